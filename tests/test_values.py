"""ValueTable: weighted lookup, row-sparse coalesced gradients, accumulation, init."""

from __future__ import annotations

import pytest
import torch

import pkm.values

from pkm.values import SparseGrad, ValueTable, merge_sparse_grads, row_sparse_grad


def dense_reference(weight: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, probe: torch.Tensor):
    w = weight.detach().clone().requires_grad_(True)
    s = weights.detach().clone().requires_grad_(True)
    out = (s.unsqueeze(-1) * w[indices]).sum(1)
    (out * probe).sum().backward()
    return out, w.grad, s.grad


def to_dense(grad: SparseGrad, num_rows: int) -> torch.Tensor:
    dense = torch.zeros(num_rows, grad.values.shape[1], dtype=grad.values.dtype)
    dense[grad.rows] = grad.values
    return dense


@pytest.mark.parametrize("dtype,chunk_elements", [(torch.float32, 1 << 20), (torch.float64, 1 << 20),
                                                  (torch.float32, 15)])
def test_lookup_and_grads_match_dense(dtype, chunk_elements, monkeypatch):
    # chunk_elements 15: the CPU workspace fill runs in many row chunks (the large-table path)
    monkeypatch.setattr(pkm.values, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    table = ValueTable(50, 7, dtype=dtype)
    indices = torch.randint(0, 50, (9, 6))
    weights = torch.randn(9, 6, dtype=dtype, requires_grad=True)
    probe = torch.randn(9, 7, dtype=dtype)
    out = table(indices, weights)
    (out * probe).sum().backward()
    ref_out, ref_wgrad, ref_sgrad = dense_reference(table.weight, indices, weights, probe)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights.grad, ref_sgrad)
    torch.testing.assert_close(to_dense(table.sparse_grad, 50).to(dtype), ref_wgrad)
    assert torch.equal(table.sparse_grad.rows, torch.unique(indices))


