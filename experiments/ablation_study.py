"""An ablation study as data: one base run config, a grid of run-config overrides, finetuning tasks.

A study file (JSON, e.g. ``configs/ablation_minilm_cpu.json``) has these keys:

``base``        ``"demo"``: the demo's pretraining config (``experiments/demo.py``) for the chosen
                ``--steps``/``--quick`` on the embedded data; or a full run-config dict (a real corpus).
``common``      ``{"section.key": value}`` overrides applied to every run (the shared memory size,
                batch cadence, ...); dotted keys reach into ``model.overrides`` too.
``quick``       overrides applied on top of ``common`` in ``--quick`` mode only (tests).
``grid``        ``{axis: {level: {"section.key": value}}}``: every combination of one level per axis
                is a run named ``<level>_<level>...`` in axis order, its overrides merged in axis order.
``extra_runs``  ``{name: {"section.key": value}}``: further runs outside the grid (the baseline).
``ds_config``   the DeepSpeed config every run uses; ``procs``: ranks per run.
``finetune``    ``{"seeds": [...], "tasks": "heldout" | [task, ...]}``: ``"heldout"`` means the
                demo's two tasks built from held-out articles; a task is ``{"name", "task", "data",
                "lr", "options"}`` (a finetune task name, its data folder, FinetuneConfig options).

Strings ``{minilm}`` (the all-MiniLM-L6-v2 folder from its wheel) and ``{out}`` (the study's output
folder) are replaced everywhere. Every run gets ``train.out_dir = <out>/runs/<name>``; everything
else (shards, steps, seed, batch, memory size) is shared unless a grid level changes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from pretrain.config import apply_overrides, config_from_dict, config_to_dict, read_config_file

DEMO_DEFAULT_STEPS = 200  # steps of a study on the demo's base when --steps is not given

__all__ = ["Study", "load_study", "expand_runs", "resolve_placeholders", "flatten"]

STUDY_KEYS = {"description", "base", "common", "quick", "grid", "extra_runs", "ds_config", "procs", "finetune"}
FINETUNE_KEYS = {"seeds", "tasks"}
TASK_KEYS = {"name", "task", "data", "lr", "options"}


@dataclass
class Study:
    """A loaded study file: what to pretrain (runs: name -> full run-config dict) and finetune."""

    path: str
    runs: dict[str, dict[str, Any]]
    overrides: dict[str, dict[str, Any]]  # name -> the dotted overrides that define the run
    ds_config: str
    procs: int
    seeds: list[int]
    tasks: list[dict[str, Any]]
    embedded_data: bool  # the base is the demo's: the runs read the shards the demo's prep stage writes
    heldout_tasks: bool  # the tasks are the demo's held-out ones: the demo's tasks stage builds them
    raw: dict[str, Any] = field(default_factory=dict)


def resolve_placeholders(value: Any, mapping: dict[str, str]) -> Any:
    """``value`` with every ``{name}`` of ``mapping`` replaced inside every string (recursively)."""
    if isinstance(value, str):
        for name, text in mapping.items():
            value = value.replace("{" + name + "}", text)
        return value
    if isinstance(value, list):
        return [resolve_placeholders(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, mapping) for k, v in value.items()}
    return value


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_overrides(where: str, overrides: Any) -> dict[str, Any]:
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a mapping of dotted run-config keys to values, got {overrides!r}.")
    for key in overrides:
        if not isinstance(key, str) or key.split(".")[0] not in ("model", "data", "optim", "train"):
            raise ValueError(f"{where}: '{key}' is not a run-config key (model.*, data.*, optim.*, train.*).")
    return overrides


def expand_runs(grid: dict[str, dict[str, dict]], extra_runs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """The grid's cartesian product (axis order) plus the extra runs: name -> merged dotted overrides."""
    if not isinstance(grid, dict) or not isinstance(extra_runs, dict):
        raise ValueError("the study's 'grid' and 'extra_runs' must be mappings.")
    runs: dict[str, dict[str, Any]] = {}
    axes = list(grid.items())
    for axis, levels in axes:
        if not isinstance(levels, dict) or not levels:
            raise ValueError(f"grid axis '{axis}' must map at least one level name to its overrides.")
    if axes:
        for combo in itertools.product(*[list(levels.items()) for _, levels in axes]):
            name = "_".join(level for level, _ in combo)
            merged: dict[str, Any] = {}
            for (axis, _), (level, overrides) in zip(axes, combo):
                merged.update(_check_overrides(f"grid.{axis}.{level}", overrides))
            runs[name] = merged
    for name, overrides in extra_runs.items():
        if name in runs:
            raise ValueError(f"extra run '{name}' has the name of a grid run: rename it.")
        runs[name] = dict(_check_overrides(f"extra_runs.{name}", overrides))
    if not runs:
        raise ValueError("the study defines no run: give a 'grid' and/or 'extra_runs'.")
    for name in runs:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"run name '{name}' must be letters, digits, '-', '_' or '.' (it names a folder).")
    return runs


def _base_config(raw: dict[str, Any], out: str, args: argparse.Namespace) -> dict[str, Any]:
    base = raw.get("base", "demo")
    if base == "demo":
        from experiments.demo import _pretrain_config

        demo_args = argparse.Namespace(steps=getattr(args, "steps", None) or DEMO_DEFAULT_STEPS, quick=args.quick)
        return _pretrain_config(out, demo_args)
    if not isinstance(base, dict):
        raise ValueError("the study's 'base' must be \"demo\" or a run-config mapping (model, data, optim, train).")
    return json.loads(json.dumps(base))


