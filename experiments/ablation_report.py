"""The ablation's report: ``<out>/report/README.md``, ``results.json`` and PNG plots.

Every number comes from the runs' own files, read here and nowhere else: the final evaluation
record of each run's ``metrics.jsonl`` (MLM loss/accuracy and the memory metrics on the validation
split, see docs/METRICS.md) and the ``result.json`` of each finetuning run (mean and sample std over
seeds, via the finetuning sweep's own summary). The plots put every run on the same axes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from typing import Any

from atomic_files import write_json_atomic, write_text_atomic
from experiments.demo_report import _plot, _records

MEMORY_METRICS = ("usage", "top1_usage", "kl_uniform", "gini", "stale_frac")
MEMORY_COLUMN_TITLES = {"usage": "usage", "top1_usage": "top-1 usage", "kl_uniform": "KL (nats)",
                        "gini": "Gini", "stale_frac": "stale"}
PLOTS = [  # file, title, y label, (record kind, metric key or memory metric)
    ("usage.png", "memory usage (validation)", "share of slots", ("eval", "memory:usage")),
    ("top1_usage.png", "top-1 memory usage (validation)", "share of slots", ("eval", "memory:top1_usage")),
    ("stale_frac.png", "stale slots (not updated in the window)", "share of slots", ("eval", "memory:stale_frac")),
    ("mlm_loss.png", "MLM loss (validation)", "loss", ("eval", "loss")),
    ("train_loss.png", "MLM loss (training, mean over the log interval)", "loss", ("train", "loss")),
]
_MEMORY_KEY = re.compile(r"^memory/([^/]+)/([a-z0-9_]+)$")


# --------------------------------------------------------------------------------------------------
# reading the runs' files
# --------------------------------------------------------------------------------------------------


def final_eval(records: list[dict]) -> dict:
    """The evaluation record at the highest step (the one after the last training step)."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return {}
    return max(evals, key=lambda r: r["step"])


def memory_layers(record: dict) -> list[str]:
    """Memory layer names (e.g. 'layer3') that have metrics in a record, in layer order."""
    names = {m.group(1) for k in record if (m := _MEMORY_KEY.match(k))}
    return sorted(names, key=lambda n: (len(n), n))


def pretrain_summary(metrics_path: str) -> dict:
    """Final validation MLM loss/accuracy and, per memory layer, the memory metrics."""
    last = final_eval(_records(metrics_path))
    if not last:
        raise ValueError(f"{metrics_path} has no evaluation record: the pretraining run did not finish; "
                         "rerun the ablation (it resumes)")
    return {"step": last["step"], "mlm_loss": last["loss"], "mlm_acc": last["mlm_acc"], "eval_tokens": last["tokens"],
            "memory": {layer: {m: last[f"memory/{layer}/{m}"] for m in MEMORY_METRICS + ("tokens",)
                               if f"memory/{layer}/{m}" in last}
                       for layer in memory_layers(last)}}


def finetune_summary(output: str, task: dict, seeds: list[int]) -> dict:
    """Mean and sample std over seeds of one task's dev score (percent), from each run's result.json."""
    from finetune.sweep import make_runs, read_result, summarize
    from finetune.tasks import get_task

    runs = make_runs([task["task"]], [task["lr"]], seeds)
    # the ablation's finetune stage owns these runs (its stage markers decide what is redone), so a
    # finished run's result.json is taken as it is
    found = {r: read_result(os.path.join(output, r.rel_dir)) for r in runs}
    results = {r: res for r, res in found.items() if res is not None}
    if len(results) != len(runs):
        raise ValueError(f"{output} holds {len(results)} of {len(runs)} finetuning results: rerun the ablation (it resumes)")
    best, _, _ = summarize(results)
    row = best[0]
    scale = 100.0 if get_task(task["task"]).is_glue else 1.0  # the sweep's percent convention
    scores = [results[r]["score"] * scale for r in runs]
    return {"task": task["task"], "metric": row["metric"], "lr": task["lr"], "mean": row["mean"], "std": row["std"],
            "n_seeds": row["n_seeds"], "seeds": list(seeds), "scores": scores, "metric_means": row["metric_means"]}


def collect(out: str, study: Any) -> dict:
    """results.json's content: per run its overrides, pretraining summary and finetuning summaries."""
    from experiments.ablation import finetune_dir

    runs = {}
    for name, config in study.runs.items():
        runs[name] = {
            "overrides": study.overrides[name],
            "metrics_file": os.path.join(config["train"]["out_dir"], "metrics.jsonl"),
            "pretrain": pretrain_summary(os.path.join(config["train"]["out_dir"], "metrics.jsonl")),
            "finetune": {t["name"]: finetune_summary(finetune_dir(out, name, t["name"]), t, study.seeds)
                         for t in study.tasks},
        }
    return runs


