"""Atomic training checkpoints: DeepSpeed engine state + value shards + TrainState per rank.

Layout under ``<out_dir>/checkpoints/``::

    step_00000100/                  one complete checkpoint (never partially written: see below)
        ds/state/...                engine.save_checkpoint: dense weights, ZeRO optimizer, lr scheduler
        values/                     value-table shards and the SparseAdam state (per rank)
        train_state/rank_00000.pt   TrainState of each rank (step, tokens, data position, RNG states)
        run_config.json             the resolved run config
        ds_config.json              the DeepSpeed config the engine ran with
        data.json                   the training split's fingerprint (checked before a resume)
        model/config.json           BertPkmConfig (+ tokenizer files when known), for convert
        meta.json                   format version, step, world size, ZeRO stage, value-shard layout,
                                    and the size of every other file (checked before a resume)
    latest                          "step_00000100": the newest complete checkpoint
    step_00000090/ ...              older ones, the last ``keep_last_k`` kept

Writing: rank 0 creates ``step_N.tmp/``; every rank writes its parts; after a barrier rank 0 writes
``meta.json``, renames the folder to ``step_N`` (atomic on one file system) and only then replaces
``latest`` (written to a temp file and ``os.replace``d). A crash at any point leaves either the old
``latest`` or the new one pointing at a complete folder; leftover ``*.tmp`` folders are ignored and
cleaned by the next save. A folder damaged later (a file missing or of another size than meta.json
records) is skipped by ``latest_checkpoint``, which falls back to the newest intact one. The folder
must be on a file system every rank sees (as DeepSpeed's own checkpointing assumes): a multi-rank
run checks that at start (``pretrain.shared_storage.check_folder_shared``), and every save checks
that rank 0 sees each rank's train-state file before it renames the folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from atomic_files import write_json_atomic, write_text_atomic
from pkm.checkpoint_values import load_full_values, load_value_shards, save_value_shards
from pretrain.safe_load import deepspeed_files_loaded_safely, load_weights_only, numpy_rng_globals
from pretrain.shared_storage import check_every_rank_wrote

__all__ = [
    "TrainState",
    "capture_rng_state",
    "restore_rng_state",
    "checkpoint_root",
    "latest_checkpoint",
    "checkpoint_problems",
    "read_meta",
    "CKPT_FORMAT_VERSION",
    "list_checkpoints",
    "step_dir_name",
    "save_checkpoint",
    "load_checkpoint",
    "save_value_state",
    "load_value_state",
    "load_full_value_tables",
    "DS_TAG",
]

DS_TAG = "state"  # DeepSpeed's tag inside <ckpt>/ds/
# meta.json format: 1 = no version key, no file list; 2 = "files": {relative path: size in bytes}
CKPT_FORMAT_VERSION = 2
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """What besides the model and optimizers a run needs to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding tokens, summed over ranks
    samples_seen: int = 0  # sequences, summed over ranks
    # The data position belongs to the TrainStream; these two are its snapshot at save time
    # ("sampler": the key checkpoints have always used), handed back to it on resume.
    epoch: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)  # TrainStream.state_dict()
    rng: dict[str, Any] = field(default_factory=dict)  # python / numpy / torch (/ cuda) RNG states
    staleness: list[dict[str, Any]] = field(default_factory=list)  # one StalenessTracker state per memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**d)


def capture_rng_state() -> dict[str, Any]:
    """Python / numpy / torch (/ cuda) RNG states as tensors, ints and tuples only, so the train
    state loads with ``torch.load(weights_only=True)`` (no pickled numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's own device only: a resume may see another number of GPUs per process
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def _numpy_state(saved: Any) -> Any:
    """np.random.set_state's tuple, from the tensor form (or the tuple older train states hold)."""
    if isinstance(saved, dict):
        keys = np.asarray(saved["keys"].numpy(), dtype=np.uint32)
        return saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]
    return saved


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _restore_cuda_rng_state(state["cuda"])


def _restore_cuda_rng_state(saved: Any) -> None:
    """The current device's CUDA generator from a train state: one state (this rank's device), or
    the list of every visible device's states that older checkpoints hold. From such a list the
    entry of the current device index is taken; a list without one (the run resumes with more GPUs
    per node than it was saved with) leaves the generator as it is, with a warning: the dropout
    draws then differ from the interrupted run's."""
    device = torch.cuda.current_device()
    if isinstance(saved, torch.Tensor):
        torch.cuda.set_rng_state(saved, device)
        return
    states = list(saved)
    if device < len(states):
        torch.cuda.set_rng_state(states[device], device)
        return
    import warnings

    warnings.warn(f"the checkpoint's CUDA RNG states cover {len(states)} devices, and this process runs on "
                  f"device {device}: its CUDA generator keeps its fresh seed, so dropout draws differ from "
                  "the interrupted run's (checkpoints written now hold only each rank's own device).",
                  stacklevel=3)


