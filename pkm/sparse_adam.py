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

CPU speed: the update is memory-bound (per touched row: read weight, both moments and the gradient,
write three back), and as a dozen torch ops per chunk it costs ~3.5x that minimum (each op is another
pass plus a parallel region; ``index_add_`` on rows is serial). So on CPU the step runs, when a C
compiler is available, a fused per-row kernel: ~40 lines of C built once per process with the system
``cc``/``gcc`` (~0.1 s, no torch headers), called through ``ctypes`` (which releases the GIL, so
``torch.get_num_threads()`` Python threads share the rows through an atomic block counter; the
rows are unique, so no two threads write the same row). One pass per row, the torch path's formulas
with fma where ATen's kernels use one: exp_avg, exp_avg_sq and row_step come out bitwise equal to
the torch path, the weight within ~1 ulp (ATen's vectorised sqrt is not correctly rounded; sqrtf
is). Measured (2 cores, this repo's BENCHMARKS.md): 222k rows x 768 in 110 ms instead of 430 ms on
one thread, and no collapse under load (the torch path's many 2-thread parallel regions each wait
for a descheduled thread). Without a compiler (the build error is kept in ``_native_error``), with
``PKM_SPARSE_ADAM_NATIVE=0`` or ``optimizer.native = False``, or for an unusual layout (non-unit
column stride), the torch path runs. No state layout change: state_dict and
pkm/checkpoint_values.py see the same tensors as before.

CUDA speed: the same one-pass-per-row update as a Triton kernel (``pkm.triton_kernels.sparse_adam_rows``:
read weight, both moments and the gradient once, write three back; moments bitwise equal to the torch
path, the weight within an ulp), chosen automatically for CUDA tables when Triton imports; the torch-op
path runs with ``PKM_TRITON=0`` or ``optimizer.triton = False``. The kernel also counts the rows'
steps and looks their bias corrections up by count in a ``BiasCorrectionTable`` (the torch path's
expressions, evaluated once per count rather than once per row and step), so a table's whole step is
one launch. The table must cover every count: the optimizer bounds the counts on the host by counting
its own steps, and reads them from the device only when they are new or were changed from outside.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Iterable

import torch

from pkm.values import ValueTable, triton_enabled

__all__ = ["SparseAdam", "native_available"]


# --- fused CPU kernel -----------------------------------------------------------------------------
# Same arithmetic as ``SparseAdam._update_rows`` (lerp as ATen's fma form, addcmul as
# ``v*beta2 + (omb2*g)*g``, bias corrections in double), one pass per row. ``next_block`` is shared by
# the calling threads: each grabs ``block`` rows at a time, so a descheduled thread (shared machine)
# delays only its current block, not a fixed half of the rows.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
void pkm_sparse_adam_rows(float *w, float *m, float *v, float *row_step, const float *g,
                          const int64_t *rows, int64_t n_rows, int64_t cols, int64_t ws, int64_t ms,
                          int64_t vs, int64_t gs, int64_t *next_block, int64_t block, float lr,
                          double beta1, double beta2, float omb1, float omb2, float b2f, float eps,
                          float lrwd) {
    for (;;) {
        const int64_t u0 = __atomic_fetch_add(next_block, block, __ATOMIC_RELAXED);
        if (u0 >= n_rows) return;
        const int64_t u1 = u0 + block < n_rows ? u0 + block : n_rows;
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t r = rows[u];
            const float step = row_step[r] + 1.0f;
            row_step[r] = step;
            const float bc1 = (float)(1.0 - pow(beta1, (double)step));
            const float bc2s = (float)sqrt(1.0 - pow(beta2, (double)step));
            const float step_size = (1.0f / bc1) * lr;  /* torch: lr / t == t.reciprocal() * lr */
            float *restrict wr = w + r * ws, *restrict mr = m + r * ms, *restrict vr = v + r * vs;
            const float *restrict gr = g + u * gs;
            if (lrwd != 0.0f) {
                for (int64_t c = 0; c < cols; ++c) {
                    const float gc = gr[c];
                    const float mc = fmaf(omb1, gc - mr[c], mr[c]);
                    const float vc = fmaf(omb2 * gc, gc, vr[c] * b2f);
                    mr[c] = mc;
                    vr[c] = vc;
                    wr[c] = wr[c] - fmaf(wr[c], lrwd, mc / (sqrtf(vc) / bc2s + eps) * step_size);
                }
            } else {
                for (int64_t c = 0; c < cols; ++c) {
                    const float gc = gr[c];
                    const float mc = fmaf(omb1, gc - mr[c], mr[c]);
                    const float vc = fmaf(omb2 * gc, gc, vr[c] * b2f);
                    mr[c] = mc;
                    vr[c] = vc;
                    wr[c] = wr[c] - mc / (sqrtf(vc) / bc2s + eps) * step_size;
                }
            }
        }
    }
}
"""
_native_lock = threading.Lock()
_native_fn = None  # ctypes function once built
_native_error: str | None = None  # why it could not be built (then the torch path runs)


def _build_native():
    """Compile and load the kernel once per process; None (and ``_native_error`` set) when impossible.
    Compiled per process into a private temp dir, so ``-march=native`` always matches this CPU."""
    global _native_fn, _native_error
    with _native_lock:
        if _native_fn is not None or _native_error is not None:
            return _native_fn
        try:
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
            if cc is None:
                raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
            tmp = tempfile.mkdtemp(prefix="pkm_sparse_adam_")
            try:
                src, lib = os.path.join(tmp, "k.c"), os.path.join(tmp, "k.so")
                with open(src, "w") as f:
                    f.write(_C_SOURCE)
                # -fno-math-errno lets sqrtf vectorise; -ffp-contract=off: only the explicit fmaf()s
                # (where ATen's kernels use fma) fuse, so moments match the torch path bitwise
                base = [cc, "-O3", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC", src, "-o", lib, "-lm"]
                errors = []
                for extra in (["-march=native"], []):
                    r = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=120)
                    if r.returncode == 0:
                        break
                    errors.append(r.stderr.strip()[-500:])
                else:
                    raise RuntimeError("compile failed: " + " | ".join(errors))
                fn = ctypes.CDLL(lib).pkm_sparse_adam_rows  # loaded: the file may go
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fn.restype = None
            fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int64]
                           + [ctypes.c_float, ctypes.c_double, ctypes.c_double] + [ctypes.c_float] * 5)
            _native_fn = fn
        except Exception as e:  # any failure: fall back to the torch path, never an error
            _native_error = f"{type(e).__name__}: {e}"
        return _native_fn


def _bump_row_steps(
    row_step: torch.Tensor, rows: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count one more update for ``rows``; their bias corrections (1 - beta1^t, sqrt(1 - beta2^t)) as
    [U] fp32, computed in float64 from the per-row counts t."""
    step = row_step.index_select(0, rows) + 1  # [U]
    row_step.index_copy_(0, rows, step)
    step64 = step.to(torch.float64)
    bias1 = (1.0 - beta1**step64).to(torch.float32)
    bias2_sqrt = (1.0 - beta2**step64).sqrt().to(torch.float32)
    return bias1, bias2_sqrt


