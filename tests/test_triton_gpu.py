"""Triton value kernels on CUDA at realistic shapes, against the torch-op path (skipped without a GPU).

BERT-large memory shape: N = 512^2 rows, d = 1024, 4 heads x top-32 = 128 lookups per token.
"""

from __future__ import annotations

import pytest
import torch

from pkm import ProductKeyMemory, SparseAdam, SparseGrad, ValueTable
from pkm.values import lookup_backward, weighted_bag

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROWS, DIM, LOOKUPS, TOKENS = 512 * 512, 1024, 128, 4096


def _inputs(dtype: torch.dtype, cols: int = DIM):
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(ROWS, cols, device="cuda", generator=g) / 32
    # Zipf-like skew: a few hot rows looked up by many tokens, as trained memories do
    idx = (torch.rand(TOKENS, LOOKUPS, device="cuda", generator=g) ** 3 * ROWS).long()
    w = torch.softmax(torch.randn(TOKENS, LOOKUPS, device="cuda", generator=g), -1).to(dtype)
    grad_out = torch.randn(TOKENS, cols, device="cuda", generator=g).to(dtype)
    return table, idx, w, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [DIM, 341])  # full width and a d/3 column shard
def test_forward_and_backward_match_torch_path(dtype, cols):
    table, idx, w, grad_out = _inputs(dtype, cols)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weighted_bag(table, idx, w, triton=True).float(),
                               weighted_bag(table, idx, w, triton=False).float(), **tol)
    got, got_dots = lookup_backward(table, idx, w, grad_out, triton=True)
    ref, ref_dots = lookup_backward(table, idx, w, grad_out, triton=False)
    assert torch.equal(got.rows, ref.rows)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dots, ref_dots, rtol=1e-5, atol=1e-4)


def test_backward_is_deterministic():
    table, idx, w, grad_out = _inputs(torch.bfloat16)
    a, da = lookup_backward(table, idx, w, grad_out, triton=True)
    b, db = lookup_backward(table, idx, w, grad_out, triton=True)
    assert torch.equal(a.values, b.values) and torch.equal(da, db)


def test_sparse_adam_kernel_matches_torch_path():
    tables, opts = [], []
    for flag in (True, False):
        table = ValueTable(ROWS, DIM, device="cuda")
        with torch.no_grad():
            table.weight.copy_(torch.arange(ROWS * DIM, device="cuda").view(ROWS, DIM).sin())
        opt = SparseAdam([table], lr=1e-3, weight_decay=0.01)
        opt.triton = flag
        tables.append(table), opts.append(opt)
    g = torch.Generator(device="cuda").manual_seed(1)
    before = tables[0].weight.detach().clone()
    for _ in range(3):
        rows = torch.randperm(ROWS, device="cuda", generator=g)[:50_000].sort().values
        vals = torch.randn(rows.numel(), DIM, device="cuda", generator=g)
        for table, opt in zip(tables, opts):
            table.sparse_grad = SparseGrad(rows, vals.clone())
            opt.step()
    s_k, s_t = opts[0].state[tables[0].weight], opts[1].state[tables[1].weight]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(s_k[key], s_t[key]), key
    # CUDA's torch-path division and sqrt are IEEE-rounded as the kernel's: within an ulp at most
    torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=2.5e-7, atol=0)
    untouched = s_k["row_step"] == 0
    assert torch.equal(tables[0].weight.detach()[untouched], before[untouched])


def test_memory_layer_bf16_matches_torch_path():
    results = {}
    for flag in (True, False):
        torch.manual_seed(0)
        mem = ProductKeyMemory(DIM, DIM, n_keys=512, heads=4, knn=32, k_dim=256).cuda()
        mem.values.triton = flag
        x = torch.randn(2048, DIM, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mem(x).output
        out.float().square().mean().backward()
        results[flag] = (out.float(), x.grad, mem.keys.grad, mem.values.sparse_grad.values)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_product_topk_kernel_at_bert_large_shape(dtype):
    """The one-kernel selection (4 heads, n = 512, top-32) against the torch ops: the same slots in
    fp32; in bf16 (ties) the same candidate scores, best first."""
    from pkm import triton_kernels
    from pkm.memory import _select_torch

    n, knn, heads = 512, 32, 4
    g = torch.Generator(device="cuda").manual_seed(3)
    sub = torch.randn(2 * heads, TOKENS, n, device="cuda", generator=g).to(dtype)
    got = triton_kernels.product_topk(sub, knn)
    ref, _, _ = _select_torch(sub.view(heads, 2, TOKENS, n), knn)
    if dtype == torch.float32:
        assert torch.equal(got, ref)
    halves = sub.view(heads, 2, TOKENS, n)

    def scores(slots):
        return (halves[:, 0].gather(-1, slots // n) + halves[:, 1].gather(-1, slots % n)).float()

    assert torch.equal(scores(got), scores(ref))
