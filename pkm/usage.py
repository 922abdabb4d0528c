"""Memory usage metrics for product-key memory (DESIGN.md, "Memory usage metrics").

Two accumulators, both cheap enough to run at every eval and free of host syncs on the hot path:

* `MemoryUsage` counts, over a window of tokens, how often each of the N value slots was selected,
  how much softmax weight it received, and how often it was a query's highest-weight slot.
  `compute()` turns the counts into usage / KL-to-uniform / Gini / top-1 usage.
* `StalenessTracker` records per slot the last optimizer step that updated it, giving the share of
  "outdated" slots (Kim & Jung 2020) and a histogram of steps since the last update.

`summarize()` flattens both into the metrics dict logged to TensorBoard and JSONL.

Metric definitions (N = number of slots, all over the accumulated window):

  c_i  = number of (token, head, k) selections of slot i
  m_i  = sum of the softmax weights those selections carried (weight mass of slot i)
  p_i  = m_i / sum_j m_j
  t_i  = number of (token, head) queries whose highest-weight slot was i

  usage       = |{i : c_i > 0}| / N                              (Lample et al. 2019, "memory usage")
  kl_uniform  = KL(p || U_N) = sum_{i: p_i > 0} p_i * ln(p_i * N)  in nats, in [0, ln N];
                0 when the weight mass is spread evenly over all slots, ln N when on one slot
  gini        = sum_{r=1..N} (2r - N - 1) * m_(r) / (N * sum_j m_j), with m_(1) <= ... <= m_(N)
                the masses sorted ascending over ALL N slots (unused slots count as 0):
                0 for equal mass, (N - 1) / N when all mass is on one slot
  top1_usage  = |{i : t_i > 0}| / N; heads are pooled: heads share the value table, so a slot
                counts when it was the top-1 slot of any head for any token
  tokens      = number of tokens counted (rows T of the updates)

With an empty window (no weight mass) kl_uniform and gini are NaN (undefined), usage and
top1_usage are 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MemoryUsage",
    "StalenessTracker",
    "gini_coefficient",
    "kl_to_uniform",
    "summarize",
    "default_bin_edges",
]


def kl_to_uniform(mass: Tensor) -> float:
    """KL(p || uniform) in nats for p = mass / mass.sum() over len(mass) slots; NaN if no mass."""
    mass = mass.detach().to(torch.float64).flatten()
    total = mass.sum()
    if not bool(total > 0):
        return float("nan")
    p = mass / total
    nz = p > 0  # 0 * log 0 = 0 by convention
    return float((p[nz] * torch.log(p[nz] * mass.numel())).sum())


def gini_coefficient(mass: Tensor) -> float:
    """Gini coefficient of non-negative per-slot masses (zeros included); NaN if no mass."""
    x = torch.sort(mass.detach().to(torch.float64).flatten()).values
    n = x.numel()
    total = x.sum()
    if n == 0 or not bool(total > 0):
        return float("nan")
    rank = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float(((2 * rank - n - 1) * x).sum() / (n * total))


class MemoryUsage:
    """Accumulates slot selections of one memory layer over a window of tokens.

    State is one flat float64 tensor (`counts()`), so data-parallel ranks can sum their windows
    with a single all_reduce. float64 holds integer counts exactly up to 2**53 and keeps the
    weight sums accurate over long windows; it is 3 * N * 8 bytes (6 MiB for N = 512**2).
    """

    # Rows of the [3, N] view of the state; the last element of the flat buffer is the token count.
    _SELECTED, _MASS, _TOP1 = 0, 1, 2

    def __init__(self, num_rows: int, device: torch.device | str | None = None) -> None:
        if int(num_rows) <= 0:
            raise ValueError(f"MemoryUsage needs num_rows >= 1 (the number of memory slots), got {num_rows}.")
        self.num_rows = int(num_rows)
        self._state = torch.zeros(3 * self.num_rows + 1, dtype=torch.float64, device=device)

    # -- accumulation -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._state.device

    def to(self, device: torch.device | str) -> "MemoryUsage":
        self._state = self._state.to(device)
        return self

    def _table(self) -> Tensor:
        return self._state[:-1].view(3, self.num_rows)  # [3, N]: selected, mass, top1

    @torch.no_grad()
    def update(self, indices: Tensor, weights: Tensor) -> None:
        """Add one batch: indices and weights of shape [T, H, K] (or [T, K] for one head).

        No host sync: only shapes are read on the host. Indices outside [0, N) fail inside
        index_add_ (an IndexError on CPU, a device-side assert on CUDA); checking the range here
        would need a sync.
        """
        if indices.shape != weights.shape:
            raise ValueError(
                f"indices and weights must have the same shape, got {tuple(indices.shape)} and "
                f"{tuple(weights.shape)}."
            )
        if indices.dim() not in (2, 3):
            raise ValueError(
                f"indices must be [tokens, heads, knn] or [tokens, knn], got shape {tuple(indices.shape)}."
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}.")
        if indices.dim() == 2:
            indices, weights = indices.unsqueeze(1), weights.unsqueeze(1)  # [T, 1, K]
        if indices.numel() == 0:
            self._state[-1] += indices.shape[0]
            return
        if indices.device != self._state.device:
            # Follow the model's device once, instead of copying every batch to the host.
            self._state = self._state.to(indices.device)
        indices = indices.long()
        weights = weights.detach().to(torch.float64)
        table = self._table()
        flat_idx = indices.reshape(-1)  # [T*H*K]
        table[self._SELECTED].index_add_(0, flat_idx, torch.ones_like(weights.reshape(-1)))
        table[self._MASS].index_add_(0, flat_idx, weights.reshape(-1))
        # Highest-weight slot of every (token, head) query; argmax keeps the first of ties.
        best = weights.argmax(dim=-1, keepdim=True)  # [T, H, 1]
        top1 = indices.gather(-1, best).reshape(-1)  # [T*H]
        table[self._TOP1].index_add_(0, top1, torch.ones(top1.numel(), dtype=torch.float64, device=top1.device))
        self._state[-1] += indices.shape[0]

    def reset(self) -> None:
        """Start a new window."""
        self._state.zero_()

    # -- merging across ranks / windows -------------------------------------------------------

    def counts(self) -> Tensor:
        """A copy of the raw state, flat float64 [3 * N + 1], for all_reduce(SUM) across ranks.

        Usage: `c = usage.counts(); dist.all_reduce(c); usage.load_counts(c)`.
        """
        return self._state.clone()

    def load_counts(self, counts: Tensor) -> None:
        """Replace the state by `counts` (e.g. the all-reduced sum of every rank's `counts()`)."""
        if counts.shape != self._state.shape:
            raise ValueError(
                f"counts must have shape {tuple(self._state.shape)} (from counts() of a MemoryUsage with "
                f"num_rows={self.num_rows}), got {tuple(counts.shape)}."
            )
        self._state = counts.detach().to(dtype=torch.float64, device=self._state.device).clone()

    def merge(self, other: "MemoryUsage") -> None:
        """Add another accumulator's window (same num_rows) into this one."""
        if other.num_rows != self.num_rows:
            raise ValueError(f"cannot merge MemoryUsage with {other.num_rows} slots into one with {self.num_rows}.")
        self._state += other._state.to(self._state.device)

    # -- read-out -----------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return int(self._state[-1].item())

    def selection_counts(self) -> Tensor:
        """Per-slot selection counts c_i (float64 [N], integer-valued), e.g. for a usage histogram."""
        return self._table()[self._SELECTED].clone()

    def weight_mass(self) -> Tensor:
        """Per-slot accumulated softmax weight m_i (float64 [N])."""
        return self._table()[self._MASS].clone()

    def top1_counts(self) -> Tensor:
        """Per-slot count of queries for which the slot had the highest weight (float64 [N])."""
        return self._table()[self._TOP1].clone()

    def compute(self, process_group: Any = None) -> dict[str, float]:
        """The window's metrics (see the module docstring). One host sync.

        With `process_group` given (and torch.distributed initialised), the metrics are computed on
        the sum over that group's ranks; the local state is left as it is, so calling it twice is safe.
        Every rank of the group must call it.
        """
        state = self._state
        if process_group is not None:
            import torch.distributed as dist  # only needed for the collective

            state = state.clone()
            dist.all_reduce(state, op=dist.ReduceOp.SUM, group=process_group)
        table = state[:-1].view(3, self.num_rows)
        return {
            "usage": float((table[self._SELECTED] > 0).sum().item()) / self.num_rows,
            "kl_uniform": kl_to_uniform(table[self._MASS]),
            "gini": gini_coefficient(table[self._MASS]),
            "top1_usage": float((table[self._TOP1] > 0).sum().item()) / self.num_rows,
            "tokens": float(state[-1].item()),
        }


def default_bin_edges(step: int) -> list[float]:
    """Powers-of-two staleness bins [0, 1, 2, 4, ..., 2**k, inf) with 2**k >= step."""
    edges: list[float] = [0.0, 1.0]
    while edges[-1] < max(step, 1):
        edges.append(edges[-1] * 2)
    edges.append(math.inf)
    return edges


class StalenessTracker:
    """Per slot, the last optimizer step that updated it.

    `mark_updated(rows, step)` after each value-optimizer step with the rows it touched. Slots never
    updated count from `start_step` (the tracker's creation, 0 for a fresh run): initialisation is
    their last "update". A slot updated at step s is fresh at step `step` within a window of T
    steps iff step - s < T; otherwise it is stale (Kim & Jung's "outdated" slots).

    With the embedding-dim-sharded value tables every rank holds all N rows and sees the same touched
    rows, so the tracker needs no cross-rank reduction.
    """

    def __init__(self, num_rows: int, start_step: int = 0, device: torch.device | str | None = None) -> None:
        if int(num_rows) <= 0:
            raise ValueError(f"StalenessTracker needs num_rows >= 1 (the number of memory slots), got {num_rows}.")
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        self.num_rows = int(num_rows)
        self.start_step = int(start_step)
        self.latest_step = int(start_step)  # host-side copy of max(last_update): checks need no sync
        self.last_update = torch.full((self.num_rows,), self.start_step, dtype=torch.long, device=device)

    def to(self, device: torch.device | str) -> "StalenessTracker":
        self.last_update = self.last_update.to(device)
        return self

    def _check_step(self, step: int, what: str) -> int:
        step = int(step)
        if step < self.latest_step:
            raise ValueError(
                f"{what} got step {step}, but rows were already marked updated at step {self.latest_step}: "
                "steps must not go backwards (load the checkpointed tracker state when resuming)."
            )
        return step

    @torch.no_grad()
    def mark_updated(self, rows: Tensor, step: int) -> None:
        """Record that `rows` (LongTensor, any shape, duplicates allowed) were updated at `step`."""
        step = self._check_step(step, "mark_updated")
        if rows.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"rows must be an integer tensor, got dtype {rows.dtype}.")
        rows = rows.reshape(-1).to(device=self.last_update.device, dtype=torch.long, non_blocking=True)
        self.last_update.index_fill_(0, rows, step)
        self.latest_step = step

    def steps_since_update(self, step: int) -> Tensor:
        """LongTensor [N]: step - (last step each slot was updated, or start_step if never)."""
        step = self._check_step(step, "steps_since_update")
        return step - self.last_update

    def stale_fraction(self, step: int, window_steps: int) -> float:
        """Share of slots not updated in the last `window_steps` steps, i.e. step - last >= window."""
        if int(window_steps) < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}.")
        age = self.steps_since_update(step)
        return float((age >= int(window_steps)).sum().item()) / self.num_rows

    def histogram(self, step: int, bin_edges: Sequence[float] | Tensor | None = None) -> Tensor:
        """Counts of slots per staleness bin [e_j, e_{j+1}) (LongTensor [len(bin_edges) - 1], CPU).

        Ages outside [e_0, e_last) are not counted: end with math.inf for an open last bin.
        Default edges: `default_bin_edges(step)` = [0, 1, 2, 4, ..., inf), which count every slot.
        """
        edges = torch.as_tensor(
            default_bin_edges(step) if bin_edges is None else bin_edges, dtype=torch.float64
        ).flatten()
        if edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(f"bin_edges must be at least two strictly increasing numbers, got {edges.tolist()}.")
        age = self.steps_since_update(step).cpu().to(torch.float64)
        # bucketize(right=True) - 1 gives j with e_j <= age < e_{j+1}
        bins = torch.bucketize(age, edges, right=True) - 1
        bins = bins[(bins >= 0) & (bins < edges.numel() - 1)]
        return torch.bincount(bins, minlength=edges.numel() - 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "start_step": self.start_step,
            "latest_step": self.latest_step,
            "last_update": self.last_update.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_rows"]) != self.num_rows:
            raise ValueError(
                f"staleness state is for {state['num_rows']} slots, this tracker has {self.num_rows}."
            )
        last = torch.as_tensor(state["last_update"], dtype=torch.long)
        if last.shape != (self.num_rows,):
            raise ValueError(f"last_update must have shape ({self.num_rows},), got {tuple(last.shape)}.")
        self.start_step = int(state["start_step"])
        self.latest_step = int(state["latest_step"])
        self.last_update = last.to(self.last_update.device).clone()


def summarize(
    usage: Mapping[str, float] | None,
    staleness: StalenessTracker | None = None,
    step: int | None = None,
    window_steps: int | None = None,
    prefix: str = "memory/",
) -> dict[str, float]:
    """The flat metrics dict for TensorBoard / JSONL, with stable keys.

    `usage` is `MemoryUsage.compute()` (or None to log staleness only). Keys: `{prefix}usage`,
    `{prefix}kl_uniform`, `{prefix}gini`, `{prefix}top1_usage`, `{prefix}tokens`, and, with a
    tracker, `{prefix}stale_frac` (share not updated in the last `window_steps` steps) and
    `{prefix}stale_steps_mean` (mean steps since update). For several memory layers use one prefix
    per layer, e.g. `memory/layer6/`.
    """
    out: dict[str, float] = {}
    if usage is not None:
        for key in ("usage", "kl_uniform", "gini", "top1_usage", "tokens"):
            if key not in usage:
                raise ValueError(f"usage dict has no '{key}': pass the result of MemoryUsage.compute().")
            out[prefix + key] = float(usage[key])
    if staleness is not None:
        if step is None or window_steps is None:
            raise ValueError("summarize needs step and window_steps together with a staleness tracker.")
        out[prefix + "stale_frac"] = staleness.stale_fraction(step, window_steps)
        out[prefix + "stale_steps_mean"] = float(staleness.steps_since_update(step).double().mean().item())
    return out
