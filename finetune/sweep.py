"""python -m finetune.sweep: a grid of tasks x learning rates x seeds -> results table.

    python -m finetune.sweep --model DIR --data GLUE_DIR --tasks sst2,mrpc,rte \
        --lrs 2e-5,3e-5 --seeds 1,2,3 --output sweeps/bert [--grid grid.yaml] [--epochs 3 ...]

Each run writes <output>/runs/<task>/lr<lr>_seed<seed>/result.json atomically when it ends, with
the run's full configuration, so a rerun of the same command skips finished runs and redoes a run
that crashed (its folder has no result.json). A finished run made with other options is refused
(or redone with --redo-mismatched), never reported as this sweep's. With several CUDA devices the
runs go one process per device; otherwise they run one after the other in this process. At the
end (also after --max-runs stops early, a failed run or Ctrl-C) the table of the runs finished so
far is written: results.csv / results.md (per task: best learning rate by mean dev score, mean +-
std over seeds, GLUE average over the GLUE tasks present) and results_all.csv (every task x lr).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from atomic_files import write_json_atomic, write_text_atomic
from finetune.config import FinetuneConfig, config_fields
from finetune.tasks import GLUE_TASKS, canonical_task_name, get_task
from pkm.config_files import read_mapping_file

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Run:
    task: str
    lr: float
    seed: int

    @property
    def rel_dir(self) -> str:
        return os.path.join("runs", self.task, f"lr{self.lr:g}_seed{self.seed}")


@dataclass
class SweepOutcome:
    output: str
    runs: list[Run]
    skipped: list[Run] = field(default_factory=list)     # already finished before this call
    completed: list[Run] = field(default_factory=list)   # finished by this call
    failed: dict[Run, str] = field(default_factory=dict)
    pending: list[Run] = field(default_factory=list)     # left for a later call (max_runs)
    table: list[dict[str, Any]] = field(default_factory=list)
    glue_average: float | None = None
    states: dict[Run, str] = field(default_factory=dict)  # dry_run: done / todo / mismatch

    @property
    def done(self) -> bool:
        return not self.failed and not self.pending


# ------------------------------------------------------------------------------------- grid


def load_grid_file(path: str) -> dict[str, Any]:
    """JSON or YAML: {tasks, lrs, seeds, model?, data?, squad_data?, options?, task_options?}."""
    grid = read_mapping_file(path, "grid file")
    if "learning_rates" in grid:
        grid["lrs"] = grid.pop("learning_rates")
    allowed = {"tasks", "lrs", "seeds", "model", "data", "squad_data", "options", "task_options"}
    unknown = sorted(set(grid) - allowed)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in grid file {path}; allowed: {sorted(allowed)}.")
    return grid


def _as_list(value: Any, kind: type) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [kind(v) for v in value]


def make_runs(tasks: list[str], lrs: list[float], seeds: list[int]) -> list[Run]:
    if not tasks or not lrs or not seeds:
        raise ValueError("A sweep needs at least one task, one learning rate and one seed "
                         "(--tasks, --lrs, --seeds, or the grid file).")
    if any(lr <= 0 for lr in lrs):
        raise ValueError(f"Learning rates must be positive, got {lrs}.")
    names = list(dict.fromkeys(canonical_task_name(t) for t in tasks))
    return [Run(t, float(lr), int(s)) for t in names for lr in lrs for s in seeds]


# Fields that say where or how visibly a run executes, not what it computes: a finished run made
# with other values of these still counts. (The sweep itself sets device per process.)
RUN_KEY_IGNORED = ("output", "progress", "log_every_steps", "device")
_PATH_FIELDS = ("model", "data")


def read_result(run_dir: str) -> dict[str, Any] | None:
    """The run's result.json when the run finished (a crashed run has none), else None."""
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and "score" in result else None


