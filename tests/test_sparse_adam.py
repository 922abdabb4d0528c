"""SparseAdam: only touched rows change; equals torch.optim.Adam when every row is touched."""

from __future__ import annotations

import copy

import pytest
import torch

from pkm.sparse_adam import SparseAdam, native_available
from pkm.values import SparseGrad, ValueTable
from tests.fp_bounds import AdamStepBound, aten_moments_bitwise


def lookup_step(table: ValueTable, indices: torch.Tensor, probe: torch.Tensor) -> None:
    weights = torch.rand(indices.shape, requires_grad=True)
    (table(indices, weights) * probe).sum().backward()


def test_untouched_rows_and_moments_bitwise_unchanged():
    torch.manual_seed(0)
    table = ValueTable(40, 6)
    opt = SparseAdam([table], lr=0.1, weight_decay=0.01)
    # step 1 touches rows 0..19 (so they have moments), step 2 touches only a few
    lookup_step(table, torch.arange(20).view(4, 5), torch.randn(4, 6))
    opt.step()
    state = opt.state[table.weight]
    before_w = table.weight.detach().clone()
    before_m, before_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    before_step = state["row_step"].clone()
    touched = torch.tensor([[3, 25, 3], [30, 25, 7]])
    lookup_step(table, touched, torch.randn(2, 6))
    opt.step()
    assert table.sparse_grad is None  # step zeroes the grad
    mask = torch.zeros(40, dtype=torch.bool)
    mask[touched.flatten()] = True
    assert torch.equal(table.weight[~mask], before_w[~mask])
    assert torch.equal(state["exp_avg"][~mask], before_m[~mask])
    assert torch.equal(state["exp_avg_sq"][~mask], before_v[~mask])
    assert torch.equal(state["row_step"][~mask], before_step[~mask])
    assert not torch.equal(table.weight[mask], before_w[mask])
    assert state["row_step"][[3, 7, 25, 30]].tolist() == [2.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("weight_decay,chunk_elements", [(0.0, 1 << 18), (0.1, 1 << 18), (0.0, 7)])
def test_equals_torch_adam_when_all_rows_touched(weight_decay, chunk_elements, native):
    torch.manual_seed(0)
    rows, dim, tokens = 12, 5, 6
    table = ValueTable(rows, dim)
    ref = table.weight.detach().clone().requires_grad_(True)
    opt = SparseAdam([table], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt.chunk_elements = chunk_elements  # 7: several row chunks per step (the large-table CPU path)
    opt.native = native  # fused C kernel (when a compiler exists) or the torch ops
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref_opt = ref_cls([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=weight_decay)
    for _ in range(6):
        # every row touched every step (with duplicates), random weights
        indices = torch.cat([torch.randperm(rows), torch.randint(0, rows, (tokens * 3 - rows,))])
        indices = indices[torch.randperm(indices.numel())].view(tokens, 3)
        weights = torch.rand(tokens, 3)
        probe = torch.randn(tokens, dim)
        (table(indices, weights) * probe).sum().backward()
        ref_out = (weights.unsqueeze(-1) * ref[indices]).sum(1)
        (ref_out * probe).sum().backward()
        opt.step()
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(table.weight.detach(), ref.detach(), atol=1e-6, rtol=1e-6)
    state, ref_state = opt.state[table.weight], ref_opt.state[ref]
    torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], atol=1e-6, rtol=1e-6)


def test_per_row_bias_correction_for_late_rows():
    # a row first touched at step 5 gets a full-size first Adam step: lr * sign(grad)
    table = ValueTable(4, 2, init="zeros")
    opt = SparseAdam([table], lr=0.5)
    for _ in range(4):
        lookup_step(table, torch.tensor([[0]]), torch.ones(1, 2))
        opt.step()
    table.sparse_grad = None
    weights = torch.ones(1, 1, requires_grad=True)
    (table(torch.tensor([[3]]), weights) * torch.tensor([[2.0, -3.0]])).sum().backward()
    opt.step()
    torch.testing.assert_close(table.weight[3], torch.tensor([-0.5, 0.5]), atol=1e-6, rtol=0)


def test_scheduler_drives_lr_and_state_dict_round_trip():
    torch.manual_seed(0)
    t1, t2 = ValueTable(16, 3), ValueTable(16, 3)
    t1b, t2b = ValueTable(16, 3), ValueTable(16, 3)
    t1b.load_state_dict(t1.state_dict())
    t2b.load_state_dict(t2.state_dict())
    opt = SparseAdam([t1, t2], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.01 * (s + 1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    idx = [torch.randint(0, 16, (4, 2)) for _ in range(4)]
    probes = [torch.randn(4, 3) for _ in range(4)]
    weights = [torch.rand(4, 2) for _ in range(4)]

    def run(tables, optimizer, scheduler, steps):
        for s in steps:
            for t in tables:
                (t(idx[s], weights[s].clone().requires_grad_(True)) * probes[s]).sum().backward()
            optimizer.step()
            scheduler.step()

    run([t1, t2], opt, sched, [0, 1])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    # deepcopy: state_dict() returns references to the live state tensors (as torch's Adam does)
    saved = copy.deepcopy(opt.state_dict())
    # fresh optimizer on copies of the tables, loaded from the state dict, must continue identically
    t1b.load_state_dict(t1.state_dict())
    t2b.load_state_dict(t2.state_dict())
    opt_b = SparseAdam([t1b, t2b], lr=1.0)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.01 * (s + 1))
    opt_b.load_state_dict(saved)
    sched_b.load_state_dict(sched.state_dict())
    assert opt_b.state[t1b.weight]["row_step"].dtype == torch.float32
    run([t1, t2], opt, sched, [2, 3])
    run([t1b, t2b], opt_b, sched_b, [2, 3])
    assert torch.equal(t1.weight, t1b.weight) and torch.equal(t2.weight, t2b.weight)
    assert torch.equal(opt.state[t2.weight]["exp_avg_sq"], opt_b.state[t2b.weight]["exp_avg_sq"])


def test_tables_without_grad_are_skipped():
    t = ValueTable(8, 2)
    before = t.weight.detach().clone()
    opt = SparseAdam([t])
    opt.step()
    assert torch.equal(t.weight, before)
    with pytest.raises(ValueError):
        SparseAdam([])
    with pytest.raises(ValueError):
        SparseAdam([t], lr=-1.0)


def _native_vs_torch(threads: int, weight_decay: float, block_elements: int) -> None:
    torch.manual_seed(0)
    num_rows, dim = 300, 37
    a, b = ValueTable(num_rows, dim), ValueTable(num_rows, dim)
    b.load_state_dict(a.state_dict())
    opt_a = SparseAdam([a], lr=0.01, betas=(0.8, 0.95), weight_decay=weight_decay)
    opt_b = SparseAdam([b], lr=0.01, betas=(0.8, 0.95), weight_decay=weight_decay)
    opt_a.native = True  # whatever PKM_SPARSE_ADAM_NATIVE says
    opt_a.native_block_elements = block_elements  # small: many blocks shared by the threads
    opt_b.native = False
    bound = AdamStepBound(a.weight, lr=0.01, betas=(0.8, 0.95), eps=1e-8, weight_decay=weight_decay)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):  # irregular touches: per-row step counts differ
            rows = torch.randperm(num_rows)[: int(torch.randint(1, num_rows, ()))].sort().values
            values = torch.randn(rows.numel(), dim)
            a.sparse_grad, b.sparse_grad = SparseGrad(rows, values), SparseGrad(rows, values.clone())
            before = a.weight.detach().clone()
            version = a.weight._version
            opt_a.step()
            assert a.weight._version > version  # in-place update visible to autograd's checks
            opt_b.step()
            bound.step(rows, values)
            untouched = torch.ones(num_rows, dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(a.weight[untouched], before[untouched])
    finally:
        torch.set_num_threads(old_threads)
    # the same formulas and fma placement as ATen's vectorised lerp / addcmul: counts and (on those
    # paths) moments agree bitwise; the weight within the steps' rounding bound (ATen's vectorised
    # sqrt is not correctly rounded, the kernel's is)
    bound.assert_close(a.weight, b.weight, opt_a.state[a.weight], opt_b.state[b.weight],
                       moments_bitwise=aten_moments_bitwise())


@pytest.mark.skipif(not native_available(), reason="no C compiler: the torch path is the only one")
@pytest.mark.parametrize("threads,weight_decay,block_elements", [(1, 0.0, 1 << 14), (2, 0.1, 40), (3, 0.0, 1)])
def test_native_kernel_matches_torch_path(threads, weight_decay, block_elements):
    _native_vs_torch(threads, weight_decay, block_elements)


@pytest.mark.skipif(not native_available(), reason="no C compiler: the torch path is the only one")
def test_native_kernel_rejects_out_of_range_rows():
    table = ValueTable(8, 3)
    opt = SparseAdam([table])
    opt.native = True
    before = table.weight.detach().clone()
    for bad in ([2, 8], [-1, 3]):
        table.sparse_grad = SparseGrad(torch.tensor(bad), torch.randn(2, 3))
        with pytest.raises(ValueError, match="rows must be in"):
            opt.step()
    assert torch.equal(table.weight, before)


def test_falls_back_to_torch_without_compiler(monkeypatch):
    import pkm.sparse_adam as sa

    monkeypatch.setattr(sa, "_native_fn", None)
    monkeypatch.setattr(sa, "_native_error", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(sa.shutil, "which", lambda name: None)
    assert not sa.native_available()  # no error raised, just unavailable
    assert sa._native_error  # the reason is kept for diagnostics
    table = ValueTable(10, 4)
    opt = SparseAdam([table], lr=0.1)
    before = table.weight.detach().clone()
    table.sparse_grad = SparseGrad(torch.tensor([1, 4]), torch.ones(2, 4))
    opt.step()  # torch path
    torch.testing.assert_close(table.weight[[1, 4]], before[[1, 4]] - 0.1, atol=1e-6, rtol=0)
    assert opt.state[table.weight]["row_step"].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0]
