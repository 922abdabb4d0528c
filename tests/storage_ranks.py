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
