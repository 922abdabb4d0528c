"""Rank functions for tests/test_shared_storage.py's spawned gloo ranks (a module that imports only
pretrain.shared_storage, so a spawned rank starts quickly)."""

from __future__ import annotations

import os


def _outcome(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as e:
        return f"raised: {e}"
    return "ok"


def agreement_cases(rank: int, root: str) -> dict[str, str]:
    """Each start-up check on a good and a bad setup; -> {case: "ok" or "raised: <message>"}."""
    from pretrain import shared_storage as ss

    shared = os.path.join(root, "shared")
    own = os.path.join(root, f"own_{rank}")  # a node-local folder
    os.makedirs(own, exist_ok=True)
    for folder in (shared, own):
        os.makedirs(os.path.join(folder, "train_state"), exist_ok=True)
        with open(os.path.join(folder, "train_state", f"rank_{rank:05d}.pt"), "w") as f:
            f.write("x")
    files = [f"train_state/rank_{r:05d}.pt" for r in range(2)]
    return {
        "verdict ok": _outcome(ss.first_failure, None),
        "verdict rank 1 fails": _outcome(ss.first_failure, "data.shard_dir 'x' does not exist" if rank == 1 else None),
        "shared folder": _outcome(ss.check_folder_shared, shared),
        "own folder": _outcome(ss.check_folder_shared, own),
        "shared folder probes left": ",".join(n for n in os.listdir(shared) if n.startswith(ss.PROBE_PREFIX)),
        "data folder shared": str(ss.folder_is_shared(shared)),
        "data folder own": str(ss.folder_is_shared(own)),
        "same resume": _outcome(ss.agree_on_resume, None),
        "resume differs": _outcome(ss.agree_on_resume, os.path.join(root, "ckpt", "step_00000004") if rank == 0 else None),
        "every rank wrote (shared)": _outcome(ss.check_every_rank_wrote, shared, files),
        "every rank wrote (own)": _outcome(ss.check_every_rank_wrote, own, files),
    }


def shard_scan_cases(rank: int, root: str) -> dict[str, object]:
    """Who scans the shards (check_shards replaced by a recorder): a shared folder, node-local
    copies on two hosts (host names faked per rank), and a scan that fails."""
    import socket

    from pretrain import data, shared_storage

    calls: list[str] = []

    def recorder(shard_dir, splits, vocab_size, verify_checksums=False):
        calls.append(os.path.basename(shard_dir))
        if os.path.basename(shard_dir) == "corrupt":
            raise ValueError(f"{shard_dir}/train_00000.bin holds token id 99999")

    data.check_shards = recorder
    shared = os.path.join(root, "shared")
    own = os.path.join(root, f"copy_{rank}")
    corrupt = os.path.join(root, "corrupt")
    for folder in (shared, own, corrupt):
        os.makedirs(folder, exist_ok=True)
    out: dict[str, object] = {}
    data.check_shards_once(shared, ["train"], 100)
    out["shared"] = list(calls)
    calls.clear()
    real_hostname = socket.gethostname
    socket.gethostname = lambda: f"node{rank}"  # two hosts, each with its own copy
    shared_storage._HOSTS = None
    try:
        data.check_shards_once(own, ["train"], 100)
    finally:
        socket.gethostname = real_hostname
        shared_storage._HOSTS = None
    out["copies on two hosts"] = list(calls)
    calls.clear()
    out["corrupt"] = _outcome(data.check_shards_once, corrupt, ["train"], 100)
    out["corrupt scanned by"] = list(calls)
    # a scan (3 s) longer than the group's timeout (1 s): the others wait in rounds, never timing out
    import datetime
    import time

    import torch.distributed as dist

    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=1))
    real_group, real_poll = shared_storage.control_group, data.SCAN_POLL_S
    shared_storage.control_group = lambda: short
    data.SCAN_POLL_S = 0.2
    data.check_shards = lambda *a, **k: time.sleep(3.0)
    try:
        out["slow scan"] = _outcome(data.check_shards_once, shared, ["train"], 100)
    finally:
        shared_storage.control_group, data.SCAN_POLL_S = real_group, real_poll
    return out


def all_cases(rank: int, root: str) -> dict[str, object]:
    """Both sets, from one spawn (the start-up of the ranks dominates the cost)."""
    return {**agreement_cases(rank, root), "scan": shard_scan_cases(rank, os.path.join(root, "scan"))}
