"""The training and prediction loops shared by GLUE and SQuAD, and the optimizers.

Dense parameters: AdamW with linear warmup then linear decay to 0 (BERT finetuning recipe).
PKM value tables (when the model has memory): they are not dense parameters (requires_grad=False,
row-sparse gradients accumulated in table.sparse_grad), so they get pkm.sparse_adam.SparseAdam with
their own learning rate, or stay frozen. Gradient clipping uses one global norm over the dense
gradients and the tables' sparse gradients, so both are scaled by the same factor.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from finetune.config import FinetuneConfig
from pkm.lr_schedule import warmup_decay
from pkm.value_step import global_grad_norm

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ utilities


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use --device cpu.")
    return device


# ------------------------------------------------------------------------------------- models


def register_pkm_models() -> None:
    """Import pkm.modeling so the Auto classes know model_type "bert_pkm" (pkm is part of this
    project, so there is no fallback for its absence)."""
    import pkm.modeling  # noqa: F401  (registers BertPkm* with the Auto classes)


def value_tables(model: torch.nn.Module) -> list:
    """The model's PKM value tables ([] for a plain BERT)."""
    import pkm.modeling
    return list(pkm.modeling.value_tables(model))


# --------------------------------------------------------------------------------- optimizers


def start_run(cfg: FinetuneConfig, data: dict, eval_splits: Iterable[str]) -> tuple[torch.device, Any, int]:
    """What every GLUE/SQuAD run does once its data loaded: cap the splits (max_train_samples,
    max_eval_samples; in place), write the run's config, seed, pick the device and load the model
    folder's tokenizer. Returns (device, tokenizer, pad token id)."""
    import os

    from transformers import AutoTokenizer

    from atomic_files import write_json_atomic

    def first(split: str, n: int | None) -> None:
        if n:
            data[split] = data[split].select(range(min(n, len(data[split]))))

    first("train", cfg.max_train_samples)
    for split in eval_splits:
        first(split, cfg.max_eval_samples)
    os.makedirs(cfg.output, exist_ok=True)
    write_json_atomic(os.path.join(cfg.output, "finetune_config.json"), cfg.to_dict())
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return resolve_device(cfg.device), tokenizer, pad_id


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup, then linear decay to 0 at ``total_steps`` (the shape pretraining uses too)."""
    return warmup_decay(warmup_steps, total_steps, "linear")


def dense_param_groups(model: torch.nn.Module, weight_decay: float, exclude: set[int]
                       ) -> list[dict]:
    """Weight decay on matrices only; biases and norm weights (1-D) are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class Optimizers:
    dense: torch.optim.Optimizer
    dense_sched: LambdaLR
    tables: list
    sparse: torch.optim.Optimizer | None = None
    sparse_sched: LambdaLR | None = None

    def step(self) -> None:
        self.dense.step()
        self.dense_sched.step()
        self.dense.zero_grad(set_to_none=True)
        if self.sparse is not None:
            self.sparse.step()               # also clears each table's sparse_grad
            self.sparse_sched.step()
        else:
            for t in self.tables:            # frozen values: drop the accumulated row grads
                t.zero_grad()


def build_optimizers(model: torch.nn.Module, cfg: FinetuneConfig, total_steps: int) -> Optimizers:
    tables = value_tables(model)
    if tables:
        # The model's own grouping: also keeps weight decay off the memory keys and query net.
        import pkm.modeling
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in pkm.modeling.parameter_groups(model, cfg.weight_decay)]
    else:
        groups = dense_param_groups(model, cfg.weight_decay, set())
    dense = torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_eps)
    warmup = int(cfg.warmup_ratio * total_steps)
    schedule = linear_warmup_decay(total_steps, warmup)
    opts = Optimizers(dense, LambdaLR(dense, schedule), tables)
    if tables and not cfg.freeze_values:
        from pkm.sparse_adam import SparseAdam
        opts.sparse = SparseAdam(tables, lr=cfg.resolved_value_lr)
        value_schedule = schedule if cfg.value_lr_schedule == "linear" else (lambda step: 1.0)
        opts.sparse_sched = LambdaLR(opts.sparse, value_schedule)
    return opts


def clip_gradients(model: torch.nn.Module, tables: list, max_norm: float) -> float:
    """Clip by the global norm over dense grads and the tables' sparse grads; returns the norm."""
    dense = [p.grad for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=dense[0].device if dense else "cpu")
    for g in dense:
        sq = sq + g.detach().float().pow(2).sum()
    if tables:  # the value tables' part, as pretraining takes it (pkm.value_step)
        sq = sq + global_grad_norm(tables).to(sq.device, sq.dtype).square()
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in dense:
            g.mul_(scale)
        for t in tables:
            if t.sparse_grad is not None:
                t.scale_grad_(scale)
    return norm


# -------------------------------------------------------------------------------------- loops


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(model: torch.nn.Module, make_loader: Callable[[int], Iterable[dict]], steps_per_epoch: int,
          loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor], cfg: FinetuneConfig,
          device: torch.device, desc: str = "train") -> dict[str, Any]:
    """Train for cfg.max_steps or cfg.epochs; make_loader(epoch) gives that epoch's batches
    (seeded shuffling, so a run is reproducible). Returns a summary of the run."""
    if steps_per_epoch <= 0:
        raise ValueError("The training set is empty.")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    opts = build_optimizers(model, cfg, total_steps)
    model.train()
    step, loss_sum, loss_n, t0 = 0, 0.0, 0, time.time()
    recent: list[float] = []
    bar = tqdm(total=total_steps, desc=desc, disable=not cfg.progress, dynamic_ncols=True)
    epoch = 0
    while step < total_steps:
        for batch in make_loader(epoch):
            batch = to_device(batch, device)
            with autocast(device, cfg.bf16):
                loss = loss_fn(model, batch)
            loss.backward()
            clip_gradients(model, opts.tables, cfg.max_grad_norm)
            opts.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"Training loss became {value} at step {step}; lower --lr.")
            loss_sum += value
            loss_n += 1
            recent = (recent + [value])[-cfg.log_every_steps:]
            bar.update(1)
            if step % cfg.log_every_steps == 0 or step == total_steps:
                bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{opts.dense_sched.get_last_lr()[0]:.2e}")
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    return {"train_steps": step, "train_epochs": step / steps_per_epoch,
            "train_loss": loss_sum / max(1, loss_n), "train_loss_last": float(np.mean(recent)),
            "train_time_s": time.time() - t0, "has_memory": bool(opts.tables),
            "memory_values": ("frozen" if cfg.freeze_values else "sparse_adam") if opts.tables else None,
            "value_lr": cfg.resolved_value_lr if opts.tables and not cfg.freeze_values else None}


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable[dict],
            forward_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, ...]],
            device: torch.device, bf16: bool, progress: bool, desc: str = "predict"
            ) -> list[np.ndarray]:
    """Run forward_fn over the loader in eval mode; returns its outputs concatenated, as fp32."""
    was_training = model.training
    model.eval()
    chunks: list[list[np.ndarray]] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        with autocast(device, bf16):
            outs = forward_fn(model, to_device(batch, device))
        chunks.append([o.float().cpu().numpy() for o in outs])
    model.train(was_training)
    if not chunks:
        return []
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in batch.items() if k in keep}
