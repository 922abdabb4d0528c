"""The Python API: one call per run, and the sweep.

    from finetune import run_glue_task, run_squad, run_sweep
    run_glue_task("sst2", model="ckpt/hf", output="runs/sst2", data="glue_data", lr=2e-5, seed=1)
    run_squad("squad_v2", model="ckpt/hf", output="runs/squad2", data="squad_data")
"""
from __future__ import annotations

from typing import Any

from finetune.config import FinetuneConfig
from finetune.tasks import get_task


def finetune(cfg: FinetuneConfig | dict[str, Any]) -> dict[str, Any]:
    """Run one finetuning job (GLUE or SQuAD, from cfg.task); returns the result dict, also
    written to <output>/result.json."""
    if isinstance(cfg, dict):
        cfg = FinetuneConfig.from_dict(cfg)
    if get_task(cfg.task).is_glue:
        from finetune.glue import run_glue
        return run_glue(cfg)
    from finetune.squad import run_squad_config
    return run_squad_config(cfg)


def run_glue_task(task: str, model: str, output: str, data: str | None = None, lr: float = 2e-5,
                  seed: int = 42, **options: Any) -> dict[str, Any]:
    """Finetune `model` (HF folder: BERT or BERT+PKM) on one GLUE task. options: any
    FinetuneConfig field (epochs, batch_size, max_seq_length, value_lr, freeze_values, bf16 ...)."""
    if not get_task(task).is_glue:
        raise ValueError(f"{task!r} is not a GLUE task; use run_squad for SQuAD.")
    return finetune(FinetuneConfig.from_dict(
        dict(task=task, model=model, output=output, data=data, lr=lr, seed=seed, **options)))


def run_squad(task: str, model: str, output: str, data: str | None = None, lr: float = 3e-5,
              seed: int = 42, **options: Any) -> dict[str, Any]:
    """Finetune on SQuAD; task is "squad" (v1.1) or "squad_v2". Writes predictions.json (and
    null_odds.json for v2.0) into output; returns the result dict (metrics: exact, f1, ...)."""
    if get_task(task).is_glue:
        raise ValueError(f"{task!r} is a GLUE task; use run_glue_task.")
    return finetune(FinetuneConfig.from_dict(
        dict(task=task, model=model, output=output, data=data, lr=lr, seed=seed, **options)))
