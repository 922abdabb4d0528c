"""Stopping on a signal: SIGTERM/SIGINT (a scheduler's preemption, ``docker stop``, Ctrl-C) set a
flag, and the training loop saves a checkpoint at the next step boundary and exits cleanly."""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopFlag"]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly.

    With several ranks the stop must be agreed: a signal may reach the ranks at different times and
    all must stop at the same step. ``agreed`` starts a non-blocking all-reduce (MAX) of the flags at
    every step and returns the result of the one started at the step before, which is long finished
    by then: reading it never makes the host wait for the current step's work on the device. So the
    ranks stop one step after the first of them saw the signal, all at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor, Any] | None = None  # (work, host copy, copy done event)
        self._host: torch.Tensor | None = None  # pinned host buffer of the flag (CUDA)

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
        """Whether every rank stops now. Collective with several ranks (every rank calls it once per
        step): True on every rank at the step after the first one in which some rank had the flag
        set. One rank needs no agreement and stops at once, without touching the device."""
        if world_size == 1:
            return self.requested
        previous = self._read_pending()
        # torch.full writes the value with a kernel: no host-to-device copy (torch.tensor([v], device=...)
        # would copy from pageable memory and wait for the device)
        flag = torch.full((1,), 1 if self.requested else 0, dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
        if flag.device.type == "cpu":
            self._pending = (work, flag, None)
        else:
            work.wait()  # NCCL: orders the current stream after the all-reduce; the host goes on
            if self._host is None:
                self._host = torch.empty(1, dtype=torch.int32, pin_memory=True)  # read before it is reused
            self._host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (work, self._host, done)
        return previous

    def _read_pending(self) -> bool:
        """The result of the all-reduce started at the previous step (False before the first)."""
        if self._pending is None:
            return False
        work, host, done = self._pending
        self._pending = None
        if done is None:
            work.wait()  # gloo: finished in the background during the step
        else:
            done.synchronize()  # the copy was queued a step ago: waits for that point only
        # a host tensor read through numpy: no device is involved (an .item() would be counted as
        # a sync by the step's sync check, and is one on a device tensor)
        return bool(host.numpy()[0])

    def drain(self) -> None:
        """Wait for the last all-reduce, if one is outstanding (the loop ended without using it)."""
        self._read_pending()

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
