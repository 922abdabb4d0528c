"""One SQuAD v1.1 / v2.0 finetuning run: features, finetune, n-best decoding, official EM/F1.

Writes into the run folder: predictions.json ({qid: answer text}, the official format),
null_odds.json (v2.0: {qid: null score - best span score}, the evaluate-v2.0 --na-prob-file input),
nbest_predictions.json and result.json.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch

from finetune.batching import Rows, eval_loader, steps_per_epoch, train_loader_factory
from finetune.config import FinetuneConfig
from finetune.data_issues import DataIssues
from finetune.metrics import squad_evaluate, squad_evaluate_v1
from finetune.results import finish_run
from finetune.squad_data import gold_answers, load_squad
from finetune.squad_features import (
    check_lengths,
    postprocess_predictions,
    prepare_features,
)
from finetune.tasks import SquadTask, get_task
from finetune.trainer import (
    model_inputs,
    predict,
    register_pkm_models,
    start_run,
    train,
)

log = logging.getLogger(__name__)


def load_qa_model(model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForQuestionAnswering
    register_pkm_models()
    return AutoModelForQuestionAnswering.from_pretrained(model_dir)


def _loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    out = model(**model_inputs(batch))
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(out.start_logits.float(), batch["start_positions"])
                  + ce(out.end_logits.float(), batch["end_positions"]))


def _span_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**model_inputs(batch))
    return out.start_logits, out.end_logits


def run_squad_config(cfg: FinetuneConfig) -> dict[str, Any]:
    """Finetune cfg.model on SQuAD (cfg.task "squad" or "squad_v2"); returns and writes the result."""
    t_start = time.time()
    task = get_task(cfg.task)
    if not isinstance(task, SquadTask):
        raise ValueError(f"{cfg.task} is not a SQuAD task; use finetune.run_glue_task.")
    cfg.validate()
    check_lengths(cfg.max_seq_length, cfg.max_query_length, cfg.doc_stride)
    issues = DataIssues()
    data = load_squad(task, cfg.data, issues=issues)
    device, tokenizer, pad_id = start_run(cfg, data, ["validation"])
    train_ds, dev_ds = data["train"], data["validation"]
    train_feats = prepare_features(tokenizer, train_ds["question"], train_ds["context"],
                                   train_ds["answers"], cfg.max_seq_length, cfg.doc_stride,
                                   cfg.max_query_length, progress=cfg.progress)
    dev_feats = prepare_features(tokenizer, dev_ds["question"], dev_ds["context"], None,
                                 cfg.max_seq_length, cfg.doc_stride, cfg.max_query_length,
                                 progress=cfg.progress)
    model = load_qa_model(cfg.model).to(device)

    train_rows = Rows(train_feats.tensors())
    summary = train(model, train_loader_factory(train_rows, cfg.batch_size, cfg.seed, pad_id),
                    steps_per_epoch(len(train_rows), cfg.batch_size), _loss, cfg, device,
                    desc=f"{task.name} lr={cfg.lr:g} seed={cfg.seed}")

    start, end = predict(model, eval_loader(Rows(dev_feats.tensors()), cfg.eval_batch_size, pad_id),
                         _span_logits, device, cfg.bf16, cfg.progress, desc="eval")
    preds, null_odds, nbest = postprocess_predictions(
        dev_ds["id"], dev_ds["context"], dev_feats, start, end, task.version_2,
        cfg.n_best_size, cfg.max_answer_length, cfg.null_score_diff_threshold)
    # Each version is scored by its own official script (they differ on empty-normalising golds).
    if task.version_2:
        metrics = squad_evaluate(gold_answers(dev_ds), preds, null_odds)
    else:
        metrics = squad_evaluate_v1(gold_answers(dev_ds), preds)

    with open(os.path.join(cfg.output, "predictions.json"), "w", encoding="utf-8") as f:
        json.dump(preds, f, indent=2, ensure_ascii=False)
    if task.version_2:
        with open(os.path.join(cfg.output, "null_odds.json"), "w", encoding="utf-8") as f:
            json.dump(null_odds, f, indent=2)
    with open(os.path.join(cfg.output, "nbest_predictions.json"), "w", encoding="utf-8") as f:
        json.dump(nbest, f, indent=1, ensure_ascii=False)
    return finish_run(cfg, task, model, tokenizer, metrics, device, summary, issues, t_start,
                      num_train_examples=len(train_ds), num_train_features=len(train_feats),
                      num_dev_examples={"validation": len(dev_ds)}, num_dev_features=len(dev_feats))
