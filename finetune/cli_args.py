"""argparse flags generated from FinetuneConfig, so the CLI, the API and the sweep agree."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from finetune.config import FinetuneConfig, config_fields
from finetune.tasks import ALL_TASK_NAMES

_HELP = {
    "task": f"one of: {', '.join(ALL_TASK_NAMES)}",
    "model": "HF model folder (plain BERT or a converted BERT+PKM checkpoint)",
    "output": "run folder: result.json, predictions, finetune_config.json",
    "data": "local data folder (GLUE download root or task folder; SQuAD folder with the official "
            "JSON files). Without it the data come from the Hugging Face hub.",
    "lr": "peak learning rate of the dense parameters (AdamW, linear warmup/decay)",
    "value_lr": "learning rate of the PKM memory values (sparse Adam); default 10 x lr",
    "value_lr_schedule": "linear (same warmup/decay as dense) or constant",
    "freeze_values": "keep the PKM memory values fixed",
    "max_seq_length": "default 128 (GLUE) / 384 (SQuAD)",
    "device": "cpu, cuda, cuda:1 ...; default cuda when available",
    "bf16": "bf16 autocast",
    "predict_test": "write GLUE test predictions in the submission format",
    "skip_malformed_rows": "GLUE: skip unreadable train/dev rows (counted in result.json) instead "
                           "of stopping at the first one; test rows are never skipped",
}


def _base_type(tp: Any) -> Any:
    """float | None -> float."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                     required: tuple[str, ...] = ("task", "model", "output")) -> None:
    hints = typing.get_type_hints(FinetuneConfig)
    for f in config_fields():
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        # --max-seq-length and --max_seq_length both work (bools: dashes only, --no-bf16 ...)
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name and tp is not bool:
            flags.append(f"--{f.name}")
        help_text = _HELP.get(f.name, "")
        if tp is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text or " ")
        else:
            default = None if f.default is dataclasses.MISSING else f.default
            parser.add_argument(*flags, dest=f.name, type=tp, default=default,
                                required=f.name in required, help=help_text or " ")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> FinetuneConfig:
    values = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    values.update(overrides)
    return FinetuneConfig.from_dict(values)
