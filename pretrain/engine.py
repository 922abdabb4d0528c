"""The dense engine and the value tables beside it, built for one run.

DeepSpeed owns the dense parameters (ZeRO partitions, mixed precision, its optimizer and lr
scheduler); the memories' value tables live outside it, column-sharded over a process group and
stepped by SparseAdam (docs/DESIGN.md says why). ``build_engine`` makes both from a model built
with ``external_values=True``; both optimizers follow ``lr_lambda``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from pkm.lr_schedule import warmup_decay
from pretrain.config import OptimConfig, RunConfig

__all__ = ["ValueTables", "build_engine", "compile_encoder_layers", "lr_lambda", "token_capacity",
           "value_table_group"]


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The run's lr multiplier per optimizer step (``pkm.lr_schedule.warmup_decay``): warmup over
    ``warmup_steps``, then ``decay`` to ``min_lr_ratio`` at ``decay_steps`` (default max_steps)."""
    horizon = optim.decay_steps if optim.decay_steps is not None else max_steps
    return warmup_decay(optim.warmup_steps, horizon, optim.decay, optim.min_lr_ratio)


@dataclass
class ValueTables:
    """This rank's value tables (memory module path -> ShardedValueTable), their SparseAdam and its
    lr schedule, and the process group the columns are sharded over (None: the world). Empty for a
    memory-less model."""

    tables: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    group: Any = None


def compile_encoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile every encoder layer without a memory, in place (``layer.compile()``: the
    state_dict keys, hence checkpoints, stay the same). Memory layers stay eager: their top-k
    selection, custom autograd functions and sharded lookup (collectives) would only break the
    graph. Returns the number of layers compiled. Used by ``train.compile``."""
    from pkm.modeling import BertPkmLayer

    layers = [m for m in model.modules() if isinstance(m, BertPkmLayer) and not m.has_memory]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


def value_table_group() -> Any:
    """The value tables' own process group over every rank (``dist.new_group``), so their lookups
    never share a communicator with the engine's gradient reductions (DESIGN.md, Sharding).
    Collective: every rank calls it, in the same order relative to other ``new_group`` calls, and
    before ``deepspeed.initialize`` (which makes groups of its own)."""
    import torch.distributed as dist

    return dist.new_group(list(range(dist.get_world_size())))


def token_capacity(cfg: RunConfig, micro_batch: int) -> int | None:
    """The most tokens one rank passes to one lookup, for the tables' fixed-size exchange: with
    ``packing: full`` every micro-batch is ``micro_batch`` full samples of ``max_seq_len`` tokens
    (padding only in an epoch's last sample), so the exchange is as large as the exact one and no
    token count has to be read on the host. ``doc`` packing leaves samples short: the counts are
    exchanged instead (None), so padding never travels."""
    return micro_batch * cfg.data.max_seq_len if cfg.data.packing == "full" else None


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any], device: torch.device,
                 group: Any = None) -> tuple[Any, ValueTables]:
    """Hand ``model``'s memories their value tables (column shards over ``group``, default: the
    world; a run passes ``value_table_group()``; the model is built with ``external_values=True``),
    give the tables SparseAdam + the shared schedule, and hand the dense model to DeepSpeed.

    Returns (engine, ValueTables); the tables are empty for a memory-less model. Collective: every
    rank calls it with an identically initialised model."""
    import deepspeed

    from pkm.modeling import memory_modules, parameter_groups
    from pkm.sharded_values import attach_sharded_values
    from pkm.sparse_adam import SparseAdam

    o = cfg.optim
    schedule = lr_lambda(o, cfg.train.max_steps)
    values = ValueTables(group=group)
    if cfg.train.compile:
        compile_encoder_layers(model)
    if memory_modules(model):
        # outside the module, so DeepSpeed never broadcasts, casts or partitions them (DESIGN.md)
        seed = cfg.model.init_seed if cfg.model.init_seed is not None else cfg.train.seed
        capacity = token_capacity(cfg, int(ds_config["train_micro_batch_size_per_gpu"]))
        values.tables = attach_sharded_values(model, group=group, grad_reduction="mean", device=device, seed=seed,
                                              token_capacity=capacity)
        values.optimizer = SparseAdam(list(values.tables.values()), lr=o.value_lr, betas=tuple(o.value_betas),
                                      eps=o.value_eps, weight_decay=o.value_weight_decay)
        values.scheduler = LambdaLR(values.optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, o.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),  # the engine steps it (and skips it on overflow)
    )
    return engine, values
