"""The learning-rate shape shared by pretraining and finetuning (dense and value optimizers alike)."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["SCHEDULE_SHAPES", "warmup_decay"]

SCHEDULE_SHAPES = ("linear", "cosine", "constant")


def warmup_decay(warmup_steps: int, horizon: int, shape: str = "linear", floor: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimizer steps (LambdaLR convention: step 0 is the
    first update). Linear warmup over ``warmup_steps`` (the first update uses 1/warmup of the peak),
    then ``shape`` from 1 down to ``floor`` at ``horizon`` steps, flat after it."""
    if shape not in SCHEDULE_SHAPES:
        raise ValueError(f"lr schedule shape must be one of {SCHEDULE_SHAPES}, got {shape!r}.")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if shape == "constant" or horizon <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, horizon - warmup_steps))
        if shape == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor
