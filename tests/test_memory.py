"""ProductKeyMemory against a naive O(N) reference that scores all n^2 product keys exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pkm.memory import MemoryOutput, ProductKeyMemory


def naive_memory(mem: ProductKeyMemory, x: torch.Tensor, values: torch.Tensor):
    """Reference: same parameters, but builds all N = n^2 full keys and scores every one of them.

    x [T, d] (real tokens); values a dense [N, v] tensor (so autograd gives a dense value grad).
    Returns (output [T, v], indices [T, H, k], weights [T, H, k]).
    """
    h, n, k, k_dim = mem.heads, mem.n_keys, mem.knn, mem.k_dim
    q = F.linear(x, mem.query_proj.weight, mem.query_proj.bias)
    norm = mem.query_norm
    if isinstance(norm, torch.nn.BatchNorm1d):
        q = F.batch_norm(q, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    else:
        q = F.layer_norm(q, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    q = q.view(-1, h, k_dim)  # [T, H, k_dim]
    k1, k2 = mem.keys[:, 0], mem.keys[:, 1]  # [H, n, half]
    # full product keys: key[a * n + b] = concat(k1[a], k2[b])  -> [H, N, k_dim]
    full = torch.cat(
        [k1.unsqueeze(2).expand(h, n, n, k_dim // 2), k2.unsqueeze(1).expand(h, n, n, k_dim // 2)],
        dim=-1,
    ).reshape(h, n * n, k_dim)
    scores_all = torch.einsum("thd,hnd->thn", q, full)  # [T, H, N]
    scores, indices = scores_all.topk(k, dim=-1)  # [T, H, k]
    weights = scores.softmax(-1)
    out = (weights.unsqueeze(-1) * values[indices]).sum(dim=(1, 2))  # [T, v]
    return out, indices, weights


CONFIGS = [  # (n_keys, heads, knn, k_dim, query_norm)
    (8, 1, 1, 8, "batchnorm"),
    (16, 4, 8, 16, "batchnorm"),
    (32, 1, 32, 16, "layernorm"),
    (64, 4, 32, 32, "batchnorm"),
    (64, 4, 8, 16, "layernorm"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_keys,heads,knn,k_dim,query_norm", CONFIGS)
def test_matches_naive_reference(n_keys, heads, knn, k_dim, query_norm, dtype):
    torch.manual_seed(1000 * n_keys + 10 * knn + heads)
    d_in, d_out, tokens = 12, 10, 24
    mem = ProductKeyMemory(d_in, d_out, n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim,
                           query_norm=query_norm).to(dtype)
    x = torch.randn(tokens, d_in, dtype=dtype, requires_grad=True)
    probe = torch.randn(tokens, d_out, dtype=dtype)

    res = mem(x)
    (res.output * probe).sum().backward()
    fast_grads = {name: p.grad.clone() for name, p in mem.named_parameters() if p.grad is not None}
    fast_x_grad = x.grad.clone()
    sg = mem.values.sparse_grad
    fast_value_grad = torch.zeros(mem.size, d_out, dtype=torch.float64)
    fast_value_grad[sg.rows] = sg.values.double()
    assert sg.rows.unique().numel() == sg.rows.numel(), "sparse grad must be coalesced"
    assert torch.all(sg.rows[1:] > sg.rows[:-1]), "sparse grad rows must be sorted"

    mem.zero_grad()
    x.grad = None
    values = mem.values.weight.detach().clone().to(dtype).requires_grad_(True)
    ref_out, ref_idx, ref_w = naive_memory(mem, x, values)
    (ref_out * probe).sum().backward()

    tol = dict(atol=1e-5, rtol=1e-5)
    assert torch.equal(res.indices, ref_idx)
    torch.testing.assert_close(res.weights, ref_w, **tol)
    torch.testing.assert_close(res.output, ref_out, **tol)
    torch.testing.assert_close(fast_x_grad, x.grad, **tol)
    for name, p in mem.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[name], p.grad, **tol, msg=f"grad of {name}")
    assert set(fast_grads) == {n for n, p in mem.named_parameters() if p.requires_grad}
    torch.testing.assert_close(fast_value_grad, values.grad.double(), **tol)
    # the value grad is row-sparse: exactly the looked-up rows
    assert torch.equal(sg.rows, torch.unique(ref_idx))


def test_padding_leaves_outputs_and_batchnorm_stats_unchanged():
    torch.manual_seed(0)
    mem = ProductKeyMemory(16, 8, n_keys=16, heads=2, knn=4, k_dim=16).train()
    real = torch.randn(2, 5, 16)
    mask_small = torch.ones(2, 5, dtype=torch.long)
    mem_padded = ProductKeyMemory(16, 8, n_keys=16, heads=2, knn=4, k_dim=16).train()
    mem_padded.load_state_dict(mem.state_dict())

    out_small = mem(real, mask_small)
    # same real tokens, plus 3 padded positions per sequence full of large junk
    padded = torch.cat([real, 100 * torch.randn(2, 3, 16)], dim=1)
    mask = torch.cat([mask_small, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    out_padded = mem_padded(padded, mask)

    torch.testing.assert_close(out_padded.output[:, :5], out_small.output, atol=1e-6, rtol=1e-6)
    assert torch.all(out_padded.output[:, 5:] == 0)
    assert torch.equal(out_padded.indices, out_small.indices)
    assert out_padded.indices.shape == (10, 2, 4)
    bn_a, bn_b = mem.query_norm, mem_padded.query_norm
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var, atol=1e-6, rtol=1e-6)
    assert int(bn_a.num_batches_tracked) == int(bn_b.num_batches_tracked) == 1
    # the running stats did move (so the comparison above is meaningful)
    assert bn_a.running_mean.abs().sum() > 0


def test_3d_without_mask_and_eval_mode():
    torch.manual_seed(0)
    mem = ProductKeyMemory(16, 8, n_keys=16, heads=2, knn=4, k_dim=16)
    x = torch.randn(3, 4, 16)
    res = mem(x)
    assert res.output.shape == (3, 4, 8)
    assert res.indices.shape == (12, 2, 4) and res.indices.dtype == torch.int64
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(12, 2))
    mem.eval()
    a, b = mem(x).output, mem(x).output
    assert torch.equal(a, b)


def test_bf16_autocast_runs_and_keeps_fp32_table():
    torch.manual_seed(0)
    mem = ProductKeyMemory(32, 16, n_keys=16, heads=2, knn=4, k_dim=16)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = mem(x, mask)
        loss = res.output.float().pow(2).sum()
    loss.backward()
    assert res.output.dtype == torch.bfloat16
    assert res.weights.dtype == torch.bfloat16
    assert mem.values.weight.dtype == torch.float32
    assert mem.values.sparse_grad.values.dtype == torch.float32
    assert mem.keys.grad is not None and mem.keys.grad.dtype == torch.float32
    assert torch.isfinite(mem.query_proj.weight.grad).all()


def _cast_params_like_deepspeed(mem: ProductKeyMemory, dtype: torch.dtype) -> None:
    """What DeepSpeed bf16/fp16 does to the engine's module: every parameter's data is cast, no
    buffer is (BatchNorm running stats stay fp32). The value table lives outside the engine
    (DESIGN.md), so it keeps its fp32 weight."""
    for name, p in mem.named_parameters():
        if not name.startswith("values."):
            p.data = p.data.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_with_fp32_buffers_match_fp32_layer(dtype):
    torch.manual_seed(0)
    ref = ProductKeyMemory(32, 16, n_keys=16, heads=2, knn=4, k_dim=16).train()
    with torch.no_grad():  # give the fp32 reference the same (half-representable) parameters
        for name, p in ref.named_parameters():
            if not name.startswith("values."):
                p.copy_(p.to(dtype).float())
    mem = copy.deepcopy(ref)
    _cast_params_like_deepspeed(mem, dtype)
    bn = mem.query_norm
    assert bn.weight.dtype == dtype and bn.running_mean.dtype == torch.float32
    x = torch.randn(2, 6, 32).to(dtype)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[0, 5] = 0
    x[~mask.bool()] = 100.0  # junk at padded positions must stay out of the statistics
    real = mask.bool()

    for training in (True, False):
        mem.train(training)
        ref.train(training)
        # the query net alone: the BatchNorm under mixed dtypes, over the real tokens only
        q, q_ref = mem.query(x[real]), ref.query(x[real].float())  # [T, H, k_dim]
        assert q.dtype == dtype
        torch.testing.assert_close(q.float(), q_ref, atol=3e-2, rtol=2e-2)

        res, res_ref = mem(x, mask), ref(x.float(), mask)
        assert isinstance(res, MemoryOutput)
        assert res.output.dtype == dtype and res.weights.dtype == dtype
        assert torch.all(res.output[~real] == 0)
        # half-precision rounding may swap near-tied slots at the top-k boundary: compare the output
        # where the chosen slot sets agree, and require most tokens to agree so the check means something
        agree = (res.indices.sort(-1)[0] == res_ref.indices.sort(-1)[0]).all(-1).all(-1)  # [T]
        assert agree.float().mean() >= 0.5
        torch.testing.assert_close(res.output[real][agree].float(), res_ref.output[real][agree],
                                   atol=1e-2, rtol=2e-2)

    # running stats: fp32, updated once per training forward (query + layer), close to the fp32 layer
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    assert int(bn.num_batches_tracked) == int(ref.query_norm.num_batches_tracked) == 2
    torch.testing.assert_close(bn.running_mean, ref.query_norm.running_mean, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(bn.running_var, ref.query_norm.running_var, atol=1e-3, rtol=1e-2)

    mem.train()
    mem(x, mask).output.float().pow(2).sum().backward()
    for name, p in mem.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == dtype, name
            assert torch.isfinite(p.grad).all(), name
    assert mem.values.sparse_grad.values.dtype == torch.float32


def test_memory_output_is_a_tuple_hook_engines_can_walk():
    """ZeRO-3 finds a forward's output tensors only inside tensors/tuples/lists/dicts (its hook on
    them re-gathers the module's parameters for backward); a dataclass would hide them."""
    mem = ProductKeyMemory(8, 6, n_keys=8, heads=2, knn=2, k_dim=8)
    out = mem(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long))
    assert isinstance(out, tuple)
    assert out._fields == ("output", "indices", "weights")
    assert out[0] is out.output and out[1] is out.indices and out[2] is out.weights
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 3 and all(isinstance(t, torch.Tensor) for t in leaves)

    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    seen = []
    walked = zero_utils.apply_to_tensors_only(lambda t: seen.append(t) or t, out)  # ZeRO-3's output walk
    assert len(seen) == 3 and seen[0] is out.output
    assert isinstance(walked, MemoryOutput)  # rebuilt as the same type, fields in place
    assert walked.indices is out.indices


