"""The pretraining loop: DeepSpeed engine for the dense parameters, sharded value tables beside it.

One optimizer step (``Trainer.train_step``)::

    for each of the gradient_accumulation_steps micro-batches:
        loss = engine(batch).loss            # the memory looks values up in the sharded tables
        engine.backward(loss)                # dense grads (ZeRO) + row-sparse value grads (tables)
        engine.step()                        # only the boundary micro-batch really steps
    value step (only if the engine applied its step, i.e. no fp16 overflow):
        unscale fp16, global value-grad norm (all-reduce over the group), clip, SparseAdam.step,
        staleness tracker marks the touched rows, value LR scheduler steps
    else: drop the value grads (the engine skipped the step for overflow)

Gradient scaling of the value tables matches the dense parameters (DESIGN.md): the engine divides
the loss by the accumulation steps and, with fp16, multiplies it by the loss scale, and the value
grads come from that same loss; ``ShardedValueTable(grad_reduction="mean")`` already applies the 1/P
that turns its sum over all ranks' tokens into the data-parallel mean. Only the fp16 loss scale is
removed here (read from the engine's optimizer before ``engine.step`` may change it).

Both learning rates follow ``lr_lambda`` (warmup, then linear/cosine/constant): the dense one through
a LambdaLR the engine owns (stepped by the engine, skipped with its step on overflow, saved in its
checkpoint), the value one through a LambdaLR on SparseAdam stepped right after.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from pkm.atomic_io import write_text_atomic
from pkm.lr_schedule import warmup_decay
from pkm.value_step import step_values
from pretrain import checkpoint as ckpt
from pretrain.config import OptimConfig, RunConfig, config_to_dict
from pretrain.evaluate import ValidationData, evaluate_mlm
from pretrain.logging_utils import MetricsLogger, get_logger
from pretrain.throughput import flops_per_sequence, non_embedding_params, throughput_metrics

__all__ = ["lr_lambda", "build_engine", "compile_encoder_layers", "model_inputs", "Trainer", "TrainResult",
           "TrainStream", "TrainingDiverged", "ValidationData", "seed_everything"]


# --------------------------------------------------------------------------------------------------
# The one schedule both optimizers follow
# --------------------------------------------------------------------------------------------------


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The run's lr multiplier per optimizer step (``pkm.lr_schedule.warmup_decay``): warmup over
    ``warmup_steps``, then ``decay`` to ``min_lr_ratio`` at ``decay_steps`` (default max_steps)."""
    horizon = optim.decay_steps if optim.decay_steps is not None else max_steps
    return warmup_decay(optim.warmup_steps, horizon, optim.decay, optim.min_lr_ratio)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Training data: an endless, resumable stream of micro-batches for this rank
# --------------------------------------------------------------------------------------------------


class TrainStream:
    """Micro-batches of this rank from ``pretrain.data`` (MLMDataset + MLMSampler + DataLoader).

    The data position is the number of *global* samples the loop has consumed (counted here, not
    read from the sampler, which a prefetching DataLoader runs ahead of); resuming rebuilds the
    loader at that position, and since masks are seeded per (seed, epoch, index) the batches after
    a resume are the ones the uninterrupted run would have seen.
    """

    def __init__(self, shard_dir: str, split: str, max_seq_len: int, packing: str, mask_prob: float,
                 whole_word_masking: bool, seed: int, micro_batch: int, rank: int, world_size: int,
                 num_workers: int = 0, pin_memory: bool | None = None) -> None:
        from pretrain.data import MLMDataset

        self.dataset = MLMDataset(shard_dir, split=split, max_seq_len=max_seq_len, packing=packing,
                                  mask_prob=mask_prob, whole_word_masking=whole_word_masking, seed=seed)
        self.seed, self.micro_batch = seed, micro_batch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        # page-locked batches let the trainer's non_blocking copies to a GPU run asynchronously
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.consumed_samples = 0
        self._iter: Any = None

    def _start(self) -> None:
        from pretrain.data import MLMSampler

        sampler = MLMSampler(len(self.dataset), rank=self.rank, world_size=self.world_size, seed=self.seed,
                             shuffle=True, consumed_samples=self.consumed_samples)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=sampler,
            # with the index lists of the masked positions and real tokens: a GPU step needs no host sync
            collate_fn=functools.partial(self.dataset.collate, with_positions=True),
            num_workers=self.num_workers, persistent_workers=False, pin_memory=self.pin_memory,
            # its own generator: creating an iterator draws a base seed, which from the global RNG
            # would shift the dropout stream of a resumed run (the loader is rebuilt on resume)
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._iter = iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self.consumed_samples += self.micro_batch * self.world_size
        return batch

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "num_samples": len(self.dataset), "seed": self.seed,
                "micro_batch": self.micro_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples", len(self.dataset)) != len(self.dataset) or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                "the checkpoint's data position was saved for another dataset or seed "
                f"({state.get('num_samples')} samples, seed {state.get('seed')}; now {len(self.dataset)}, "
                f"{self.seed}): resume with the same data.shard_dir, data.max_seq_len and train.seed."
            )
        self.consumed_samples = int(state["consumed_samples"])
        self._iter = None