def run_key(config: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run's result: every FinetuneConfig field but RUN_KEY_IGNORED, paths made
    absolute (the model folder is compared by path, not content), fields a result.json predates
    taken at their defaults."""
    key = {}
    for f in config_fields():
        if f.name in RUN_KEY_IGNORED:
            continue
        if f.name in config:
            value = config[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = None
        if f.name in _PATH_FIELDS and isinstance(value, str):
            value = os.path.abspath(value)
        key[f.name] = value
    return key


def config_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'epochs: 1.0 -> 4.0' (finished run -> wanted) for every run_key field that differs."""
    a, b = run_key(stored), run_key(wanted)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in b if a.get(k) != b[k]]


def run_state(run_dir: str, cfg: FinetuneConfig) -> str:
    """'done' (finished with this configuration), 'mismatch' (finished with other options) or
    'todo' (never finished)."""
    result = read_result(run_dir)
    if result is None:
        return "todo"
    stored = result.get("config")
    if not isinstance(stored, dict) or config_differences(stored, cfg.to_dict()):
        return "mismatch"
    return "done"


# ------------------------------------------------------------------------------------ running


def _run_config(run: Run, model: str, output: str, data_for: dict[str, str | None],
                options: dict[str, Any], task_options: dict[str, dict[str, Any]]) -> FinetuneConfig:
    values = dict(options)
    values.update(task_options.get(run.task, {}))
    values.update(task=run.task, model=model, output=os.path.join(output, run.rel_dir),
                  data=data_for.get(run.task), lr=run.lr, seed=run.seed)
    return FinetuneConfig.from_dict(values)


def config_to_cli(cfg: FinetuneConfig) -> list[str]:
    """The `python -m finetune` flags that rebuild cfg (for one process per device)."""
    args = []
    for f in config_fields():
        value = getattr(cfg, f.name)
        if value is None:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def _run_in_process(cfg: FinetuneConfig) -> None:
    from finetune.api import finetune
    finetune(cfg)


def _run_subprocess(cfg: FinetuneConfig, device_id: str, cpu_slots: int = 1) -> None:
    """One run in its own process, pinned to one GPU ("cpu": a CPU process, for tests)."""
    env = dict(os.environ)
    if device_id == "cpu":
        cfg = dataclasses.replace(cfg, device="cpu", progress=False)
        # CPU processes side by side: split the cores instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, cpu_slots))))
    else:
        env["CUDA_VISIBLE_DEVICES"] = device_id
        cfg = dataclasses.replace(cfg, device="cuda", progress=False)
    os.makedirs(cfg.output, exist_ok=True)
    with open(os.path.join(cfg.output, "log.txt"), "w", encoding="utf-8") as logf:
        proc = subprocess.run([sys.executable, "-m", "finetune", *config_to_cli(cfg)], env=env,
                              stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}; see {os.path.join(cfg.output, 'log.txt')}")


def detect_devices(devices: str | list[str] | None, device_option: str | None) -> list[str]:
    """CUDA device ids to spread runs over; [] means run sequentially in this process."""
    if devices is not None:
        ids = _as_list(devices, str)
        return ids if len(ids) > 1 else []
    if device_option not in (None, "cuda"):
        return []
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001  (a broken CUDA setup just means: sequential)
        n = 0
    return [str(i) for i in range(n)] if n > 1 else []


def _validate_data(tasks: list[str], data_for: dict[str, str | None],
                   configs: dict[Run, FinetuneConfig]) -> None:
    """Read every local file the grid's runs need once, before the first run, so a missing or
    damaged file (GLUE train/dev, SQuAD train/dev JSON) is one clear error now rather than a
    failure in every run. Missing test files only mean no test predictions: a warning."""
    from finetune import glue_data, squad_data
    for name in tasks:
        task, folder = get_task(name), data_for.get(name)
        if folder is None:
            continue                                   # the hub: nothing local to check
        task_cfgs = [c for r, c in configs.items() if r.task == name]
        if task.is_glue:
            for skip in sorted({c.skip_malformed_rows for c in task_cfgs}):
                glue_data.load_glue(task, folder, skip_malformed=skip)
            if any(c.predict_test for c in task_cfgs):
                for path in glue_data.missing_test_files(task, folder):
                    log.warning("%s not found: the %s runs write no test predictions from it",
                                path, name)
        else:
            squad_data.load_squad(task, folder)