def _finetune_tasks(raw: dict[str, Any], out: str, quick: bool) -> tuple[list[int], list[dict[str, Any]]]:
    spec = raw.get("finetune", {})
    if not isinstance(spec, dict) or set(spec) - FINETUNE_KEYS:
        raise ValueError(f"the study's 'finetune' must be a mapping with keys {sorted(FINETUNE_KEYS)}, got {spec!r}.")
    seeds = spec.get("seeds", [1, 2])
    if not isinstance(seeds, list) or len(seeds) < 2 or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"finetune.seeds must list at least 2 integer seeds (mean and std over seeds), got {seeds!r}.")
    tasks = spec.get("tasks", "heldout")
    if tasks == "heldout":
        from experiments.demo import heldout_finetune_tasks

        return seeds, heldout_finetune_tasks(out, quick)
    if not isinstance(tasks, list) or not tasks:
        raise ValueError("finetune.tasks must be \"heldout\" or a non-empty list of tasks.")
    for t in tasks:
        if not isinstance(t, dict) or set(t) - TASK_KEYS or not {"name", "task", "lr"} <= set(t):
            raise ValueError(f"a finetune task needs name, task and lr (optional: data, options), got {t!r}.")
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"finetune task names must be unique, got {names}.")
    return seeds, [{"data": None, "options": {}, **t} for t in tasks]


def check_inputs(study: Study) -> None:
    """Folders the runs read, checked before anything is trained: init_from models, the shards (unless
    the demo's prep stage writes them), finetuning data (unless the demo's tasks stage writes it)."""
    for name, cfg in study.runs.items():
        init = cfg["model"]["init_from"]
        if init and not os.path.isfile(os.path.join(init, "config.json")):
            raise ValueError(f"run '{name}': model.init_from '{init}' is not a Hugging Face model folder "
                             "(config.json + weights): fix the path in the study file.")
        shards = cfg["data"]["shard_dir"]
        if not study.embedded_data and not os.path.isfile(os.path.join(shards, "manifest.json")):
            raise ValueError(f"run '{name}': data.shard_dir '{shards}' holds no prepared shards (manifest.json): "
                             f"run `python -m data_prep prepare ... --out {shards}` first, or fix the path.")
    if not study.heldout_tasks:
        for task in study.tasks:
            if task["data"] and not os.path.isdir(task["data"]):
                raise ValueError(f"finetuning task '{task['name']}': data folder '{task['data']}' does not exist.")


def load_study(path: str, out: str, args: argparse.Namespace) -> Study:
    """Read, expand and validate the study: every run config is checked (types, keys, ranges) here,
    before anything is trained. ``args`` carries ``steps``, ``quick`` (for the demo base)."""
    from experiments.demo import REPO_ROOT, minilm_dir

    raw = read_config_file(path)
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"study file '{path}' has unknown key '{unknown[0]}' (known: {', '.join(sorted(STUDY_KEYS))}).")
    mapping = {"out": out}
    if "{minilm}" in json.dumps(raw) or raw.get("base", "demo") == "demo":
        mapping["minilm"] = minilm_dir()
    raw = resolve_placeholders(raw, mapping)
    base = _base_config(raw, out, args)
    common = dict(_check_overrides("common", raw.get("common", {})))
    if args.quick:
        common.update(_check_overrides("quick", raw.get("quick", {})))
    if getattr(args, "steps", None) and raw.get("base", "demo") != "demo":
        common["train.max_steps"] = args.steps  # the demo base derives its cadence from --steps itself
    variants = expand_runs(raw.get("grid", {}), raw.get("extra_runs", {}))
    only = [v for v in (getattr(args, "only", None) or "").split(",") if v]
    missing = sorted(set(only) - set(variants))
    if missing:
        raise ValueError(f"--only names unknown run '{missing[0]}' (runs of this study: {', '.join(variants)}).")
    if only:
        variants = {name: variants[name] for name in variants if name in only}
    runs = {}
    for name, overrides in variants.items():
        items = list(common.items()) + list(overrides.items()) + [("train.out_dir", os.path.join(out, "runs", name))]
        try:
            cfg = config_from_dict(apply_overrides(base, items))
        except ValueError as e:
            raise ValueError(f"study '{path}', run '{name}': {e}") from e
        runs[name] = config_to_dict(cfg)
    ds_config = raw.get("ds_config", "ds_configs/demo_zero2_fp32.json")
    ds_config = ds_config if os.path.isabs(ds_config) else os.path.join(REPO_ROOT, ds_config)
    if not os.path.isfile(ds_config):
        raise ValueError(f"study '{path}': ds_config '{ds_config}' does not exist (the shipped ones are in ds_configs/).")
    procs = getattr(args, "procs", None) or raw.get("procs", 2)
    if not isinstance(procs, int) or procs < 1:
        raise ValueError(f"study '{path}': procs must be a positive integer, got {procs!r}.")
    seeds, tasks = _finetune_tasks(raw, out, args.quick)
    if getattr(args, "seeds", None):
        seeds = args.seeds
    return Study(path=path, runs=runs, overrides={n: dict(v) for n, v in variants.items()}, ds_config=ds_config,
                 procs=procs, seeds=seeds, tasks=tasks, embedded_data=raw.get("base", "demo") == "demo",
                 heldout_tasks=raw.get("finetune", {}).get("tasks", "heldout") == "heldout", raw=raw)
