"""Start-up agreement between ranks: one verdict, one shared run folder, one checkpoint to resume.

A multi-node run breaks late and obscurely when its ranks do not see the same files: every rank
picks the checkpoint to resume from its own view of ``train.out_dir``, only global rank 0 renames a
finished checkpoint folder, and a node-local out_dir leaves the other nodes' shards in their own
``step_N.tmp`` (found only at the next resume). A preparation error on one node used to exit that
node while the others waited in the rendezvous for the whole process-group timeout. These
collectives turn each of those into one clear error on every rank, within seconds of the start:

- ``first_failure``: every rank says "ok" or its error; every rank raises the first one (lowest rank);
- ``check_folder_shared``: rank 0 writes a nonce file in the folder that every rank must read back,
  and every rank writes one that rank 0 must see (both directions: the checkpoint is written by
  every rank and renamed by rank 0);
- ``folder_is_shared``: the one-way form (rank 0 writes, the others read), as a yes / no answer;
- ``agree_on_resume``: every rank's checkpoint to resume (its step) is the same;
- ``check_every_rank_wrote``: at a save, rank 0 sees every rank's train-state file before it renames.

They run over a gloo group of their own (``control_group``): Python objects travel on the CPU,
whatever the training backend, and never between the engine's collectives.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import torch.distributed as dist

__all__ = [
    "StartupError",
    "control_group",
    "rank_name",
    "all_hosts",
    "all_gather_objects",
    "first_failure",
    "check_folder_shared",
    "folder_is_shared",
    "shared_folder_problems",
    "agree_on_resume",
    "check_every_rank_wrote",
    "check_out_dir_on_a_volume",
]

# How long a rank looks for a file another rank has just written before calling it missing: network
# file systems may cache a directory's "no such file" for a few seconds (NFS lookupcache, acdirmin).
VISIBILITY_WAIT_S = float(os.environ.get("PKM_SHARED_FS_WAIT_S", "10"))
PROBE_PREFIX = ".tmp-shared-check-"  # ".tmp-*.json": data prep counts such a leftover as its own temp file
# Docker: the image's checkpoint volume, and the file Docker puts in every container's root
CONTAINER_MARKER = "/.dockerenv"
CHECKPOINT_VOLUME = "/checkpoints"


class StartupError(ValueError):
    """A rank (or several) cannot start; the message names them and says what to fix."""


_CONTROL_GROUP: Any = None


def control_group():
    """The gloo group the start-up checks talk over (None: the default group, already gloo).
    Made on first use; every rank reaches the first use at the same point, so the ranks create
    their groups in the same order, as ``dist.new_group`` requires."""
    global _CONTROL_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_name(rank: int | None = None, host: str | None = None) -> str:
    """'rank 3 (host gpu-node-1)': how every message here names a rank."""
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return f"rank {rank} (host {host or socket.gethostname()})"


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (collective over ``control_group``)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def _raise_if_any(problems: list[str | None], lead: str) -> None:
    found = [p for p in problems if p]
    if found:
        shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
        raise StartupError(f"{lead}{shown}")


def first_failure(error: str | None) -> None:
    """Collective: every rank passes None (ready) or its error message; if any rank failed, every
    rank raises ``StartupError`` with the first failure's message (and how many others failed),
    so all exit together instead of waiting for the one that left. A world of one raises its own."""
    if not _distributed():
        if error:
            raise StartupError(error)
        return
    verdicts = all_gather_objects((rank_name(), error))
    failed = [(who, msg) for who, msg in verdicts if msg]
    if failed:
        who, msg = failed[0]
        others = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
        raise StartupError(f"{who}: {msg}{others}" if len(verdicts) > 1 else msg)


def _missing_after_wait(paths: dict[int, str], timeout_s: float) -> set[int]:
    """The keys of ``paths`` whose file is still absent after waiting up to ``timeout_s`` (one
    deadline for all of them, so many missing files cost one wait, not one each)."""
    deadline = time.monotonic() + timeout_s
    missing = set(paths)
    while True:
        missing = {k for k in missing if not os.path.isfile(paths[k])}
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


def _read_nonce(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("nonce")
    except (OSError, ValueError):
        return None


def _write_probe(path: str, nonce: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"nonce": nonce, "writer": rank_name()}, f)
        f.flush()
        os.fsync(f.fileno())  # on the server before the other ranks look


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _probe(folder: str, two_way: bool, create: bool) -> list[str | None]:
    """Collective. Every rank's problem seeing the folder rank 0 sees (None: fine), the same list
    on every rank. Rank 0 writes a nonce file; every other rank reads it back; with ``two_way``
    every other rank also writes one that rank 0 must find. Every probe file is removed after."""
    rank = dist.get_rank()
    hosts = all_hosts()
    name0 = None
    if rank == 0:
        nonce = uuid.uuid4().hex
        name0 = os.path.join(folder, f"{PROBE_PREFIX}{nonce}.json")
        try:
            if create:
                os.makedirs(folder, exist_ok=True)
            _write_probe(name0, nonce)
            shared = nonce
        except OSError as e:
            shared = f"!{e.strerror or e} ({type(e).__name__})"
    else:
        shared = None
    shared = _broadcast(shared)
    if shared.startswith("!"):  # rank 0 cannot write there: nothing to compare
        return [f"{rank_name(0, hosts[0])} cannot write in '{folder}': {shared[1:]}"] + [None] * (dist.get_world_size() - 1)
    nonce = shared
    mine = os.path.join(folder, f"{PROBE_PREFIX}{nonce}-rank{rank}.json")
    problem = None
    if rank != 0:
        path0 = os.path.join(folder, f"{PROBE_PREFIX}{nonce}.json")
        if _missing_after_wait({0: path0}, VISIBILITY_WAIT_S):
            problem = f"{rank_name()} does not see the file {rank_name(0, hosts[0])} wrote in '{folder}'"
        elif _read_nonce(path0) != nonce:
            problem = f"{rank_name()} reads another content in the file {rank_name(0, hosts[0])} wrote in '{folder}'"
        elif two_way:
            try:
                _write_probe(mine, nonce)
            except OSError as e:
                problem = f"{rank_name()} cannot write in '{folder}': {e.strerror or e}"
    seen = all_gather_objects(problem)
    if two_way:  # the other direction: rank 0 renames what every rank wrote
        if rank == 0:
            paths = {r: os.path.join(folder, f"{PROBE_PREFIX}{nonce}-rank{r}.json")
                     for r in range(1, len(seen)) if seen[r] is None}
            missing = _missing_after_wait(paths, VISIBILITY_WAIT_S)
            for r, path in paths.items():
                if r in missing or _read_nonce(path) != nonce:
                    seen[r] = f"{rank_name(0, hosts[0])} does not see the file {rank_name(r, hosts[r])} wrote in '{folder}'"
        seen = _broadcast(seen)
    dist.barrier(group=control_group())  # every rank has read what it needed
    if rank == 0:
        _remove(name0)
    elif two_way:
        _remove(mine)
    return seen


_HOSTS: list[str] | None = None


def all_hosts() -> list[str]:
    """Every rank's host name (collective on the first call only, on every rank)."""
    global _HOSTS
    if _HOSTS is None or len(_HOSTS) != dist.get_world_size():
        _HOSTS = all_gather_objects(socket.gethostname())
    return _HOSTS


