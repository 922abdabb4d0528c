"""Triton kernels for the value path on GPUs: lookup forward, fused lookup backward, sparse Adam.

Why kernels of our own (issue "GPU speed of the memory layer"): the torch-op path runs each step as
a dozen ATen calls (embedding-bag forward, its per-sample-weights backward, a second bag over the
output gradient for the value gradient, index_select / index_copy / lerp / addcmul / div for Adam),
and each call is another full pass over the touched rows. The value side is memory bound, so the
passes *are* the cost. Here:

* ``bag_forward``: out[t] = sum_k w[t, k] * V[idx[t, k]], token-major, fp32 accumulation, the result
  written once in the activation dtype (one read of each looked-up row; no [T, K, d] gather).
* ``row_grouped_backward``: one pass over the lookups grouped by row (one sort per step). Each
  row's run of sorted lookups is a segment (a hot row is split into segments of at most ``seg``
  lookups, whose partial sums a second small kernel adds in order); a program walks ``block_r``
  segments of similar length side by side over a block of columns, reads each segment's row V[r]
  *once*, and for each lookup (t, k) reads grad_out[t] (small, [T, d], mostly L2-resident) to
  produce both gradients at once:
    value grad  G[r]     = sum_(t,k) w[t, k] * grad_out[t]            -> [U, d] fp32, coalesced
    score grad  dw[t, k] = <grad_out[t], V[r]>                         -> [T*K] fp32
  so the table is read about once per distinct row instead of once per lookup (~8x less at
  BERT-large shape), and the ATen backward's two separate passes become one. Deterministic: every
  output element has one writer and every sum is taken in the (stable) sorted order; no atomics.
* ``gather_dots``: dw[t, k] = <x[t], V[idx[t, k]]>, token-major (the sub-key scores of
  ``pkm.memory``, where the table is small and cache resident, so grouping by row does not pay).
* ``product_topk``: the memory's selection from the sub-key scores in one kernel per (token, head):
  each half's top-k by one sort of (score, id) packed into int64 keys, the k x k candidate sums in
  the scores' dtype over the pairs (a + 1)(b + 1) <= k, one sort of those; all in registers, where
  the torch ops take two top-k, a gather, an add and a third top-k. Opt-in (``pkm.memory``'s
  ``fused_topk``) until measured on a GPU.
* ``sparse_adam_rows``: one pass per touched row: read weight, both moments and the gradient, write
  three back, with ``SparseAdam``'s torch-path arithmetic (lerp as ATen's fma form, addcmul rounded as
  ATen's kernel for that device rounds it, correctly rounded sqrt and division), so the moments are
  bitwise equal to the torch path and the weight within an ulp (Triton may contract the final
  multiply-subtract into an fma). The kernel also counts each row's step and looks its bias
  corrections up by the new count in a table the caller fills with the torch path's expressions, so
  a table's whole step is one launch.

All kernels take fp32 tables (the master weights) and fp32, bf16 or fp16 activations, any number of
columns (masked, not only powers of two; a column shard of a sharded table is just a narrower table
with its own row stride), and work with zero tokens (the wrappers return before launching).
Addresses are computed in int64, so tables beyond 2^31 elements are fine.

Triton is optional: ``available()`` says whether it imports. With ``TRITON_INTERPRET=1`` (set by the
test suite on machines without CUDA) the same kernels run on CPU tensors through Triton's interpreter;
that is how CI checks them against the torch path. Written for Triton 3.6 (CUDA images) and 3.9.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # optional dependency: CPU installs may lack it; then the torch-op path runs
    import triton
    import triton.language as tl
except Exception as _e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _IMPORT_ERROR: str | None = f"{type(_e).__name__}: {_e}"
else:
    _IMPORT_ERROR = None

__all__ = [
    "available",
    "import_error",
    "bag_forward",
    "gather_dots",
    "row_grouped_backward",
    "sparse_adam_rows",
    "product_topk",
]


def available() -> bool:
    """Whether Triton imported (kernels can run on CUDA tensors, or on CPU under the interpreter)."""
    return triton is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


def _col_block(cols: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(cols, 1)))


if triton is not None:

    @triton.jit
    def _bag_forward_kernel(
        weight_ptr, idx_ptr, wts_ptr, out_ptr,
        n_lookups, cols, w_stride, out_stride,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (t, column block): out[t, block] = sum_k wts[t, k] * weight[idx[t, k], block]
        t = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < cols
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, n_lookups, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < n_lookups
            rows = tl.load(idx_ptr + t * n_lookups + offs_k, mask=kmask, other=0).to(tl.int64)
            a = tl.load(wts_ptr + t * n_lookups + offs_k, mask=kmask, other=0.0).to(tl.float32)
            tile = tl.load(
                weight_ptr + rows[:, None] * w_stride + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            acc += tl.sum(tile * a[:, None], axis=0)
        tl.store(out_ptr + t * out_stride + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _gather_dots_kernel(
        table_ptr, idx_ptr, x_ptr, out_ptr,
        n_lookups, cols, t_stride, x_stride,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (t, lookup block): out[t, k] = <x[t], table[idx[t, k]]>
        t = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < n_lookups
        rows = tl.load(idx_ptr + t * n_lookups + offs_k, mask=kmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_D):
            offs_d = c0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < cols
            x = tl.load(x_ptr + t * x_stride + offs_d, mask=dmask, other=0.0).to(tl.float32)
            tile = tl.load(
                table_ptr + rows[:, None] * t_stride + offs_d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            acc += tl.sum(tile * x[None, :], axis=1)
        tl.store(out_ptr + t * n_lookups + offs_k, acc, mask=kmask)

    @triton.jit
    def _segment_grad_kernel(
        table_ptr, seg_row_ptr, seg_start_ptr, seg_end_ptr, seg_dest_ptr, perm_ptr, wts_ptr, g_ptr,
        out_ptr, dots_ptr,
        num_segments, n_lookups, total_lookups, cols, t_stride, g_stride, out_stride,
        COMPUTE_DOTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program (segment block, column block): BLOCK_R segments side by side, each the sorted
        # lookups [start, end) of one table row. Step j gathers the j-th lookup's grad_out row of
        # every segment at once (BLOCK_R independent loads in flight), so the dependent index loads
        # are paid once per step for many rows. out[dest] = sum_j w_j * g[token_j]; with
        # COMPUTE_DOTS each lookup's dot with its row over these columns goes to
        # dots[column block, flat position]. One writer per output element: no atomics, and every
        # row's sum is taken in its sorted-lookup order, the same every run.
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = offs_r < num_segments
        cb = tl.program_id(1)
        offs_d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < cols
        mask2 = rmask[:, None] & dmask[None, :]
        start = tl.load(seg_start_ptr + offs_r, mask=rmask, other=0)
        count = tl.load(seg_end_ptr + offs_r, mask=rmask, other=0) - start
        if COMPUTE_DOTS:
            r = tl.load(seg_row_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
            vrow = tl.load(table_ptr + r[:, None] * t_stride + offs_d[None, :], mask=mask2, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j in range(0, tl.max(count, axis=0)):
            jmask = rmask & (j < count)
            pos = tl.load(perm_ptr + start + j, mask=jmask, other=0)  # flat t * K + k (< 2^31)
            tok = (pos.to(tl.int32) // n_lookups).to(tl.int64)
            a = tl.load(wts_ptr + pos, mask=jmask, other=0.0).to(tl.float32)
            gt = tl.load(
                g_ptr + tok[:, None] * g_stride + offs_d[None, :],
                mask=jmask[:, None] & dmask[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_R, BLOCK_D]
            acc += gt * a[:, None]
            if COMPUTE_DOTS:
                part = tl.sum(gt * vrow, axis=1)  # [BLOCK_R]
                tl.store(dots_ptr + cb * total_lookups + pos, part, mask=jmask)
        # the plan's padding segments (count 0) write nothing; every real one has a lookup
        dest = tl.load(seg_dest_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
        tl.store(out_ptr + dest[:, None] * out_stride + offs_d[None, :], acc, mask=mask2 & (count > 0)[:, None])

    @triton.jit
    def _segment_sum_kernel(
        out_ptr, row_ptr, first_ptr, count_ptr, cols, out_stride, BLOCK_D: tl.constexpr,
    ):
        # program (i, column block): out[row[i]] += the partial rows out[first[i] : first[i] + count[i]],
        # in order (out[row[i]] holds the row's first segment); count 0: a row that was not split
        i = tl.program_id(0).to(tl.int64)
        count = tl.load(count_ptr + i)
        if count > 0:
            offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = offs_d < cols
            row = tl.load(row_ptr + i).to(tl.int64)
            first = tl.load(first_ptr + i)
            acc = tl.load(out_ptr + row * out_stride + offs_d, mask=dmask, other=0.0)
            for p in range(first, first + count):
                acc += tl.load(out_ptr + p * out_stride + offs_d, mask=dmask, other=0.0)  # p: int64 (first is)
            tl.store(out_ptr + row * out_stride + offs_d, acc, mask=dmask)

    @triton.jit
    def _sparse_adam_kernel(
        w_ptr, m_ptr, v_ptr, count_ptr, g_ptr, rows_ptr, bc1_ptr, bc2s_ptr,
        cols, w_stride, m_stride, v_stride, g_stride,
        lr, omb1, omb2, beta2, eps, lrwd,
        HAS_WD: tl.constexpr, CUDA_ADDCMUL: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # program u: Adam on row rows[u], all its columns; the same formulas as SparseAdam's torch
        # path (_bump_row_steps and _update_rows). One program per row, so the row's count is read
        # and written by one program only (rows are unique).
        u = tl.program_id(0).to(tl.int64)
        r = tl.load(rows_ptr + u).to(tl.int64)
        t = tl.load(count_ptr + r) + 1.0  # fp32 count, exact below 2^24
        tl.store(count_ptr + r, t)
        t_idx = t.to(tl.int32)
        bc1 = tl.load(bc1_ptr + t_idx)
        bc2s = tl.load(bc2s_ptr + t_idx)
        step_size = tl.div_rn(1.0, bc1) * lr  # the torch path's lr / bc1, which torch computes as bc1.reciprocal() * lr
        for c0 in range(0, cols, BLOCK_D):
            offs = c0 + tl.arange(0, BLOCK_D)
            mask = offs < cols
            g = tl.load(g_ptr + u * g_stride + offs, mask=mask, other=0.0)
            m = tl.load(m_ptr + r * m_stride + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + r * v_stride + offs, mask=mask, other=0.0)
            w = tl.load(w_ptr + r * w_stride + offs, mask=mask, other=0.0)
            m = tl.fma(omb1, g - m, m)  # m.lerp_(g, 1 - beta1), ATen's weight < 0.5 form
            # v.mul_(beta2).addcmul_(g, g, value=1 - beta2), rounded as ATen's kernel on that device does:
            # CUDA computes a + alpha * (b * c), the CPU kernels (a + alpha * b) * c in one fma
            if CUDA_ADDCMUL:
                v = tl.fma(omb2, g * g, v * beta2)
            else:
                v = tl.fma(omb2 * g, g, v * beta2)
            denom = tl.div_rn(tl.sqrt_rn(v), bc2s) + eps
            upd = tl.div_rn(m, denom) * step_size
            if HAS_WD:
                upd = tl.fma(w, lrwd, upd)  # decoupled decay folded into the step, as the torch path
            tl.store(m_ptr + r * m_stride + offs, m, mask=mask)
            tl.store(v_ptr + r * v_stride + offs, v, mask=mask)
            tl.store(w_ptr + r * w_stride + offs, w - upd, mask=mask)


if triton is not None:

    @triton.jit
    def _sortable(x):
        # fp32 -> int32 whose signed order is the float order (negative floats: magnitude bits flipped)
        bits = x.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _unsortable(key):
        # inverse of _sortable (the transform is an involution)
        return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

    @triton.jit
    def _low_word(key):
        # the low 32 bits of an int64 key, by int64 arithmetic only (no unsigned literals)
        return key - ((key >> 32) << 32)

    @triton.jit
    def _top_sub_keys(sub_ptr, n, N_P: tl.constexpr, K_P: tl.constexpr):
        # the K_P best of n scores, descending: (scores [K_P] fp32, sub-key ids [K_P] int64); ties go
        # to the lower id. Each score is packed with its id into one int64 key, so one sort orders
        # both; the first K_P of the sorted keys are picked by a masked sum over [N_P / K_P, K_P].
        cols = tl.arange(0, N_P)
        x = tl.load(sub_ptr + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        key = (_sortable(x).to(tl.int64) << 32) | (N_P - 1 - cols).to(tl.int64)
        key = tl.sort(key, descending=True)
        chunks = tl.reshape(key, [N_P // K_P, K_P])
        top = tl.sum(tl.where(tl.arange(0, N_P // K_P)[:, None] == 0, chunks, 0), axis=0)  # [K_P]
        return _unsortable((top >> 32).to(tl.int32)), (N_P - 1) - _low_word(top)

    @triton.jit
    def _product_topk_kernel(
        sub_ptr, out_ptr, n, knn, last_slot, set_stride, t_stride, n_tokens,
        N_P: tl.constexpr, K_P: tl.constexpr, ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr,
    ):
        # program (t, h): the knn best slots i1 * n + i2 of head h for token t, from the sub-key
        # scores of its two halves (sets 2h, 2h + 1), as pkm.memory.product_key_topk's torch path:
        # top-knn of each half, then the best knn of the candidate sums s1[a] + s2[b] over the pairs
        # with (a + 1)(b + 1) <= knn (the only ones that can make the top knn), summed in the
        # scores' dtype. One sort per half and one over the knn x knn candidates, all in registers.
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        v1, c1 = _top_sub_keys(sub_ptr + (2 * h) * set_stride + t * t_stride, n, N_P, K_P)
        v2, c2 = _top_sub_keys(sub_ptr + (2 * h + 1) * set_stride + t * t_stride, n, N_P, K_P)
        cand = v1[:, None] + v2[None, :]  # [K_P, K_P]
        if ROUND_BF16:
            cand = cand.to(tl.bfloat16).to(tl.float32)
        if ROUND_FP16:
            cand = cand.to(tl.float16).to(tl.float32)
        ranks = tl.arange(0, K_P)
        pair_ok = (ranks[:, None] + 1) * (ranks[None, :] + 1) <= knn
        slot = c1[:, None] * n + c2[None, :]  # [K_P, K_P] int64, <= last_slot = n^2 - 1 < 2^32
        key = (_sortable(cand).to(tl.int64) << 32) | (last_slot - slot)  # ties: the lower slot first
        key = tl.where(pair_ok, key, -9223372036854775807)
        key = tl.sort(tl.reshape(key, [K_P * K_P]), descending=True)
        chunks = tl.reshape(key, [K_P, K_P])
        best = tl.sum(tl.where(ranks[:, None] == 0, chunks, 0), axis=0)  # [K_P]
        slots = last_slot - _low_word(best)
        tl.store(out_ptr + (h * n_tokens + t) * knn + ranks, slots, mask=ranks < knn)


def _check_table(table: torch.Tensor) -> None:
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"kernels need a 2-D table with unit column stride, got shape {tuple(table.shape)} "
                         f"and strides {table.stride()}.")


def bag_forward(weight: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k weights[t, k] * weight[indices[t, k]]  ->  [T, cols] in ``weights.dtype``."""
    _check_table(weight)
    t, k = indices.shape
    cols = weight.shape[1]
    out = torch.empty(t, cols, dtype=weights.dtype, device=weight.device)
    if t == 0 or k == 0:
        return out.zero_()
    idx, wts = indices.contiguous(), weights.contiguous()
    block_d = _col_block(cols, 256)
    grid = (t, triton.cdiv(cols, block_d))
    _bag_forward_kernel[grid](weight, idx, wts, out, k, cols, weight.stride(0), out.stride(0),
                              BLOCK_K=16, BLOCK_D=block_d, num_warps=4)
    return out