def _refuse_mismatches(output: str, configs: dict[Run, FinetuneConfig], states: dict[Run, str]
                       ) -> None:
    """Finished runs made with other options are an error (unless the caller redoes them), so a
    rerun with new options never reports the results of the old ones."""
    mismatched = [r for r, st in states.items() if st == "mismatch"]
    if not mismatched:
        return
    examples = []
    for r in mismatched[:3]:
        stored = (read_result(os.path.join(output, r.rel_dir)) or {}).get("config")
        diffs = (config_differences(stored, configs[r].to_dict()) if isinstance(stored, dict)
                 else ["no configuration recorded"])
        examples.append(f"{r.rel_dir} ({'; '.join(diffs[:4])})")
    raise ValueError(
        f"{len(mismatched)} finished run(s) in {output} were made with other options than this "
        f"sweep's, e.g. {', '.join(examples)}. Use another --output, rerun with the same "
        f"options, or pass --redo-mismatched to redo those runs (their folders are replaced).")


def run_sweep(model: str, output: str, tasks: list[str] | str, lrs: list[float] | str,
              seeds: list[int] | str, data: str | dict[str, str] | None = None,
              squad_data: str | None = None, options: dict[str, Any] | None = None,
              task_options: dict[str, dict[str, Any]] | None = None, max_runs: int | None = None,
              devices: str | list[str] | None = None, progress: bool = True,
              redo_mismatched: bool = False, dry_run: bool = False) -> SweepOutcome:
    """Run the grid tasks x lrs x seeds, skipping finished runs; write the results table.

    data: GLUE download root (or {task: folder}); squad_data: folder with the official SQuAD
    JSON files; None -> the hub. options: FinetuneConfig fields for every run (epochs, batch_size,
    value_lr ...); task_options: per-task overrides. max_runs: stop after this many runs (the rest
    stay pending for a rerun). devices: CUDA ids ("0,1"); default: all GPUs when more than one.
    A finished run counts only when made with the same configuration (run_key); finished runs
    made with other options are an error, or redone with redo_mismatched. Ctrl-C still writes
    the table of the runs finished so far, then re-raises KeyboardInterrupt. dry_run: validate
    and return the runs' states (outcome.states) without running or writing anything."""
    runs = make_runs(_as_list(tasks, str), _as_list(lrs, float), _as_list(seeds, int))
    task_names = list(dict.fromkeys(r.task for r in runs))
    options = dict(options or {})
    bad = sorted(set(options) & {"task", "model", "output", "data", "lr", "seed"})
    if bad:
        raise ValueError(f"options may not set {bad}: they come from the grid itself.")
    task_options = {canonical_task_name(k): v for k, v in (task_options or {}).items()}
    if isinstance(data, dict):
        data_for = {canonical_task_name(k): v for k, v in data.items()}
    else:
        data_for = {t: (squad_data if not get_task(t).is_glue else data) for t in task_names}
    options.setdefault("progress", progress)
    # Validate every config, data file and finished run before any expensive work.
    configs = {r: _run_config(r, model, output, data_for, options, task_options) for r in runs}
    next(iter(configs.values())).validate()
    _validate_data(task_names, data_for, configs)
    states = {r: run_state(os.path.join(output, r.rel_dir), cfg) for r, cfg in configs.items()}
    if dry_run:
        return SweepOutcome(output=output, runs=runs, states=states)
    if not redo_mismatched:
        _refuse_mismatches(output, configs, states)

    os.makedirs(output, exist_ok=True)
    # The options of the latest call; each run's own result.json keeps the config it was made with.
    write_json_atomic(os.path.join(output, "sweep.json"), {
        "model": model, "tasks": task_names, "lrs": sorted({r.lr for r in runs}),
        "seeds": sorted({r.seed for r in runs}), "data": data_for, "options": options,
        "task_options": task_options})
    outcome = SweepOutcome(output=output, runs=runs)
    todo = []
    for r in runs:
        if states[r] == "done":
            outcome.skipped.append(r)
        else:
            todo.append(r)
    if max_runs is not None:
        todo, outcome.pending = todo[:max_runs], todo[max_runs:]
    log.info("sweep: %d runs, %d already finished, %d to run now", len(runs), len(outcome.skipped),
             len(todo))
    bar = tqdm(total=len(runs), initial=len(outcome.skipped), desc="sweep", disable=not progress,
               dynamic_ncols=True, position=0)

    def attempt(r: Run, device_id: str | None) -> None:
        run_dir = os.path.join(output, r.rel_dir)
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)                        # leftovers of a crashed run
        try:
            if device_id is None:
                _run_in_process(configs[r])
            else:
                _run_subprocess(configs[r], device_id, device_ids.count("cpu"))
            outcome.completed.append(r)
        except Exception as e:  # noqa: BLE001  (one failed run must not stop the grid)
            log.error("run %s failed: %s", r.rel_dir, e)
            outcome.failed[r] = f"{type(e).__name__}: {e}"
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "error.txt"), "w", encoding="utf-8") as f:
                f.write(outcome.failed[r] + "\n")
        bar.update(1)
        bar.set_postfix(last=f"{r.task} lr={r.lr:g} seed={r.seed}", failed=len(outcome.failed))

    device_ids = detect_devices(devices, options.get("device"))
    try:
        if device_ids:
            _run_on_devices(todo, device_ids, attempt)
        else:
            _run_sequentially(todo, attempt)
    except KeyboardInterrupt:
        log.warning("interrupted: writing the table of the runs finished so far; rerun the same "
                    "command to go on")
        raise
    finally:
        # Also on Ctrl-C or an unexpected error: the partial table the README promises.
        bar.close()
        outcome.table, outcome.glue_average = write_results(output, runs, configs)
    if outcome.pending:
        log.info("stopped after %d runs (max_runs); %d runs left: rerun the same command to go on",
                 len(todo), len(outcome.pending))
    return outcome


