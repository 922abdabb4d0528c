"""One optimizer step of the value tables: unscale, global norm over shards, clip, mark, update.

The value tables live outside the dense engine (pkm/sharded_values.py), so everything the engine does
for the dense gradients has to be done for theirs by hand, in the same order: divide out the fp16 loss
scale, take the global L2 norm (the shards of a table hold disjoint columns, so their squared norms
add up over the group), clip by it, refuse a non-finite gradient under fp16 (the engine checked only
its own), then let the caller mark the touched rows (staleness) and step ``SparseAdam``, which clears
the gradients. Pretraining and finetuning both call ``step_values``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

from pkm.values import ValueTable

__all__ = ["ValueStepResult", "global_grad_norm", "step_values"]


class ValueStepResult(NamedTuple):
    applied: bool  # False: the gradients were dropped (non-finite under ``skip_nonfinite``)
    norm: torch.Tensor | None  # global L2 norm of the unscaled gradients before clipping (fp64)


def global_grad_norm(tables: Sequence[ValueTable]) -> torch.Tensor:
    """L2 norm (0-dim fp64, no host sync) of the value gradients of whole tables: each sharded table's
    squared norm is summed over its process group (one all-reduce per group; every rank calls this)."""
    if not tables:
        raise ValueError("global_grad_norm needs at least one value table.")
    device = tables[0].weight.device
    local = torch.zeros((), dtype=torch.float64, device=device)
    by_group: dict[int, tuple[dist.ProcessGroup | None, torch.Tensor]] = {}
    for t in tables:
        sq = t.grad_sq_norm().to(device, torch.float64)  # this rank's columns; 0 without a gradient
        world = getattr(t, "world_size", 1)
        if world > 1:
            group, acc = by_group.get(id(t.group), (t.group, torch.zeros_like(local)))
            by_group[id(t.group)] = (group, acc + sq)
        else:
            local = local + sq
    for group, acc in by_group.values():
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        local = local + acc
    return local.sqrt()


def step_values(
    tables: Sequence[ValueTable],
    optimizer: torch.optim.Optimizer,
    *,
    loss_scale: float = 1.0,
    max_norm: float = 0.0,
    need_norm: bool = False,
    skip_nonfinite: bool = False,
    before_update: Callable[[Sequence[ValueTable]], None] | None = None,
) -> ValueStepResult:
    """Step ``optimizer`` (a ``SparseAdam`` over ``tables``) on the accumulated sparse gradients.

    loss_scale: the fp16 loss scale the gradients still carry (divided out first).
    max_norm > 0: clip by the global norm, as a tensor factor (no host sync).
    need_norm: compute the norm even without clipping (e.g. to log it); it costs a pass over the
        touched rows and an all-reduce, so it is skipped when nothing needs it.
    skip_nonfinite: drop the gradients instead of stepping when the norm is not finite (fp16: the
        engine saw no overflow in the dense gradients, an overflow in the value gradients alone must
        not write inf into the tables); one host sync.
    before_update: called with the tables while their gradients are still there (staleness marks).
    """
    if loss_scale != 1.0:
        for t in tables:
            t.scale_grad_(1.0 / loss_scale)
    norm = global_grad_norm(tables) if (need_norm or max_norm > 0 or skip_nonfinite) else None
    if max_norm > 0:
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(torch.float32)  # min(1, clip / norm)
        for t in tables:
            if t.sparse_grad is not None:
                t.sparse_grad.values.mul_(factor.to(t.sparse_grad.values.device))
    if skip_nonfinite and not bool(torch.isfinite(norm)):
        for t in tables:
            t.zero_grad()
        return ValueStepResult(False, norm)
    if before_update is not None:
        before_update(tables)
    optimizer.step()
    return ValueStepResult(True, norm)
