"""Element-wise Triton helpers of the dense-loss kernels (:mod:`.dense`, :mod:`.akl`).

Every helper maps zero probabilities (``-inf`` logits, lanes past the vocabulary, underflow) to
exact zeros without forming ``0 · inf``, ``-inf − -inf`` or ``log 0``, so the kernels also run
warning-free under the Triton interpreter. The derivations are in :mod:`.dense`'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["log1p_small", "lae", "xmul", "expm1", "p_minus_q", "load_pair", "teacher_lp", "log_probs"]


@triton.jit
def log1p_small(e):
    """``log(1 + e)`` for ``e ∈ [0, 1]``, accurate for tiny ``e``."""
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def lae(x, c):
    """``log(e^x + e^c)`` for finite ``c`` and ``x ∈ [−inf, +inf]`` (no NaN, no overflow)."""
    hi = tl.maximum(x, c)
    lo = tl.minimum(x, c)
    return hi + log1p_small(tl.exp(lo - hi))


@triton.jit
def xmul(x, y):
    """``x · y`` with ``x = 0 ⇒ 0`` even where ``y`` is infinite."""
    return x * tl.where(x == 0.0, 0.0, y)


@triton.jit
def expm1(x):
    """``e^x − 1`` without cancellation near 0: degree-8 Taylor for ``|x| < 0.5`` (truncation
    below 2e-8 relative), ``exp(x) − 1`` beyond (no cancellation there); −1 at ``-inf``."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    poly = 1.0 / 40320.0
    poly = poly * xs + 1.0 / 5040.0
    poly = poly * xs + 1.0 / 720.0
    poly = poly * xs + 1.0 / 120.0
    poly = poly * xs + 1.0 / 24.0
    poly = poly * xs + 1.0 / 6.0
    poly = poly * xs + 0.5
    return tl.where(small, xs + xs * xs * poly, tl.exp(tl.where(small, 0.0, x)) - 1.0)


@triton.jit
def p_minus_q(d, q, p):
    """``p − q`` relative to the larger side: ``−p·expm1(d)`` (``d ≤ 0``), ``q·expm1(−d)``."""
    e = expm1(-tl.abs(d))
    return tl.where(d <= 0.0, -p * e, q * e)


@triton.jit
def load_pair(s_row, t_row, cols, msk, inv_t, tm, MIX: tl.constexpr):
    """``a = z_s / T`` and ``b`` of one block (``-inf`` past the vocabulary): ``b = z_t / T``,
    or with ``MIX`` (TAID) ``b = m / T``, ``m = (1 − t)·z_s + t·z_t`` mixed in float32 on the
    raw logits, each product by :func:`xmul` (so ``m = z_s`` exactly at ``t = 0``, ``z_t`` at
    ``t = 1``, and a ``-inf`` on either side gives ``-inf`` in between: never NaN)."""
    zs = tl.load(s_row + cols, mask=msk, other=float("-inf")).to(tl.float32)
    zt = tl.load(t_row + cols, mask=msk, other=float("-inf")).to(tl.float32)
    if MIX:
        zt = xmul(1.0 - tm, zs) + xmul(tm, zt)
    return zs * inv_t, zt * inv_t


@triton.jit
def teacher_lp(b, mb, ln_zb):
    """``log p = (b − M_b) − ln Z_b``: the one formula of the teacher's log-probabilities, so
    that every pass of a kernel sees the same float32 ``p`` bit for bit (AKL's selection
    relies on it)."""
    return (b - mb) - ln_zb


@triton.jit
def log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, MIX: tl.constexpr):
    """``log q``, ``log p`` and ``d`` of one block (``-inf`` in lanes past the vocabulary).
    ``d = (x − y) − cz`` from the shifted logits, ``cz = ln(Z_a / Z_b)`` (0 where both are
    ``-inf``, without forming ``-inf − -inf``; ±inf where one side is)."""
    a, b = load_pair(s_row, t_row, cols, msk, inv_t, tm, MIX)
    x = a - ma
    y = b - mb
    both = (x == float("-inf")) & (y == float("-inf"))
    d = tl.where(both, 0.0, (tl.where(both, 0.0, x) - tl.where(both, 0.0, y)) - cz)
    return x - ln_za, teacher_lp(b, mb, ln_zb), d