def _run_on_devices(todo: list[Run], device_ids: list[str], attempt) -> None:
    """One run per device at a time; on Ctrl-C no queued run starts (the running ones get the
    same SIGINT from the terminal and stop)."""
    free: queue.Queue[str] = queue.Queue()
    for d in device_ids:
        free.put(d)

    def on_device(r: Run) -> None:
        d = free.get()
        try:
            attempt(r, d)
        finally:
            free.put(d)
    pool = ThreadPoolExecutor(max_workers=len(device_ids))
    try:
        list(pool.map(on_device, todo))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_sequentially(todo: list[Run], attempt) -> None:
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    # Each run would print the same "newly initialised head" load report: keep the log readable.
    hf_logging.set_verbosity_error()
    try:
        for r in todo:
            attempt(r, None)
    finally:
        hf_logging.set_verbosity(verbosity)


# -------------------------------------------------------------------------------------- table


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def collect_results(output: str, configs: dict[Run, FinetuneConfig]) -> dict[Run, dict[str, Any]]:
    """The results of the runs finished with this sweep's configuration (never those of a run
    made with other options that is still waiting to be redone)."""
    found = {}
    for r, cfg in configs.items():
        run_dir = os.path.join(output, r.rel_dir)
        if run_state(run_dir, cfg) == "done":
            found[r] = read_result(run_dir)
    return found