def load_train_state_file(path: str) -> dict[str, Any]:
    """One rank's train state, unpickled by torch's restricted loader (tensors and plain data; the
    numpy array of train states written before RNG states became tensors is allowed too)."""
    return load_weights_only(path, extra_globals=numpy_rng_globals())


# --------------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------------


def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints (with meta.json) under root, oldest first, as (step, path)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(path: str, warn: Callable[[str], None] | None = None) -> str | None:
    """The newest intact checkpoint folder.

    ``path`` may be a run's out_dir, its ``checkpoints/`` folder, or a checkpoint folder itself
    (returned as it is: ``checkpoint_problems`` tells whether it is intact). Folders whose files do
    not match their meta.json (a damaged disk, a copy cut short) are skipped, each reported through
    ``warn``, so a run resumes from the newest checkpoint it can really load. (``latest`` is written
    for people and tools; it can only lag behind the folders, never lead them, so the highest intact
    step is the answer.)
    """
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    root = checkpoint_root(path) if os.path.isdir(checkpoint_root(path)) else path
    for _, cand in reversed(list_checkpoints(root)):
        problems = checkpoint_problems(cand)
        if not problems:
            return cand
        if warn is not None:
            warn(f"checkpoint '{cand}' is damaged ({'; '.join(problems[:3])}): skipping it, using an older one.")
    return None


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint meta '{path}' cannot be read ({e}).") from None
    version = meta.get("format_version", 1)  # version 1 (no file list) had no version key
    if version > CKPT_FORMAT_VERSION:
        raise ValueError(f"checkpoint '{ckpt_dir}' has format version {version}; this code reads versions up to "
                         f"{CKPT_FORMAT_VERSION}: update pkm-bert.")
    return meta


def _file_sizes(folder: str) -> dict[str, int]:
    """{relative path: size in bytes} of every file under folder except meta.json."""
    sizes = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if rel != "meta.json":
                sizes[rel] = os.path.getsize(full)
    return dict(sorted(sizes.items()))


def checkpoint_problems(ckpt_dir: str) -> list[str]:
    """What is wrong with a checkpoint folder (empty: intact): an unreadable meta.json, or a file of
    its recorded list that is missing or has another size. Cheap (one stat per file). Checkpoints
    of format version 1 carry no file list: only their meta.json is checked."""
    try:
        meta = read_meta(ckpt_dir)
    except ValueError as e:
        return [str(e)]
    problems = []
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif os.path.getsize(full) != size:
            problems.append(f"{rel} has {os.path.getsize(full)} bytes, {size} were written")
    return problems


# --------------------------------------------------------------------------------------------------
# Value tables (sharded by columns) and their optimizer: pkm.checkpoint_values does the file format
# (any world size P -> any Q, or one full table); the value lr scheduler rides along here.
# --------------------------------------------------------------------------------------------------


def save_value_state(folder: str, tables: dict[str, Any], value_optimizer: Any, value_scheduler: Any,
                     rank: int) -> None:
    """Collective over the tables' group: every rank writes its shard (+ SparseAdam moments)."""
    if not tables:  # a memory-less model
        return
    save_value_shards(folder, tables, value_optimizer, barrier=True)
    if rank == 0 and value_scheduler is not None:
        torch.save(value_scheduler.state_dict(), os.path.join(folder, "value_scheduler.pt"))


def load_value_state(folder: str, tables: dict[str, Any], value_optimizer: Any, value_scheduler: Any) -> None:
    """Restore shards and moments (resharding if the checkpoint had another world size) and the
    value lr scheduler (the same on every rank)."""
    if not tables:
        return
    load_value_shards(folder, tables, value_optimizer, strict=True, restore_hyperparams=True)
    path = os.path.join(folder, "value_scheduler.pt")
    if value_scheduler is not None and os.path.isfile(path):
        value_scheduler.load_state_dict(load_weights_only(path))


def load_full_value_tables(folder: str) -> dict[str, torch.Tensor]:
    """{memory module path: full [num_rows, dim] fp32 weight}, from all ranks' shards (for convert)."""
    if not os.path.isdir(folder):  # a memory-less model has no value shards
        return {}
    return {name: full.weight for name, full in load_full_values(folder).items()}


