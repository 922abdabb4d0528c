"""One GLUE finetuning run: load data, finetune, score the dev set(s), write test predictions.

The same code serves a plain HF BERT and a BERT+PKM folder: the model comes from
AutoModelForSequenceClassification (pkm.modeling registers the memory model with it) and the
optimizers adapt to whether the model has value tables (finetune.trainer).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from finetune import glue_data
from finetune.batching import Rows, eval_loader, steps_per_epoch, train_loader_factory
from finetune.config import FinetuneConfig
from finetune.data_issues import DataIssues
from finetune.metrics import glue_metrics
from finetune.results import finish_run
from finetune.tasks import GLUE_TASKS, GlueTask, get_task
from finetune.trainer import (
    model_inputs,
    predict,
    register_pkm_models,
    start_run,
    train,
)

log = logging.getLogger(__name__)


def tokenize_split(tokenizer, task: GlueTask, ds, max_seq_length: int, with_labels: bool,
                   chunk: int = 10000, progress: bool = False) -> Rows:
    cols: dict[str, list] = {"input_ids": [], "attention_mask": []}
    if "token_type_ids" in tokenizer.model_input_names:
        cols["token_type_ids"] = []
    n = len(ds)
    for lo in tqdm(range(0, n, chunk), desc="tokenize", disable=not progress or n <= chunk,
                   leave=False):
        part = ds[lo:lo + chunk]
        texts = [part[c] for c in task.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        for k in cols:
            cols[k].extend(enc[k])
    if with_labels:
        labels = ds["label"]
        cols["labels"] = [float(x) for x in labels] if task.is_regression else [int(x) for x in labels]
    return Rows(cols)


def load_classifier(model_dir: str, task: GlueTask) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification
    register_pkm_models()
    kwargs: dict[str, Any] = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    config = AutoConfig.from_pretrained(model_dir, **kwargs)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)


def _loss_fn(task: GlueTask):
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits.float()
        if task.is_regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), batch["labels"].float())
        return torch.nn.functional.cross_entropy(logits, batch["labels"])
    return loss


def _logits_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor]:
    return (model(**model_inputs(batch)).logits,)


def logits_to_predictions(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def write_submission(task: GlueTask, path: str, idx: list[int], preds: np.ndarray) -> None:
    """GLUE submission format: header index<TAB>prediction; label strings where GLUE wants them."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for i, p in zip(idx, preds):
            if task.is_regression:
                value = f"{float(np.clip(p, 0.0, 5.0)):.3f}"   # STS-B scores live in [0, 5]
            elif task.submit_label_strings:
                value = task.label_names[int(p)]
            else:
                value = str(int(p))
            f.write(f"{int(i)}\t{value}\n")


def run_glue(cfg: FinetuneConfig) -> dict[str, Any]:
    """Finetune cfg.model on the GLUE task cfg.task; returns (and writes) the result dict."""
    t_start = time.time()
    task = get_task(cfg.task)
    if not isinstance(task, GlueTask):
        raise ValueError(f"{cfg.task} is not a GLUE task; use finetune.run_squad.")
    cfg.validate()
    issues = DataIssues()
    # data errors before loading the model
    data = glue_data.load_glue(task, cfg.data, skip_malformed=cfg.skip_malformed_rows, issues=issues)
    device, tokenizer, pad_id = start_run(cfg, data, task.dev_splits)
    train_rows = tokenize_split(tokenizer, task, data["train"], cfg.max_seq_length, True,
                                progress=cfg.progress)
    model = load_classifier(cfg.model, task).to(device)

    summary = train(model, train_loader_factory(train_rows, cfg.batch_size, cfg.seed, pad_id),
                    steps_per_epoch(len(train_rows), cfg.batch_size), _loss_fn(task), cfg, device,
                    desc=f"{task.name} lr={cfg.lr:g} seed={cfg.seed}")

    metrics: dict[str, float] = {}
    for split, suffix in zip(task.dev_splits, task.dev_metric_suffixes):
        rows = tokenize_split(tokenizer, task, data[split], cfg.max_seq_length, True)
        (logits,) = predict(model, eval_loader(rows, cfg.eval_batch_size, pad_id), _logits_fn,
                            device, cfg.bf16, cfg.progress, desc=f"eval {split}")
        preds = logits_to_predictions(task, logits)
        metrics.update(glue_metrics(task.metrics, np.asarray(rows.columns["labels"]), preds, suffix))

    written = []
    if cfg.predict_test:
        sub_dir = os.path.join(cfg.output, "test_predictions")
        for split, fname in zip(task.test_splits, task.submission_files):
            if split not in data or len(data[split]) == 0:
                continue
            rows = tokenize_split(tokenizer, task, data[split], cfg.max_seq_length, False)
            (logits,) = predict(model, eval_loader(rows, cfg.eval_batch_size, pad_id), _logits_fn,
                                device, cfg.bf16, cfg.progress, desc=f"predict {split}")
            os.makedirs(sub_dir, exist_ok=True)
            write_submission(task, os.path.join(sub_dir, fname), data[split]["idx"],
                             logits_to_predictions(task, logits))
            written.append(fname)
        if task.name == "mnli":
            ax = glue_data.load_glue_ax(cfg.data, issues)
            if ax is not None and len(ax):
                rows = tokenize_split(tokenizer, task, ax, cfg.max_seq_length, False)
                (logits,) = predict(model, eval_loader(rows, cfg.eval_batch_size, pad_id),
                                    _logits_fn, device, cfg.bf16, cfg.progress, desc="predict AX")
                os.makedirs(sub_dir, exist_ok=True)
                write_submission(task, os.path.join(sub_dir, "AX.tsv"), ax["idx"],
                                 logits_to_predictions(task, logits))
                written.append("AX.tsv")

    return finish_run(cfg, task, model, tokenizer, metrics, device, summary, issues, t_start,
                      num_train_examples=len(train_rows),
                      num_dev_examples={s: len(data[s]) for s in task.dev_splits},
                      test_prediction_files=written)


def glue_task_names() -> list[str]:
    return list(GLUE_TASKS)