def summarize(results: dict[Run, dict[str, Any]]) -> tuple[list[dict], list[dict], float | None]:
    """-> (per-task rows at the best lr, per task x lr rows, GLUE average). Scores in percent
    (GLUE metrics x 100; SQuAD EM/F1 are percentages already)."""
    def pct(task: str, value: float) -> float:
        return 100.0 * value if get_task(task).is_glue else value

    by_task_lr: dict[tuple[str, float], list[dict]] = {}
    for r, res in sorted(results.items(), key=lambda kv: (kv[0].task, kv[0].lr, kv[0].seed)):
        by_task_lr.setdefault((r.task, r.lr), []).append(res)
    all_rows = []
    for (task, lr), group in by_task_lr.items():
        scores = np.array([pct(task, g["score"]) for g in group])
        metric_names = get_task(task).metrics
        metric_means = {m: float(np.mean([pct(task, g["metrics"][m]) for g in group]))
                        for m in metric_names}
        all_rows.append({
            "task": task, "lr": lr, "mean": float(scores.mean()),
            "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "n_seeds": len(scores), "seeds": [g["seed"] for g in group],
            "metric": "/".join(get_task(task).score_metrics), "metric_means": metric_means})
    best_rows = []
    order = {name: i for i, name in enumerate(list(GLUE_TASKS) + ["squad", "squad_v2"])}
    for task in sorted({row["task"] for row in all_rows}, key=lambda t: order[t]):
        cands = [row for row in all_rows if row["task"] == task]
        best = max(cands, key=lambda row: (row["mean"], -row["lr"]))
        best_rows.append({**best, "best_lr": best["lr"], "lrs_tried": [c["lr"] for c in cands]})
    glue = [row["mean"] for row in best_rows if get_task(row["task"]).is_glue]
    return best_rows, all_rows, (float(np.mean(glue)) if glue else None)


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def write_results(output: str, runs: list[Run], configs: dict[Run, FinetuneConfig]
                  ) -> tuple[list[dict], float | None]:
    results = collect_results(output, configs)
    best_rows, all_rows, glue_avg = summarize(results)
    best = [["task", "metric", "best_lr", "mean", "std", "n_seeds", "lrs_tried", "metrics_at_best_lr"]]
    for row in best_rows:
        best.append([row["task"], row["metric"], _fmt_lr(row["best_lr"]), f"{row['mean']:.4f}",
                     f"{row['std']:.4f}", row["n_seeds"],
                     " ".join(_fmt_lr(x) for x in row["lrs_tried"]),
                     " ".join(f"{k}={v:.4f}" for k, v in row["metric_means"].items())])
    if glue_avg is not None:
        n = sum(get_task(r["task"]).is_glue for r in best_rows)
        best.append(["glue_average", f"mean of {n} GLUE task scores", "", f"{glue_avg:.4f}",
                     "", "", "", ""])
    write_text_atomic(os.path.join(output, "results.csv"), _csv_text(best))
    every = [["task", "lr", "metric", "mean", "std", "n_seeds", "seeds"]]
    for row in all_rows:
        every.append([row["task"], _fmt_lr(row["lr"]), row["metric"], f"{row['mean']:.4f}",
                      f"{row['std']:.4f}", row["n_seeds"], " ".join(map(str, row["seeds"]))])
    write_text_atomic(os.path.join(output, "results_all.csv"), _csv_text(every))
    lines = ["# Finetuning results", "",
             f"{len(results)} of {len(runs)} runs finished. Dev scores in %: "
             "the GLUE task score is the mean of the task's metrics (MRPC/QQP: F1 and accuracy, "
             "STS-B: Pearson and Spearman, MNLI: matched and mismatched accuracy); SQuAD: F1. "
             "Best learning rate by mean dev score over seeds.", "",
             "| Task | Metric | Best lr | Dev score (mean ± std) | Seeds | Metrics at best lr |",
             "|---|---|---|---|---|---|"]
    for row in best_rows:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in row["metric_means"].items())
        lines.append(f"| {row['task']} | {row['metric']} | {_fmt_lr(row['best_lr'])} | "
                     f"{row['mean']:.2f} ± {row['std']:.2f} | {row['n_seeds']} | {metrics} |")
    if glue_avg is not None:
        n = sum(get_task(r["task"]).is_glue for r in best_rows)
        lines.append(f"| **GLUE average** ({n} tasks) | | | **{glue_avg:.2f}** | | |")
    lines += ["", "## Every learning rate", "", "| Task | lr | Dev score (mean ± std) | Seeds |",
              "|---|---|---|---|"]
    for row in all_rows:
        lines.append(f"| {row['task']} | {_fmt_lr(row['lr'])} | {row['mean']:.2f} ± "
                     f"{row['std']:.2f} | {row['n_seeds']} |")
    write_text_atomic(os.path.join(output, "results.md"), "\n".join(lines) + "\n")
    return best_rows, glue_avg


