"""The end of a finetuning run, the same for every task: the model saved if asked, and
``result.json`` (what the sweep and the reports read) written atomically."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from atomic_files import write_json_atomic
from finetune.config import FinetuneConfig
from finetune.data_issues import DataIssues
from finetune.metrics import task_score

log = logging.getLogger(__name__)


def finish_run(cfg: FinetuneConfig, task: Any, model: Any, tokenizer: Any, metrics: dict[str, float],
               device: Any, train_summary: dict[str, Any], issues: DataIssues, started: float,
               **counts: Any) -> dict[str, Any]:
    """Save the model (``cfg.save_model``) and write ``<output>/result.json``: the task, model, lr
    and seed, the metrics and the task's score, ``counts`` (examples, features, prediction files),
    the training summary, the run time since ``started`` (``time.time()``), the config and the data
    issues. Returns the result."""
    if cfg.save_model:
        model.save_pretrained(os.path.join(cfg.output, "model"))
        tokenizer.save_pretrained(os.path.join(cfg.output, "model"))
    result = {
        "task": task.name, "model": cfg.model, "lr": cfg.lr, "seed": cfg.seed,
        "metrics": metrics, "score": task_score(metrics, task.score_metrics),
        "score_metrics": list(task.score_metrics),
        **counts, "device": str(device), **train_summary, "runtime_s": time.time() - started,
        "config": cfg.to_dict(), "data_issues": issues.to_dict(),
    }
    write_json_atomic(os.path.join(cfg.output, "result.json"), result)
    log.info("%s: %s", task.name, metrics)
    return result
