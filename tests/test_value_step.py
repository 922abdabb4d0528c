"""pkm.value_step: the value tables' optimizer step (fp16 unscaling, overflow skips, clipping, marks).

Local tables here (world size 1, no all-reduce); tests/test_sharded_values.py checks the global norm
over column shards on spawned ranks against one process.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pkm.sparse_adam import SparseAdam
from pkm.value_step import global_grad_norm, step_values
from pkm.values import SparseGrad, ValueTable

ROWS = torch.tensor([1, 3])


def _table() -> tuple[ValueTable, SparseAdam]:
    torch.manual_seed(0)
    table = ValueTable(16, 4)
    return table, SparseAdam([table], lr=0.1)


def _grad(scale: float = 1.0) -> SparseGrad:
    return SparseGrad(ROWS.clone(), torch.full((2, 4), 3.0) * scale)


def _reference(table: ValueTable, grad_values: torch.Tensor) -> torch.Tensor:
    """One plain SparseAdam step with the given (unscaled, clipped) grad, from the same start."""
    ref = copy.deepcopy(table)
    opt = SparseAdam([ref], lr=0.1)
    ref.sparse_grad = SparseGrad(ROWS.clone(), grad_values)
    opt.step()
    return ref.weight.detach()


def test_fp16_grads_are_unscaled_and_rows_marked_before_the_update():
    table, opt = _table()
    expected = _reference(table, torch.full((2, 4), 3.0))
    table.sparse_grad = _grad(scale=1024.0)  # the loss scale multiplied it
    seen = []
    result = step_values([table], opt, loss_scale=1024.0, skip_nonfinite=True,
                         before_update=lambda ts: seen.append(ts[0].sparse_grad.rows.tolist()))
    assert result.applied and seen == [[1, 3]]  # marks see the gradient before SparseAdam clears it
    torch.testing.assert_close(table.weight.detach(), expected, rtol=0, atol=0)
    assert table.sparse_grad is None
    assert float(result.norm) == pytest.approx(3.0 * 8 ** 0.5)


def test_value_only_overflow_is_skipped_when_asked():
    table, opt = _table()
    before = table.weight.detach().clone()
    g = _grad()
    g.values[0, 0] = float("inf")
    table.sparse_grad = g
    marked = []
    result = step_values([table], opt, skip_nonfinite=True, before_update=marked.append)
    assert not result.applied and not marked
    assert torch.equal(table.weight.detach(), before) and table.sparse_grad is None


def test_clipping_by_global_norm_over_tables():
    (a, _), b = _table(), ValueTable(16, 4)
    opt = SparseAdam([a, b], lr=0.1)
    norm = (3.0 ** 2 * 8 + 4.0 ** 2 * 8) ** 0.5  # two tables' gradients together
    expected_a = _reference(a, torch.full((2, 4), 3.0) / (norm + 1e-6))
    a.sparse_grad = _grad()
    b.sparse_grad = SparseGrad(ROWS.clone(), torch.full((2, 4), 4.0))
    result = step_values([a, b], opt, max_norm=1.0)
    assert float(result.norm) == pytest.approx(norm)
    torch.testing.assert_close(a.weight.detach(), expected_a)


def test_small_gradients_are_not_clipped_and_norm_only_when_needed():
    table, opt = _table()
    expected = _reference(table, torch.full((2, 4), 3.0))
    table.sparse_grad = _grad()
    assert step_values([table], opt, max_norm=100.0).applied
    torch.testing.assert_close(table.weight.detach(), expected)
    table.sparse_grad = _grad()
    assert step_values([table], opt).norm is None  # nothing asked for the norm: no pass, no all-reduce


def test_global_grad_norm_counts_tables_without_a_gradient_as_zero():
    a, b = ValueTable(8, 2), ValueTable(8, 2)
    a.sparse_grad = SparseGrad(torch.tensor([0]), torch.tensor([[3.0, 4.0]]))
    norm = global_grad_norm([a, b])
    assert norm.dtype == torch.float64 and float(norm) == 5.0
    with pytest.raises(ValueError, match="at least one"):
        global_grad_norm([])