# ---------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from finetune.cli_args import add_config_flags
    parser = argparse.ArgumentParser(prog="python -m finetune.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grid", help="JSON/YAML grid file (tasks, lrs, seeds, options, task_options); "
                        "command-line flags override it")
    parser.add_argument("--tasks", help="comma-separated tasks (e.g. sst2,mrpc,squad_v2)")
    parser.add_argument("--lrs", "--learning-rates", dest="lrs", help="comma-separated learning rates")
    parser.add_argument("--seeds", help="comma-separated seeds")
    parser.add_argument("--squad-data", "--squad_data", dest="squad_data",
                        help="folder with the official SQuAD JSON files (for squad / squad_v2)")
    parser.add_argument("--max-runs", "--max_runs", dest="max_runs", type=int,
                        help="stop after this many runs; rerun the same command to continue")
    parser.add_argument("--devices", help="CUDA device ids for one process per device, e.g. 0,1,2,3 "
                        "(default: every GPU when more than one; 'cpu,cpu' runs CPU processes)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument("--redo-mismatched", action="store_true",
                        help="redo finished runs that were made with other options (default: "
                        "refuse, naming them)")
    add_config_flags(parser, skip=("task", "lr", "seed"), required=())
    # Only flags given on the command line override the grid file and FinetuneConfig defaults.
    parser.set_defaults(**{f.name: None for f in config_fields()
                           if f.name not in ("task", "lr", "seed")})
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        grid = load_grid_file(args.grid) if args.grid else {}
        model = args.model or grid.get("model")
        if not model or not args.output:
            raise ValueError("Pass --model (or 'model' in the grid file) and --output.")
        options = dict(grid.get("options") or {})
        for f in config_fields():
            if f.name in ("task", "lr", "seed", "model", "output", "data"):
                continue
            value = getattr(args, f.name, None)
            if value is not None:
                options[f.name] = value
        progress = options.pop("progress", True)
        tasks = args.tasks or grid.get("tasks")
        lrs = args.lrs or grid.get("lrs")
        seeds = args.seeds or grid.get("seeds")
        data = args.data or grid.get("data")
        squad = args.squad_data or grid.get("squad_data")
        outcome = run_sweep(model, args.output, tasks, lrs, seeds, data=data, squad_data=squad,
                            options=options, task_options=grid.get("task_options"),
                            max_runs=args.max_runs, devices=args.devices, progress=progress,
                            redo_mismatched=args.redo_mismatched, dry_run=args.dry_run)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the table of the finished runs is in {args.output}/results.md; rerun "
              f"the same command to go on", file=sys.stderr)
        return 130
    if args.dry_run:
        for r, state in outcome.states.items():
            print(f"{state}\t{r.rel_dir}")            # mismatch: finished with other options
        return 0
    with open(os.path.join(args.output, "results.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"runs: {len(outcome.runs)} total, {len(outcome.skipped)} skipped (finished before), "
          f"{len(outcome.completed)} completed, {len(outcome.failed)} failed, "
          f"{len(outcome.pending)} pending")
    for r, err in outcome.failed.items():
        print(f"FAILED {r.rel_dir}: {err}", file=sys.stderr)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
