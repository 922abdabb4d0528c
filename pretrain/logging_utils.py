"""Rank-0 logging: one metrics dict per interval -> JSONL + TensorBoard + a readable progress line.

Every rank may call ``MetricsLogger.log``; only rank 0 writes (the others hold no file handles), so
the training loop needs no ``if rank == 0`` around logging. Values must already be Python numbers:
the loop converts tensors with ``.item()`` only at log steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

__all__ = ["MetricsLogger", "get_logger", "format_progress", "read_jsonl"]


def get_logger(rank: int = 0, name: str = "pretrain") -> logging.Logger:
    """A stdout logger that prints on rank 0 and stays quiet (warnings only) elsewhere."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s [%(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return logger


def _fmt_num(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_progress(step: int, max_steps: int, metrics: dict[str, Any], eta_s: float | None = None) -> str:
    """'step   120/1000 (12.0%) | loss 6.1234 | acc 0.1032 | lr 1.0e-04 | ... | eta 0:12:31'."""
    parts = [f"step {step:>{len(str(max_steps))}d}/{max_steps} ({100.0 * step / max_steps:4.1f}%)"]
    order = [("loss", "loss"), ("mlm_acc", "acc"), ("lr", "lr"), ("value_lr", "vlr"),
             ("grad_norm", "gnorm"), ("value_grad_norm", "vgnorm"), ("tokens_per_s", "tok/s"),
             ("samples_per_s", "seq/s"), ("mfu", "mfu"), ("step_time_s", "s/step")]
    for key, label in order:
        if key in metrics and metrics[key] is not None:
            v = metrics[key]
            if key in ("lr", "value_lr"):
                parts.append(f"{label} {v:.2e}")
            elif key == "tokens_per_s":
                parts.append(f"{label} {v:,.0f}")
            elif key == "samples_per_s":
                parts.append(f"{label} {v:,.1f}")
            elif key == "mfu":
                parts.append(f"{label} {100 * v:.2f}%")
            else:
                parts.append(f"{label} {_fmt_num(float(v))}")
    if eta_s is not None:
        h, rem = divmod(int(eta_s), 3600)
        parts.append(f"eta {h}:{rem // 60:02d}:{rem % 60:02d}")
    return " | ".join(parts)


class MetricsLogger:
    """JSONL (``metrics.jsonl``) + TensorBoard (``tb/``) under ``out_dir`` on rank 0.

    ``log(step, metrics, kind)``: ``kind`` is "train" or "eval"; each JSONL line is
    ``{"step": .., "kind": .., "time": .., **metrics}``; TensorBoard tags are ``<kind>/<key>``.
    """

    def __init__(self, out_dir: str, rank: int = 0, tensorboard: bool = True, max_steps: int = 0,
                 logger: logging.Logger | None = None) -> None:
        self.rank = rank
        self.max_steps = max_steps
        self.logger = logger or get_logger(rank)
        self.start_time = time.time()
        self.start_step = 0
        self._jsonl = None
        self._tb = None
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        # append: a resumed run continues the same file (the steps after the resume point follow)
        self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a listed dependency, but logging must not kill a run
                self.logger.warning("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(log_dir=os.path.join(out_dir, "tb"))

    def set_start(self, step: int) -> None:
        """Where this process started (for the ETA after a resume)."""
        self.start_step = step
        self.start_time = time.time()

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if self.rank != 0:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **clean}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
            self._tb.flush()
        if kind == "train":
            done = step - self.start_step  # since this process started (a resume starts the clock anew)
            eta = (time.time() - self.start_time) / done * (self.max_steps - step) if done > 0 else None
            self.logger.info(format_progress(step, self.max_steps, clean, eta))
        else:
            body = " | ".join(f"{k} {_fmt_num(v) if isinstance(v, float) else v}" for k, v in clean.items())
            self.logger.info(f"[{kind}] step {step} | {body}")

    def log_histogram(self, tag: str, counts: list[int], step: int) -> None:
        """A staleness histogram as TensorBoard scalars per bin (cheap; JSONL gets it via log())."""
        if self.rank != 0 or self._tb is None:
            return
        for i, c in enumerate(counts):
            self._tb.add_scalar(f"{tag}/bin{i}", float(c), step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_jsonl(path: str, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (optionally one kind); for tests and analysis."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