# --------------------------------------------------------------------------------------------------
# Whole checkpoints
# --------------------------------------------------------------------------------------------------


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    out_dir: str,
    step: int,
    engine: Any,
    tables: dict[str, Any],
    value_optimizer: torch.optim.Optimizer | None,
    value_scheduler: Any,
    train_state: TrainState,
    rank: int,
    world_size: int,
    keep_last_k: int,
    extra_files: dict[str, Any] | None = None,
    model_config: Any = None,
    tokenizer_dir: str | None = None,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    ``extra_files``: {relative name: JSON-able object} written by rank 0 (run_config.json,
    ds_config.json). ``model_config``: a PretrainedConfig saved to model/ (with the tokenizer files
    copied from ``tokenizer_dir``), so convert needs nothing but the checkpoint.
    """
    root = checkpoint_root(out_dir)
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of an interrupted save: a folder, a `latest` write
            path = os.path.join(root, name)
            if name.endswith(".tmp") and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(".tmp-") and name.endswith("-latest") and os.path.isfile(path):
                os.remove(path)
        if os.path.isdir(final):  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.makedirs(tmp)
    _barrier()

    engine.save_checkpoint(os.path.join(tmp, "ds"), tag=DS_TAG, save_latest=False)
    save_value_state(os.path.join(tmp, "values"), tables, value_optimizer, value_scheduler, rank)
    os.makedirs(os.path.join(tmp, "train_state"), exist_ok=True)
    torch.save(train_state.to_dict(), os.path.join(tmp, "train_state", f"rank_{rank:05d}.pt"))
    if rank == 0:
        for rel, obj in (extra_files or {}).items():
            write_json_atomic(os.path.join(tmp, rel), obj)
        if model_config is not None:
            model_dir = os.path.join(tmp, "model")
            model_config.save_pretrained(model_dir)
            if tokenizer_dir:
                copy_tokenizer_files(tokenizer_dir, model_dir)
    _barrier()
    # a rank whose out_dir is not rank 0's (node-local storage) would leave its part elsewhere: say
    # so now, on every rank, instead of renaming an incomplete folder found only at the resume
    check_every_rank_wrote(tmp, [f"train_state/rank_{r:05d}.pt" for r in range(world_size)])

    if rank == 0:
        meta = {
            "format_version": CKPT_FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "ds_tag": DS_TAG,
            "tokens_seen": train_state.tokens_seen,
            "value_tables": {n: {"num_rows": int(t.num_rows), "dim": int(t.dim)} for n, t in tables.items()},
            "files": _file_sizes(tmp),  # every rank's files are in place (barrier above)
        }
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(root, "latest"), step_dir_name(step) + "\n")
        for old in _rotated_out(root, step, keep_last_k):
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _rotated_out(root: str, step: int, keep_last_k: int) -> list[str]:
    """Checkpoints older than the ``keep_last_k`` newest up to ``step``. Folders of later steps
    (left by a run that was resumed from an earlier checkpoint because they were damaged) never
    count, so the checkpoint just written is never among those removed."""
    upto = [path for s, path in list_checkpoints(root) if s <= step]
    return upto[:-keep_last_k]


def load_checkpoint(
    ckpt_dir: str,
    engine: Any,
    tables: dict[str, Any],
    value_optimizer: torch.optim.Optimizer | None,
    value_scheduler: Any,
    rank: int,
    world_size: int,
) -> TrainState:
    """Collective: restore engine, values and this rank's TrainState (RNG states are returned inside
    the TrainState; the caller restores them last, after everything that may consume randomness)."""
    meta = read_meta(ckpt_dir)
    if meta["world_size"] != world_size:
        raise ValueError(
            f"checkpoint '{ckpt_dir}' was written by {meta['world_size']} ranks and this run has "
            f"{world_size}: DeepSpeed's ZeRO optimizer state is partitioned per rank, so resume with "
            f"{meta['world_size']} ranks."
        )
    with deepspeed_files_loaded_safely(os.path.join(ckpt_dir, "ds")):  # DeepSpeed's own loads unpickle
        load_path, _ = engine.load_checkpoint(
            os.path.join(ckpt_dir, "ds"), tag=meta.get("ds_tag", DS_TAG),
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the engine state from '{ckpt_dir}/ds'.")
    load_value_state(os.path.join(ckpt_dir, "values"), tables, value_optimizer, value_scheduler)
    ts_path = os.path.join(ckpt_dir, "train_state", f"rank_{rank:05d}.pt")
    return TrainState.from_dict(load_train_state_file(ts_path))


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt", "vocab.json", "added_tokens.json",
)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer files found in src_dir (a HF model/tokenizer folder) into dst_dir."""
    copied = []
    if not src_dir or not os.path.isdir(src_dir):
        return copied
    os.makedirs(dst_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        p = os.path.join(src_dir, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