def test_all_padding_batch_returns_zeros():
    mem = ProductKeyMemory(8, 6, n_keys=8, heads=2, knn=2, k_dim=8)
    res = mem(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(res.output, torch.zeros(2, 3, 6))
    assert res.indices.shape == (0, 2, 2) and res.weights.shape == (0, 2, 2)
    assert torch.isfinite(mem.query_norm.running_mean).all() and torch.isfinite(mem.query_norm.running_var).all()


def test_zero_init_values_give_zero_output():
    mem = ProductKeyMemory(8, 8, n_keys=8, heads=1, knn=2, k_dim=8, value_init="zeros")
    out = mem(torch.randn(5, 8)).output
    assert torch.equal(out, torch.zeros_like(out))


def test_values_handed_in_are_not_registered():
    from pkm.values import ValueTable

    mem = ProductKeyMemory(8, 6, n_keys=8, heads=1, knn=2, k_dim=8, external_values=True)
    assert not mem.owns_values and not any(k.startswith("values.") for k in mem.state_dict())
    with pytest.raises(ValueError, match="has no value table yet: hand one in with attach_values"):
        mem(torch.randn(3, 8))
    table = ValueTable(64, 6, init="zeros")
    mem.attach_values(table)
    assert mem.value_table is table
    assert not any(k.startswith("values.") for k in mem.state_dict())
    assert all(m is not table for m in mem.modules())
    assert all(p is not table.weight for p in mem.parameters())
    assert torch.equal(mem(torch.randn(3, 8)).output, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="this memory needs 64 x 6"):
        mem.attach_values(ValueTable(63, 6))
    owner = ProductKeyMemory(8, 6, n_keys=8, heads=1, knn=2, k_dim=8)
    with pytest.raises(ValueError, match="owns its value table"):
        owner.attach_values(table)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        ProductKeyMemory(8, 8, n_keys=4, knn=8)
    with pytest.raises(ValueError):
        ProductKeyMemory(8, 8, k_dim=7)
    mem = ProductKeyMemory(8, 8, n_keys=8, heads=1, knn=2, k_dim=8)
    with pytest.raises(ValueError):
        mem(torch.randn(3, 9))
    with pytest.raises(ValueError):
        mem(torch.randn(2, 3, 8), torch.ones(2, 4))
