"""Finetuning on GLUE and SQuAD from any HF model folder (plain BERT or BERT+PKM), and sweeps.

Python API: run_glue_task, run_squad, finetune (one run from a FinetuneConfig), run_sweep.
CLI: python -m finetune ... (one run), python -m finetune.sweep ... (a grid). See finetune/README.md.
"""
from finetune.api import finetune, run_glue_task, run_squad
from finetune.config import FinetuneConfig
from finetune.tasks import ALL_TASK_NAMES, GLUE_TASKS, SQUAD_TASKS


def run_sweep(*args, **kwargs):
    """See finetune.sweep.run_sweep."""
    from finetune.sweep import run_sweep as _run_sweep
    return _run_sweep(*args, **kwargs)


__all__ = ["finetune", "run_glue_task", "run_squad", "run_sweep", "FinetuneConfig",
           "ALL_TASK_NAMES", "GLUE_TASKS", "SQUAD_TASKS"]