# --------------------------------------------------------------------------------------------------
# the Markdown
# --------------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _memory_columns(runs: dict) -> list[tuple[str, str, str]]:
    """(title, layer, metric) per memory column; the layer is named only when runs have several."""
    layers = sorted({layer for r in runs.values() for layer in r["pretrain"]["memory"]}, key=lambda n: (len(n), n))
    return [(MEMORY_COLUMN_TITLES[m] + (f" ({layer})" if len(layers) > 1 else ""), layer, m)
            for layer in layers for m in MEMORY_METRICS]


def results_table(runs: dict, tasks: list[dict]) -> list[str]:
    """One row per run: final MLM loss and accuracy, memory metrics, finetuning mean ± std."""
    mem_cols = _memory_columns(runs)
    titles = (["run", "MLM loss", "MLM acc"] + [t for t, _, _ in mem_cols]
              + [f"{t['name']} ({runs[next(iter(runs))]['finetune'][t['name']]['metric']})" for t in tasks])
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for name, r in runs.items():
        p = r["pretrain"]
        cells = [name, _num(p["mlm_loss"]), _num(p["mlm_acc"])]
        cells += [_num(p["memory"].get(layer, {}).get(metric)) for _, layer, metric in mem_cols]
        cells += [f"{_num(r['finetune'][t['name']]['mean'], 2)} ± {_num(r['finetune'][t['name']]['std'], 2)}"
                  for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def axis_effects(runs: dict, grid: dict, tasks: list[dict]) -> list[str]:
    """For every two-level grid axis: the change from its first to its second level with the other
    axes fixed (e.g. residual - replace, at scratch and at init), on the table's key numbers."""
    axes = list(grid.items())
    lines: list[str] = []
    for a, (axis, levels) in enumerate(axes):
        names = list(levels)
        if len(names) != 2:
            continue
        lo, hi = names
        others = [list(levels_b) for b, (_, levels_b) in enumerate(axes) if b != a]
        contexts = [[]] if not others else _product(others)
        for ctx in contexts:
            def run_name(level: str) -> str:
                parts = list(ctx)
                parts.insert(a, level)
                return "_".join(parts)
            r_lo, r_hi = runs.get(run_name(lo)), runs.get(run_name(hi))
            if r_lo is None or r_hi is None:
                continue
            deltas = [f"MLM loss {r_hi['pretrain']['mlm_loss'] - r_lo['pretrain']['mlm_loss']:+.4f}"]
            for layer in r_hi["pretrain"]["memory"]:
                m_lo, m_hi = r_lo["pretrain"]["memory"].get(layer, {}), r_hi["pretrain"]["memory"][layer]
                for metric in ("usage", "top1_usage", "stale_frac"):
                    if metric in m_lo and metric in m_hi:
                        deltas.append(f"{MEMORY_COLUMN_TITLES[metric]} {m_hi[metric] - m_lo[metric]:+.4f}")
            for t in tasks:
                f_lo, f_hi = r_lo["finetune"][t["name"]], r_hi["finetune"][t["name"]]
                deltas.append(f"{t['name']} {f_hi['mean'] - f_lo['mean']:+.2f}")
            where = f" (at {', '.join(ctx)})" if ctx else ""
            lines.append(f"- **{axis}: {hi} - {lo}**{where}: " + "; ".join(deltas))
    return lines


def _product(lists: list[list[str]]) -> list[list[str]]:
    import itertools

    return [list(c) for c in itertools.product(*lists)]


def settings_section(study: Any, runs_dir_names: list[str], command: str) -> list[str]:
    """The exact settings: what every run shares (flattened run config) and what differs."""
    from experiments.ablation_study import flatten

    with open(study.ds_config, encoding="utf-8") as f:
        ds = json.load(f)
    flat = {name: {k: v for k, v in flatten(cfg).items() if k != "train.out_dir"} for name, cfg in study.runs.items()}
    keys = sorted({k for f in flat.values() for k in f})
    shared = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) == 1]
    differing = [k for k in keys if k not in shared]
    first = next(iter(flat.values()))
    micro = ds.get("train_micro_batch_size_per_gpu", "?")
    gas = ds.get("gradient_accumulation_steps", 1)
    lines = [
        f"- command: `{command}`" if command else "- command: (API call)",
        f"- study file: `{os.path.relpath(study.path, _repo_root())}`",
        f"- DeepSpeed config: `{os.path.relpath(study.ds_config, _repo_root())}` ({study.procs} rank(s) x micro-batch "
        f"{micro} x accumulation {gas} = {micro * gas * study.procs if isinstance(micro, int) else '?'} sequences per step)",
        f"- finetuning seeds: {', '.join(map(str, study.seeds))}; tasks:",
    ]
    for t in study.tasks:
        lines.append(f"  - {t['name']}: `{t['task']}`, lr {t['lr']:g}, data `{t['data']}`, options "
                     f"`{json.dumps(t['options'], sort_keys=True)}`")
    lines += ["", "Run config shared by every run:", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(first.get(k))}` |" for k in shared]
    lines += ["", "Run config that differs between runs (the grid):", "",
              "| key | " + " | ".join(runs_dir_names) + " |", "|---|" + "---|" * len(runs_dir_names)]
    lines += [f"| `{k}` | " + " | ".join(f"`{json.dumps(flat[n].get(k))}`" for n in runs_dir_names) + " |"
              for k in differing]
    if "model.init_from" in differing and "model.preset" in differing:
        lines += ["", "(`model.preset` is ignored where `model.init_from` is set: the architecture is that model's.)"]
    return lines


def stage_times(out: str) -> list[str]:
    """Wall seconds of every finished stage, from the stage markers (the run's own timing)."""
    folder = os.path.join(out, "stages")
    times = []
    for file in sorted(os.listdir(folder), key=lambda f: os.path.getmtime(os.path.join(folder, f))):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            wall = json.load(f).get("stage_wall_s")
        if wall is not None:
            times.append((file[:-len(".json")], wall))
    if not times:
        return []
    total = sum(w for _, w in times)
    return ["- stage wall times (s, this output folder; a resumed stage counts its last attempt): "
            + ", ".join(f"{name} {wall:.0f}" for name, wall in times) + f"; sum {total:.0f} s"]


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plot_series(runs_records: dict[str, list[dict]], kind: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """run (and memory layer, when there are several) -> (steps, values) of one metric."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name, records in runs_records.items():
        for r in records:
            if r.get("kind") != kind:
                continue
            if key.startswith("memory:"):
                metric = key.split(":", 1)[1]
                layers = memory_layers(r)
                items = [(name if len(layers) == 1 else f"{name} {layer}", r.get(f"memory/{layer}/{metric}"))
                         for layer in layers]
            else:
                items = [(name, r.get(key))]
            for label, value in items:
                if isinstance(value, (int, float)) and not math.isnan(value):
                    steps, values = series.setdefault(label, ([], []))
                    steps.append(r["step"])
                    values.append(float(value))
    return series


def write_ablation_report(out: str, study: Any, quick: bool = False, command: str = "") -> dict:
    report_dir = os.path.join(out, "report")
    os.makedirs(report_dir, exist_ok=True)
    runs = collect(out, study)
    records = {name: _records(r["metrics_file"]) for name, r in runs.items()}
    plots = []
    for file, title, ylabel, (kind, key) in PLOTS:
        if _plot(os.path.join(report_dir, file), title, ylabel, _plot_series(records, kind, key)):
            plots.append((title, file))
    stale_window = {cfg["train"]["stale_window_steps"] for cfg in study.runs.values()}
    eval_tokens = {r["pretrain"]["eval_tokens"] for r in runs.values()}
    lines = [
        "# Ablation: replace vs residual memory (ResM), from scratch vs initialised from a memory-less BERT",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by "
        "`python -m experiments.ablation`; every number is read from the runs' own files (`results.json` has them "
        "unrounded, with the file each came from).",
        "",
        "## Results",
        "",
        "Pretraining columns: the final evaluation on the validation split (step "
        f"{', '.join(str(s) for s in sorted({r['pretrain']['step'] for r in runs.values()}))}; "
        f"{', '.join(f'{t:.0f}' for t in sorted(eval_tokens))} non-padding tokens). Memory columns "
        "(docs/METRICS.md): usage = share of slots selected at least once (any of the top-k of any head) over "
        "those tokens; top-1 usage = share of slots that were some query's highest-weight slot; KL = KL divergence "
        "of the weight mass over slots from uniform; Gini of that mass; stale = share of slots the value optimizer "
        f"did not update in the last {', '.join(map(str, sorted(stale_window)))} training steps. n/a: no memory. "
        "Finetuning columns: dev score in % (GLUE-format tasks: the mean of the task's metrics x 100; SQuAD-format: "
        "F1), mean ± sample std over seeds.",
        "",
    ] + results_table(runs, study.tasks)
    effects = axis_effects(runs, study.raw.get("grid", {}), study.tasks)
    if effects:
        lines += ["", "## Effect of each grid axis", "",
                  "Second level minus first level, the other axes fixed (computed from the table's numbers):", ""]
        lines += effects
    lines += ["", "## Plots (every run on the same axes)", ""] + [f"![{title}]({file})" for title, file in plots]
    lines += ["", "## Settings", ""] + stage_times(out) + settings_section(study, list(runs), command)
    if quick:
        lines += ["", "_Quick form (test suite): few steps, a tiny memory and trimmed tasks; the numbers only show "
                  "the path works._"]
    write_json_atomic(os.path.join(report_dir, "results.json"),
                      {"runs": runs, "tasks": study.tasks, "seeds": study.seeds, "study": study.path})
    readme = os.path.join(report_dir, "README.md")
    write_text_atomic(readme, "\n".join(lines) + "\n")
    return {"report": readme, "results": os.path.join(report_dir, "results.json"),
            "plots": [file for _, file in plots]}
