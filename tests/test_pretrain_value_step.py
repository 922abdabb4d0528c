"""The value-table step of the trainer in isolation: fp16 unscaling, overflow skips, clipping.

No process group and no DeepSpeed: a stand-in engine answers ``was_step_applied`` and the tables are
local ValueTables (the trainer treats sharded and local tables alike; world size 1 needs no all-reduce).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from pkm.sparse_adam import SparseAdam
from pkm.usage import StalenessTracker
from pkm.values import SparseGrad, ValueTable
from pretrain.config import load_config
from pretrain.trainer import Trainer, lr_lambda


class _Engine:
    def __init__(self, applied: bool) -> None:
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


def _trainer(applied: bool = True, fp16: bool = False, clip: float = 0.0) -> Trainer:
    torch.manual_seed(0)
    cfg = load_config(None, [("optim.value_grad_clip", clip), ("optim.warmup_steps", 2), ("train.max_steps", 10)])
    tr = object.__new__(Trainer)  # only the attributes _value_step reads
    table = ValueTable(16, 4)
    tr.cfg, tr.engine, tr.fp16, tr.world_size, tr.group = cfg, _Engine(applied), fp16, 1, None
    tr.device = torch.device("cpu")
    tr.table_list = [table]
    tr.value_optimizer = SparseAdam([table], lr=0.1)
    tr.value_scheduler = LambdaLR(tr.value_optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
    tr.staleness = [StalenessTracker(16)]
    tr.state = type("S", (), {"step": 0})()
    tr._acc = {k: torch.zeros((), dtype=torch.float64) for k in ("value_norm_sum", "value_steps", "skipped")}
    return tr


def _grad(scale: float = 1.0) -> SparseGrad:
    return SparseGrad(torch.tensor([1, 3]), torch.full((2, 4), 3.0) * scale)


def _reference(grad_values: torch.Tensor, tr: Trainer) -> torch.Tensor:
    """What one SparseAdam step with the given (unscaled) grad gives, from the same start."""
    ref = copy.deepcopy(tr.table_list[0])
    opt = SparseAdam([ref], lr=0.1)
    LambdaLR(opt, lr_lambda(tr.cfg.optim, tr.cfg.train.max_steps))
    ref.sparse_grad = SparseGrad(torch.tensor([1, 3]), grad_values)
    opt.step()
    return ref.weight.detach()


def test_fp16_grads_are_unscaled_and_rows_marked():
    tr = _trainer(fp16=True)
    expected = _reference(torch.full((2, 4), 3.0), tr)
    tr.table_list[0].sparse_grad = _grad(scale=1024.0)  # the loss scale multiplied it
    tr._value_step(loss_scale=1024.0)
    torch.testing.assert_close(tr.table_list[0].weight.detach(), expected, rtol=0, atol=0)
    assert tr.table_list[0].sparse_grad is None
    assert tr.staleness[0].last_update[[1, 3]].tolist() == [1, 1] and tr.staleness[0].last_update[0] == 0
    assert float(tr._acc["value_norm_sum"]) == pytest.approx(3.0 * 8 ** 0.5)
    assert tr.value_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # warmup 2: step 1 -> full lr


def test_skipped_engine_step_skips_values():
    tr = _trainer(applied=False, fp16=True)
    before = tr.table_list[0].weight.detach().clone()
    lr_before = tr.value_optimizer.param_groups[0]["lr"]
    tr.table_list[0].sparse_grad = _grad()
    tr._value_step(loss_scale=2.0**16)
    assert torch.equal(tr.table_list[0].weight.detach(), before)
    assert tr.table_list[0].sparse_grad is None and float(tr._acc["skipped"]) == 1
    assert tr.value_optimizer.param_groups[0]["lr"] == lr_before  # schedule does not advance either


def test_value_only_overflow_is_skipped_in_fp16():
    tr = _trainer(fp16=True)
    before = tr.table_list[0].weight.detach().clone()
    g = _grad()
    g.values[0, 0] = float("inf")
    tr.table_list[0].sparse_grad = g
    tr._value_step(loss_scale=1.0)
    assert torch.equal(tr.table_list[0].weight.detach(), before) and float(tr._acc["skipped"]) == 1


def test_clipping_by_global_norm():
    tr = _trainer(clip=1.0)
    norm = 3.0 * 8 ** 0.5
    expected = _reference(torch.full((2, 4), 3.0) * (1.0 / (norm + 1e-6)), tr)
    tr.table_list[0].sparse_grad = _grad()
    tr._value_step(loss_scale=1.0)
    torch.testing.assert_close(tr.table_list[0].weight.detach(), expected)
