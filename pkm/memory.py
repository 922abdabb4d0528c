"""Product-key memory layer (Lample et al. 2019), vectorised over tokens and heads.

Per token x: q = Norm(W x + b) split into H heads of k_dim; each head's query is split in halves
scored against two sub-key sets of size n (N = n^2 slots); top-k per half; the k x k candidate sums;
final top-k; softmax; output = sum over heads and the k chosen slots of w * V[slot]. All heads share
one value table and go through ONE lookup call with indices [T, H*k].

Speed (CPU, see BENCHMARKS.md): the selection runs without autograd; of the k x k candidate grid only
the ~k ln k pairs that can reach the top-k are scored; the k chosen scores are recomputed as
differentiable gather-dots with the picked sub-keys, so no dense [H*2, T, n] score gradient is built;
the value lookup is a fused weighted bag with a row-sparse gradient (pkm/values.py).

GPU: the value path and the sub-key dots run Triton kernels (pkm/triton_kernels.py). The selection
(two top-k, the candidate sums, a third top-k) can run as one Triton kernel too
(``triton_kernels.product_topk``); it is off until measured on a GPU: ``PKM_FUSED_TOPK=1`` or a
memory's ``fused_topk = True`` turns it on (see ``fused_topk_enabled``).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pkm.memory_config import MemoryConfig
from pkm.values import ValueTable, dense_row_grad, triton_enabled, weighted_bag, weighted_bag_weights_grad

__all__ = ["MemoryOutput", "ProductKeyMemory", "QueryBatchNorm", "average_batchnorm_statistics",
           "fused_topk_enabled", "product_key_topk"]


class MemoryOutput(NamedTuple):
    """What the memory's forward returns.

    A NamedTuple, not a dataclass: engines that hook a module's outputs to drive backward (DeepSpeed
    ZeRO-3 re-gathers partitioned parameters from a hook on the returned tensors) find tensors only
    inside tensors, tuples, lists and dicts; in a dataclass the hook never fires and backward fails.
    Immutable: build a new one (``mo._replace(...)``) instead of assigning a field.
    """

    output: torch.Tensor | None  # same leading shape as x, last dim = output_dim (None in metric copies)
    indices: torch.Tensor  # [T, heads, knn] int64, T = number of real (non-padded) tokens
    weights: torch.Tensor  # [T, heads, knn] softmax weights (activation dtype)


class QueryBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that computes in fp32 (or wider) and returns the input's dtype.

    Mixed-precision engines (DeepSpeed bf16/fp16) cast every parameter but no buffer, leaving bf16
    input and affine parameters beside fp32 running statistics, a mix ``F.batch_norm`` rejects; and
    statistics of bf16 activations lose precision anyway. So input and affine parameters are cast up,
    the running statistics stay in their own (fp32) buffers and are updated exactly. Same parameters,
    buffers and state_dict keys as ``nn.BatchNorm1d``. Padding is handled by the caller, which passes
    only the real tokens.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # same bookkeeping as nn.BatchNorm's forward
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_stats = not self.training or self.track_running_stats
        mean = self.running_mean if pass_stats else None
        var = self.running_var if pass_stats else None

        compute = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        if mean is not None:
            compute = torch.promote_types(compute, mean.dtype)
        # Buffers of another dtype (a model cast as a whole, e.g. .half()) are computed on in a copy
        # and written back, so the update is never lost.
        stats_cast = mean is not None and (mean.dtype != compute or var.dtype != compute)
        mean_c = mean.to(compute) if stats_cast else mean
        var_c = var.to(compute) if stats_cast else var
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        out = F.batch_norm(
            x.to(compute), mean_c, var_c, weight, bias, use_batch_stats, factor, self.eps
        )  # [T, C] in the compute dtype
        if stats_cast and self.training and self.track_running_stats:
            with torch.no_grad():
                mean.copy_(mean_c)
                var.copy_(var_c)
        return out.to(x.dtype)


def average_batchnorm_statistics(model: nn.Module, group=None) -> int:
    """Set every BatchNorm's running mean and variance in ``model`` to their mean over the ranks of
    ``group`` (collective: every rank calls it with the same model). Returns the number of layers.

    Data-parallel engines keep the buffers apart: DeepSpeed broadcasts parameters once and buffers
    never, so each rank's running statistics follow its own batches. Training never reads them (it
    normalises by batch statistics); evaluation and checkpoints do, so the trainer averages before
    both. Because the running update is affine in the statistics (r <- (1 - m) r + m b_r), the
    mean over ranks taken at any step equals the mean of the ranks' own running statistics at that
    step, wherever earlier averages were taken: a resumed run (whose checkpoint held the mean)
    evaluates as the uninterrupted one. The sum is taken in float64, where P float32 values add
    exactly, so the result does not depend on the reduction order and equal inputs stay unchanged.
    ``num_batches_tracked`` is the same on every rank (every rank runs the same forwards)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.running_mean is not None and m.running_var is not None]
    if not layers:
        return 0
    stats = [b for m in layers for b in (m.running_mean, m.running_var)]
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in stats])  # [sum of sizes], one all-reduce
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    with torch.no_grad():
        for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(mean.view_as(b))
    return len(layers)


