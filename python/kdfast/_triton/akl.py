"""AKL's head (api.md §1, ``akl``) by selection in the streaming passes of :mod:`.dense`.

The head H of a row: order the ids by the teacher's probability ``p`` descending (ties: lower
id first), keep every id whose cumulative mass up to and including itself is ≤ μ, and always
the first id. Here μ is the bound ``head_mass + HEAD_TOLERANCE`` (2⁻²⁰, from
:mod:`kdfast.reference`: an exact boundary, e.g. a uniform teacher at ``head_mass = k/V``, is
not left to rounding). Cumulative masses only grow along that order, so H is a prefix of it,
fixed by two numbers, found without sorting and without an ``[N, V]`` buffer:

* the *boundary level* ``u``: the largest float32 bit pattern with ``F(u) > μ``, where
  ``F(c) = Σ_{i: bits(p_i) ≥ c} p_i`` (float64) is the mass at or above ``c`` — positive floats
  order like their bit patterns, and ``F`` is a non-increasing step function whose steps sit on
  the values ``p`` takes, so ``u`` is the bit pattern of an actual ``p``: the first value (from
  the top) whose whole tie group no longer fits. Every id with ``p > u`` is in H (its
  cumulative mass is at most ``F`` of the level above, ``≤ μ``); every id with ``p < u`` is out
  (its cumulative mass exceeds ``F(u) > μ``). ``F(0) ≤ μ`` (the whole row fits): ``u = −1``.
  μ ≥ 1 is the whole row without a search: in exact arithmetic every cumulative mass is
  ≤ Σ p = 1, and how far the float32 ``p`` of a long row sum above 1 must not decide it
  (``head_mass = 1`` is every id: exactly forward KL).
* the tie count ``j``: the ids tied at ``u`` enter in id order while ``G + k·u ≤ μ``
  (``k = 1, 2, …``, ``G = F(u + 1)`` the mass strictly above ``u``), so the first ``j`` of
  them (by a running in-row count) are in H; ``j ≥ 1`` when nothing lies above ``u`` (the
  first id).

``u`` is found by a ``NC``-ary search on ``[0, bits(1.0)]``: each pass over the row evaluates
``F`` at ``NC`` evenly spaced candidates (one ``[BLOCK, NC]`` compare-and-sum per block),
keeping the interval ``[lo, hi)`` with ``F(lo) > μ ≥ F(hi)``; the width ``2^30`` shrinks
``NC``-fold per pass (8 passes at ``NC = 16``). O(V·NC) work per pass, O(1) state per row.

Exactness against the sort definition (a stable descending sort, a float64 ``cumsum``): the
masses are the kernel's float32 ``p``, the same bits in every pass (one formula,
:func:`.rowmath.teacher_lp`, and no fused multiply-adds), and the ties are exact float32
equalities broken by id as the stable sort breaks them. The sums are float64, as the
reference's; they differ from its sequential ``cumsum`` only in the order of the additions (a
tree within a block, blocks in order), i.e. by ≲ V·2⁻⁵³ relative, so a membership can differ
only where a cumulative mass lies that close to μ — which the tolerance keeps away from every
boundary that holds exactly. (Summing in float32 instead would move that margin to ≈ V·2⁻²⁴,
the size of the tolerance itself: exact boundaries of long rows would again depend on rounding.)
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rowmath import teacher_lp

__all__ = ["head_level", "head_mask"]

# bits(1.0): no float32 probability has a larger bit pattern.
_ONE_BITS = tl.constexpr(0x3F800000)
_TWO_30 = tl.constexpr(1073741824.0)  # a cap on the tie count (no float → int overflow)


@triton.jit
def _teacher_p(t_row, cols, msk, inv_t, mb, ln_zb):
    b = tl.load(t_row + cols, mask=msk, other=float("-inf")).to(tl.float32) * inv_t
    return tl.exp(teacher_lp(b, mb, ln_zb))


@triton.jit
def head_level(t_row, V, inv_t, mb, ln_zb, mu, BLOCK: tl.constexpr, NC: tl.constexpr):
    """``(u, j)`` of the row's head (see the module docstring); ``mu`` is the float64 bound."""
    offs = tl.arange(0, BLOCK)
    ks = tl.arange(0, NC)
    # μ ≥ 1: the whole row (every cumulative mass is ≤ Σ p = 1; not left to its rounding).
    whole = mu >= 1.0
    lo = tl.where(whole, -1, 0)
    hi = tl.where(whole, 0, _ONE_BITS + 1)
    g = tl.zeros([], dtype=tl.float64)  # F(hi)
    while hi - lo > 1:
        step = (hi - lo + (NC - 1)) // NC
        cand = lo + ks * step
        f = tl.zeros([NC], dtype=tl.float64)
        for start in range(0, V, BLOCK):
            cols = start + offs
            msk = cols < V
            p = _teacher_p(t_row, cols, msk, inv_t, mb, ln_zb)
            bits = p.to(tl.int32, bitcast=True)
            at_or_above = bits[:, None] >= cand[None, :]
            f += tl.sum(tl.where(at_or_above, p.to(tl.float64)[:, None], 0.0), 0)
        # F is non-increasing in the candidate, so the candidates with F > μ are a prefix.
        n_over = tl.sum(((cand < hi) & (f > mu)).to(tl.int32), 0)
        k = n_over - 1  # −1 only in the first pass, when F(0) ≤ μ: the whole row is the head
        nxt = lo + (k + 1) * step
        has_next = (k + 1 < NC) & (nxt < hi)
        g = tl.where(has_next, tl.sum(tl.where(ks == k + 1, f, 0.0), 0), g)
        hi = tl.where(k < 0, 0, tl.where(has_next, nxt, hi))
        lo = tl.where(k < 0, -1, lo + k * step)
    # Ties at u that fit: the largest j with G + j·u ≤ μ (u = 0: all of them).
    uv = tl.maximum(lo, 0).to(tl.float32, bitcast=True).to(tl.float64)
    r = tl.where(uv > 0.0, (mu - g) / tl.where(uv > 0.0, uv, 1.0), _TWO_30)
    j = tl.floor(tl.minimum(tl.maximum(r, 0.0), _TWO_30))
    j = tl.where(g + (j + 1.0) * uv <= mu, j + 1.0, j)  # the division's rounding, either way
    j = tl.where((j > 0.0) & (g + j * uv > mu), j - 1.0, j)
    j = tl.where(g == 0.0, tl.maximum(j, 1.0), j)  # nothing above u: the first id is in H
    return lo, j.to(tl.int32)


@triton.jit
def head_mask(p, msk, u, j, ties_before):
    """Whether each lane of a block is in the head, and the running count of ids tied at ``u``
    (``ties_before`` in the blocks before this one; start at 0)."""
    bits = p.to(tl.int32, bitcast=True)
    tie = msk & (bits == u)
    rank = ties_before + tl.cumsum(tie.to(tl.int32), 0)
    head = msk & ((bits > u) | (tie & (rank <= j)))
    return head, ties_before + tl.sum(tie.to(tl.int32), 0)
