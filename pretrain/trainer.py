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

Both learning rates follow ``pretrain.engine.lr_lambda`` (warmup, then linear/cosine/constant): the
dense one through a LambdaLR the engine owns (stepped by the engine, skipped with its step on
overflow, saved in its checkpoint), the value one through a LambdaLR on SparseAdam stepped right after.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from atomic_files import write_text_atomic
from pkm.memory import average_batchnorm_statistics
from pkm.value_step import step_values
from pretrain import checkpoint as ckpt
from pretrain.config import RunConfig, config_to_dict
from pretrain.engine import ValueTables
from pretrain.evaluate import evaluate_mlm, mlm_hits
from pretrain.logging_utils import MetricsLogger, get_logger
from pretrain.stop_flag import StopFlag
from pretrain.throughput import flops_per_sequence, non_embedding_params, throughput_metrics

__all__ = ["model_inputs", "Trainer", "TrainResult", "TrainingDiverged", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


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


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    last_checkpoint: str | None
    final_loss: float | None


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps: the run stops with an error (main exits non-zero)."""


FAULT_INJECT_ENV = "PKM_FAULT_INJECT"


class InjectedFault(RuntimeError):
    """The failure ``PKM_FAULT_INJECT`` asked for (tests only)."""


def injected_fault_step(rank: int) -> int | None:
    """Test-only fault injection: ``PKM_FAULT_INJECT=<rank>:<step>`` makes that rank raise
    :class:`InjectedFault` at the start of that optimizer step (1-based), as an OOM or a bad batch on
    one rank would; how every rank then ends is tested in tests/test_rank_failure.py. Unset: None."""
    spec = os.environ.get(FAULT_INJECT_ENV, "").strip()
    if not spec:
        return None
    try:
        fault_rank, step = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{FAULT_INJECT_ENV}={spec!r}: expected <rank>:<step>, e.g. 1:3 (a test-only switch; "
                         "unset it for real runs)") from None
    return step if fault_rank == rank else None


class Trainer:
    """Owns engine, value tables, data and logging for one run (every rank builds one)."""

    def __init__(self, cfg: RunConfig, engine: Any, values: ValueTables, train_data: Any, val_data: Any,
                 *, tokenizer_dir: str | None = None) -> None:
        """Everything is built before (``pretrain.main.run``): the engine and the value tables by
        ``pretrain.engine.build_engine``, ``train_data`` a ``TrainStream`` (anything with
        ``next_batch``, ``epoch``, ``state_dict`` and ``load_state_dict``), ``val_data`` a
        ``ValidationData`` or None. Checkpoints copy the tokenizer files from ``tokenizer_dir``."""
        from pkm.modeling import last_memory_outputs, memory_modules
        from pkm.usage import MemoryUsage, StalenessTracker

        self.cfg = cfg
        self.engine = engine
        self.tables = values.tables
        self.value_optimizer = values.optimizer
        self.value_scheduler = values.scheduler
        self.train_data = train_data
        self.val_data = val_data
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # an explicit group object: pkm.usage treats process_group=None as "no reduction"
        self.group = values.group if values.group is not None else (dist.group.WORLD if dist.is_initialized() else None)
        self.tokenizer_dir = tokenizer_dir
        self.device = engine.device
        self.gas = int(engine.gradient_accumulation_steps())
        self.fp16 = bool(engine.fp16_enabled())
        self.logger = get_logger(self.rank)
        self.metrics = MetricsLogger(cfg.train.out_dir, rank=self.rank, tensorboard=cfg.train.tensorboard,
                                     max_steps=cfg.train.max_steps, logger=self.logger)
        self._last_memory_outputs = last_memory_outputs
        self.memories = memory_modules(engine.module)
        self.table_list = list(self.tables.values())
        self.memory_names = list(self.tables.keys())
        self.train_usage = [MemoryUsage(t.num_rows, device=self.device) for t in self.table_list]
        self.staleness = [StalenessTracker(t.num_rows, device=self.device) for t in self.table_list]
        # tokens / samples not yet added to state (all-reduced at log and checkpoint steps only)
        self._pending_counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        mc = engine.module.config
        # model FLOPs of one sequence, for the logged MFU (pretrain/throughput.py)
        self.flops_per_seq = flops_per_sequence(non_embedding_params(engine.module), cfg.data.max_seq_len,
                                                mc.hidden_size, mc.num_hidden_layers)
        self.state = ckpt.TrainState()
        self._fault_step = injected_fault_step(self.rank)
        self.stop = StopFlag()
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
                correct, n_masked = mlm_hits(out.logits, labels, batch.get("masked_positions"))
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
        # a ZeRO-1/2 checkpoint holds rank 0's module: every rank's BatchNorm statistics become their mean first
        average_batchnorm_statistics(self.engine.module, self.group)
        self._flush_counts()
        self.state.epoch = self.train_data.epoch
        self.state.sampler = self.train_data.state_dict()
        self.state.rng = ckpt.capture_rng_state()
        self.state.staleness = [t.state_dict() for t in self.staleness]
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(
            self.cfg.train.out_dir, self.state.step, self.engine, self.tables, self.value_optimizer,
            self.value_scheduler, self.state, self.rank, self.world_size, self.cfg.train.keep_last_k,
            extra_files={"run_config.json": config_to_dict(self.cfg), "ds_config.json": self.engine.config,
                         "data.json": _data_identity(self.cfg)},
            model_config=self.engine.module.config, tokenizer_dir=self.tokenizer_dir,
        )
        self.last_checkpoint = path
        self.logger.info(f"checkpoint step {self.state.step} -> {path} ({time.perf_counter() - t0:.1f}s)")
        return path

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
                if self._fault_step == self.state.step + 1:
                    raise InjectedFault(f"{FAULT_INJECT_ENV}: rank {self.rank} fails at step {self._fault_step}")
                self.train_step()
                step = self.state.step
                if step % t.log_every == 0 or step == t.max_steps:
                    last_metrics = self._log_train()
                    self._stop_if_diverged()
                t_other = time.perf_counter()
                if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                    self.evaluate()
                stop = self.stop.agreed(self.world_size, self.group, self.device)
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
            self.stop.drain()  # the stop agreement's last all-reduce (every rank started it)
            if not interrupted:
                self.evaluate()
        finally:
            self.stop.uninstall()
            self.metrics.close()
            # the DataLoader workers exit now, after the checkpoint (they ignore the stop signal)
            close_data = getattr(self.train_data, "close", None)
            if close_data is not None:
                close_data()
        return TrainResult(self.state.step, interrupted, self.last_checkpoint,
                           last_metrics["loss"] if last_metrics else None)


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
