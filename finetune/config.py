"""One typed config for a finetuning run (GLUE or SQuAD), shared by the CLI, the API and the sweep."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from finetune.tasks import canonical_task_name, get_task


@dataclass
class FinetuneConfig:
    task: str                               # cola sst2 mrpc stsb qqp mnli qnli rte wnli squad squad_v2
    model: str                              # HF model folder: plain BERT or converted BERT+PKM
    output: str                             # run folder (result.json, predictions, config)
    data: str | None = None                 # local data folder; None -> the hub
    lr: float = 2e-5                        # dense AdamW peak learning rate
    seed: int = 42
    epochs: float = 3.0
    max_steps: int | None = None            # overrides epochs when set
    batch_size: int = 32
    eval_batch_size: int = 128
    max_seq_length: int | None = None       # None -> 128 for GLUE, 384 for SQuAD
    warmup_ratio: float = 0.1               # linear warmup over this share of the steps, then decay to 0
    weight_decay: float = 0.01
    adam_eps: float = 1e-6                  # BERT's finetuning epsilon
    max_grad_norm: float = 1.0              # over dense and memory-value gradients together; 0 = off
    # PKM memory values (ignored for a model without memory):
    value_lr: float | None = None           # sparse Adam lr for the value tables; None -> 10 x lr
    value_lr_schedule: str = "linear"       # "linear" (same warmup/decay as dense) | "constant"
    freeze_values: bool = False             # keep the memory values fixed
    # SQuAD:
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0  # v2.0: predict "" when null - best span > this
    # Runtime:
    device: str | None = None               # None -> cuda if available else cpu
    bf16: bool = False                      # bf16 autocast (weights and optimizer state stay fp32)
    max_train_samples: int | None = None    # subsample for quick runs (first N rows)
    max_eval_samples: int | None = None
    skip_malformed_rows: bool = False       # GLUE: skip (and count) unreadable train/dev rows
    predict_test: bool = True               # GLUE: write test predictions in the submission format
    save_model: bool = False                # save the finetuned model + tokenizer into output/model
    progress: bool = True                   # tqdm bars
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        self.task = canonical_task_name(self.task)
        if self.max_seq_length is None:
            self.max_seq_length = 128 if get_task(self.task).is_glue else 384

    def validate(self) -> None:
        """Checks that need no data or model, run before any expensive work."""
        if not os.path.isdir(self.model):
            raise ValueError(f"Model folder {self.model!r} does not exist; pass --model pointing at "
                             f"a Hugging Face model folder (config.json, weights, tokenizer files).")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"{self.model!r} has no config.json: is it a Hugging Face model folder "
                             f"(a converted checkpoint or a saved BERT)?")
        for name in ("lr", "batch_size", "eval_batch_size", "max_seq_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("epochs must be positive (or set max_steps).")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if self.value_lr_schedule not in ("linear", "constant"):
            raise ValueError(f"value_lr_schedule must be 'linear' or 'constant', "
                             f"got {self.value_lr_schedule!r}.")
        if self.value_lr is not None and self.value_lr <= 0:
            raise ValueError(f"value_lr must be positive, got {self.value_lr}.")
        if not get_task(self.task).is_glue:
            from finetune.squad_features import check_lengths
            check_lengths(self.max_seq_length, self.max_query_length, self.doc_stride)

    @property
    def resolved_value_lr(self) -> float:
        return self.value_lr if self.value_lr is not None else 10.0 * self.lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown finetuning option(s) {unknown}; valid: {sorted(known)}.")
        return cls(**d)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(FinetuneConfig))