class BiasCorrectionTable:
    """(1 - beta1^t, sqrt(1 - beta2^t)) as fp32 for every count t = 0 .. S - 1, on the device.

    The CUDA kernel looks each row's corrections up by its new count instead of the step computing
    them per row (a dozen small torch ops over the touched rows). The entries are ``_bump_row_steps``'
    own expressions on t, so they are the values the torch path computes for a row with that count.
    The table grows (doubling) when the counts may reach its end; with ``t`` counted per row, S stays
    about the number of steps taken (8 bytes an entry).
    """

    MIN_SIZE = 1024

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._bias1: torch.Tensor | None = None
        self._bias2_sqrt: torch.Tensor | None = None

    def covering(self, max_count: int, beta1: float, beta2: float,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables (bias1 [S], bias2_sqrt [S]) with S > max_count, for these betas on ``device``."""
        size = self._bias1.numel() if self._bias1 is not None else 0
        if self._key != (beta1, beta2, device) or size <= max_count:
            size = max(self.MIN_SIZE, 1 << max_count.bit_length())  # a power of two > max_count
            counts = torch.arange(size, dtype=torch.float64, device=device)
            self._bias1 = (1.0 - beta1**counts).to(torch.float32)
            self._bias2_sqrt = (1.0 - beta2**counts).sqrt().to(torch.float32)
            self._key = (beta1, beta2, device)
        return self._bias1, self._bias2_sqrt


def native_available() -> bool:
    """Whether the fused CPU kernel is (or can be) built in this process."""
    return _build_native() is not None


def _native_default() -> bool:
    return os.environ.get("PKM_SPARSE_ADAM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


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
        # CPU: use the fused C kernel when it can be built (PKM_SPARSE_ADAM_NATIVE=0 turns it off)
        self.native = _native_default()
        # rows per grab of the native kernel's work counter (~64 KB of each tensor)
        self.native_block_elements = 1 << 14
        # CUDA: the fused Triton row kernel (None = automatic, see pkm.values.triton_enabled;
        # False = the torch-op path; PKM_TRITON=0 turns the automatic choice off)
        self.triton: bool | None = None
        self._bias_corrections = BiasCorrectionTable()
        # per weight: (its row_step tensor, that tensor's version, a bound on its counts), see _row_count_bound
        self._count_bounds: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}
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
            if self._native_step(weight, state, rows, g, lr, beta1, beta2, eps, wd):
                table.zero_grad()
                continue

            if triton_enabled(weight, self.triton):
                from pkm import triton_kernels

                # one kernel: counts, bias corrections (looked up by count) and the update
                bias1, bias2_sqrt = self._bias_corrections.covering(
                    self._row_count_bound(weight, state["row_step"]), beta1, beta2, weight.device)
                triton_kernels.sparse_adam_rows(weight, state["exp_avg"], state["exp_avg_sq"], state["row_step"],
                                                g, rows, bias1, bias2_sqrt, lr, beta1, beta2, eps, lr * wd)
                table.zero_grad()
                continue
            bias1, bias2_sqrt = _bump_row_steps(state["row_step"], rows, beta1, beta2)  # [U] each
            bias1, bias2_sqrt = bias1.unsqueeze(1), bias2_sqrt.unsqueeze(1)  # [U, 1]

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

    def _row_count_bound(self, weight: torch.Tensor, row_step: torch.Tensor) -> int:
        """A bound on every row's count after this step, known on the host without reading the device.

        Each step adds at most one to a count, so the bound is counted up from the last one. The
        counts are read (one host sync) only when they are new to this optimizer or were changed by
        anything but the kernel (a loaded checkpoint replaces the tensor; an in-place torch op, such
        as the torch path's, bumps its version; the kernel's own writes do not).
        """
        known = self._count_bounds.get(weight)
        if known is not None and known[0] is row_step and known[1] == row_step._version:
            bound = known[2] + 1
        else:
            bound = (int(row_step.max()) if row_step.numel() else 0) + 1
        self._count_bounds[weight] = (row_step, row_step._version, bound)
        return bound

    def _native_step(self, weight: torch.Tensor, state: dict, rows: torch.Tensor, g: torch.Tensor,
                     lr: float, beta1: float, beta2: float, eps: float, wd: float) -> bool:
        """Run the fused kernel on a CPU table; False (nothing touched) when it does not apply."""
        exp_avg, exp_avg_sq, row_step = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        if not self.native or self.triton or weight.device.type != "cpu":  # triton=True: Triton asked for
            return False
        tensors = (weight, exp_avg, exp_avg_sq, row_step, g)
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            return False
        if any(t.stride(-1) != 1 for t in (weight, exp_avg, exp_avg_sq)) or row_step.stride(0) != 1:
            return False
        if exp_avg.shape != weight.shape or exp_avg_sq.shape != weight.shape or row_step.shape != weight.shape[:1]:
            return False
        fn = _build_native()
        if fn is None:
            return False
        n, cols = rows.numel(), weight.shape[1]
        rows = rows.to(torch.int64).contiguous()
        g = g.contiguous()
        if g.shape != (n, cols):
            raise ValueError(f"SparseAdam: gradient values have shape {tuple(g.shape)}, expected ({n}, {cols}).")
        # the kernel writes through raw pointers: an out-of-range row must be an error, not corruption
        lo, hi = torch.aminmax(rows)
        if int(lo) < 0 or int(hi) >= weight.shape[0]:
            raise ValueError(
                f"SparseAdam: gradient rows must be in [0, {weight.shape[0]}), got [{int(lo)}, {int(hi)}].")
        block = max(1, self.native_block_elements // max(cols, 1))
        counter = ctypes.c_int64(0)
        # hyper-parameters rounded to fp32 exactly as the torch path's ops round their scalars
        lr = float(lr)
        args = (weight.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), row_step.data_ptr(), g.data_ptr(),
                rows.data_ptr(), n, cols, weight.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0), g.stride(0),
                ctypes.addressof(counter), block, lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, beta2, eps, lr * wd)
        workers = min(torch.get_num_threads(), (n + block - 1) // block)
        threads = [threading.Thread(target=fn, args=args, daemon=True) for _ in range(workers - 1)]
        for t in threads:
            t.start()
        fn(*args)  # ctypes drops the GIL: the calling thread works too
        for t in threads:
            t.join()
        # raw-pointer writes: bump the version counters as the in-place torch ops would (autograd's
        # "modified by an inplace operation" check stays as it was)
        torch.autograd.graph.increment_version([weight, exp_avg, exp_avg_sq, row_step])
        return True

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