# --------------------------------------------------------------------------------------------------
# Engine + value tables
# --------------------------------------------------------------------------------------------------


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


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the training forward for a host-side batch.

    A batch without padding (``token_positions`` lists every position, known from shapes on the
    host) goes without its attention mask: the memories take ``token_positions`` instead, and
    attention without a mask is the same computation, but Hugging Face's SDPA path would otherwise
    check ``mask.all()`` on the device every forward (a host sync) to decide to drop it."""
    positions = batch.get("token_positions")
    if positions is not None and "attention_mask" in batch and positions.numel() == batch["attention_mask"].numel():
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return dict(batch)


def build_engine(model: torch.nn.Module, cfg: RunConfig, ds_config: dict[str, Any], device: torch.device,
                 group: Any = None) -> tuple[Any, dict[str, Any], Any, Any]:
    """Hand ``model``'s memories their value tables (column shards over ``group``, default: the
    world; the model is built with ``external_values=True``), give the tables SparseAdam + the shared
    schedule, and hand the dense model to DeepSpeed.

    Returns (engine, tables {memory module path: ShardedValueTable}, value optimizer, value lr
    scheduler); the last three are empty/None for a memory-less model. Collective: every rank calls
    it with an identically initialised model."""
    import deepspeed

    from pkm.modeling import memory_modules, parameter_groups
    from pkm.sharded_values import attach_sharded_values
    from pkm.sparse_adam import SparseAdam

    o = cfg.optim
    schedule = lr_lambda(o, cfg.train.max_steps)
    tables: dict[str, Any] = {}
    value_opt = value_sched = None
    if cfg.train.compile:
        compile_encoder_layers(model)
    if memory_modules(model):
        # outside the module, so DeepSpeed never broadcasts, casts or partitions them (DESIGN.md)
        seed = cfg.model.init_seed if cfg.model.init_seed is not None else cfg.train.seed
        tables = attach_sharded_values(model, group=group, grad_reduction="mean", device=device, seed=seed)
        value_opt = SparseAdam(list(tables.values()), lr=o.value_lr, betas=tuple(o.value_betas), eps=o.value_eps,
                               weight_decay=o.value_weight_decay)
        value_sched = LambdaLR(value_opt, schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, o.weight_decay), config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),  # the engine steps it (and skips it on overflow)
    )
    return engine, tables, value_opt, value_sched


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    last_checkpoint: str | None
    final_loss: float | None


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run stops with an error (main exits non-zero)."""


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
                pass

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        self.signum = signum

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class Trainer:
    """Owns engine, value tables, data and logging for one run (every rank builds one)."""

    def __init__(
        self,
        cfg: RunConfig,
        engine: Any,
        tables: dict[str, Any],
        value_optimizer: Any,
        value_scheduler: Any,
        train_data: Any,
        val_data: Any,
        ds_config: dict[str, Any],
        rank: int,
        world_size: int,
        group: Any = None,
        model_config: Any = None,
        tokenizer_dir: str | None = None,
    ) -> None:
        from pkm.modeling import last_memory_outputs, memory_modules
        from pkm.usage import MemoryUsage, StalenessTracker

        self.cfg = cfg
        self.engine = engine
        self.tables = tables
        self.value_optimizer = value_optimizer
        self.value_scheduler = value_scheduler
        self.train_data = train_data
        self.val_data = val_data
        self.ds_config = ds_config
        self.rank = rank
        self.world_size = world_size
        # an explicit group object: pkm.usage treats process_group=None as "no reduction"
        self.group = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        self.model_config = model_config
        self.tokenizer_dir = tokenizer_dir
        self.device = engine.device
        self.gas = int(engine.gradient_accumulation_steps())
        self.fp16 = bool(engine.fp16_enabled())
        self.logger = get_logger(rank)
        self.metrics = MetricsLogger(cfg.train.out_dir, rank=rank, tensorboard=cfg.train.tensorboard,
                                     max_steps=cfg.train.max_steps, logger=self.logger)
        self._last_memory_outputs = last_memory_outputs
        self.memories = memory_modules(engine.module)
        self.table_list = list(tables.values())
        self.memory_names = list(tables.keys())
        self.train_usage = [MemoryUsage(t.num_rows, device=self.device) for t in self.table_list]
        self.staleness = [StalenessTracker(t.num_rows, device=self.device) for t in self.table_list]
        # tokens / samples not yet added to state (all-reduced at log and checkpoint steps only)
        self._pending_counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        mc = engine.module.config
        # model FLOPs of one sequence, for the logged MFU (pretrain/throughput.py)
        self.flops_per_seq = flops_per_sequence(non_embedding_params(engine.module), cfg.data.max_seq_len,
                                                mc.hidden_size, mc.num_hidden_layers)
        self.state = ckpt.TrainState()
        self.stop = _StopFlag()
        self.last_checkpoint: str | None = None
        # consecutive steps with a non-finite loss or a skipped update (a device counter: no host
        # sync per step; read at log and checkpoint steps)
        self._bad_streak = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_loss_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self._reset_interval()

    # -- state ------------------------------------------------------------------------------------

    def _reset_interval(self) -> None:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self._acc = {"loss_sum": z(), "micro": z(), "correct": z(), "masked": z(), "tokens": z(),
                     "samples": z(), "value_norm_sum": z(), "value_steps": z(), "dense_norm": z(),
                     "dense_norm_steps": z(), "skipped": z()}
        self._interval_t0 = time.perf_counter()
        self._interval_excluded_s = 0.0  # evaluation and checkpoint time: not training throughput
        self._interval_steps = 0
        for u in self.train_usage:
            u.reset()

    def resume(self, ckpt_dir: str) -> None:
        ts = ckpt.load_checkpoint(ckpt_dir, self.engine, self.tables, self.value_optimizer,
                                  self.value_scheduler, self.rank, self.world_size)
        self.state = ts
        self.train_data.load_state_dict(ts.sampler)
        for tracker, st in zip(self.staleness, ts.staleness):
            tracker.load_state_dict(st)
        ckpt.restore_rng_state(ts.rng)  # last: nothing after this may draw random numbers
        self.last_checkpoint = ckpt_dir
        if self.rank == 0:
            self._truncate_metrics(ts.step)
        self.logger.info(f"resumed from {ckpt_dir} at step {ts.step} ({ts.tokens_seen:,} tokens seen)")

    def _truncate_metrics(self, step: int) -> None:
        """A killed run may have logged steps after its last checkpoint; the resumed run logs them
        again, so drop them from metrics.jsonl to keep one record per (step, kind)."""
        path = os.path.join(self.cfg.train.out_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        import json

        self.metrics.close()
        with open(path, encoding="utf-8") as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text_atomic(path, "".join(lines))
        self.metrics = MetricsLogger(self.cfg.train.out_dir, rank=self.rank, tensorboard=self.cfg.train.tensorboard,
                                     max_steps=self.cfg.train.max_steps, logger=self.logger)

    # -- one step ---------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_scale(self) -> float:
        if not self.fp16:
            return 1.0
        scale = getattr(self.engine.optimizer, "loss_scale", None)
        if scale is None:
            scale = getattr(self.engine.optimizer, "cur_scale", 1.0)
        return float(scale)

    def train_step(self) -> None:
        engine = self.engine
        engine.train()
        acc = self._acc
        for micro in range(self.gas):
            # No host sync in here (GPU): counts come from shapes known on the host, the masked
            # positions from index lists made by the collate, metrics stay device tensors until
            # the log step (tests/test_train_step_syncs.py).
            host_batch = self.train_data.next_batch()
            batch = self._to_device(model_inputs(host_batch))
            labels = batch["labels"]
            out = engine(**batch)
            loss = out.loss
            with torch.no_grad():
                correct, n_masked = _mlm_hits(out.logits, labels, batch.get("masked_positions"))
                positions = host_batch.get("token_positions")
                n_tokens = positions.numel() if positions is not None else batch["attention_mask"].sum()
                acc["loss_sum"] += loss.detach().double()
                acc["micro"] += 1
                acc["correct"] += correct
                acc["masked"] += n_masked
                acc["tokens"] += n_tokens
                acc["samples"] += labels.shape[0]
                self._pending_counts[0] += n_tokens
                self._pending_counts[1] += labels.shape[0]
                for usage, mo in zip(self.train_usage, self._last_memory_outputs(engine.module)):
                    usage.update(mo.indices, mo.weights)
            if micro == self.gas - 1:
                assert engine.is_gradient_accumulation_boundary(), "micro-batch loop out of sync with the engine"
                loss_scale = self._loss_scale()  # before step(): an overflow step lowers it
            engine.backward(loss)
            engine.step()
        self._value_step(loss_scale)
        self._note_step_health(loss)
        norm = engine.get_global_grad_norm()
        if norm is not None:
            acc["dense_norm"] += torch.as_tensor(norm, dtype=torch.float64, device=self.device)
            acc["dense_norm_steps"] += 1
        self.state.step += 1
        self._interval_steps += 1

    def _value_step(self, loss_scale: float) -> None:
        """Step the value tables iff the engine applied its step (fp16 overflow -> both skip)."""
        tables, acc = self.table_list, self._acc
        if not tables:  # a memory-less model (the baseline)
            return
        if not self.engine.was_step_applied():
            for t in tables:
                t.zero_grad()
            acc["skipped"] += 1
            return
        step = self.state.step + 1
        log_step = step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

        def mark_touched_rows(tables) -> None:
            for t, tracker in zip(tables, self.staleness):
                if t.sparse_grad is not None:
                    tracker.mark_updated(t.sparse_grad.rows, step)

        result = step_values(tables, self.value_optimizer, loss_scale=loss_scale,
                             max_norm=self.cfg.optim.value_grad_clip, need_norm=log_step,
                             skip_nonfinite=self.fp16, before_update=mark_touched_rows)
        if not result.applied:
            acc["skipped"] += 1
            return
        self.value_scheduler.step()
        if result.norm is not None:
            acc["value_norm_sum"] += result.norm.to(self.device)  # (a norm, summed for the interval mean)
            acc["value_steps"] += 1

    # -- divergence -------------------------------------------------------------------------------

    def _note_step_health(self, loss: torch.Tensor) -> None:
        """Count this step into the streak of bad steps (non-finite loss, or an update the engine
        skipped for non-finite gradients), or end the streak."""
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self._last_loss_nonfinite = nonfinite.to(torch.int64)
        bad = nonfinite if self.engine.was_step_applied() else torch.ones_like(nonfinite)
        self._bad_streak = torch.where(bad, self._bad_streak + 1, torch.zeros_like(self._bad_streak))

    def _bad_streak_all_ranks(self) -> int:
        return int(self._reduce(self._bad_streak.clone(), op=dist.ReduceOp.MAX).item())

    def _stop_if_diverged(self) -> None:
        """Raise TrainingDiverged once ``train.max_skipped_steps`` steps in a row were bad."""
        limit = self.cfg.train.max_skipped_steps
        streak = self._bad_streak_all_ranks()
        if limit and streak >= limit:
            raise TrainingDiverged(
                f"training diverged: the last {streak} steps (up to step {self.state.step}) had a non-finite loss "
                f"or gradients and were skipped (train.max_skipped_steps={limit}). The last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint was written before the divergence)'}: lower "
                "optim.lr, raise optim.warmup_steps or set optim.grad_clip, then resume from it with --resume "
                "(or start again).")

    def _state_is_finite(self) -> bool:
        """False when the last step's loss was non-finite or any floating-point buffer (BatchNorm
        running statistics) of any rank holds NaN/inf: such a state must not become a checkpoint.
        (A step skipped for an fp16 overflow alone leaves the weights as they were: it may be saved.)"""
        buffers = [b for b in self.engine.module.buffers() if b.is_floating_point() and b.numel()]
        nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        for b in buffers:
            nonfinite += (~torch.isfinite(b)).any().to(self.device, torch.int64)
        flags = self._reduce(torch.stack([nonfinite, self._last_loss_nonfinite]), op=dist.ReduceOp.MAX).tolist()
        return flags == [0, 0]

    def _save_if_finite(self) -> str | None:
        """Checkpoint unless the state is non-finite (then the last good checkpoint stays latest)."""
        if self._state_is_finite():
            return self.save()
        self.logger.warning(f"step {self.state.step}: not writing a checkpoint, the model state is not finite "
                            f"(non-finite loss or BatchNorm statistics); the latest stays {self.last_checkpoint}")
        return None

    # -- logging ----------------------------------------------------------------------------------

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values, op=op, group=self.group)
        return values

    def _flush_counts(self) -> None:
        counts = self._reduce(self._pending_counts.clone()).tolist()
        self.state.tokens_seen += int(counts[0])
        self.state.samples_seen += int(counts[1])
        self._pending_counts.zero_()

    def _log_train(self) -> dict[str, float]:
        acc = self._acc
        keys = ["loss_sum", "micro", "correct", "masked", "tokens", "samples"]
        summed = self._reduce(torch.stack([acc[k] for k in keys]).to(self.device)).tolist()  # the .item() of the interval
        s = dict(zip(keys, summed))
        local = torch.stack([acc["value_norm_sum"], acc["value_steps"], acc["dense_norm"],
                             acc["dense_norm_steps"], acc["skipped"]]).tolist()
        elapsed = max(1e-9, time.perf_counter() - self._interval_t0 - self._interval_excluded_s)
        steps = max(1, self._interval_steps)
        self._flush_counts()
        metrics: dict[str, float] = {
            "loss": s["loss_sum"] / max(1.0, s["micro"]),
            "mlm_acc": s["correct"] / max(1.0, s["masked"]),
            "lr": float(self.engine.get_lr()[0]),
            "value_lr": float(self.value_optimizer.param_groups[0]["lr"]) if self.value_optimizer else float("nan"),
            "grad_norm": local[2] / local[3] if local[3] else float("nan"),
            "value_grad_norm": local[0] / local[1] if local[1] else float("nan"),
            "tokens_per_s": s["tokens"] / elapsed,
            "samples_per_s": s["samples"] / elapsed,
            "step_time_s": elapsed / steps,
            "tokens_seen": float(self.state.tokens_seen),
            "skipped_steps": local[4],
        }
        # model TFLOP/s and MFU per device (pretrain/throughput.py); the counts are over all ranks
        rates = throughput_metrics(s["samples"] / self.world_size, s["tokens"] / self.world_size, elapsed,
                                   self.flops_per_seq, self.cfg.train.peak_tflops)
        metrics["model_tflops"] = rates["model_tflops"]
        metrics["mfu"] = rates["mfu"]
        if self.fp16:
            metrics["loss_scale"] = self._loss_scale()
        for name, usage in zip(self.memory_names, self.train_usage):
            m = usage.compute(process_group=self.group if self.world_size > 1 else None)
            prefix = f"memory/{_short(name)}/"
            metrics[prefix + "usage"] = m["usage"]
            metrics[prefix + "top1_usage"] = m["top1_usage"]
        self.metrics.log(self.state.step, metrics, kind="train")
        self._reset_interval()
        return metrics

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        from pkm.usage import summarize

        step = self.state.step
        metrics, usages = evaluate_mlm(self.engine, self.val_data, self.cfg.train.eval_batches, self.device,
                                       [t.num_rows for t in self.table_list], group=self.group)
        for name, usage, tracker in zip(self.memory_names, usages, self.staleness):
            prefix = f"memory/{_short(name)}/"
            u = usage.compute(process_group=self.group if self.world_size > 1 else None)
            metrics.update(summarize(u, tracker, step=step, window_steps=self.cfg.train.stale_window_steps,
                                     prefix=prefix))
            hist = tracker.histogram(step).tolist()
            metrics[prefix + "stale_hist"] = hist  # JSONL keeps the list; TensorBoard one scalar per bin
            self.metrics.log_histogram(f"eval/{prefix}stale_hist", hist, step)
        self.metrics.log(step, metrics, kind="eval")
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self) -> str:
        self._flush_counts()
        self.state.epoch = self.train_data.epoch
        self.state.sampler = self.train_data.state_dict()
        self.state.rng = ckpt.capture_rng_state()
        self.state.staleness = [t.state_dict() for t in self.staleness]
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(
            self.cfg.train.out_dir, self.state.step, self.engine, self.tables, self.value_optimizer,
            self.value_scheduler, self.state, self.rank, self.world_size, self.cfg.train.keep_last_k,
            extra_files={"run_config.json": config_to_dict(self.cfg), "ds_config.json": self.ds_config,
                         "data.json": _data_identity(self.cfg)},
            model_config=self.model_config, tokenizer_dir=self.tokenizer_dir,
        )
        self.last_checkpoint = path
        self.logger.info(f"checkpoint step {self.state.step} -> {path} ({time.perf_counter() - t0:.1f}s)")
        return path

    def _stop_requested(self) -> bool:
        """Every rank must agree to stop at the same step (a signal may reach ranks at different
        times): one tiny all-reduce per step. One rank needs no agreement, and no host sync."""
        if self.world_size == 1:
            return self.stop.requested
        flag = torch.tensor([1 if self.stop.requested else 0], device=self.device)
        return bool(self._reduce(flag, op=dist.ReduceOp.MAX).item())

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        t = self.cfg.train
        self.stop.install()
        self.metrics.set_start(self.state.step)
        self._reset_interval()
        last_metrics: dict[str, float] | None = None
        interrupted = False
        try:
            while self.state.step < t.max_steps:
                self.train_step()
                step = self.state.step
                if step % t.log_every == 0 or step == t.max_steps:
                    last_metrics = self._log_train()
                    self._stop_if_diverged()
                t_other = time.perf_counter()
                if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                    self.evaluate()
                stop = self._stop_requested()
                if (t.ckpt_every and step % t.ckpt_every == 0) or stop or step == t.max_steps:
                    if self._save_if_finite() is None and step == t.max_steps:
                        raise TrainingDiverged(
                            f"the run reached train.max_steps ({step}) with a non-finite loss or BatchNorm "
                            f"statistics, so no final checkpoint was written; the last good checkpoint is "
                            f"{self.last_checkpoint}: lower optim.lr or raise optim.warmup_steps and resume from it.")
                self._interval_excluded_s += time.perf_counter() - t_other
                if stop:
                    interrupted = True
                    self.logger.info(f"stopping at step {step} on signal {self.stop.signum}; checkpoint saved")
                    break
            if not interrupted:
                self.evaluate()
        finally:
            self.stop.uninstall()
            self.metrics.close()
        return TrainResult(self.state.step, interrupted, self.last_checkpoint,
                           last_metrics["loss"] if last_metrics else None)


