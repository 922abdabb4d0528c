"""Value tables for product-key memory, with row-sparse gradients.

The table's weight is a plain fp32 ``nn.Parameter`` with ``requires_grad=False``: state_dict (and so
HF ``save_pretrained``) includes it, but no dense optimizer or DeepSpeed engine ever sees a gradient
for it. The lookup is a custom autograd Function whose backward

* returns the gradient for the per-lookup weights (a gather-dot of the output grad with the rows), and
* accumulates a *coalesced row-sparse* value gradient (unique sorted rows, summed) into
  ``table.sparse_grad``; memory and time scale with the rows touched, never with ``num_rows``.

The math lives in small functions (``weighted_bag``, ``weighted_bag_weights_grad``,
``row_sparse_grad``, ``merge_sparse_grads``) so a sharded table (``pkm/sharded_values.py``) can reuse
them on its column slice.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SparseGrad",
    "ValueTable",
    "weighted_bag",
    "weighted_bag_weights_grad",
    "row_sparse_grad",
    "dense_row_grad",
    "merge_sparse_grads",
    "ValueLookup",
    "GradWorkspace",
    "LookupOrder",
    "sort_lookups",
    "lookup_backward",
    "triton_enabled",
]

_MODE_SUM = 0  # embedding_bag mode id for "sum"
_VALUE_INITS = ("normal", "zeros")


class SparseGrad(NamedTuple):
    """A coalesced row-sparse gradient: each row id appears once, ids sorted ascending."""

    rows: torch.Tensor  # [U] int64, unique, sorted
    values: torch.Tensor  # [U, cols] fp32, summed gradient of those rows


# --------------------------------------------------------------------------------------------------
# Kernel selection: Triton kernels on CUDA tensors, the torch-op path (the reference) elsewhere
# --------------------------------------------------------------------------------------------------


def _triton_default() -> bool:
    return os.environ.get("PKM_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


def triton_enabled(tensor: torch.Tensor, flag: bool | None = None) -> bool:
    """Whether the value-path functions run their Triton kernel for ``tensor``.

    ``flag`` is a table's (or optimizer's) ``triton`` attribute: ``None`` (default) = automatic, i.e.
    on for CUDA tensors when Triton imports, unless ``PKM_TRITON=0``; ``False`` = never (the torch-op
    path); ``True`` = always, which on CPU tensors needs Triton's interpreter (``TRITON_INTERPRET=1``;
    the test suite uses this to check the kernels against the torch path without a GPU).
    """
    if flag is False or (flag is None and (tensor.device.type != "cuda" or not _triton_default())):
        return False
    from pkm import triton_kernels  # imported on first use: importing Triton takes a while

    if not triton_kernels.available():
        if flag:
            raise RuntimeError(f"Triton kernels were requested but Triton does not import: "
                               f"{triton_kernels.import_error()}")
        return False
    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before Triton is imported, or set the table's `triton` attribute to None/False.")
    return True


# --------------------------------------------------------------------------------------------------
# Reusable math (shared with the sharded table)
# --------------------------------------------------------------------------------------------------


def weighted_bag(
    weight: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, triton: bool | None = None
) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * weight[indices[t, k]]  ->  [T, cols] in ``weights.dtype``.

    Computed with a fused weighted embedding bag in the table's dtype (fp32), so the [T, K, cols]
    gather is never materialised and the fp32 table is never cast as a whole; only the [T, cols]
    result is cast to the activation dtype. On CUDA, a Triton kernel of the same math
    (``pkm.triton_kernels.bag_forward``; ``triton`` selects, see ``triton_enabled``).
    """
    if triton_enabled(weight, triton):
        from pkm import triton_kernels

        return triton_kernels.bag_forward(weight, indices, weights)
    out = F.embedding_bag(
        indices, weight, per_sample_weights=weights.to(weight.dtype), mode="sum"
    )  # [T, cols]
    return out.to(weights.dtype)


class LookupOrder(NamedTuple):
    """The lookups of an [T, K] index tensor grouped by row (one sort, shared by the backward)."""

    sorted_rows: torch.Tensor  # [T*K] row of each lookup, ascending
    perm: torch.Tensor  # [T*K] flat position (t * K + k) of each sorted lookup
    tokens: torch.Tensor  # [T*K] token (bag) t of each sorted lookup
    rows: torch.Tensor  # [U] distinct rows, ascending
    offsets: torch.Tensor  # [U] start of each row's group in the sorted lookups


