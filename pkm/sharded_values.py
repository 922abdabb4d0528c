"""A value table split along the embedding dimension across the ranks of a process group.

Each of the P ranks of ``group`` holds all ``num_rows`` rows and a contiguous column slice
``[col_start, col_end)`` of the full ``[num_rows, dim]`` table ("Memory Layers at Scale", Meta 2024).
When ``dim % P != 0`` the first ``dim % P`` ranks hold one column more (see ``column_bounds``).

Forward (every rank calls it, each with its own tokens, T_r >= 0 of them):

1. all-gather every rank's (indices, weights) (small: T*K ids and weights, never activations of
   width dim), each rank's block padded to one size. With a ``token_capacity`` C (the most tokens a
   rank can have, e.g. micro-batch size x sequence length, known on the host and the same on every
   rank) every block is C rows and nothing else is exchanged: no split size has to be read on the
   host, so the step never waits for the device here. Padded slots get weight 0 and the index of a
   real lookup (``_fill_padding``), so they add exact zeros and touch no extra row. When every rank
   has C tokens (``packing: full``) nothing is padded and the bytes are those of the exact exchange.
   Without a capacity the token counts are all-gathered first and read on the host (one host sync
   per lookup), and blocks are cut to the longest rank;
2. weighted bag over the local column slice for *all* gathered tokens -> [sum_r T_r, d_local];
3. all-to-all so each rank receives its own tokens' rows from every column holder, and concatenates
   the column slices -> [T_r, dim].

Backward mirrors it: the output grad's column slices go to their holders (all-to-all), each rank
accumulates the row-sparse value grad of its slice summed over *all* ranks' tokens, and the partial
weight grads (dots over the local columns) are sent back to the token owners and summed there.

The lookup is a collective: every rank of the group must call forward (and backward, when the graph
needs it) the same number of times and in the same order, also a rank with zero tokens. The math is
the local table's (``weighted_bag`` and ``lookup_backward`` from ``pkm.values``, Triton kernels on
CUDA); the same code runs on gloo (CPU tensors) and NCCL (CUDA tensors): only
``all_gather_single``/``all_gather_into_tensor`` and ``all_to_all_single`` with split sizes are used.
Give the tables a group of their own (``dist.new_group(ranks)``, even when the ranks are the whole
world): the engine's gradient reductions run on WORLD from backward hooks, and a separate
communicator keeps the two streams of collectives from interleaving differently on different ranks.
With P = 1 no collective is issued at all and the table behaves exactly like the local one.

Gradient scale versus data-parallel dense parameters
----------------------------------------------------
With the usual data-parallel recipe every rank r backpropagates its own loss L_r and the dense grads
are *averaged* over ranks, i.e. the step follows the gradient of  L = (1/P) * sum_r L_r.  A shard's
value grad, however, collects the contributions of all ranks' tokens: it is  sum_r dL_r/dV.  To follow
the same L the shard grad must be multiplied by 1/P.  ``grad_reduction="mean"`` (the default) applies
that factor inside backward; ``"sum"`` leaves the raw sum (the gradient of sum_r L_r, as the local
table would give for the concatenated batch).  ``data_parallel_grad_scale(group)`` returns the factor
for callers that scale by hand.  This assumes the sharding group *is* the data-parallel group; if the
table were replicated across several sharding groups, the replicas' grads would also need an
all-reduce over the replica group (not done here).  Gradient accumulation (the engine divides the
loss by the number of micro-batches) and an fp16 loss scale act on the value grads exactly as on the
dense grads, because they flow from the same loss; un-scaling the fp16 loss scale is the trainer's job
(``scale_grad_``).

Trainer use (every rank, before any optimizer or the DeepSpeed engine is built; the model is built
without value tables, so no rank ever allocates a full one, and the shards never reach the engine)::

    model = BertPkmForMaskedLM(config, external_values=True)         # memories without tables
    group = dist.new_group(list(range(dist.get_world_size())))      # the tables' own communicator
    tables = attach_sharded_values(model, group, seed=seed,          # {module path: shard}, "mean"
                                   token_capacity=B * S)             # fixed-size exchange (packing "full")
    value_opt = SparseAdam(list(tables.values()), lr=1e-3)
    ...  engine.backward(loss); engine.step(); value_opt.step()      # value_opt.step zeroes the grads
    save_value_shards(folder, tables, value_opt)                     # pkm.checkpoint_values
    load_value_shards(folder, tables, value_opt)                     # any saved P, any current P
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from pkm.memory import ProductKeyMemory
from pkm.values import (
    ValueTable,
    lookup_backward,
    weighted_bag,
)

__all__ = [
    "ShardedValueTable",
    "column_bounds",
    "data_parallel_grad_scale",
    "attach_sharded_values",
]

GradReduction = Literal["mean", "sum"]
_GRAD_REDUCTIONS = ("mean", "sum")


def column_bounds(dim: int, world_size: int) -> list[tuple[int, int]]:
    """Column slice [start, end) of each rank: the first ``dim % world_size`` ranks get one more."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}.")
    if dim < world_size:
        raise ValueError(
            f"cannot shard a value dim of {dim} over {world_size} ranks: every rank needs at least "
            f"one column (use fewer ranks for the value tables or a larger value dim)."
        )
    base, extra = divmod(dim, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        width = base + (1 if r < extra else 0)
        bounds.append((start, start + width))
        start += width
    return bounds


def data_parallel_grad_scale(group: dist.ProcessGroup | None = None) -> float:
    """Factor that turns a shard's grad (sum over all ranks' tokens) into the gradient of the
    mean of the per-rank losses, the objective data-parallel dense grads follow: 1 / P."""
    return 1.0 / dist.get_world_size(group)


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # torch >= 2.13 renamed all_gather_into_tensor (the old name warns); both exist on gloo and NCCL.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _fill_padding(all_idx: torch.Tensor) -> torch.Tensor:
    """Give the padded slots (index -1, weight 0) of a fixed-capacity exchange an index that writes
    nothing: the row of the first real lookup in the gathered buffer. Its weight 0 adds +0 to that
    row's output, and its zero output grad adds +0 to that row's value grad; the row is in the
    sparse grad anyway, so the set of touched rows (what SparseAdam and the staleness tracker see)
    is exactly that of the real lookups. Device ops only: nothing waits for the host. (If no rank
    has a single token, row 0 stands in and would receive a zero gradient.)"""
    flat = all_idx.reshape(-1)  # [P * C * K]
    real = flat >= 0
    first = real.to(torch.int8).argmax().reshape(1)  # first real lookup (argmax takes the first maximum)
    fill = flat.index_select(0, first).clamp_min(0)  # [1]
    return torch.where(real, flat, fill).view_as(all_idx)


class _ShardedLookup(torch.autograd.Function):
    """Collective weighted lookup; see the module docstring for the communication pattern.

    Two exchanges: with a ``token_capacity`` every rank's tokens travel padded to that fixed count
    (no split size has to reach the host); without one, the token counts are all-gathered and read
    on the host first (``_Layout`` holds which of the two a call used)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, indices: torch.Tensor, table: "ShardedValueTable",
                anchor: torch.Tensor | None) -> torch.Tensor:  # noqa: ARG004 (anchor: see ValueTable.forward)
        num_tokens = indices.shape[0]
        layout = table._layout(num_tokens)  # same on every rank
        ctx.table, ctx.layout = table, layout
        if layout.total == 0:
            # Every rank has zero tokens (same decision everywhere, so no rank waits on a collective).
            ctx.save_for_backward(indices.new_zeros(0, indices.shape[1]), weights.new_zeros(0, indices.shape[1]))
            return weights.new_zeros(0, table.dim)
        all_idx, all_w = table._gather_tokens(indices, weights, layout)  # [sum T (or P*C), K] each
        ctx.save_for_backward(all_idx, all_w)
        bag = weighted_bag(table.weight.detach(), all_idx, all_w, triton=table.triton)  # [sum T, d_local]
        return table._columns_to_owners(bag, layout, num_tokens)  # [T, dim]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table: ShardedValueTable = ctx.table
        layout: _Layout = ctx.layout
        all_idx, all_w = ctx.saved_tensors
        num_tokens = grad_out.shape[0]
        if layout.total == 0:
            return grad_out.new_zeros(0, all_idx.shape[1]), None, None, None
        g_local = table._owners_to_columns(grad_out, layout)  # [sum T, d_local]
        # value grad of the slice over all ranks' tokens, and the partial weight grads [sum T, K] fp32
        # (dots over the local columns), from one sort of the lookups
        grad, partial = lookup_backward(table.weight.detach(), all_idx, all_w, g_local, triton=table.triton)
        if table.grad_scale != 1.0:
            grad.values.mul_(table.grad_scale)
        table.accumulate_grad_(grad)
        grad_weights = table._partials_to_owners(partial, layout, num_tokens)  # [T, K] fp32
        return grad_weights.to(all_w.dtype), None, None, None


class _Layout(NamedTuple):
    """How one lookup's tokens are laid out in the exchanged buffers, the same on every rank.

    ``counts``: every rank's token count, read on the host (the counts exchange), or None with a
    fixed capacity: then every rank's block holds exactly ``capacity`` rows, its own tokens first
    and padding after them. ``total``: rows in the gathered buffers (0 only when no rank has a
    token, which only the counts exchange can know)."""

    counts: list[int] | None
    capacity: int
    total: int

    def block_sizes(self, world_size: int) -> list[int]:
        """Rows of each rank's block in the gathered buffers."""
        return list(self.counts) if self.counts is not None else [self.capacity] * world_size


class ShardedValueTable(ValueTable):
    """Value table sharded by columns over ``group``; same interface as ``ValueTable``.

    ``weight`` is the local fp32 shard [num_rows, col_end - col_start] (requires_grad=False);
    ``sparse_grad`` is the row-sparse grad of that shard, summed over all ranks' tokens and multiplied
    by ``grad_scale`` (1/P for ``grad_reduction="mean"``, 1 for ``"sum"``). ``forward`` returns the
    calling rank's own tokens at full width ``dim``. ``grad_sq_norm`` is local to the shard: the
    global squared norm is the sum over the group (``pkm.value_step.global_grad_norm`` does that all-reduce).

    ``init="normal"`` draws each column from its own generator seeded by (seed, column), so the full
    table is the same for every P (a 2-rank and a 3-rank run start from identical values).
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        group: dist.ProcessGroup | None = None,
        init: str = "normal",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        grad_reduction: GradReduction = "mean",
        seed: int = 0,
        token_capacity: int | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not ValueTable.__init__: it would allocate the full table
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"ShardedValueTable needs positive num_rows and dim, got {num_rows} x {dim}.")
        if init not in ("normal", "zeros"):
            raise ValueError(f"value init must be one of ('normal', 'zeros'), got {init!r}.")
        if grad_reduction not in _GRAD_REDUCTIONS:
            raise ValueError(f"grad_reduction must be one of {_GRAD_REDUCTIONS}, got {grad_reduction!r}.")
        if token_capacity is not None and (isinstance(token_capacity, bool) or not isinstance(token_capacity, int)
                                           or token_capacity <= 0):
            raise ValueError(f"token_capacity must be a positive integer or None, got {token_capacity!r}.")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ShardedValueTable needs an initialised torch.distributed process group.")
        if group is not None and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("this rank is not a member of the process group given to ShardedValueTable.")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds = column_bounds(dim, self.world_size)
        self.num_rows = num_rows
        self.dim = dim
        self.col_start, self.col_end = self.bounds[self.rank]
        self.init = init
        self.seed = seed
        self.grad_reduction = grad_reduction
        self.grad_scale = 1.0 / self.world_size if grad_reduction == "mean" else 1.0
        # the most tokens a rank passes to one lookup, the same on every rank (None: exchange counts)
        self.token_capacity = token_capacity
        if dtype != torch.float32:
            raise ValueError(f"value tables hold fp32 master weights, got dtype {dtype}.")
        if device is None and dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        self.weight = nn.Parameter(
            torch.empty(num_rows, self.col_end - self.col_start, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.sparse_grad = None
        # bytes this rank sent, per direction (benchmarks and logging read it; reset freely)
        self.comm_bytes = {"forward": 0, "backward": 0}
        self.reset_parameters()

    # -- construction helpers ---------------------------------------------------------------------

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "zeros":
                self.weight.zero_()
                return
            std = 1.0 / math.sqrt(self.dim)  # Lample: d^-0.5 with d the full value dim
            gen = torch.Generator(device="cpu")
            for j, col in enumerate(range(self.col_start, self.col_end)):
                gen.manual_seed(self.seed * 1_000_003 + col)
                column = torch.randn(self.num_rows, generator=gen, dtype=torch.float32) * std
                self.weight[:, j].copy_(column.to(self.weight.device))

    @classmethod
    def from_full(
        cls,
        full_weight: torch.Tensor,
        group: dist.ProcessGroup | None = None,
        grad_reduction: GradReduction = "mean",
        device: torch.device | str | None = None,
        token_capacity: int | None = None,
    ) -> "ShardedValueTable":
        """Shard of a full [num_rows, dim] tensor that every rank holds (e.g. a ``ValueTable``'s
        weight after identical model construction); copies only this rank's columns. The shard is
        not a submodule, so ``model.to()`` does not move it: ``device`` defaults to the current CUDA
        device on NCCL and to the full tensor's device otherwise."""
        if full_weight.dim() != 2:
            raise ValueError(f"a full value weight must be 2-D [num_rows, dim], got {tuple(full_weight.shape)}.")
        num_rows, dim = full_weight.shape
        if device is None and dist.get_backend(group) != "nccl":
            device = full_weight.device  # NCCL: the constructor picks the current CUDA device
        table = cls(num_rows, dim, group=group, init="zeros", device=device, grad_reduction=grad_reduction,
                    token_capacity=token_capacity)
        with torch.no_grad():
            table.weight.copy_(full_weight[:, table.col_start : table.col_end].to(torch.float32))
        return table

    # -- lookup -----------------------------------------------------------------------------------

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices [T, K], weights [T, K] (this rank's tokens, T may be 0) -> [T, dim] in weights.dtype.

        Collective over ``group``: every rank must call it, in the same order."""
        self._check_lookup(indices, weights)
        dev = self.weight.device
        # As in ValueTable.forward: the values need a gradient even when `weights` does not (a frozen
        # query net and keys); the zero-size anchor makes autograd record the lookup whenever grad is on.
        anchor = None
        if torch.is_grad_enabled() and not weights.requires_grad:
            anchor = torch.empty(0, device=dev, requires_grad=True)
        return _ShardedLookup.apply(weights.to(dev), indices.to(device=dev, dtype=torch.int64), self, anchor)

    # -- communication (each helper is one collective or two; shapes in comments) -------------------

    # With P = 1 every helper is the identity (no collective, no host sync): the plain local table.

    def _layout(self, num_tokens: int) -> _Layout:
        """Where every rank's tokens sit in this lookup's exchanged buffers (the same on every rank)."""
        if self.world_size == 1:
            return _Layout([num_tokens], num_tokens, num_tokens)
        capacity = self.token_capacity
        if capacity is not None:
            if num_tokens > capacity:
                raise ValueError(
                    f"a sharded value lookup got {num_tokens} tokens but the table's token_capacity is {capacity} "
                    "(the fixed number of rows every rank sends, set from micro-batch size x max_seq_len): raise "
                    "token_capacity, or set it to None to exchange the token counts instead.")
            return _Layout(None, capacity, capacity * self.world_size)
        counts = self._gather_counts(num_tokens)
        return _Layout(counts, max(counts), sum(counts))

    def _gather_counts(self, num_tokens: int) -> list[int]:
        mine = torch.tensor([num_tokens], dtype=torch.int64, device=self.weight.device)  # [1]
        counts = torch.empty(self.world_size, dtype=torch.int64, device=self.weight.device)  # [P]
        _all_gather_flat(counts, mine, self.group)
        self.comm_bytes["forward"] += 8 * (self.world_size - 1)
        return counts.tolist()  # one host sync per lookup: the split sizes must be known on the host

    def _gather_tokens(
        self, indices: torch.Tensor, weights: torch.Tensor, layout: _Layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's (indices, weights), concatenated in rank order -> [sum T, K] each (with a
        fixed capacity: [P * C, K], padding included, see ``_fill_padding``)."""
        if self.world_size == 1:
            return indices, weights
        P, k, rows = self.world_size, indices.shape[1], layout.capacity
        if self.num_rows <= torch.iinfo(torch.int32).max:
            indices = indices.to(torch.int32)  # a third less traffic than int64 ids; widened below
        # all_gather needs equal sizes: pad to the block size (the longest rank, or the capacity);
        # padded slots get weight 0 and index -1 (marks them for _fill_padding)
        pad = rows - indices.shape[0]
        idx = torch.nn.functional.pad(indices, (0, 0, 0, pad), value=-1) if pad else indices  # [rows, K]
        w = torch.nn.functional.pad(weights, (0, 0, 0, pad)) if pad else weights  # [rows, K]
        all_idx = idx.new_empty(P * rows, k)  # [P * rows, K]
        all_w = w.new_empty(P * rows, k)  # [P * rows, K]
        _all_gather_flat(all_idx, idx.contiguous(), self.group)
        _all_gather_flat(all_w, w.contiguous(), self.group)
        self.comm_bytes["forward"] += (P - 1) * rows * k * (idx.element_size() + w.element_size())
        all_idx = all_idx.to(torch.int64)
        if layout.counts is None:
            return _fill_padding(all_idx), all_w  # [P * C, K] each
        counts = layout.counts
        if min(counts) == rows:
            return all_idx, all_w
        keep = torch.cat([torch.arange(c, device=idx.device) + p * rows for p, c in enumerate(counts)])
        return all_idx[keep], all_w[keep]  # [sum T, K] each

    def _columns_to_owners(self, bag: torch.Tensor, layout: _Layout, num_tokens: int) -> torch.Tensor:
        """bag [sum T, d_local] (rows of all ranks' tokens, local columns) -> [T, dim] for this rank."""
        if self.world_size == 1:
            return bag
        width = self.col_end - self.col_start
        blocks = layout.block_sizes(self.world_size)
        mine = blocks[self.rank]  # T, or the capacity (own tokens first, then padding)
        send = bag.reshape(-1)  # [sum T * d_local]: rank p's tokens are a contiguous block
        recv_sizes = [mine * (e - s) for s, e in self.bounds]  # from each column holder
        recv = bag.new_empty(sum(recv_sizes))  # [T * dim]
        dist.all_to_all_single(
            recv, send, output_split_sizes=recv_sizes,
            input_split_sizes=[c * width for c in blocks], group=self.group,
        )
        self.comm_bytes["forward"] += (sum(blocks) - mine) * width * bag.element_size()
        parts = [b.view(mine, e - s)[:num_tokens] for b, (s, e) in zip(recv.split(recv_sizes), self.bounds)]
        return torch.cat(parts, dim=1)  # [T, dim]

    def _owners_to_columns(self, grad_out: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """grad_out [T, dim] of this rank's tokens -> [sum T, d_local]: all tokens, local columns."""
        if self.world_size == 1:
            return grad_out
        width = self.col_end - self.col_start
        blocks = layout.block_sizes(self.world_size)
        mine = blocks[self.rank]
        if mine > grad_out.shape[0]:  # padding rows carry a zero gradient
            grad_out = torch.nn.functional.pad(grad_out, (0, 0, 0, mine - grad_out.shape[0]))  # [C, dim]
        # column slice q goes to rank q: [T, d_q] blocks, flattened and laid end to end
        send = torch.cat([grad_out[:, s:e].reshape(-1) for s, e in self.bounds])  # [T * dim]
        send_sizes = [mine * (e - s) for s, e in self.bounds]
        recv = grad_out.new_empty(sum(blocks) * width)  # [sum T * d_local]
        dist.all_to_all_single(
            recv, send, output_split_sizes=[c * width for c in blocks],
            input_split_sizes=send_sizes, group=self.group,
        )
        self.comm_bytes["backward"] += (sum(send_sizes) - send_sizes[self.rank]) * grad_out.element_size()
        return recv.view(sum(blocks), width)

    def _partials_to_owners(self, partial: torch.Tensor, layout: _Layout, num_tokens: int) -> torch.Tensor:
        """partial [sum T, K] (dots over local columns) -> [T, K]: summed over column holders."""
        if self.world_size == 1:
            return partial
        k = partial.shape[1]
        blocks = layout.block_sizes(self.world_size)
        mine = blocks[self.rank]
        recv = partial.new_empty(self.world_size * mine * k)  # [P * T * K]
        dist.all_to_all_single(
            recv, partial.contiguous().reshape(-1), output_split_sizes=[mine * k] * self.world_size,
            input_split_sizes=[c * k for c in blocks], group=self.group,
        )
        self.comm_bytes["backward"] += (sum(blocks) - mine) * k * partial.element_size()
        return recv.view(self.world_size, mine, k)[:, :num_tokens].sum(0)  # [T, K]

    # -- inspection ---------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, dim={self.dim}, cols=[{self.col_start}, {self.col_end}), "
            f"rank={self.rank}/{self.world_size}, grad_reduction={self.grad_reduction}"
        )


def attach_sharded_values(
    memories: nn.Module | Iterable[tuple[str, ProductKeyMemory]],
    group: dist.ProcessGroup | None = None,
    grad_reduction: GradReduction = "mean",
    device: torch.device | str | None = None,
    seed: int = 0,
    token_capacity: int | None = None,
) -> dict[str, ShardedValueTable]:
    """Hand every product-key memory its value table's column shard, made on this rank only.

    ``memories``: a model (every ProductKeyMemory in it, named by its module path) or an iterable of
    (name, memory); each must have been built with ``external_values=True`` (a memory that owns a
    full table is refused: that table would be allocated on every rank). Each shard is initialised as
    its memory's ``value_init`` says; for "normal", every column comes from its own generator seeded
    by (``seed * 1000 + i`` for the i-th memory, column), so the full table is the same for any number
    of ranks. ``token_capacity``: the most tokens a rank passes to one lookup (e.g. micro-batch size x
    sequence length), the same on every rank; with it the lookups exchange fixed-size buffers and
    never read a token count on the host (see the module docstring). Returns {memory name: shard} in
    order, for ``SparseAdam(list(tables.values()))`` and ``save_value_shards``. The shards are not submodules, so an engine wrapping the model never sees
    them. Collective: every rank of ``group`` calls it with the same memories.
    """
    if isinstance(memories, nn.Module):
        named = [(n, m) for n, m in memories.named_modules() if isinstance(m, ProductKeyMemory)]
    else:
        named = list(memories)
    if not named:
        raise ValueError("found no product-key memory to give a sharded value table.")
    owning = [name or "<root>" for name, memory in named if memory.owns_values]
    if owning:
        raise ValueError(
            f"memories {owning} own full value tables: build the model with external_values=True so "
            "that no rank allocates a full table."
        )
    tables: dict[str, ShardedValueTable] = {}
    for i, (name, memory) in enumerate(named):
        table = ShardedValueTable(
            memory.size, memory.output_dim, group=group, init=memory.value_init, device=device,
            grad_reduction=grad_reduction, seed=seed * 1000 + i, token_capacity=token_capacity,
        )
        memory.attach_values(table)
        tables[name] = table
    return tables
