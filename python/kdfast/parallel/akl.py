"""AKL over a vocabulary sharded across ranks: the head found without gathering the row.

AKL's head (:func:`kdfast.reference.akl_weights`) is the ids whose cumulative teacher mass, in
the order of ``p`` descending (ties: lower id first), is ≤ ``H = head_mass + 2⁻²⁰``, plus always
the first. With ``F(x) = Σ_{p_v ≥ x} p_v`` (non-increasing in x), let ``x*`` be the smallest
float32 with ``F(x*) ≤ H``: every id with ``p ≥ x*`` is in the head, none below the next value
``x' = max{p < x*}`` is, and the ids tied at ``x'`` enter in global id order while
``F(x*) + j·x' ≤ H`` (j = 1, 2, …). Ranks hold slices in id order, so a tie's global rank is
its local rank plus the ties of the ranks before.

``x*`` is searched on the bit patterns of non-negative float32 (monotone in the value), 16-ary:
8 all-reduces of 15 sums per row; then one max (``x'``), one sum of ``F(x*)`` with the tie
counts per rank, one of the head and tail gaps, and one of the two KLs. The weights ``w_h = g_H / (g_H + g_T)``,
``w_t = g_T / (g_H + g_T)`` are constants for the gradient, as in every other backend.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import _native
from .. import reference as ref
from .collectives import sum_over_ranks, world

_ARY = 16  # 15 probes per round
_ROUNDS = 8  # 15^8 > 2^31 bit patterns


def _bits(p: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of non-negative ``p`` as int32 (monotone in the value; a view of
    float32 ``p``, no copy)."""
    return p.float().contiguous().view(torch.int32)


def _mass_at_least(p: torch.Tensor, bits: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``Σ_{bits_v ≥ τ} p_v`` per row for each threshold ``τ`` ``[N, m]`` → float64 ``[N, m]``
    (local): one pass of the Rust kernel over a CPU float32 slice, else one PyTorch pass per
    threshold."""
    if p.device.type == "cpu" and p.dtype == torch.float32:
        return _native.mass_at_least(p, thresholds)
    p64 = p.double()
    out = torch.empty(thresholds.shape, dtype=torch.float64, device=p.device)
    for j in range(thresholds.shape[1]):
        out[:, j] = torch.where(bits >= thresholds[:, j:j + 1].to(torch.int32), p64, 0.0).sum(-1)
    return out


def head_mask(p: torch.Tensor, head_mass: float, group) -> torch.Tensor:
    """The local slice's AKL head ``[N, V_local]`` (bool) for teacher probabilities ``p``."""
    limit = head_mass + ref.HEAD_TOLERANCE
    n, dev = p.shape[0], p.device
    bits = _bits(p)
    # x* = min{b : F(b) ≤ limit} lies in [lo, hi]; F(hi) = 0 (above +inf: no id). Each round
    # probes lo, lo + step, ..., lo + 14 step and keeps (last miss, first fit]: R → < R / 15.
    lo = torch.zeros(n, dtype=torch.int64, device=dev)
    hi = torch.full((n,), 0x7F800001, dtype=torch.int64, device=dev)
    offsets = torch.arange(_ARY - 1, device=dev)[None, :]
    for _ in range(_ROUNDS):
        step = torch.clamp((hi - lo + _ARY - 2) // (_ARY - 1), min=1)
        probes = torch.minimum(lo[:, None] + step[:, None] * offsets, hi[:, None])
        mass = _mass_at_least(p, bits, probes)
        dist.all_reduce(mass, op=dist.ReduceOp.SUM, group=group)
        fits = mass <= limit  # False ... False True ... True
        any_fit, all_fit = fits.any(1), fits.all(1)
        first_fit = probes.gather(1, fits.int().argmax(1, keepdim=True)).squeeze(1)
        last_miss = probes.gather(1, (_ARY - 2 - fits.flip(1).int().argmin(1, keepdim=True))).squeeze(1)
        hi = torch.where(any_fit, first_fit, hi)
        lo = torch.where(all_fit, lo, last_miss + 1)
    full = bits >= hi.to(torch.int32)[:, None]
    below = torch.where(full, -1, bits)
    x_next = below.amax(-1).long() if below.shape[-1] else torch.full((n,), -1, dtype=torch.int64, device=dev)
    del below
    dist.all_reduce(x_next, op=dist.ReduceOp.MAX, group=group)  # x' (−1: none)
    tie = (bits == x_next.to(torch.int32)[:, None]) & (x_next[:, None] >= 0)
    rank, size = world(group)
    sums = torch.zeros(n, 1 + size, dtype=torch.float64, device=dev)  # F(x*) and the ties per rank
    sums[:, 0] = _mass_at_least(p, bits, hi[:, None])[:, 0]
    sums[:, 1 + rank] = tie.sum(-1).double()
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    a = sums[:, 0]
    # The ties (rare): each one's global rank among its row's ties, from 1, in id order.
    r, c = tie.nonzero(as_tuple=True)  # row-major: a row's ties in id order
    counts = tie.sum(-1)
    start = torch.cumsum(counts, 0) - counts
    j = (sums[:, 1:1 + rank].sum(-1)[r] + (torch.arange(r.numel(), device=dev) - start[r] + 1)).double()
    value = torch.where(x_next >= 0, x_next, 0).to(torch.int32).view(torch.float32).double()
    enter = (a[r] + j * value[r] <= limit) | ((j == 1) & (a[r] == 0))  # the first id is always in the head
    head = full
    head[r[enter], c[enter]] = True
    return head


def akl_rows(lq: torch.Tensor, lp: torch.Tensor, head_mass: float, group) -> torch.Tensor:
    """Per-row AKL ``w_h KL(p‖q) + w_t KL(q‖p)`` from the local slices of the global
    log-probabilities (student ``lq`` differentiable, teacher ``lp``)."""
    with torch.no_grad():
        p, q = lp.exp(), lq.exp()
        head = head_mask(p, head_mass, group)
        gap = (p - q).abs().double()
        gaps = torch.stack([torch.where(head, gap, 0.0).sum(-1), torch.where(head, 0.0, gap).sum(-1)], 1)
        dist.all_reduce(gaps, op=dist.ReduceOp.SUM, group=group)
    fkl, inf_f = ref.plogratio_terms(lp, lq)
    rkl, inf_r = ref.plogratio_terms(lq, lp)
    parts = torch.stack([fkl.sum(-1), rkl.sum(-1), inf_f.any(-1).to(fkl.dtype), inf_r.any(-1).to(fkl.dtype)], 1)
    sums = sum_over_ranks(parts, group)
    g_h, g_t = gaps[:, 0], gaps[:, 1]
    total = g_h + g_t
    some = total > 0
    w_h = torch.where(some, g_h / torch.where(some, total, 1.0), 0.5).to(fkl.dtype)
    w_t = torch.where(some, g_t / torch.where(some, total, 1.0), 0.5).to(fkl.dtype)
    f = torch.where(sums[:, 2].detach() > 0, math.inf, sums[:, 0])
    r = torch.where(sums[:, 3].detach() > 0, math.inf, sums[:, 1])
    return torch.where(w_h == 0, 0.0, w_h * f) + torch.where(w_t == 0, 0.0, w_t * r)