def gather_dots(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out[t, k] = <x[t], table[indices[t, k]]>  ->  [T, K] fp32."""
    _check_table(table)
    t, k = indices.shape
    cols = table.shape[1]
    out = torch.empty(t, k, dtype=torch.float32, device=table.device)
    if t == 0 or k == 0:
        return out
    idx, x = indices.contiguous(), x.contiguous()
    block_k = min(32, triton.next_power_of_2(k))
    block_d = _col_block(cols, 128)
    grid = (t, triton.cdiv(k, block_k))
    _gather_dots_kernel[grid](table, idx, x, out, k, cols, table.stride(0), x.stride(0),
                              BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out


class Segments(NamedTuple):
    """The sorted lookups cut into segments of at most ``seg`` lookups of one row each.

    A row with more lookups than ``seg`` (a hot memory slot, or any sub-key) is split, so no program
    walks thousands of lookups alone: its first segment writes the row's slot u of the output buffer
    in place, each further one a partial row ``num_rows + p``, which ``_segment_sum_kernel`` then adds
    to slot u in segment order (deterministic).

    Every size is an upper bound known on the host (from U and L), so making the plan never waits
    for the device: segments past the real count are empty (start == end) and write nothing, and
    split slots past the real count have no partials.
    """

    row: torch.Tensor  # [C] table row of each segment (C = min(U, L) + max_partials)
    start: torch.Tensor  # [C] first sorted lookup
    end: torch.Tensor  # [C] one past the last; == start for the padding segments
    dest: torch.Tensor  # [C] output-buffer row: the row's slot u, or num_rows + p for a partial
    max_partials: int  # P: partial rows after the num_rows final ones (a bound; the real count <= P)
    split_slots: torch.Tensor  # [M] slots u, the split rows first (ascending), then unsplit ones
    split_first: torch.Tensor  # [M] buffer row of each one's first partial
    split_count: torch.Tensor  # [M] its number of partials (0: not split, nothing to add)


def plan_segments(rows: torch.Tensor, offsets: torch.Tensor, num_lookups: int, seg: int,
                  empty_rows: bool = False) -> Segments:
    """Segments of the row-grouped lookups: rows [U] table rows, offsets [U + 1] (last = L).

    A row of c lookups has ceil(c / seg) segments, (c - 1) // seg of them partials; summed over the
    rows, that is at most (L - U) // seg partials, which sizes the plan without reading the counts.
    ``empty_rows``: some rows may have no lookup (every row of a small table); they get no segment,
    and the bound becomes L // seg.
    """
    num_rows = rows.numel()
    max_partials = max(num_lookups - (0 if empty_rows else num_rows), 0) // seg
    max_segments = min(num_rows, num_lookups) + max_partials
    counts = offsets[1:] - offsets[:-1]  # [U], each >= 1 unless empty_rows
    extra = ((counts - 1) // seg).clamp_min(0)  # [U] partials of each row
    pieces = torch.where(counts > 0, extra + 1, 0) if empty_rows else extra + 1  # [U] segments of each row
    last_piece = torch.cumsum(pieces, 0)  # [U] one past each row's last segment
    seg_ids = torch.arange(max_segments, device=rows.device)  # [C]
    seg_slot = torch.searchsorted(last_piece, seg_ids, right=True)  # [C] == U past the real segments
    real = seg_slot < num_rows
    seg_slot = seg_slot.clamp_max(num_rows - 1)
    piece = seg_ids - (last_piece[seg_slot] - pieces[seg_slot])  # [C] segment number within its row
    start = offsets[seg_slot] + piece * seg
    end = torch.where(real, torch.minimum(start + seg, offsets[seg_slot + 1]), start)
    first_partial = num_rows + torch.cumsum(extra, 0) - extra  # [U] buffer row of each row's first partial
    dest = torch.where(real & (piece > 0), first_partial[seg_slot] + piece - 1, seg_slot)
    # the split rows first, in ascending slot order: at most min(U, P) of them
    max_split = min(num_rows, max_partials)
    split_slots = torch.argsort((extra == 0).to(torch.int8), stable=True)[:max_split]
    return Segments(rows[seg_slot], start, end, dest, max_partials, split_slots,
                    first_partial[split_slots], extra[split_slots])


class GroupedLaunch(NamedTuple):
    """Launch parameters of the row-grouped backward (see ``default_grouped_launch``)."""

    block_d: int  # columns per program
    block_r: int  # segments (rows) per program, walked side by side
    seg: int  # most lookups of one row a program walks before the row is split
    num_warps: int


def default_grouped_launch(cols: int) -> GroupedLaunch:
    # 256 columns x 8 rows (value tables) or 128 x 16 (sub-keys) per program, 4 warps; a row is
    # split after 64 lookups, so hot rows and sub-keys are spread over many programs, and the rows of
    # one program have similar counts. The fastest launches of the sweep on an H200, the ones the
    # layer numbers in BENCHMARKS.md were measured with (benchmarks/pkm_layer_gpu.py).
    block_d = _col_block(cols, 256)
    return GroupedLaunch(block_d, 8 if block_d >= 256 else 16, 64, 4)


def row_grouped_backward(
    table: torch.Tensor,
    rows: torch.Tensor,
    offsets: torch.Tensor,
    perm: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    compute_dots: bool = True,
    launch: GroupedLaunch | None = None,
    empty_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both lookup gradients from one pass over the lookups grouped by row.

    rows [U] distinct rows; offsets [U + 1] start of each row's lookups in sorted order (last = T*K);
    perm [T*K] flat position t*K + k of each sorted lookup; weights [T, K]; grad_out [T, cols].
    Returns (value grad [U, cols] fp32, score grad [T, K] fp32 or None). With ``empty_rows``, rows
    may have no lookups (offsets repeat); their gradient rows are zero.
    """
    _check_table(table)
    t, k = weights.shape
    cols = table.shape[1]
    num_rows = rows.numel()
    if t * k >= 2**31:
        raise ValueError(f"{t} x {k} lookups: the row-grouped kernel indexes lookups in int32 (< 2^31).")
    launch = launch or default_grouped_launch(cols)
    col_blocks = triton.cdiv(cols, launch.block_d)
    if num_rows == 0:
        dots = torch.zeros(t, k, dtype=torch.float32, device=table.device) if compute_dots else None
        return torch.empty(0, cols, dtype=torch.float32, device=table.device), dots
    plan = plan_segments(rows, offsets, t * k, launch.seg, empty_rows)
    alloc = torch.zeros if empty_rows else torch.empty  # an empty row has no segment to write it
    out = alloc(num_rows + plan.max_partials, cols, dtype=torch.float32, device=table.device)
    # each column block writes its share of every dot; summed below in block order
    dots = torch.empty(col_blocks, t * k, dtype=torch.float32, device=table.device) if compute_dots else None
    g = grad_out.contiguous()
    # segments of similar length side by side: a program walks as many steps as its longest segment
    by_count = torch.argsort(plan.end - plan.start, descending=True, stable=True)
    seg_row, seg_start, seg_end, seg_dest = (x[by_count] for x in (plan.row, plan.start, plan.end, plan.dest))
    num_segments = seg_row.numel()
    if num_segments:  # none: no lookups at all (empty_rows)
        _segment_grad_kernel[(triton.cdiv(num_segments, launch.block_r), col_blocks)](
            table, seg_row, seg_start, seg_end, seg_dest, perm, weights.contiguous(), g,
            out, dots if dots is not None else out,
            num_segments, k, t * k, cols, table.stride(0), g.stride(0), out.stride(0),
            COMPUTE_DOTS=compute_dots, BLOCK_R=launch.block_r, BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        )
    if plan.split_slots.numel():
        _segment_sum_kernel[(plan.split_slots.numel(), col_blocks)](
            out, plan.split_slots, plan.split_first, plan.split_count, cols, out.stride(0),
            BLOCK_D=launch.block_d, num_warps=launch.num_warps,
        )
    if dots is not None:
        dots = (dots[0] if col_blocks == 1 else dots.sum(0)).view(t, k)
    return out[:num_rows], dots


def sparse_adam_rows(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    row_step: torch.Tensor,
    grad: torch.Tensor,
    rows: torch.Tensor,
    bias1: torch.Tensor,
    bias2_sqrt: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    lr_wd: float,
) -> None:
    """In-place Adam on ``rows`` (unique) of weight / exp_avg / exp_avg_sq from grad [U, cols] fp32.

    Each row's count in row_step [num_rows] fp32 goes up by one; its bias corrections are looked up
    by the new count t in bias1 [S] = 1 - beta1^t and bias2_sqrt [S] = sqrt(1 - beta2^t) (fp32; the
    caller makes S larger than every count). lr_wd = lr * weight_decay (0: no decay).
    """
    for name, ten in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_table(ten)
        if ten.dtype != torch.float32:
            raise ValueError(f"sparse Adam kernel needs fp32 {name}, got {ten.dtype}.")
    for name, ten in (("row_step", row_step), ("bias1", bias1), ("bias2_sqrt", bias2_sqrt)):
        if ten.dtype != torch.float32 or ten.dim() != 1 or ten.stride(0) != 1:
            raise ValueError(f"sparse Adam kernel needs a contiguous 1-D fp32 {name}, got {ten.dtype} "
                             f"of shape {tuple(ten.shape)}.")
    num_rows, cols = rows.numel(), weight.shape[1]
    if num_rows == 0:
        return
    g = grad.contiguous()
    block_d = _col_block(cols, 1024)
    _sparse_adam_kernel[(num_rows,)](
        weight, exp_avg, exp_avg_sq, row_step, g, rows.contiguous(), bias1, bias2_sqrt,
        cols, weight.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0), g.stride(0),
        lr, 1.0 - beta1, 1.0 - beta2, beta2, eps, lr_wd,
        HAS_WD=lr_wd != 0.0, CUDA_ADDCMUL=weight.device.type == "cuda", BLOCK_D=block_d,
        num_warps=4 if block_d >= 512 else 2,
    )


