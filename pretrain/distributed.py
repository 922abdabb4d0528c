"""Process-group start-up: ``deepspeed.init_distributed`` with the run's collective timeout, and
without its /dev/shm leak.

Timeout (``train.collective_timeout_s``): how long a rank waits in the rendezvous or in a collective
for the others, in the world group and in every group made after it (DeepSpeed's, the value
tables'). It bounds how long the survivors of one rank's failure hang: a rank that raises exits at
once (``pretrain.main``), and the ranks waiting for it in the next collective fail when it runs out
(NCCL's watchdog ends the process; gloo raises) instead of waiting DeepSpeed's default 10 minutes
(torch's 30 on gloo for the later groups).

On the cpu accelerator, DeepSpeed (0.19) gives every rank of a single-node launch a 69 MB
shared-memory segment for its low-latency allreduce (``/dev/shm/deepspeed_allreduce_buffer_<uid>_
<addr>_<port>_<rank>``) and never unlinks it. /dev/shm is RAM: every CPU run, finished or killed,
leaves 69 MB per rank behind, and a few hundred runs (a test suite, a sweep) exhaust the machine.
Once every rank has mapped every segment, the names are no longer needed: each rank unlinks its
own, and the kernel frees the memory when the last process holding a mapping exits, however it
exits. The allreduce itself keeps working.
"""
from __future__ import annotations

import os
from datetime import timedelta

SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_segment_path(rank: int) -> str:
    """The segment DeepSpeed's shm allreduce creates for ``rank`` in this launch."""
    addr = os.environ.get("MASTER_ADDR", "")
    port = os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def _default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on.

    ``torch.distributed.new_group(ranks)`` without a timeout takes torch's module-wide default (10
    minutes for NCCL, 30 for gloo), not the world group's. DeepSpeed makes its groups that way (ZeRO's
    data-parallel group, where the gradient reductions run), so without this a rank waiting there
    for a failed peer would ignore ``train.collective_timeout_s``. torch reads the two defaults from
    its ``distributed_c10d`` module at each ``new_group`` (``_get_default_timeout``)."""
    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """``deepspeed.init_distributed`` with the accelerator's backend and ``timeout_s`` (None:
    DeepSpeed's default); then drop this rank's shared-memory name once all ranks have opened theirs
    (a barrier orders the two)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
        _default_group_timeout(kwargs["timeout"])
    deepspeed.init_distributed(dist_backend=backend or accel.communication_backend_name(), **kwargs)
    if accel.device_name() != "cpu":
        return  # the segments exist only on the cpu accelerator
    # shm_initialize opens every peer's segment before init_distributed returns on that peer, so
    # after the barrier no rank still needs a name to find one. Every rank takes the same branch.
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(shm_segment_path(dist.get_rank()))
    except FileNotFoundError:
        pass  # ranks on several nodes, or a DeepSpeed that names or removes it otherwise
