"""The demo's report folder: a Markdown summary and PNG plots.

Plots: training loss over steps; memory usage (share of slots selected) and staleness (share of slots
not updated in the last window) over steps, from the pretraining run's metrics.jsonl; and a histogram
of how often each memory slot is selected on validation text, measured with the converted model.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _records(metrics_path: str) -> list[dict]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict], kind: str, key_part: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every metric of ``kind`` whose name contains ``key_part``: name -> (steps, values)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        for key, value in r.items():
            if key_part in key and isinstance(value, (int, float)) and not math.isnan(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(r["step"])
                values.append(float(value))
    return out


def _plot(path: str, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]]) -> bool:
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


@torch.no_grad()
def slot_selection_counts(hf_dir: str, shard_dir: str, max_batches: int, batch_size: int = 16,
                          max_seq_len: int = 128) -> list[np.ndarray]:
    """Per memory layer, how many times each slot was selected on the validation split."""
    import pkm.modeling as modeling
    from pkm.usage import MemoryUsage
    from pretrain.data import MLMDataset
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    memories = modeling.memory_modules(model)
    usage = [MemoryUsage(m.value_table.num_rows) for m in memories]
    dataset = MLMDataset(shard_dir, split="validation", max_seq_len=max_seq_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
    for n, batch in enumerate(loader):
        if n >= max_batches:
            break
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch["token_type_ids"])
        for tracker, mem_out in zip(usage, modeling.last_memory_outputs(model)):
            tracker.update(mem_out.indices, mem_out.weights)
    return [u.selection_counts().numpy() for u in usage]


def _plot_histogram(path: str, counts: list[np.ndarray]) -> bool:
    if not counts:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for layer, c in enumerate(counts):
        upper = max(1.0, float(c.max()))
        bins = np.concatenate([[0, 1], np.geomspace(2, upper + 1, 20)])
        ax.hist(c, bins=bins, alpha=0.6, label=f"memory {layer}: {np.mean(c > 0):.1%} of {c.size} slots used")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_title("slot selections on validation text")
    ax.set_xlabel("times selected")
    ax.set_ylabel("slots")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _metric_table(finetune: dict) -> list[str]:
    """One row per (task, metric), one column per model, so the memory model sits beside the baseline."""
    models = [m for m, tasks in finetune.items() if isinstance(tasks, dict)]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for model in models:
        for task, metrics in finetune[model].items():
            if not isinstance(metrics, dict):
                continue
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not name.startswith(("NoAns", "HasAns")):
                    rows.setdefault((task, name), {})[model] = value
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for (task, name), values in rows.items():
        lines.append(f"| {task} | {name} | " + " | ".join(_fmt(values.get(m, "")) for m in models) + " |")
    return lines


def write_report(out: str, stages: dict[str, dict], quick: bool = False) -> dict:
    report_dir = os.path.join(out, "report")
    os.makedirs(report_dir, exist_ok=True)
    records = _records(os.path.join(out, "pretrain", "metrics.jsonl"))
    plots = {}
    if _plot(os.path.join(report_dir, "train_loss.png"), "MLM training loss", "loss",
             {k: v for k, v in _series(records, "train", "loss").items() if k in ("loss", "mlm_loss")}):
        plots["training loss"] = "train_loss.png"
    if _plot(os.path.join(report_dir, "memory_usage.png"), "memory usage (validation)", "share of slots",
             {k: v for k, v in _series(records, "eval", "usage").items()}):
        plots["memory usage"] = "memory_usage.png"
    if _plot(os.path.join(report_dir, "staleness.png"), "stale slots (not updated in the window)", "share of slots",
             _series(records, "eval", "stale_frac")):
        plots["staleness"] = "staleness.png"
    counts = slot_selection_counts(os.path.join(out, "hf_model"), os.path.join(out, "shards"),
                                   max_batches=2 if quick else 16,
                                   max_seq_len=stages.get("pretrain", {}).get("config", {}).get("data", {}).get("max_seq_len", 128))
    if _plot_histogram(os.path.join(report_dir, "slot_histogram.png"), counts):
        plots["slot-usage histogram"] = "slot_histogram.png"

    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    prep, pretrain = stages.get("prep", {}), stages.get("pretrain", {})
    lines = [
        "# Demo report: BERT + product-key memory on real Wikipedia text",
        "",
        "## What ran",
        f"- **data**: {prep.get('articles', '?')} Wikipedia articles from the sample in the `gensim` wheel; "
        f"{prep.get('pretrain_articles', '?')} tokenized into shards with the all-MiniLM-L6-v2 tokenizer, "
        f"{prep.get('heldout_articles', '?')} held out for finetuning.",
        f"- **pretraining**: BERT+PKM initialised from all-MiniLM-L6-v2, residual memory with zero-initialised "
        f"values, {pretrain.get('steps', '?')} steps on {pretrain.get('ranks', '?')} CPU rank(s) under the deepspeed "
        f"launcher ({pretrain.get('ds_config', '?')}), {pretrain.get('wall_s', '?')} s.",
        "- **finetuning**: a sentence-pair task (does sentence 2 follow sentence 1 in the same article? MRPC "
        "format) and a cloze QA set (a sentence with a span replaced by 'what'; SQuAD v1.1 format), both built "
        "from the held-out articles, for the converted model and for plain MiniLM as the baseline.",
        "",
        "## Pretraining",
    ]
    if train:
        lines.append(f"- loss: {train[0]['loss']:.3f} at step {train[0]['step']} -> "
                     f"{train[-1]['loss']:.3f} at step {train[-1]['step']}")
    if evals:
        last = evals[-1]
        for key in sorted(last):
            if key.startswith(("mlm_", "loss", "memory")) or "memory/" in key:
                lines.append(f"- eval {key} (step {last['step']}): {_fmt(last[key])}")
    lines += ["", "## Finetuning (dev sets)", "",
              "Pair task: accuracy and F1 as fractions; QA: exact match and F1 in percent (SQuAD's evaluation).",
              ""] + _metric_table(stages.get("finetune", {}))
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plots.items()]
    if quick:
        lines += ["", "_Quick form (test suite): few steps and trimmed tasks; the numbers only show the path works._"]
    with open(os.path.join(report_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"report": os.path.join(report_dir, "README.md"), "plots": sorted(plots.values())}