def product_topk(sub: torch.Tensor, knn: int) -> torch.Tensor:
    """The product-key selection from sub-key scores sub [H*2, T, n] (sets 2h, 2h + 1 are head h's
    halves) -> indices [H, T, knn] int64 = i1 * n + i2, best candidate first.

    The same selection as ``pkm.memory.product_key_topk``'s torch ops (top-knn per half, candidate
    sums in the scores' dtype over the pairs (a + 1)(b + 1) <= knn, top-knn of those), in one kernel
    instead of two top-k, a gather, an add and a third top-k. Equal scores are ordered by the lower
    sub-key, then the lower slot (torch.topk leaves the order of ties unspecified).
    """
    sets, t, n = sub.shape
    if sets % 2:
        raise ValueError(f"sub-key scores need two sets per head, got {sets} sets.")
    if not 0 < knn <= n or n * n > 2**32:
        raise ValueError(f"product top-k needs 0 < knn <= n and n^2 <= 2^32, got knn={knn}, n={n}.")
    out = torch.empty(sets // 2, t, knn, dtype=torch.int64, device=sub.device)
    if t == 0:
        return out
    sub = sub.contiguous()
    n_p, k_p = triton.next_power_of_2(n), triton.next_power_of_2(knn)
    _product_topk_kernel[(t, sets // 2)](
        sub, out, n, knn, n * n - 1, sub.stride(0), sub.stride(1), t,
        N_P=n_p, K_P=k_p, ROUND_BF16=sub.dtype == torch.bfloat16, ROUND_FP16=sub.dtype == torch.float16,
        num_warps=4 if n_p * k_p >= 4096 else 2,
    )
    return out
