"""Lazy (row-sparse) Adam for value tables.

Only the rows in a table's coalesced ``sparse_grad`` are read and written: weight, exp_avg and
exp_avg_sq rows are gathered, updated in fp32 and scattered back, so a step costs O(U * cols) for U
touched rows whatever the table size.

Bias correction uses a *per-row step count* (``state["row_step"]``, [num_rows] fp32): a row's moments
have been updated exactly ``row_step[r]`` times starting from zero, so ``1 - beta**row_step[r]`` is the
exact correction for that row's moment estimates, however irregularly the row is touched. With a
global step count (torch.optim.SparseAdam) a row first touched at step 1000 would get almost no
bias correction, i.e. a first update ~1/(1-beta1) = 10x too small. The moments themselves are lazy
(not decayed on steps where the row is untouched), as in torch.optim.SparseAdam and Lample's code.
When every row is touched every step this is exactly torch.optim.Adam (per-row counts == global).

``row_step`` is stored as fp32 so that ``Optimizer.load_state_dict`` (which casts floating/integer
state to the parameter's dtype) round-trips it; counts are exact up to 2**24 updates per row.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pkm.values import ValueTable

__all__ = ["SparseAdam"]


class SparseAdam(torch.optim.Optimizer):
    """Adam over the rows touched in a step, for ``ValueTable``s (params = the tables' weights).

    One param group, so ``torch.optim.lr_scheduler`` (e.g. LambdaLR) drives ``param_groups[0]["lr"]``.
    ``weight_decay`` is decoupled (AdamW style) and, like everything else, applied to touched rows only.
    """

    def __init__(
        self,
        tables: Iterable[ValueTable],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        tables = list(tables)
        if not tables:
            raise ValueError("SparseAdam needs at least one value table.")
        if lr < 0.0:
            raise ValueError(f"SparseAdam learning rate must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseAdam betas must be in [0, 1), got {betas}.")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"SparseAdam eps and weight_decay must be >= 0, got {eps}, {weight_decay}.")
        for t in tables:
            if t.weight.dtype != torch.float32:
                raise ValueError(f"SparseAdam keeps fp32 master weights; a table is {t.weight.dtype}.")
        self.tables = tables
        # CPU: rows are updated in chunks of ~this many elements through reused scratch buffers
        # (fresh [U, cols] temporaries cost more in page faults than the math; ~4 MB chunks keep the
        # scratch in cache while keeping the op count, i.e. 2-thread parallel regions, low)
        self.chunk_elements = 1 << 20
        self._scratch_bufs: dict[str, torch.Tensor] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__([t.weight for t in tables], defaults)

    def _state_for(self, weight: torch.Tensor) -> dict:
        state = self.state[weight]
        if not state:
            # allocated on first use: moments are as large as the table (inherent to Adam)
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
            state["row_step"] = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for table in self.tables:
            grad = table.sparse_grad
            if grad is None or grad.rows.numel() == 0:
                table.zero_grad()
                continue
            weight = table.weight
            state = self._state_for(weight)
            rows = grad.rows  # [U] unique (coalesced by the table), so gather/scatter is race-free
            g = grad.values.to(torch.float32)  # [U, cols]

            step = state["row_step"].index_select(0, rows) + 1  # [U]
            state["row_step"].index_copy_(0, rows, step)
            step64 = step.to(torch.float64)
            bias1 = (1.0 - beta1 ** step64).to(torch.float32).unsqueeze(1)  # [U, 1]
            bias2_sqrt = (1.0 - beta2 ** step64).sqrt().to(torch.float32).unsqueeze(1)  # [U, 1]

            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            cols = weight.shape[1]
            chunk = rows.numel() if weight.device.type != "cpu" else max(1, self.chunk_elements // cols)
            for r0 in range(0, rows.numel(), chunk):
                r = rows[r0 : r0 + chunk]  # [C]
                self._update_rows(
                    weight, exp_avg, exp_avg_sq, r, g[r0 : r0 + chunk],
                    bias1[r0 : r0 + chunk], bias2_sqrt[r0 : r0 + chunk], lr, beta1, beta2, eps, wd,
                )
            table.zero_grad()
        return loss

    def _scratch(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        if like.device.type != "cpu":  # CUDA: one chunk per table; the caching allocator recycles
            return torch.empty(rows, cols, dtype=torch.float32, device=like.device)
        buf = self._scratch_bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != like.device:
            buf = self._scratch_bufs[name] = torch.empty(rows, cols, dtype=torch.float32, device=like.device)
        return buf[:rows]

    def _update_rows(
        self,
        weight: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        rows: torch.Tensor,
        g: torch.Tensor,
        bias1: torch.Tensor,
        bias2_sqrt: torch.Tensor,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        wd: float,
    ) -> None:
        """Adam on one chunk of rows: gather the moments into (cache-sized, reused) scratch, update,
        scatter them back; the weight rows get one read-modify-write ``index_add_`` of the step."""
        n, cols = rows.numel(), weight.shape[1]
        m = torch.index_select(exp_avg, 0, rows, out=self._scratch("m", n, cols, weight))  # [C, cols]
        v = torch.index_select(exp_avg_sq, 0, rows, out=self._scratch("v", n, cols, weight))  # [C, cols]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        exp_avg.index_copy_(0, rows, m)
        exp_avg_sq.index_copy_(0, rows, v)
        # as torch.optim.Adam: step = lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), per-row bc1, bc2
        upd = torch.sqrt(v, out=self._scratch("d", n, cols, weight)).div_(bias2_sqrt).add_(eps)
        upd = torch.div(m, upd, out=upd).mul_(lr / bias1)  # [C, cols]
        if wd != 0.0:
            # decoupled decay (AdamW: w *= 1 - lr * wd before the step), touched rows only
            upd.add_(weight.index_select(0, rows), alpha=lr * wd)
        weight.index_add_(0, rows, upd, alpha=-1.0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for table in self.tables:
            table.zero_grad()
