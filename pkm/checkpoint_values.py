"""Save, load and reshard value tables (local or column-sharded) with their SparseAdam state.

Layout of a value checkpoint folder (all written atomically: temp file + ``os.replace``)::

    values_meta.json                      rank 0: format version, world size P, per table
                                          num_rows, dim, dtype, column bounds; optimizer hyperparams
    values_shard_00000-of-00002.pt        rank r: per table its weight columns [start, end) and, if
    values_shard_00001-of-00002.pt        the optimizer has state, exp_avg / exp_avg_sq of the same
                                          columns plus the per-row step counts ([num_rows], the same
                                          on every rank because every shard sees every token)

A checkpoint written by P ranks loads into Q ranks (each rank reads only the column ranges it now
holds, through memory-mapped ``torch.load``) or into one unsharded ``ValueTable``; ``load_full_values``
returns the full tensors (the converter's path to one HF checkpoint); ``reshard_value_checkpoint``
rewrites a folder for another world size offline.

Tables are named by the caller (``attach_sharded_values`` returns {module path: table}); the same names
must be used to load. Mismatches (unknown name, different num_rows or dim, a missing shard file)
raise ValueError before any table is modified.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atomic_files import honour_umask, write_json_atomic
from pkm.sharded_values import ShardedValueTable, column_bounds
from pkm.sparse_adam import SparseAdam
from pkm.values import ValueTable

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "FullValues",
    "shard_file_name",
    "save_value_shards",
    "load_value_shards",
    "load_full_values",
    "reshard_value_checkpoint",
]

FORMAT_VERSION = 1
META_FILE = "values_meta.json"
_STATE_KEYS = ("exp_avg", "exp_avg_sq")  # column-sharded optimizer state; "row_step" is per row


def shard_file_name(rank: int, world_size: int) -> str:
    return f"values_shard_{rank:05d}-of-{world_size:05d}.pt"


@dataclass
class FullValues:
    """One table gathered from all shards: weight [num_rows, dim] and, if saved, its optimizer state."""

    weight: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    row_step: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# atomic file helpers
# --------------------------------------------------------------------------------------------------


def _atomic_torch_save(obj: object, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".pt")
    try:
        honour_umask(fd)  # mkstemp's 0600 would lock other users out of the checkpoint
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a partial one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------


def _layout(tables: Mapping[str, ValueTable]) -> tuple[int, int, dist.ProcessGroup | None, bool]:
    """(rank, world_size, group, sharded) shared by all tables; mixing layouts is an error."""
    if not tables:
        raise ValueError("no value tables given to save or load.")
    kinds = {isinstance(t, ShardedValueTable) for t in tables.values()}
    if len(kinds) > 1:
        raise ValueError("cannot mix sharded and local value tables in one value checkpoint.")
    first = next(iter(tables.values()))
    if not isinstance(first, ShardedValueTable):
        return 0, 1, None, False
    for name, t in tables.items():
        if t.world_size != first.world_size or t.rank != first.rank or t.group is not first.group:
            raise ValueError(f"value table {name!r} is sharded over a different process group than the others.")
    return first.rank, first.world_size, first.group, True


def _optimizer_state(optimizer: SparseAdam | None, table: ValueTable) -> dict | None:
    if optimizer is None:
        return None
    if not any(p is table.weight for p in optimizer.param_groups[0]["params"]):
        raise ValueError("the optimizer given with the value tables does not hold one of their weights.")
    state = optimizer.state.get(table.weight)
    return state if state else None  # never stepped: nothing to save


def _hyperparams(optimizer: SparseAdam | None) -> dict | None:
    if optimizer is None:
        return None
    g = optimizer.param_groups[0]
    return {"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"]}


def save_value_shards(
    directory: str | os.PathLike,
    tables: Mapping[str, ValueTable],
    optimizer: SparseAdam | None = None,
    barrier: bool = True,
) -> None:
    """Write this rank's shard file (and, on rank 0 of the tables' group, the metadata).

    Sharded tables: every rank of their group calls it (collective when ``barrier``: it returns once
    every rank's file is in place, so the caller may rename the folder or update ``latest``).
    Local tables: call it on one process; it writes a 1-shard checkpoint.
    """
    rank, world_size, group, sharded = _layout(tables)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    payload: dict = {"format_version": FORMAT_VERSION, "rank": rank, "world_size": world_size, "tables": {}}
    meta_tables: dict = {}
    for name, t in tables.items():
        entry = {"col_start": t.col_start, "col_end": t.col_end, "weight": t.weight.detach().cpu()}
        state = _optimizer_state(optimizer, t)
        if state is not None:
            for key in _STATE_KEYS:
                entry[key] = state[key].detach().cpu()
            entry["row_step"] = state["row_step"].detach().cpu()
        payload["tables"][name] = entry
        meta_tables[name] = {
            "num_rows": t.num_rows,
            "dim": t.dim,
            "dtype": str(t.weight.dtype).removeprefix("torch."),
            "bounds": [list(b) for b in (t.bounds if sharded else [(0, t.dim)])],
            "has_optimizer_state": state is not None,
        }
    _atomic_torch_save(payload, os.path.join(directory, shard_file_name(rank, world_size)))
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "world_size": world_size,
            "files": [shard_file_name(r, world_size) for r in range(world_size)],
            "tables": meta_tables,
            "optimizer": _hyperparams(optimizer),
        }
        write_json_atomic(os.path.join(directory, META_FILE), meta, sort_keys=True)
    if sharded and barrier:
        dist.barrier(group=group)


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not a value checkpoint: {META_FILE} is missing.")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"value checkpoint {directory!r} has format version {meta.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}."
        )
    missing = [f for f in meta["files"] if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ValueError(
            f"value checkpoint {directory!r} written by {meta['world_size']} ranks is incomplete: "
            f"missing shard file(s) {', '.join(missing)}."
        )
    return meta


class _ShardReader:
    """Opens source shard files lazily (memory-mapped), each at most once."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory, self.meta, self._open = directory, meta, {}

    def file(self, rank: int) -> dict:
        if rank not in self._open:
            path = os.path.join(self.directory, self.meta["files"][rank])
            try:
                self._open[rank] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except pickle.UnpicklingError as e:  # torch's restricted unpickler met a non-tensor object
                raise ValueError(
                    f"value shard '{path}' holds Python objects that are not tensors or plain data; it is "
                    f"refused because unpickling it could run code ({str(e).splitlines()[0]})."
                ) from None
        return self._open[rank]

    def columns(self, name: str, key: str, start: int, end: int) -> torch.Tensor:
        """Columns [start, end) of ``key`` (weight/exp_avg/exp_avg_sq) of table ``name`` -> [N, end - start]."""
        parts = []
        for rank, (s, e) in enumerate(self.meta["tables"][name]["bounds"]):
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                parts.append(self.file(rank)["tables"][name][key][:, lo - s : hi - s])
        return torch.cat(parts, dim=1)

    def row_step(self, name: str) -> torch.Tensor:
        return self.file(0)["tables"][name]["row_step"]


def _check_tables(directory: str, meta: dict, tables: Mapping[str, ValueTable], strict: bool) -> None:
    saved = meta["tables"]
    for name, t in tables.items():
        if name not in saved:
            raise ValueError(
                f"value table {name!r} is not in checkpoint {directory!r} (it holds {sorted(saved)})."
            )
        s = saved[name]
        if (s["num_rows"], s["dim"]) != (t.num_rows, t.dim):
            raise ValueError(
                f"value table {name!r} is {t.num_rows} x {t.dim} but checkpoint {directory!r} holds "
                f"{s['num_rows']} x {s['dim']}."
            )
        if s["dtype"] != "float32":
            raise ValueError(f"value table {name!r} was saved as {s['dtype']}; only float32 is supported.")
    extra = sorted(set(saved) - set(tables))
    if strict and extra:
        raise ValueError(f"checkpoint {directory!r} holds value tables not being loaded: {extra}.")


def load_value_shards(
    directory: str | os.PathLike,
    tables: Mapping[str, ValueTable],
    optimizer: SparseAdam | None = None,
    strict: bool = True,
    restore_hyperparams: bool = True,
) -> None:
    """Fill ``tables`` (sharded over any number of ranks, or local) from a checkpoint written by any
    number of ranks; with ``optimizer``, also its per-table state (exp_avg, exp_avg_sq, row_step)
    and, with ``restore_hyperparams``, lr/betas/eps/weight_decay. Each rank reads only its columns.
    Not a collective (no communication), but every rank of a sharded group must call it."""
    directory = os.fspath(directory)
    _layout(tables)
    meta = _read_meta(directory)
    _check_tables(directory, meta, tables, strict)
    for t in tables.values():
        _optimizer_state(optimizer, t)  # validates membership before anything is modified
    reader = _ShardReader(directory, meta)
    for name, t in tables.items():
        with torch.no_grad():
            t.weight.copy_(reader.columns(name, "weight", t.col_start, t.col_end))
        t.zero_grad()
        if optimizer is None:
            continue
        optimizer.state.pop(t.weight, None)
        if meta["tables"][name]["has_optimizer_state"]:
            state = {key: reader.columns(name, key, t.col_start, t.col_end).to(t.weight.device).clone()
                     for key in _STATE_KEYS}
            state["row_step"] = reader.row_step(name).to(t.weight.device).clone()
            optimizer.state[t.weight] = state
    if optimizer is not None and restore_hyperparams and meta["optimizer"] is not None:
        g, h = optimizer.param_groups[0], meta["optimizer"]
        g.update(lr=h["lr"], betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"])


def load_full_values(directory: str | os.PathLike, names: list[str] | None = None) -> dict[str, FullValues]:
    """Every (or the named) table of a checkpoint as full, unsharded tensors (CPU)."""
    directory = os.fspath(directory)
    meta = _read_meta(directory)
    names = list(meta["tables"]) if names is None else names
    unknown = [n for n in names if n not in meta["tables"]]
    if unknown:
        raise ValueError(f"checkpoint {directory!r} has no value table(s) {unknown}.")
    reader = _ShardReader(directory, meta)
    out: dict[str, FullValues] = {}
    for name in names:
        dim = meta["tables"][name]["dim"]
        full = FullValues(weight=reader.columns(name, "weight", 0, dim).clone())
        if meta["tables"][name]["has_optimizer_state"]:
            full.exp_avg = reader.columns(name, "exp_avg", 0, dim).clone()
            full.exp_avg_sq = reader.columns(name, "exp_avg_sq", 0, dim).clone()
            full.row_step = reader.row_step(name).clone()
        out[name] = full
    return out


def reshard_value_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, world_size: int) -> None:
    """Rewrite checkpoint ``src`` for ``world_size`` ranks into folder ``dst`` (offline, one process;
    holds one new shard at a time, reading the old files memory-mapped)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("reshard_value_checkpoint needs a destination folder different from the source.")
    meta = _read_meta(src)
    bounds = {name: column_bounds(t["dim"], world_size) for name, t in meta["tables"].items()}  # validate first
    os.makedirs(dst, exist_ok=True)
    reader = _ShardReader(src, meta)
    for r in range(world_size):
        payload: dict = {"format_version": FORMAT_VERSION, "rank": r, "world_size": world_size, "tables": {}}
        for name, info in meta["tables"].items():
            s, e = bounds[name][r]
            entry = {"col_start": s, "col_end": e, "weight": reader.columns(name, "weight", s, e).clone()}
            if info["has_optimizer_state"]:
                for key in _STATE_KEYS:
                    entry[key] = reader.columns(name, key, s, e).clone()
                entry["row_step"] = reader.row_step(name).clone()
            payload["tables"][name] = entry
        _atomic_torch_save(payload, os.path.join(dst, shard_file_name(r, world_size)))
    new_meta = {
        "format_version": FORMAT_VERSION,
        "world_size": world_size,
        "files": [shard_file_name(r, world_size) for r in range(world_size)],
        "tables": {name: dict(info, bounds=[list(b) for b in bounds[name]]) for name, info in meta["tables"].items()},
        "optimizer": meta["optimizer"],
    }
    write_json_atomic(os.path.join(dst, META_FILE), new_meta, sort_keys=True)  # last: the folder is complete once it exists