def test_duplicate_indices_are_summed():
    table = ValueTable(10, 3)
    # row 4 appears twice in token 0 and once in token 1; row 7 once
    indices = torch.tensor([[4, 4, 7], [4, 1, 1]])
    weights = torch.tensor([[0.5, 0.25, 1.0], [2.0, 0.1, 0.2]], requires_grad=True)
    grad_out = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    out = table(indices, weights)
    out.backward(grad_out)
    g = table.sparse_grad
    assert g.rows.tolist() == [1, 4, 7]
    expected = torch.stack([
        0.3 * grad_out[1],
        0.75 * grad_out[0] + 2.0 * grad_out[1],
        1.0 * grad_out[0],
    ])
    torch.testing.assert_close(g.values, expected)
    # weights grad: dot(grad_out[t], weight[idx])
    expected_wgrad = (table.weight[indices] * grad_out.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(weights.grad, expected_wgrad)


def test_grad_accumulates_over_micro_batches_and_scales():
    torch.manual_seed(0)
    table = ValueTable(20, 4)
    i1, i2 = torch.randint(0, 20, (5, 3)), torch.randint(0, 20, (6, 3))
    w1, w2 = torch.rand(5, 3, requires_grad=True), torch.rand(6, 3, requires_grad=True)
    p1, p2 = torch.randn(5, 4), torch.randn(6, 4)
    (table(i1, w1) * p1).sum().backward()
    (table(i2, w2) * p2).sum().backward()
    _, g1, _ = dense_reference(table.weight, i1, w1, p1)
    _, g2, _ = dense_reference(table.weight, i2, w2, p2)
    torch.testing.assert_close(to_dense(table.sparse_grad, 20), g1 + g2)
    assert torch.equal(table.sparse_grad.rows, torch.unique(torch.cat([i1.flatten(), i2.flatten()])))
    norm = table.grad_sq_norm()
    torch.testing.assert_close(norm, (g1 + g2).pow(2).sum())
    table.scale_grad_(0.5)
    torch.testing.assert_close(to_dense(table.sparse_grad, 20), 0.5 * (g1 + g2))
    table.zero_grad()
    assert table.sparse_grad is None
    assert table.grad_sq_norm().item() == 0.0


def test_int32_indices_match_int64():
    torch.manual_seed(0)
    table = ValueTable(20, 5)
    idx = torch.randint(0, 20, (4, 3))
    w32 = torch.rand(4, 3, requires_grad=True)
    w64 = w32.detach().clone().requires_grad_(True)
    probe = torch.randn(4, 5)
    (table(idx.int(), w32) * probe).sum().backward()
    g32 = table.sparse_grad.values.clone()
    table.zero_grad()
    (table(idx, w64) * probe).sum().backward()
    torch.testing.assert_close(w32.grad, w64.grad)
    torch.testing.assert_close(g32, table.sparse_grad.values)


def test_weight_is_a_state_dict_parameter_without_dense_grad():
    table = ValueTable(8, 4)
    assert "weight" in table.state_dict()
    assert not table.weight.requires_grad
    w = torch.rand(2, 3, requires_grad=True)
    table(torch.randint(0, 8, (2, 3)), w).sum().backward()
    assert table.weight.grad is None and table.sparse_grad is not None


def test_bf16_weights_compute_in_activation_dtype():
    torch.manual_seed(0)
    table = ValueTable(30, 8)
    indices = torch.randint(0, 30, (4, 5))
    w = torch.rand(4, 5).to(torch.bfloat16).requires_grad_(True)
    out = table(indices, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad.dtype == torch.bfloat16
    assert table.sparse_grad.values.dtype == torch.float32
    ref = (w.detach().float().unsqueeze(-1) * table.weight[indices]).sum(1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_init_options():
    torch.manual_seed(0)
    t = ValueTable(4096, 64, init="normal")
    assert abs(t.weight.std().item() - 64 ** -0.5) < 0.01
    assert abs(t.weight.mean().item()) < 0.01
    assert torch.count_nonzero(ValueTable(16, 4, init="zeros").weight) == 0
    with pytest.raises(ValueError):
        ValueTable(16, 4, init="uniform")
    with pytest.raises(ValueError):
        ValueTable(0, 4)
    with pytest.raises(ValueError):
        ValueTable(16, 4)(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))


def test_merge_and_row_sparse_grad_helpers():
    a = SparseGrad(torch.tensor([1, 5]), torch.tensor([[1.0], [2.0]]))
    b = SparseGrad(torch.tensor([0, 5, 9]), torch.tensor([[3.0], [4.0], [5.0]]))
    m = merge_sparse_grads(a, b)
    assert m.rows.tolist() == [0, 1, 5, 9]
    assert m.values.flatten().tolist() == [3.0, 1.0, 6.0, 5.0]
    g = row_sparse_grad(torch.tensor([[3, 3]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0]]))
    assert g.rows.tolist() == [3] and g.values.tolist() == [[3.0, -3.0]]


def test_workspace_reused_across_steps_and_not_clobbered_by_accumulation():
    torch.manual_seed(0)
    table = ValueTable(30, 4)
    i1, i2 = torch.randint(0, 30, (6, 3)), torch.randint(0, 30, (6, 3))
    w = torch.rand(6, 3)
    p1, p2 = torch.randn(6, 4), torch.randn(6, 4)
    (table(i1, w) * p1).sum().backward()
    ptr = table.sparse_grad.values.data_ptr()
    table.zero_grad()
    (table(i1, w) * p1).sum().backward()
    assert table.sparse_grad.values.data_ptr() == ptr  # reused buffer
    (table(i2, w) * p2).sum().backward()  # accumulation must not overwrite the first grad
    _, g1, _ = dense_reference(table.weight, i1, w, p1)
    _, g2, _ = dense_reference(table.weight, i2, w, p2)
    torch.testing.assert_close(to_dense(table.sparse_grad, 30), g1 + g2)
