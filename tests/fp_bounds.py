"""Tolerances from the arithmetic: how far two correct fp32 evaluations of the same formula can be
apart, whatever the summation order, fma placement or SIMD width (AVX-512, AVX2, ATen's scalar
``default`` path, numpy's under Triton's interpreter, a GPU).

Each bound is the standard first-order rounding-error bound (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., ch. 2-3) of one evaluation, doubled for the distance between two.
The bounds are computed in float64 from the operands' magnitudes, so they scale with the data: a
wrong index, weight or formula moves a result by the size of its terms, far beyond these.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24  # unit roundoff of fp32 (half its machine epsilon)


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): a sum or dot of n terms evaluated in any order is within
    gamma_n * sum |terms| of the exact one (Higham, eq. 3.4; with fma the bound only gets smaller)."""
    assert n * U32 < 0.5
    return n * U32 / (1 - n * U32)


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |got - ref| <= bound, with the worst element named on failure."""
    err = (got.double() - ref.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=err.device).expand_as(err)
    excess = err - bound
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(f"{what}: |got - ref| = {err.flatten()[i]:.3e} at flat index {i} exceeds the "
                             f"rounding bound {bound.flatten()[i]:.3e} (got {got.flatten()[i]}, ref {ref.flatten()[i]})")


def dots_bound(table: torch.Tensor, idx: torch.Tensor, rows_of_token: torch.Tensor) -> torch.Tensor:
    """Distance of two fp32 evaluations of dot[t, k] = <table[idx[t, k]], x[t]> over d columns:
    2 gamma_d sum_c |table[idx[t, k], c] x[t, c]|. ``rows_of_token`` is x [T, d]."""
    d = table.shape[1]
    mags = (table.double().abs()[idx] * rows_of_token.double().abs().unsqueeze(1)).sum(-1)
    return 2 * gamma(d) * mags


def row_sums_bound(idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Distance of two fp32 evaluations of the coalesced row gradient G[r] = sum over the lookups
    (t, k) with idx[t, k] = r of w[t, k] x[t] ([num_rows, d], zeros where a row has no lookup):
    2 gamma_n sum |w x| with n the largest number of lookups of one row (bounds every row's n)."""
    flat = idx.reshape(-1)
    n = max(int(torch.bincount(flat, minlength=num_rows).max()) if flat.numel() else 1, 1)
    terms = (w.double().abs().unsqueeze(-1) * x.double().abs().unsqueeze(1)).reshape(-1, x.shape[1])
    mags = torch.zeros(num_rows, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, flat, terms)
    return 2 * gamma(n) * mags


class AdamStepBound:
    """A running bound on |a - b| for two fp32 implementations of the same (sparse) Adam steps, kept
    in float64 beside the reference's state. One step of a touched row, elementwise:

        m' = lerp(m, g, 1 - b1)              b1 m + (1 - b1) g
        v' = b2 v + (1 - b2) g^2
        u  = lr / bc1 * m' / (sqrt(v') / bc2 + eps) + lr wd w
        w' = w - u

    Rounding per evaluation: m' at most 3 roundings on magnitudes <= |m| + |g| (3u(|m| + |g|));
    v' at most 4 on terms that are all positive (4u v'); u at most 8 on |u| (sqrt, up to two ulps
    in ATen's vectorised form, two divisions, an add, two products, the lr / bc1 quotient and the
    decay term); w' one on |w'|. Two evaluations differ by twice that, plus what earlier
    differences carry in: b1 dm, b2 dv, and through u the sensitivities
    du/dm = lr / (bc1 D) and du/dsqrt(v) = lr |m'| / (bc1 bc2 D^2), D = sqrt(v') / bc2 + eps, with
    d sqrt(v) <= min(dv / (2 sqrt(v)), sqrt(dv)). First order in u: the bound is for errors that are
    small against the values, which is what a correct kernel produces.

    ``moments_bitwise`` keeps m' and v' exact (dm = dv = 0) where both sides run the same fma
    forms, so only the update's own rounding reaches the weight.
    """

    def __init__(self, weight: torch.Tensor, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        z = torch.zeros_like(weight, dtype=torch.float64)
        self.m, self.v, self.w = z.clone(), z.clone(), weight.detach().double().clone()  # reference, fp64
        self.w0 = self.w.clone()
        self.steps = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        self.dm, self.dv, self.dw = z.clone(), z.clone(), z.clone()

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Advance by one step that touches ``rows`` (unique) with gradient rows ``grad``."""
        b1, b2, lr = self.b1, self.b2, self.lr
        g = grad.double()
        m, v, w = self.m[rows], self.v[rows], self.w[rows]
        t = self.steps[rows] + 1
        self.steps[rows] = t
        bc1 = (1 - b1**t).unsqueeze(1)
        bc2 = (1 - b2**t).sqrt().unsqueeze(1)
        m_new = b1 * m + (1 - b1) * g
        v_new = b2 * v + (1 - b2) * g * g
        dm = b1 * self.dm[rows] + 2 * 3 * U32 * (m.abs() + g.abs())
        dv = b2 * self.dv[rows] + 2 * 4 * U32 * v_new
        denom = v_new.sqrt() / bc2 + self.eps
        upd = lr / bc1 * m_new / denom + lr * self.wd * w
        d_sqrt_v = torch.minimum(dv / (2 * v_new.sqrt()).clamp_min(1e-300), dv.sqrt())
        dupd = (lr / (bc1 * denom) * dm + lr * m_new.abs() / (bc1 * bc2 * denom**2) * d_sqrt_v
                + 2 * 8 * U32 * upd.abs())
        w_new = w - upd
        self.dw[rows] = self.dw[rows] * (1 + lr * self.wd) + dupd + 2 * U32 * w_new.abs()
        self.m[rows], self.v[rows], self.w[rows] = m_new, v_new, w_new
        self.dm[rows], self.dv[rows] = dm, dv

    def assert_close(self, weight_a: torch.Tensor, weight_b: torch.Tensor, state_a: dict, state_b: dict,
                     moments_bitwise: bool) -> None:
        """Counts bitwise; moments bitwise or within the bound; weights within the bound."""
        assert torch.equal(state_a["row_step"], state_b["row_step"])
        for key, bound in (("exp_avg", self.dm), ("exp_avg_sq", self.dv)):
            if moments_bitwise:
                assert torch.equal(state_a[key], state_b[key]), key
            else:
                assert_within(state_a[key], state_b[key], bound, key)
        assert_within(weight_a.detach(), weight_b.detach(), self.dw, "weight")
        # a bound that could hide a real error would be of the size of the steps' own changes
        assert float(self.dw.max()) < 1e-3 * float((self.w - self.w0).abs().max())


def aten_moments_bitwise() -> bool:
    """Whether ATen's CPU lerp / addcmul run the fma forms the kernels use: its vectorised paths
    (AVX2, AVX-512) do; the scalar ``default`` path rounds each product, so its Adam moments differ
    from the kernels' in the last bit (within ``AdamStepBound``)."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"