def check_folder_shared(folder: str, what: str = "train.out_dir") -> None:
    """Collective: raise ``StartupError`` on every rank unless ``folder`` (created by rank 0 if
    missing) is one folder that every rank reads and writes, as checkpoints need."""
    if not _distributed():
        return
    problems = _probe(folder, two_way=True, create=True)
    _raise_if_any(problems, f"{what} '{folder}' is not one folder shared by every rank (every rank writes its "
                            "part of each checkpoint there and rank 0 completes it): put it on a file system "
                            "that every node mounts at the same path (with the Docker image: under the "
                            f"{CHECKPOINT_VOLUME} volume, on shared storage). Found: ")


def shared_folder_problems(folder: str) -> list[str | None]:
    """Collective, also at world size 1 (then: can rank 0 write there): ``check_folder_shared``'s
    findings per rank (None: fine) instead of an exception, for the self-test's table."""
    if not (dist.is_available() and dist.is_initialized()):
        return [None]
    return _probe(folder, two_way=True, create=True)


def folder_is_shared(folder: str) -> bool:
    """Collective: True when every rank reads a file that rank 0 writes in ``folder`` (an existing
    folder; False also when rank 0 cannot write there, e.g. a read-only data folder)."""
    if not _distributed():
        return True
    return not any(_probe(folder, two_way=False, create=False))


def agree_on_resume(resume_from: str | None) -> None:
    """Collective: every rank must continue from the same step (or all start new); a disagreement
    names each rank, its host and the step it would have resumed from."""
    if not _distributed():
        return
    step = None
    if resume_from:
        from pretrain.checkpoint import read_meta

        step = int(read_meta(resume_from)["step"])
    choices = all_gather_objects((rank_name(), step, os.path.basename(os.path.normpath(resume_from)) if resume_from else None))
    if len({step for _, step, _ in choices}) > 1:
        listed = "; ".join(f"{who}: {f'step {s} ({name})' if s is not None else 'a new run (no checkpoint)'}"
                           for who, s, name in choices[:8])
        raise StartupError(f"the ranks do not agree on the checkpoint to resume ({listed}): every rank must see "
                           "the same train.out_dir (one shared folder), or all be given the same "
                           "train.resume_from.")


def check_every_rank_wrote(folder: str, relative_paths: list[str]) -> None:
    """Collective, at a checkpoint save after the barrier: rank 0 must see every rank's file
    (``relative_paths[r]`` under ``folder``) before it renames the folder; otherwise every rank
    raises, naming the ranks whose files rank 0 cannot see."""
    if not _distributed():
        return
    problems = None
    hosts = all_hosts()
    if dist.get_rank() == 0:
        missing = _missing_after_wait({r: os.path.join(folder, rel) for r, rel in enumerate(relative_paths)},
                                      VISIBILITY_WAIT_S)
        problems = [f"{rank_name(r, hosts[r])} wrote {rel}, which {rank_name(0, hosts[0])} does not see"
                    if r in missing else None for r, rel in enumerate(relative_paths)]
    problems = _broadcast(problems)
    _raise_if_any(problems, f"checkpoint '{folder}' is incomplete: the ranks do not share the checkpoint folder "
                            "(put train.out_dir on a file system every node mounts at the same path): ")


def check_out_dir_on_a_volume(out_dir: str) -> None:
    """In the Docker image with a checkpoint volume mounted at /checkpoints, a run folder outside it
    (e.g. a config's relative default "runs/...") lives in the container's own layer: lost when the
    container ends, and never seen by another node. Raise ValueError before anything starts."""
    if not (os.path.exists(CONTAINER_MARKER) and os.path.ismount(CHECKPOINT_VOLUME)):
        return
    real, volume = os.path.realpath(out_dir), os.path.realpath(CHECKPOINT_VOLUME)
    if os.path.commonpath([real, volume]) != volume:
        raise ValueError(f"train.out_dir '{out_dir}' ({real}) is not under the {CHECKPOINT_VOLUME} volume: written "
                         "inside the container, it is lost when the container ends and no other node sees it. "
                         f"Set --train.out_dir={CHECKPOINT_VOLUME}/<run name>.")