def sort_lookups(indices: torch.Tensor) -> LookupOrder:
    """Group the lookups of indices [T, K] by row."""
    bag_size = indices.shape[1]
    # stable: ties keep token order, so per-row sums are taken in the same order every run
    sorted_rows, perm = torch.sort(indices.reshape(-1), stable=True)  # [T*K] each
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # [U], [U]
    offsets = torch.cumsum(counts, 0) - counts  # [U]
    tokens = torch.div(perm, bag_size, rounding_mode="floor")  # [T*K]
    return LookupOrder(sorted_rows, perm, tokens, rows, offsets)


def weighted_bag_weights_grad(
    weight: torch.Tensor,
    indices: torch.Tensor,
    grad_out: torch.Tensor,
    order: LookupOrder | None = None,
    sort_rows: bool = True,
    triton: bool | None = None,
) -> torch.Tensor:
    """d out / d weights: g[t, k] = <grad_out[t], weight[indices[t, k]]>  ->  [T, K] fp32.

    Uses ATen's fused per-sample-weights backward of embedding_bag (one dot per lookup reading the
    row in place), so the [T, K, cols] gather is not materialised. The dots are taken in row-sorted
    order (``order``, computed if not given): repeated rows are then read back to back from cache and
    the table is walked in ascending address order (~2.5x less time than token order at 512^2 rows),
    while the grad_out rows, [T, cols], are small enough to stay in cache. ``sort_rows=False`` skips
    the sort (for a table that fits in cache anyway, e.g. the sub-keys). On CUDA a token-major Triton
    gather-dot (``pkm.triton_kernels.gather_dots``) runs instead; the value lookup's backward uses the
    row-grouped kernel of ``lookup_backward``, which computes these dots together with the value grad.
    """
    if triton_enabled(weight, triton):
        from pkm import triton_kernels

        return triton_kernels.gather_dots(weight, indices, grad_out)
    num_bags, bag_size = indices.shape
    grad32 = grad_out.to(weight.dtype).contiguous()  # [T, cols]
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is None or num_bags == 0:
        # Portable fallback: gather-dot (materialises [T, K, cols]; only used if the op is missing).
        return torch.einsum("tkc,tc->tk", weight[indices], grad32)
    offsets = torch.arange(0, num_bags * bag_size, bag_size, device=indices.device)  # [T] (unused by sum)
    if order is None and not sort_rows:
        bag_of = torch.arange(num_bags, device=indices.device).repeat_interleave(bag_size)  # [T*K]
        return op(grad32, weight, indices.reshape(-1), offsets, bag_of, _MODE_SUM).view(num_bags, bag_size)
    if order is None:
        order = sort_lookups(indices)
    g_sorted = op(grad32, weight, order.sorted_rows, offsets, order.tokens, _MODE_SUM)  # [T*K]
    g = torch.empty_like(g_sorted)
    g[order.perm] = g_sorted  # back to token order
    return g.view(num_bags, bag_size)


