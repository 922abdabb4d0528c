"""Stopping on a signal: SIGTERM/SIGINT (a scheduler's preemption, ``docker stop``, Ctrl-C) set a
flag, and the training loop saves a checkpoint at the next step boundary and exits cleanly."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopFlag"]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
                pass

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        self.signum = signum

    def agreed(self, world_size: int, group: Any = None, device: torch.device | None = None) -> bool:
        """Whether every rank stops now. A signal may reach ranks at different times, and all must
        stop at the same step: one tiny all-reduce per step. One rank needs no agreement, and no
        host sync."""
        if world_size == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
