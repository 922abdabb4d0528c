"""Triton kernels of the value path against the torch-op path (the reference).

Without a GPU these run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported), so shapes stay tiny. tests/test_triton_gpu.py checks
the same on CUDA at realistic shapes.
"""

from __future__ import annotations

import pytest
import torch

from pkm import ProductKeyMemory, SparseAdam, ValueTable
from pkm.values import SparseGrad, lookup_backward, weighted_bag, weighted_bag_weights_grad
from tests.fp_bounds import AdamStepBound, assert_within, aten_moments_bitwise, dots_bound, row_sums_bound

triton_kernels = pytest.importorskip("pkm.triton_kernels")
if not triton_kernels.available():  # pragma: no cover - depends on the install
    pytest.skip(f"Triton does not import: {triton_kernels.import_error()}", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("single_torch_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _lookups(tokens: int, bag: int, rows: int, dtype=torch.float32, seed: int = 0):
    """indices [T, K] with forced duplicates (within a token and across tokens), weights [T, K]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (tokens, bag), generator=g)
    if tokens and bag > 1:
        idx[:, 1] = idx[:, 0]  # duplicate inside every bag
        idx[tokens // 2 :, 2 % bag] = 3  # one hot row shared by half the tokens
    w = torch.randn(tokens, bag, generator=g).to(dtype)
    return idx.to(DEVICE), w.to(DEVICE)


def _table(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(DEVICE)


@pytest.mark.parametrize("cols", [8, 13, 300])  # power of two, odd, two column blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bag_forward_matches_embedding_bag(cols, dtype):
    table = _table(50, cols)
    idx, w = _lookups(7, 20, 50, dtype)  # K = 20: not a multiple of the kernel's 16-lookup block
    got = weighted_bag(table, idx, w, triton=True)
    ref = weighted_bag(table, idx, w, triton=False)
    assert got.dtype == ref.dtype == dtype and got.shape == (7, cols)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_kernels_handle_zero_tokens():
    table = _table(10, 6)
    idx = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
    w = torch.zeros(0, 4, device=DEVICE)
    assert weighted_bag(table, idx, w, triton=True).shape == (0, 6)
    assert weighted_bag_weights_grad(table, idx, torch.zeros(0, 6, device=DEVICE), triton=True).shape == (0, 4)
    grad, dots = lookup_backward(table, idx, w, torch.zeros(0, 6, device=DEVICE), triton=True)
    assert grad.rows.numel() == 0 and grad.values.shape == (0, 6) and dots.shape == (0, 4)


@pytest.mark.parametrize("cols", [5, 64, 1030])  # 1030: more than one column chunk of the row kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_backward_matches_torch_path(cols, dtype):
    tokens = 3 if cols > 1000 else 9
    table = _table(40, cols)
    idx, w = _lookups(tokens, 6, 40, dtype)
    grad_out = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got_grad, got_dots = lookup_backward(table, idx, w, grad_out, triton=True)
    ref_grad, ref_dots = lookup_backward(table, idx, w, grad_out, triton=False)
    assert torch.equal(got_grad.rows, ref_grad.rows)  # coalesced: unique sorted rows, duplicates summed
    assert got_grad.values.dtype == got_dots.dtype == torch.float32
    # sums over a row's lookups and dots over the columns, in another order: bounded by their terms
    assert_within(got_grad.values, ref_grad.values, row_sums_bound(idx, w, grad_out, 40)[ref_grad.rows], "grad")
    assert_within(got_dots, ref_dots, dots_bound(table, idx, grad_out), "dots")


@pytest.mark.parametrize("compute_dots", [True, False])
def test_row_grouped_backward_splits_hot_rows(compute_dots):
    """Rows with more lookups than a segment are split and their partials summed; several column
    blocks each write a share of every dot: all of it must equal the torch path."""
    from pkm.values import sort_lookups

    table = _table(20, 10)
    idx, w = _lookups(12, 5, 20)  # row 3 is looked up by 6+ tokens, duplicates in every bag
    grad_out = torch.randn(12, 10, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    order = sort_lookups(idx)
    offsets = torch.cat([order.offsets, order.offsets.new_tensor([idx.numel()])])
    launch = triton_kernels.GroupedLaunch(block_d=4, block_r=2, seg=3, num_warps=1)
    plan = triton_kernels.plan_segments(order.rows, offsets, idx.numel(), launch.seg)
    assert int(plan.split_count.max()) > 0  # the test exercises the split path
    values, dots = triton_kernels.row_grouped_backward(
        table, order.rows, offsets, order.perm, w, grad_out, compute_dots, launch)
    ref, ref_dots = lookup_backward(table, idx, w, grad_out, triton=False)
    torch.testing.assert_close(values, ref.values, rtol=1e-6, atol=1e-6)
    if compute_dots:
        torch.testing.assert_close(dots, ref_dots, rtol=1e-6, atol=1e-5)
    else:
        assert dots is None


def test_row_grouped_backward_with_empty_rows_splits_hot_rows():
    """Every row of a table as a group (``empty_rows``): rows without lookups come out zero, hot
    rows are split and summed, as the torch path's coalesced grad put into a dense table."""
    idx, w = _lookups(12, 5, 8)  # 40 table rows, lookups only in rows 0..7; row 3 hot
    g = torch.randn(12, 10, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    sorted_rows, perm = torch.sort(idx.reshape(-1), stable=True)
    all_rows = torch.arange(41, device=DEVICE)
    offsets = torch.searchsorted(sorted_rows, all_rows)
    launch = triton_kernels.GroupedLaunch(block_d=4, block_r=2, seg=3, num_warps=1)
    got, _ = triton_kernels.row_grouped_backward(g, all_rows[:-1], offsets, perm, w, g, False, launch, empty_rows=True)
    ref = lookup_backward(_table(40, 10), idx, w, g, need_weights_grad=False, triton=False)[0]
    dense = torch.zeros(40, 10, device=DEVICE).index_copy_(0, ref.rows, ref.values)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[8:], torch.zeros(32, 10, device=DEVICE))


def _segments_by_hand(counts: list[int], seg: int) -> list[tuple[int, int, int]]:
    """(slot, start, end) of every real segment, in row order: the plan written out as a loop."""
    out, offset = [], 0
    for slot, c in enumerate(counts):
        for s0 in range(0, c, seg):
            out.append((slot, offset + s0, offset + min(s0 + seg, c)))
        offset += c
    return out


@pytest.mark.parametrize("counts, seg", [([1, 1, 1], 4), ([9, 1, 4, 5, 1], 4), ([3, 20, 2, 8], 3), ([7], 7), ([8], 7),
                                         ([0, 9, 0, 0, 4, 1, 0], 4), ([0, 0, 0], 3)])  # zeros: empty_rows
def test_segment_plan_is_exact_within_host_bounds_and_never_syncs(counts, seg):
    """The plan sized by host bounds: its real segments are the hand-cut ones, padding segments are
    empty, every partial has its own buffer row inside the bound, and the split rows' partials are
    listed in order; making it reads nothing back from the device (no .tolist / .item)."""
    from benchmarks.train_step import HostSyncDetector

    rows = torch.arange(len(counts), device=DEVICE) * 10 + 5
    offsets = torch.tensor([0] + counts, device=DEVICE).cumsum(0)
    num_lookups = sum(counts)
    empty_rows = 0 in counts
    with HostSyncDetector() as syncs:
        plan = triton_kernels.plan_segments(rows, offsets, num_lookups, seg, empty_rows)
    assert syncs.events == []
    num_rows = len(counts)
    assert plan.max_partials == (num_lookups - (0 if empty_rows else num_rows)) // seg
    assert plan.start.numel() == min(num_rows, num_lookups) + plan.max_partials
    real = (plan.end > plan.start).cpu()
    hand = _segments_by_hand(counts, seg)
    got = [(int(r) // 10, int(s), int(e)) for r, s, e in zip(plan.row[real], plan.start[real], plan.end[real])]
    assert got == [(slot, s, e) for slot, s, e in hand]  # real segments first, in row order
    assert not real[len(hand):].any()
    dest = plan.dest[real].tolist()
    assert len(set(dest)) == len(dest) and all(d < num_rows + plan.max_partials for d in dest)  # one writer each
    dest_of = {slot: [d for (s, _, _), d in zip(hand, dest) if s == slot] for slot in range(num_rows) if counts[slot]}
    for slot, mine in dest_of.items():  # the first segment in place, further ones to consecutive partial rows
        partials = mine[1:]
        assert mine[0] == slot and all(d >= num_rows for d in partials)
        assert all(b == a + 1 for a, b in zip(partials, partials[1:]))
    split = [slot for slot, c in enumerate(counts) if c > seg]
    n = len(split)
    assert plan.split_slots[:n].tolist() == split and plan.split_count[n:].eq(0).all()
    for i, slot in enumerate(split):
        assert plan.split_first[i] == dest_of[slot][1] and plan.split_count[i] == len(dest_of[slot]) - 1


@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_dense_row_grad_matches_torch_path_without_a_sync(tokens):
    """The sub-keys' dense gradient: every row of the table a group (rows without lookups zero, a
    hot row split), equal to the torch path's coalesced grad put into zeros; grouping the lookups
    asks nothing of the device (no unique, no .tolist)."""
    from benchmarks.train_step import HostSyncDetector
    from pkm.values import dense_row_grad

    num_rows, cols = 30, 6
    idx, w = _lookups(tokens, 7, 12)  # rows 12..29 never looked up; row 3 hot
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ref = dense_row_grad(idx, w, x, num_rows, triton=False)
    with HostSyncDetector() as syncs:
        got = dense_row_grad(idx, w, x, num_rows, triton=True)
    assert syncs.events == []
    assert got.shape == (num_rows, cols) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[12:], torch.zeros(num_rows - 12, cols, device=DEVICE))
    if tokens:
        assert ref[:12].abs().sum() > 0


def test_gather_dots_matches_torch_path():
    table = _table(30, 12)
    idx, _ = _lookups(11, 40, 30)  # 40 lookups: two blocks of the kernel's 32
    x = torch.randn(11, 12, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = weighted_bag_weights_grad(table, idx, x, triton=True)
    ref = weighted_bag_weights_grad(table, idx, x, triton=False)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_column_shards_of_a_table():
    """A d/P column shard is a narrower table: as a strided view and as its own contiguous copy,
    the shards' outputs and gradients are the full table's columns."""
    full = _table(25, 11)
    idx, w = _lookups(6, 5, 25)
    grad_out = torch.randn(6, 11, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ref_out = weighted_bag(full, idx, w, triton=False)
    ref_grad, ref_dots = lookup_backward(full, idx, w, grad_out, triton=False)
    dots = torch.zeros_like(ref_dots)
    for c0, c1 in ((0, 4), (4, 8), (8, 11)):  # 11 columns over 3 ranks: 4, 4, 3
        for shard in (full[:, c0:c1], full[:, c0:c1].contiguous()):
            torch.testing.assert_close(weighted_bag(shard, idx, w, triton=True), ref_out[:, c0:c1])
            grad, part = lookup_backward(shard, idx, w, grad_out[:, c0:c1], triton=True)
            torch.testing.assert_close(grad.values, ref_grad.values[:, c0:c1], rtol=1e-6, atol=1e-6)
        dots += part
    torch.testing.assert_close(dots, ref_dots, rtol=1e-6, atol=1e-5)  # partial dots sum to the full ones


def test_value_table_module_with_accumulation():
    """The table's autograd path with kernels: two micro-batches accumulate into one coalesced grad."""
    grads = {}
    for flag in (True, False):
        table = ValueTable(60, 10).to(DEVICE)
        with torch.no_grad():
            table.weight.copy_(_table(60, 10))
        table.triton = flag
        outs = []
        for seed in (0, 1):
            idx, w = _lookups(5, 8, 60, seed=seed)
            w.requires_grad_(True)
            out = table(idx, w)
            out.backward(torch.ones_like(out) * (seed + 1))
            outs.append((out.detach(), w.grad))
        grads[flag] = (outs, table.sparse_grad, table.grad_sq_norm())
    (o1, g1, n1), (o0, g0, n0) = grads[True], grads[False]
    for (a_out, a_w), (b_out, b_w) in zip(o1, o0):
        torch.testing.assert_close(a_out, b_out)
        torch.testing.assert_close(a_w, b_w, rtol=1e-6, atol=1e-5)
    assert torch.equal(g1.rows, g0.rows)
    torch.testing.assert_close(g1.values, g0.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n1, n0)


def test_memory_layer_with_kernels_matches_torch_path():
    """The whole layer (sub-key gather-dots and value lookup) with kernels against the torch path."""
    results = {}
    for flag in (True, False):
        torch.manual_seed(0)
        mem = ProductKeyMemory(12, 10, n_keys=6, heads=2, knn=4, k_dim=8).to(DEVICE)
        mem.values.triton = flag
        x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
        mask = torch.tensor([[1, 1, 0], [1, 1, 1]], device=DEVICE)
        res = mem(x, mask)
        res.output.square().sum().backward()
        results[flag] = (res.output.detach(), res.indices, x.grad, mem.keys.grad, mem.query_proj.weight.grad,
                         mem.values.sparse_grad)
    a, b = results[True], results[False]
    assert torch.equal(a[1], b[1])
    for x, y in zip(a[:1] + a[2:5], b[:1] + b[2:5]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert torch.equal(a[5].rows, b[5].rows)
    torch.testing.assert_close(a[5].values, b[5].values, rtol=1e-6, atol=1e-6)


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    # map the sign-magnitude float order onto integers, so adjacent floats differ by one
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("weight_decay, cols", [(0.0, 13), (0.1, 13), (0.1, 1030)])  # 1030: two column chunks
def test_sparse_adam_kernel_matches_torch_path(weight_decay, cols):
    """Per-row counts bitwise; moments bitwise where ATen runs the kernel's fma forms (else within
    their rounding bound); weights within the rounding bound of the steps (``AdamStepBound``);
    untouched rows unchanged; over steps that touch irregular, partly overlapping sets of rows."""
    rows = 40
    tables, opts = [], []
    for flag in (True, False):
        table = ValueTable(rows, cols).to(DEVICE)
        with torch.no_grad():
            table.weight.copy_(_table(rows, cols))
        opt = SparseAdam([table], lr=1e-2, weight_decay=weight_decay)
        opt.triton, opt.native = flag, False
        tables.append(table), opts.append(opt)
    before = tables[0].weight.detach().clone()
    bound = AdamStepBound(before, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(5)
    touched = torch.zeros(rows, dtype=torch.bool)
    for step in range(4):
        sel = torch.randperm(rows, generator=g)[: 10 + 3 * step].sort().values
        touched[sel] = True
        values = torch.randn(sel.numel(), cols, generator=g) * 10 ** (step - 2)
        for table, opt in zip(tables, opts):
            table.sparse_grad = SparseGrad(sel.to(DEVICE), values.to(DEVICE).clone())
            opt.step()
        bound.step(sel.to(DEVICE), values.to(DEVICE))
    (tk, tt), (ok, ot) = tables, opts  # Triton, torch path
    sk, st = ok.state[tk.weight], ot.state[tt.weight]
    bound.assert_close(tk.weight, tt.weight, sk, st, moments_bitwise=DEVICE == "cuda" or aten_moments_bitwise())
    untouched = ~touched.to(DEVICE)
    assert torch.equal(tk.weight.detach()[untouched], before[untouched])
    assert torch.count_nonzero(sk["exp_avg"][untouched]) == 0
    assert not torch.equal(tk.weight.detach()[touched.to(DEVICE)], before[touched.to(DEVICE)])


def test_sparse_adam_kernel_counts_past_its_correction_table_and_after_a_load(monkeypatch):
    """The kernel looks bias corrections up by count: counts that outgrow the table (it grows), and
    counts put in from outside (a loaded checkpoint's state, an in-place edit) give the torch path's
    counts and moments, and weights within the steps' rounding bound, with the counts read back
    only then."""
    from pkm.sparse_adam import BiasCorrectionTable

    monkeypatch.setattr(BiasCorrectionTable, "MIN_SIZE", 4)
    rows, cols = 12, 5
    tables, opts = [], []
    for flag in (True, False):
        table = ValueTable(rows, cols).to(DEVICE)
        with torch.no_grad():
            table.weight.copy_(_table(rows, cols))
        opt = SparseAdam([table], lr=1e-2, betas=(0.8, 0.99))
        opt.triton, opt.native = flag, False
        tables.append(table), opts.append(opt)
    g = torch.Generator().manual_seed(9)
    bound = AdamStepBound(tables[0].weight, lr=1e-2, betas=(0.8, 0.99), eps=1e-8)

    def step(sel):
        values = torch.randn(sel.numel(), cols, generator=g)
        for table, opt in zip(tables, opts):
            table.sparse_grad = SparseGrad(sel.to(DEVICE), values.to(DEVICE).clone())
            opt.step()
        bound.step(sel.to(DEVICE), values.to(DEVICE))

    def assert_same():
        (tk, tt), (ok, ot) = tables, opts
        bound.assert_close(tk.weight, tt.weight, ok.state[tk.weight], ot.state[tt.weight],
                           moments_bitwise=DEVICE == "cuda" or aten_moments_bitwise())

    every = torch.arange(rows)
    for _ in range(9):  # counts 1..9 over a table that starts with 4 entries
        step(every)
    assert opts[0]._bias_corrections.covering(0, 0.8, 0.99, torch.device(DEVICE))[0].numel() > 9
    assert_same()
    loaded = {k: v.clone() for k, v in opts[1].state[tables[1].weight].items()}
    loaded["row_step"][::2] = 5000.0  # a checkpoint from a longer run: far past the table
    for table, opt in zip(tables, opts):
        opt.state[table.weight] = {k: v.clone() for k, v in loaded.items()}
    bound.steps[::2] = 5000.0
    step(every)
    assert_same()
    assert opts[0].state[tables[0].weight]["row_step"][0] == 5001.0
    for opt, table in zip(opts, tables):  # an in-place edit of the counts is seen too
        opt.state[table.weight]["row_step"][1] = 20000.0
    bound.steps[1] = 20000.0
    step(every[:3])
    assert_same()


def _sub_scores(heads: int, tokens: int, n: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads * 2, tokens, n, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("n, knn", [(16, 8), (20, 4), (12, 5), (8, 8)])  # odd n, odd knn, knn = n
def test_product_topk_kernel_is_the_torch_selection(n, knn):
    """fp32 scores (no ties): the one-kernel selection picks the same slots in the same order."""
    from pkm.memory import _select_torch

    sub = _sub_scores(3, 7, n, torch.float32)
    got = triton_kernels.product_topk(sub, knn)
    ref, _, _ = _select_torch(sub.view(3, 2, 7, n), knn)
    assert got.dtype == torch.int64 and got.shape == (3, 7, knn)
    assert torch.equal(got, ref)


def test_product_topk_kernel_with_ties_in_bf16():
    """bf16 scores tie often: the kernel's slots may differ from torch.topk's among equals, but they
    are distinct, their candidate scores (summed in bf16, as the torch path sums) are the torch
    path's, best first, and equal scores are ordered by the lower slot."""
    from pkm.memory import _select_torch

    n, knn = 32, 8
    sub = (_sub_scores(2, 9, n, torch.float32) * 2).round().div(2).to(torch.bfloat16)  # many equal scores
    got = triton_kernels.product_topk(sub, knn)
    ref, _, _ = _select_torch(sub.view(2, 2, 9, n), knn)
    halves = sub.view(2, 2, 9, n)

    def scores(slots):
        s1 = halves[:, 0].gather(-1, slots // n)
        s2 = halves[:, 1].gather(-1, slots % n)
        return (s1 + s2).float()  # bf16 + bf16 rounds to bf16, as the selection does

    got_scores, ref_scores = scores(got), scores(ref)
    assert torch.equal(got_scores, ref_scores)  # the same candidate values, in the same (descending) order
    assert (got_scores[..., :-1] >= got_scores[..., 1:]).all()
    same = got_scores[..., :-1] == got_scores[..., 1:]
    assert (got[..., :-1] < got[..., 1:])[same].all()  # ties: the lower slot first
    assert all(len(set(row.tolist())) == knn for row in got.reshape(-1, knn))
    assert same.any()  # the case has ties at all


def test_product_topk_kernel_handles_zero_tokens_and_bad_shapes():
    assert triton_kernels.product_topk(_sub_scores(2, 0, 8, torch.float32), 4).shape == (2, 0, 4)
    with pytest.raises(ValueError, match="two sets per head"):
        triton_kernels.product_topk(torch.zeros(3, 2, 8), 4)
    with pytest.raises(ValueError, match="0 < knn <= n"):
        triton_kernels.product_topk(torch.zeros(2, 2, 8), 9)


def test_memory_with_fused_selection_matches_the_torch_selection(monkeypatch):
    """The whole layer, fp32: output, indices and every gradient equal with the selection fused or
    not; PKM_FUSED_TOPK=1 switches the default on for CUDA tensors only."""
    from pkm.memory import fused_topk_enabled

    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        mem = ProductKeyMemory(12, 10, n_keys=12, heads=2, knn=5, k_dim=8).to(DEVICE)
        mem.fused_topk = fused
        x = torch.randn(3, 4, 12, device=DEVICE, requires_grad=True)
        out = mem(x, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], device=DEVICE))
        out.output.square().sum().backward()
        results.append((out.output.detach(), out.indices, x.grad, mem.keys.grad, mem.query_proj.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("PKM_FUSED_TOPK", raising=False)
    assert not fused_topk_enabled(cpu) and fused_topk_enabled(cpu, True) and not fused_topk_enabled(cpu, False)
    monkeypatch.setenv("PKM_FUSED_TOPK", "1")
    assert not fused_topk_enabled(cpu)  # automatic: CUDA tensors only
    if torch.cuda.is_available():
        assert fused_topk_enabled(torch.zeros(1, device="cuda"))


def test_triton_switch(monkeypatch):
    """Selection: automatic only for CUDA tensors, PKM_TRITON=0 turns the automatic choice off,
    an explicit attribute wins, and forcing kernels on CPU without the interpreter is an error."""
    from pkm.values import triton_enabled

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.zeros(1)
    assert triton_enabled(cpu, None) is False
    assert triton_enabled(cpu, False) is False
    assert triton_enabled(cpu, True) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_enabled(cpu, True)
    if torch.cuda.is_available():
        gpu = torch.zeros(1, device="cuda")
        assert triton_enabled(gpu, None) is True
        monkeypatch.setenv("PKM_TRITON", "0")
        assert triton_enabled(gpu, None) is False
        assert triton_enabled(gpu, True) is True


# --------------------------------------------------------------------------------------------------
# column-sharded tables on spawned gloo ranks: kernels against the torch path, inside one process group
# --------------------------------------------------------------------------------------------------

SHARD_ROWS, SHARD_DIM, SHARD_K = 30, 7, 6  # 7 columns over 2 ranks: 4 + 3
SHARD_COUNTS = ([5, 0], [2, 6])  # two micro-batches; rank 1 has no tokens in the first


def _sharded_scenario(rank: int, full: torch.Tensor, batches: list) -> dict:
    """Two micro-batches accumulated into the shard's grad, the global grad norm, one SparseAdam
    step; once with the kernels and once with the torch path, on the same ranks."""
    import torch.distributed as dist

    from pkm.sharded_values import ShardedValueTable
    from pkm.value_step import global_grad_norm

    group = dist.new_group([0, 1])
    out = {}
    for flag in (True, False):
        table = ShardedValueTable.from_full(full, group=group)
        table.triton = flag
        opt = SparseAdam([table], lr=0.05, weight_decay=0.01)
        opt.triton, opt.native = flag, False
        res = {"out": [], "w_grad": []}
        for idx, w, probe in batches:
            w = w[rank].clone().requires_grad_(True)
            y = table(idx[rank], w)
            (y * probe[rank]).sum().backward()
            res["out"].append(y.detach())
            res["w_grad"].append(w.grad)
        res["rows"] = table.sparse_grad.rows.clone()
        res["grad"] = table.sparse_grad.values.clone()
        res["norm"] = global_grad_norm([table])
        opt.step()
        res["weight"] = table.weight.detach().clone()
        out[flag] = res
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machines: the gloo ranks run the kernels through "
                    "Triton's interpreter, which the GPU image's older Triton runs differently; on CUDA "
                    "tests/test_triton_gpu.py covers column shards")
def test_sharded_table_with_kernels_matches_torch_path(monkeypatch):
    from tests.test_sharded_values import run_on_ranks

    # the gloo ranks hold CPU tensors: their (fresh) Triton runs the kernels through the interpreter,
    # also on a machine with a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    g = torch.Generator().manual_seed(7)
    full = torch.randn(SHARD_ROWS, SHARD_DIM, generator=g)
    batches = []
    for counts in SHARD_COUNTS:
        idx = [torch.randint(0, SHARD_ROWS, (c, SHARD_K), generator=g) for c in counts]
        if counts[0]:
            idx[0][0, :2] = 4  # a duplicate inside a bag
        w = [torch.randn(c, SHARD_K, generator=g) for c in counts]
        probe = [torch.randn(c, SHARD_DIM, generator=g) for c in counts]
        batches.append((idx, w, probe))
    results = run_on_ranks(_sharded_scenario, 2, full, batches)
    for res in results:
        kern, ref = res[True], res[False]
        for a, b in zip(kern["out"] + kern["w_grad"], ref["out"] + ref["w_grad"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        assert torch.equal(kern["rows"], ref["rows"])
        torch.testing.assert_close(kern["grad"], ref["grad"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kern["norm"], ref["norm"])
        torch.testing.assert_close(kern["weight"], ref["weight"], rtol=1e-6, atol=1e-7)
    assert results[0][True]["out"][0].shape == (5, SHARD_DIM) and results[1][True]["out"][0].shape == (0, SHARD_DIM)