class GradWorkspace:
    """A reusable [rows, cols] buffer for the row-sparse gradient.

    On CPU a fresh multi-hundred-MB tensor every backward costs more in page faults than the
    gradient math itself (glibc returns large blocks to the OS on free), so the table keeps one
    buffer, grown geometrically, and the gradient is written into a view of it. CUDA's caching
    allocator already recycles memory, so there the workspace is not used.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != device:
            self._buf = buf = torch.empty(max(rows, int(rows * 1.25)), cols, dtype=dtype, device=device)
        return buf[:rows]

    def release(self) -> None:
        self._buf = None


# rows per chunk of the CPU gradient fill: ~4 MB fp32 chunks stay in cache and in malloc's free lists
_CHUNK_ELEMENTS = 1 << 20


def row_sparse_grad(
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    workspace: GradWorkspace | None = None,
    order: LookupOrder | None = None,
    triton: bool | None = None,
) -> SparseGrad:
    """Coalesced value gradient: for each distinct row r, sum over lookups (t, k) with
    indices[t, k] == r of weights[t, k] * grad_out[t].  ->  SparseGrad with [U] rows, [U, cols] fp32.

    One sort (``order``, computed if not given) groups the lookups by row; the per-row sums are
    then a weighted embedding bag over grad_out (bags = distinct rows), so no [T*K, cols]
    intermediate is built and duplicates (within a token or across tokens) are summed. With a
    ``workspace`` on CPU the result is written chunk by chunk into the reused buffer (its ``values``
    then alias the workspace until the next backward). On CUDA the row-grouped Triton kernel runs.
    """
    if order is None:
        order = sort_lookups(indices)
    if triton_enabled(grad_out, triton):
        g = grad_out.contiguous()  # also stands in for the table, which is not read without dots
        grad, _ = _row_grouped(g, order, weights, g, compute_dots=False)
        return grad
    rows, offsets, tokens = order.rows, order.offsets, order.tokens
    w = weights.reshape(-1).to(torch.float32)[order.perm]  # [T*K] in sorted order
    g = grad_out.to(torch.float32).contiguous()  # [T, cols]
    if workspace is None or g.device.type != "cpu":
        values = F.embedding_bag(tokens, g, offsets, per_sample_weights=w, mode="sum")  # [U, cols]
        return SparseGrad(rows, values)

    num_rows, cols = rows.numel(), g.shape[1]
    values = workspace.get(num_rows, cols, torch.float32, g.device)  # [U, cols]
    chunk = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    starts = list(range(0, num_rows, chunk))
    # lookup range of each row chunk, read once (CPU: no device sync)
    bounds = torch.cat([offsets[starts], offsets.new_tensor([tokens.numel()])]).tolist()
    for i, r0 in enumerate(starts):
        r1 = min(r0 + chunk, num_rows)
        l0, l1 = bounds[i], bounds[i + 1]
        values[r0:r1] = F.embedding_bag(
            tokens[l0:l1], g, offsets[r0:r1] - l0, per_sample_weights=w[l0:l1], mode="sum"
        )  # [r1 - r0, cols]
    return SparseGrad(rows, values)


def dense_row_grad(
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    num_rows: int,
    triton: bool | None = None,
) -> torch.Tensor:
    """``row_sparse_grad`` as a dense [num_rows, cols] fp32 gradient (rows without lookups are zero),
    for small tables (the sub-keys of ``pkm.memory``).

    On CUDA the lookups are grouped by row without finding the distinct rows: every row of the table
    is a group, its bounds found by a search in the sorted lookups, so nothing waits for the device
    (``unique_consecutive`` would: its output size is data dependent), and the row-grouped kernel
    writes the dense gradient directly.
    """
    if triton_enabled(grad_out, triton):
        from pkm import triton_kernels

        sorted_rows, perm = torch.sort(indices.reshape(-1), stable=True)  # [L] each
        all_rows = torch.arange(num_rows + 1, device=indices.device)
        offsets = torch.searchsorted(sorted_rows, all_rows)  # [R + 1] first lookup of each row; last = L
        g = grad_out.contiguous()  # also stands in for the table, which is not read without dots
        grad, _ = triton_kernels.row_grouped_backward(
            g, all_rows[:-1], offsets, perm, weights, g, compute_dots=False, empty_rows=True)
        return grad
    sparse = row_sparse_grad(indices, weights, grad_out, triton=False)
    dense = torch.zeros(num_rows, grad_out.shape[1], dtype=torch.float32, device=grad_out.device)
    return dense.index_copy_(0, sparse.rows, sparse.values)


def _row_grouped(
    weight: torch.Tensor, order: LookupOrder, weights: torch.Tensor, grad_out: torch.Tensor, compute_dots: bool
) -> tuple[SparseGrad, torch.Tensor | None]:
    from pkm import triton_kernels

    ends = order.offsets.new_tensor([order.sorted_rows.numel()])
    offsets = torch.cat([order.offsets, ends])  # [U + 1]
    values, dots = triton_kernels.row_grouped_backward(
        weight, order.rows, offsets, order.perm, weights, grad_out, compute_dots
    )
    return SparseGrad(order.rows, values), dots


def lookup_backward(
    weight: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    need_weights_grad: bool = True,
    workspace: GradWorkspace | None = None,
    triton: bool | None = None,
) -> tuple[SparseGrad, torch.Tensor | None]:
    """Both gradients of ``weighted_bag``: (coalesced value grad, per-lookup weight grad [T, K] fp32).

    One sort groups the lookups by row. On CUDA one Triton kernel then walks the groups and produces
    both gradients in a single pass, reading each distinct row of the table once; elsewhere the
    torch-op path (``row_sparse_grad`` and ``weighted_bag_weights_grad`` over the same sort).
    """
    order = sort_lookups(indices)
    if triton_enabled(weight, triton):
        return _row_grouped(weight, order, weights, grad_out, need_weights_grad)
    grad_weights = None
    if need_weights_grad:
        grad_weights = weighted_bag_weights_grad(weight, indices, grad_out, order, triton=False)
    return row_sparse_grad(indices, weights, grad_out, workspace, order, triton=False), grad_weights


def merge_sparse_grads(a: SparseGrad | None, b: SparseGrad) -> SparseGrad:
    """Sum two coalesced sparse grads (gradient accumulation over micro-batches)."""
    if a is None:
        return b
    rows = torch.cat([a.rows, b.rows])  # [Ua + Ub]
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)  # [U], [Ua + Ub]
    ua = a.rows.numel()
    out = a.values.new_zeros(uniq.numel(), a.values.shape[1])  # [U, cols]
    out.index_add_(0, inverse[:ua], a.values)
    out.index_add_(0, inverse[ua:], b.values.to(a.values.dtype))
    return SparseGrad(uniq, out)


# --------------------------------------------------------------------------------------------------
# Autograd function and the local table
# --------------------------------------------------------------------------------------------------


class ValueLookup(torch.autograd.Function):
    """Weighted lookup into ``table.weight``; the value gradient goes to ``table.sparse_grad``."""

    @staticmethod
    def forward(
        ctx, weights: torch.Tensor, indices: torch.Tensor, table: "ValueTable", anchor: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.table = table
        ctx.save_for_backward(weights, indices)
        return weighted_bag(table.weight.detach(), indices, weights, triton=table.triton)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, indices = ctx.saved_tensors
        table: ValueTable = ctx.table
        weight = table.weight.detach()
        # reuse the table's buffer only when nothing accumulated is still living in it
        workspace = getattr(table, "_grad_workspace", None) if table.sparse_grad is None else None
        grad, grad_weights = lookup_backward(
            weight, indices, weights, grad_out, ctx.needs_input_grad[0], workspace, triton=table.triton
        )
        table.accumulate_grad_(grad)
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
        return grad_weights, None, None, None


class ValueTable(nn.Module):
    """Local (unsharded) value table [num_rows, dim] fp32 with a row-sparse gradient.

    ``weight`` has requires_grad=False; backward calls accumulate a coalesced row-sparse gradient
    into ``sparse_grad`` (summed over micro-batches until ``zero_grad``). ``SparseAdam`` consumes it.
    ``triton`` picks the kernels: None = Triton on CUDA (unless ``PKM_TRITON=0``), False = the torch-op
    path, True = Triton always (see ``triton_enabled``).
    """

    triton: bool | None = None

    def __init__(
        self,
        num_rows: int,
        dim: int,
        init: str = "normal",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"ValueTable needs positive num_rows and dim, got {num_rows} x {dim}.")
        if init not in _VALUE_INITS:
            raise ValueError(f"value init must be one of {_VALUE_INITS}, got {init!r}.")
        self.num_rows = num_rows
        self.dim = dim
        self.col_start = 0
        self.col_end = dim
        self.init = init
        self.weight = nn.Parameter(
            torch.empty(num_rows, dim, dtype=dtype, device=device), requires_grad=False
        )
        self.sparse_grad: SparseGrad | None = None
        self._grad_workspace = GradWorkspace()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "zeros":
                self.weight.zero_()
            else:
                # std d^-0.5 with d the full value dim (Lample), also for a column shard
                self.weight.normal_(0.0, 1.0 / math.sqrt(self.dim))

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices [T, K] int64, weights [T, K] -> [T, dim] in weights.dtype."""
        self._check_lookup(indices, weights)
        indices = indices.long()  # the embedding-bag kernels want one index dtype (offsets are int64)
        # The values always need a gradient, even when `weights` does not (frozen keys/query net):
        # a zero-size tensor that requires grad makes autograd record the lookup whenever grad is on.
        anchor = None
        if torch.is_grad_enabled() and not weights.requires_grad:
            anchor = torch.empty(0, device=weights.device, requires_grad=True)
        return ValueLookup.apply(weights, indices, self, anchor)

    def _check_lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        if indices.dim() != 2 or weights.shape != indices.shape:
            raise ValueError(
                f"value lookup expects indices and weights of the same shape [T, K], got "
                f"{tuple(indices.shape)} and {tuple(weights.shape)}."
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"value lookup indices must be integer, got {indices.dtype}.")
        if not weights.is_floating_point():
            raise ValueError(f"value lookup weights must be floating point, got {weights.dtype}.")

    # -- gradient bookkeeping ---------------------------------------------------------------------

    def accumulate_grad_(self, grad: SparseGrad) -> None:
        """Add a coalesced sparse grad into ``sparse_grad`` (called by the lookup's backward).

        Note: ``sparse_grad.values`` may alias a reused workspace; clone it to keep it past the next
        backward after ``zero_grad``."""
        self.sparse_grad = merge_sparse_grads(self.sparse_grad, grad)

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        self.sparse_grad = None

    def scale_grad_(self, factor: float) -> None:
        if self.sparse_grad is not None:
            self.sparse_grad.values.mul_(factor)

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared L2 norm of the local sparse grad (0-dim fp32 on the table's device, no sync)."""
        if self.sparse_grad is None:
            return torch.zeros((), dtype=torch.float32, device=self.weight.device)
        # fused norm: no [U, cols] temporary (pow(2).sum() would write one)
        return torch.linalg.vector_norm(self.sparse_grad.values, dtype=torch.float32).square()

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, cols=[{self.col_start}, {self.col_end})"