def _mlm_hits(logits: torch.Tensor, labels: torch.Tensor,
              masked_positions: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """(correct predictions, predicted positions) of one micro-batch, without a host sync when
    ``masked_positions`` are known or the logits cover every position. logits: [M, vocab] (only the
    labelled positions, in row-major order) or [B, S, vocab]; labels [B, S] (-100: not predicted)."""
    if logits.dim() == 3:
        predicted = labels != -100  # [B, S]
        return ((logits.argmax(-1) == labels) & predicted).sum(), predicted.sum()
    if masked_positions is not None:
        target = labels.reshape(-1).index_select(0, masked_positions)  # [M]
    else:
        target = labels[labels != -100]  # [M]; a boolean index syncs on a GPU
    return (logits.argmax(-1) == target).sum(), target.numel()


def _data_identity(cfg: RunConfig) -> dict[str, str]:
    """What a resume checks the data against (pretrain.main): the training split's fingerprint."""
    from pretrain.data import data_fingerprint

    return {"train_fingerprint": data_fingerprint(cfg.data.shard_dir, cfg.data.train_split)}


def _short(module_path: str) -> str:
    """'bert.encoder.layer.1.memory' -> 'layer1' (metric names)."""
    parts = module_path.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts):
            return f"layer{parts[i + 1]}"
    return module_path.replace(".", "_")