@functools.lru_cache(maxsize=32)
def _candidate_pairs(knn: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) with (a + 1) * (b + 1) <= knn.

    With both halves' top-k sorted descending, pair (a, b) is beaten or tied by the (a + 1) * (b + 1)
    pairs (a' <= a, b' <= b), so a pair outside this set can never be needed for the top-k of
    s1[a] + s2[b]: ~k ln k candidates instead of the full k x k grid (119 instead of 1024 at k = 32).
    """
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    pa = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
    pb = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
    return pa, pb


def fused_topk_enabled(tensor: torch.Tensor, flag: bool | None = None) -> bool:
    """Whether the selection runs as one Triton kernel for ``tensor``.

    ``flag`` is a memory's ``fused_topk`` attribute: ``None`` (default) = on for CUDA tensors only
    when ``PKM_FUSED_TOPK=1`` (not yet the default: it has not been measured on a GPU); ``False`` =
    never; ``True`` = always (on CPU tensors only under Triton's interpreter, as ``triton_enabled``).
    """
    if flag is None and os.environ.get("PKM_FUSED_TOPK", "0").strip() != "1":
        return False
    return triton_enabled(tensor, flag)


def product_key_topk(
    query: torch.Tensor, keys: torch.Tensor, knn: int, triton: bool | None = None,
    fused_topk: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``knn`` product keys per token and head.

    query [T, H, k_dim], keys [H, 2, n, k_dim/2]  ->  (scores [T, H, knn], indices [T, H, knn]),
    scores sorted descending, indices in [0, n^2) as ``i1 * n + i2``.
    The top-k of s1[a] + s2[b] always lies in top-k(s1) x top-k(s2) (and, with both sorted, among the
    pairs with (a + 1)(b + 1) <= k), so this equals scoring all n^2. ``triton`` selects the kernels of
    the picked-score gather-dots as in ``pkm.values.triton_enabled``; ``fused_topk`` the one-kernel
    selection (``fused_topk_enabled``), which orders equal scores by the lower sub-key and slot.
    """
    t, h, k_dim = query.shape
    n = keys.shape[2]
    half = k_dim // 2
    q = query.reshape(t, h * 2, half).transpose(0, 1)  # [H*2, T, half]
    keys_flat = keys.reshape(h * 2 * n, half)  # [H*2*n, half]: sub-key set s = 2*head + half
    with torch.no_grad():
        # Selection needs no autograd (only the k chosen scores are differentiated, below), so no
        # [H*2, T, n] score gradient is ever built.
        # one batched matmul for both halves of all heads: [H*2, T, half] x [H*2, half, n]
        sub = torch.bmm(q.detach(), keys.detach().reshape(h * 2, n, half).transpose(1, 2).to(q.dtype))
        if fused_topk_enabled(sub, fused_topk):
            from pkm import triton_kernels

            indices = triton_kernels.product_topk(sub, knn)  # [H, T, knn]
            i1, i2 = indices // n, indices % n
        else:
            indices, i1, i2 = _select_torch(sub.view(h, 2, t, n), knn)
        del sub
        # rows of keys_flat picked per (token, sub-key set), token-major so that the query rows
        # are a plain view of `query`: [H, 2, T, knn] -> [T, H, 2, knn] -> [T*H*2, knn]
        set_offset = (torch.arange(h * 2, device=query.device) * n).view(1, h, 2, 1)
        pick = (torch.stack([i1, i2], dim=1).permute(2, 0, 1, 3) + set_offset).reshape(t * h * 2, knn)
    # differentiable scores of the chosen slots, <q1, K1[i1]> + <q2, K2[i2]>, as k gather-dots per
    # (token, sub-key set): gradients touch only the picked sub-keys, never a dense [H*2, T, n] grad
    dots = _PickedDots.apply(query.reshape(t * h * 2, half), keys_flat, pick, triton)  # [T*H*2, knn]
    dots = dots.view(t, h, 2, knn)
    scores = dots[:, :, 0] + dots[:, :, 1]  # [T, H, knn], sorted descending up to rounding
    return scores, indices.transpose(0, 1)  # [T, H, knn]


def _select_torch(sub: torch.Tensor, knn: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection as torch ops: sub [H, 2, T, n] -> (indices, i1, i2), each [H, T, knn]."""
    n = sub.shape[-1]
    sub_scores, sub_idx = sub.topk(knn, dim=-1)  # [H, 2, T, knn] each, sorted descending
    pa, pb = _candidate_pairs(knn, sub.device)  # [P] each, P ~ knn * ln(knn) (119 for k=32)
    cand = sub_scores[:, 0][..., pa] + sub_scores[:, 1][..., pb]  # [H, T, P]
    best = cand.topk(knn, dim=-1)[1]  # [H, T, knn] position in the pair list
    del cand
    a, b = pa[best], pb[best]  # [H, T, knn] rank in half-1 / half-2 top-k
    i1 = sub_idx[:, 0].gather(-1, a)  # [H, T, knn] sub-key id in half 1
    i2 = sub_idx[:, 1].gather(-1, b)  # [H, T, knn] sub-key id in half 2
    return i1 * n + i2, i1, i2


class _PickedDots(torch.autograd.Function):
    """out[r, j] = <rows[r], table[pick[r, j]]> with gradients for both rows and table.

    The same gather-dot / weighted-bag kernels as the value lookup (computed in fp32), here over the
    small sub-key table: forward = per-sample-weights grad kernel, d rows = weighted bag of table rows,
    d table = coalesced weighted bag of rows grouped by picked sub-key (densified: the table is small).
    """

    @staticmethod
    def forward(
        ctx, rows: torch.Tensor, table: torch.Tensor, pick: torch.Tensor, triton: bool | None
    ) -> torch.Tensor:
        rows32, table32 = rows.float(), table.float()
        ctx.save_for_backward(rows32, table32, pick)
        ctx.dtypes = rows.dtype, table.dtype
        ctx.triton = triton
        out = weighted_bag_weights_grad(table32, pick, rows32, sort_rows=False, triton=triton)  # [R, knn] fp32
        return out.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows32, table32, pick = ctx.saved_tensors
        rows_dtype, table_dtype = ctx.dtypes
        g = grad_out.float()  # [R, knn]
        grad_rows = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_rows = weighted_bag(table32, pick, g, triton=ctx.triton).to(rows_dtype)  # [R, half]
        if ctx.needs_input_grad[1]:
            grad_table = dense_row_grad(pick, g, rows32, table32.shape[0], triton=ctx.triton)  # [H*2*n, half]
            grad_table = grad_table.to(table_dtype)
        return grad_rows, grad_table, None, None


class _ExternalTable(NamedTuple):
    """A reference to a value table kept outside the module tree (a plain attribute value, which
    ``nn.Module.__setattr__`` does not register as a submodule)."""

    table: ValueTable | None


class ProductKeyMemory(nn.Module):
    """Product-key memory: query net -> product-key top-k -> softmax -> weighted value sum."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        n_keys: int = 512,
        heads: int = 4,
        knn: int = 32,
        k_dim: int = 256,
        query_norm: str = "batchnorm",
        value_init: str = "normal",
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        external_values: bool = False,
    ) -> None:
        """``external_values=True``: build no value table; one is handed in with ``attach_values``
        (a column shard made on this rank only, held outside the module tree)."""
        super().__init__()
        if min(input_dim, output_dim) <= 0:
            raise ValueError(f"ProductKeyMemory dims must be positive, got {input_dim} -> {output_dim}.")
        # the memory's own settings follow MemoryConfig's rules (their one home)
        MemoryConfig(n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, query_norm=query_norm,
                     value_init=value_init, input_dropout=input_dropout, query_dropout=query_dropout,
                     value_dropout=value_dropout)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.n_keys = n_keys
        self.heads = heads
        self.knn = knn
        self.k_dim = k_dim
        self.size = n_keys * n_keys
        self.input_dropout = input_dropout
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout
        self.value_init = value_init

        # query network: Linear -> Norm over H*k_dim features (real tokens only)
        self.query_proj = nn.Linear(input_dim, heads * k_dim)
        self.query_norm = (
            QueryBatchNorm(heads * k_dim) if query_norm == "batchnorm" else nn.LayerNorm(heads * k_dim)
        )
        # two sub-key sets per head: [H, 2, n, k_dim/2]
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        # the value table [N, output_dim]: a submodule ("values", in the state_dict) when the
        # memory owns it; an external one is only referenced (see attach_values)
        if not external_values:
            self.values = ValueTable(self.size, output_dim, init=value_init)
        self._attached = _ExternalTable(None)
        # the one-kernel selection on GPUs: None = PKM_FUSED_TOPK decides (see fused_topk_enabled)
        self.fused_topk: bool | None = None
        self.reset_keys()

    @classmethod
    def from_config(
        cls, input_dim: int, output_dim: int, memory: MemoryConfig, external_values: bool = False
    ) -> "ProductKeyMemory":
        """The layer for ``memory`` (``layers`` and ``mode`` are the model's business)."""
        return cls(
            input_dim, output_dim, n_keys=memory.n_keys, heads=memory.heads, knn=memory.knn,
            k_dim=memory.k_dim, query_norm=memory.query_norm, value_init=memory.value_init,
            input_dropout=memory.input_dropout, query_dropout=memory.query_dropout,
            value_dropout=memory.value_dropout, external_values=external_values,
        )

    def reset_keys(self) -> None:
        # Lample: uniform in +-1/sqrt(half dim)
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        with torch.no_grad():
            self.keys.uniform_(-bound, bound)

    # -- value table plumbing ---------------------------------------------------------------------

    @property
    def owns_values(self) -> bool:
        """True when the table is this module's own submodule (built with external_values=False)."""
        return "values" in self._modules

    def attach_values(self, table: ValueTable) -> None:
        """Hand in the value table of a memory built with ``external_values=True``, e.g. this rank's
        ``ShardedValueTable``. It is referenced, not registered: not a submodule, not in
        ``parameters()`` or the state_dict, so an engine wrapping the model (DeepSpeed) never
        broadcasts, casts or partitions it; its owner (the trainer) optimises and saves it."""
        if self.owns_values:
            raise ValueError(
                "this memory owns its value table; build it with external_values=True to hand one in."
            )
        if table.num_rows != self.size or table.dim != self.output_dim:
            raise ValueError(
                f"value table is {table.num_rows} x {table.dim}, this memory needs "
                f"{self.size} x {self.output_dim} (N = n_keys^2 = {self.n_keys}^2 rows)."
            )
        self._attached = _ExternalTable(table)

    @property
    def value_table(self) -> ValueTable:
        """The table lookups go to: the own one, or the attached one."""
        if self.owns_values:
            return self._modules["values"]  # type: ignore[return-value]
        if self._attached.table is None:
            raise ValueError(
                "this memory was built with external_values=True and has no value table yet: hand "
                "one in with attach_values (pkm.sharded_values.attach_sharded_values for a model)."
            )
        return self._attached.table

    # -- forward ----------------------------------------------------------------------------------

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, input_dim] (real tokens only) -> queries [T, H, k_dim]."""
        x = F.dropout(x, p=self.input_dropout, training=self.training)
        q = self.query_norm(self.query_proj(x))  # [T, H*k_dim]; BatchNorm stats over real tokens only
        q = F.dropout(q, p=self.query_dropout, training=self.training)
        return q.view(q.shape[0], self.heads, self.k_dim)  # [T, H, k_dim]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_positions: torch.Tensor | None = None) -> MemoryOutput:
        """x [B, S, d] or [T, d]; attention_mask [B, S] (1 real, 0 pad) or None; or, instead of the
        mask, token_positions [T]: the flat (row-major) indices of the real tokens, ascending.

        Padded positions are dropped before the query net (so they never touch BatchNorm statistics)
        and get output 0. token_positions give the same tokens in the same order as the mask, without
        the host sync a boolean mask costs on a GPU (its count is only known after ``nonzero``).
        """
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"memory input has last dim {x.shape[-1]}, expected {self.input_dim}.")
        if x.dim() not in (2, 3):
            raise ValueError(f"memory input must be [B, S, d] or [T, d], got shape {tuple(x.shape)}.")
        real = None
        if token_positions is not None:
            if attention_mask is not None:
                raise ValueError("pass either attention_mask or token_positions to the memory, not both.")
            if token_positions.dim() != 1 or token_positions.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"token_positions must be a 1-D integer tensor, got shape "
                                 f"{tuple(token_positions.shape)} and dtype {token_positions.dtype}.")
            tokens = x.reshape(-1, self.input_dim).index_select(0, token_positions)  # [T, d]
        elif attention_mask is not None:
            if attention_mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input "
                    f"positions {tuple(x.shape[:-1])}."
                )
            real = attention_mask.to(torch.bool)
            tokens = x[real]  # [T, d]; T is data dependent (the contract's indices are [T, ...])
        else:
            tokens = x.reshape(-1, self.input_dim)  # [T, d]

        # T may be 0 (an all-padding batch, an empty rank): the layer still runs through the value
        # table, whose sharded version needs every rank in its collectives.
        q = self.query(tokens)  # [T, H, k_dim]
        # one kernel switch per memory: the value table's (see pkm.values.triton_enabled)
        scores, indices = product_key_topk(q, self.keys, self.knn, self.value_table.triton,
                                           self.fused_topk)  # [T, H, knn]
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)  # [T, H, knn]
        t = indices.shape[0]
        out = self.value_table(
            indices.reshape(t, self.heads * self.knn), weights.reshape(t, self.heads * self.knn)
        )  # [T, output_dim]
        out = F.dropout(out, p=self.value_dropout, training=self.training)

        if token_positions is not None:
            full = out.new_zeros(x.shape[:-1].numel(), self.output_dim).index_copy(0, token_positions, out)
            full = full.view(*x.shape[:-1], self.output_dim)  # [B, S, output_dim]
        elif real is not None:
            full = out.new_zeros(*x.shape[:-1], self.output_dim)  # [B, S, output_dim]
            full = full.index_put((real,), out)
        else:
            full = out.view(*x.shape[:-1], self.output_dim)
        return MemoryOutput(output=full, indices=indices, weights=weights)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, output_dim={self.output_dim}, n_keys={self.n_keys}, "
            f"heads={self.heads}, knn={self.knn}, k_dim={self.k_dim}"
        )
