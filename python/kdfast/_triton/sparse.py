"""Triton kernel for :func:`kdfast.sparse_loss` (api.md §2): loss and student gradient, fused.

Per row, with ``a = z_s / T`` (float32: ``z_s`` times the float32 ``1/T``), ``lse`` the
student's full-vocabulary log-sum-exp, ``lq = a − lse``, ``q = exp(lq)``, and the listed slots
``i`` (ids ``id_i``, teacher log-probs ``lp_i``, weights ``w_i``):

=========  ==============================================  ==========================================
mode       ℓ                                               ∂ℓ/∂a_j (``c`` = the factor of ``q_j``)
=========  ==============================================  ==========================================
bucket     ``Σ_i p_i (lp_i − lq_i)``                       ``q_j c − p_j`` (listed j),
           ``+ p_tail (lp_tail − lq_tail)``                ``q_j c − p_tail q_j / q_tail`` (others),
                                                           ``c = Σ p + p_tail``
renorm     ``Σ_i p̃_i (log p̃_i − lq_i)``, ``p̃ = p / Σp``    ``q_j − p̃_j [j listed]``, ``c = 1``
sampled    ``Σ_i w_i (lp_i − lq_i)``                       ``q_j Σ w − Σ_{i: id_i = j} w_i``
=========  ==============================================  ==========================================

``p_tail = exp(tail_logprob)`` (without one ``max(0, 1 − Σ p)``; 0 when all V ids are listed).
``q_tail`` is never formed as ``1 − Σ q_i`` (cancellation): in bucket mode the first pass masks
the listed ids out of the online log-sum-exp, which so yields ``lse_tail`` directly, and
``lse = logaddexp(lse_listed, lse_tail)``; ``lq_tail = lse_tail − lse``. The unlisted gradient
is ``exp(a_j − lse)·c − exp((a_j − lse_tail) + lp_tail)``, finite when ``q_tail`` underflows
(this is kdfast-core ``sparse.rs``, which the Rust backend runs).

The other losses of top-k targets (``reverse_kl``, ``jsd``, ``tvd``; ``CAT`` ≥ 0) are the dense
divergence between category distributions (kdfast-core ``categories.rs``, which the Rust
backend runs): bucket ``P = (p_i, p_tail)``, ``Q = (q_i, q_tail)`` with ``log q_tail = lse_tail −
lse`` from the same masked pass; renorm ``P̃ = p / Σp``, ``Q̃_i = exp(a_i − lse_listed)``. Per
category the dense kernels' per-element math (:mod:`.dense`) gives the loss term and ``q h``
(``d = lq − lp`` formed in float64), and with ``H = Σ_c Q_c h_c`` the gradient is
``q_j (h_j − H)``: ``qg_c − Q_c H`` at a listed id, ``q_j (h_tail − H)`` on every unlisted
column (``h_tail − H = h_tail Σ_listed Q − Σ_listed qg``, no cancellation when
``Q_tail ≈ 1``; ``h_tail`` is ``q h`` at unit mass, ``(Q, P) = (1, e^{−d})``), and renorm
``q̃_j (h_j − H)`` on the listed ids, 0 elsewhere. A ``+inf`` row (a KL with mass against none)
gets a zero gradient row; a renormalised row whose student is ``-inf`` at every listed id (``Q̃``
undefined) a NaN row.

One program per row (int64 row offsets). Before the launch the slots of every row are sorted
by id (torch ops on the device: no host sync), unused slots (id −1, sampled weight 0) last and
out-of-range ids (or invalid weights) after them, and ``torch.searchsorted`` gives, for every
vocabulary block, the range of sorted slots whose ids fall in it. The kernel then

1. sums the slots (in float64): ``Σ t_i``, ``Σ t_i (lp_i − a_i)`` with ``a_i`` gathered from
   the student row, and (bucket) the log-sum-exp of the listed ``a_i``; ``t_i = p_i`` or ``w_i``;
2. runs the online log-sum-exp of ``a`` over blocks of ``BLOCK`` columns (bucket: with the
   block's listed ids set to −inf first), so the loss is
   ``Σ t_i (lp_i − a_i) + lse · Σ t_i`` (+ the tail term; renorm divides by ``Σ p``);
   (2b. the categories' loss and ``H``, from a second pass over the slots;)
3. with a gradient, writes every block once: the dense part ``q_j c`` (bucket: minus the tail
   term) times ``grad_scale · (T² if t2_scale) / T``, with the block's listed ids replaced (or,
   sampled, decremented per slot, so repeated ids add up) before the store.

No ``[N, V]`` temporary; only the last pass writes, and it reads each element before writing
it, so ``grad`` may alias the student logits. Rows whose label is ``ignore_index`` give 0 and a
zero gradient without reading the student. A row with an id outside ``[0, V)`` (other than −1),
an invalid sampled weight (NaN, inf, negative), a repeated id in top-k targets, or no finite
student logit gives a NaN loss (and NaN gradient) instead of an out-of-bounds read or an error:
the kernel cannot raise without a host sync. (:func:`kdfast.sparse_kl` checks values first on
CPU tensors and in eager mode, with the Rust backend's messages.) Like :mod:`.dense`, the
kernel never forms ``inf − inf``, ``0 · inf`` or ``log 0`` for valid input, so it also runs
warning-free under the Triton interpreter.
"""

from __future__ import annotations

from typing import Optional, Union

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .._registry import LOSSES

from .dense import terms
from .launch import block_and_warps, unit_columns
from .rowmath import p_minus_q, xmul

__all__ = ["sparse_call", "MODES"]

MODES = {"bucket": 0, "renorm": 1, "sampled": 2}
# The category losses' KIND in the dense kernels' numbering (forward KL 0, reverse KL 1, JSD 2,
# TVD 5); -1 is sparse_kl's forward KL against the full-vocabulary log q.
_CATS = {name: LOSSES[name].kernel_id for name in ("forward_kl", "reverse_kl", "jsd", "tvd")}
# Sort keys of slots that are not listed: unused (id −1, weight 0), then invalid.
_UNUSED = tl.constexpr(1 << 62)
_INVALID = tl.constexpr((1 << 62) + 1)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _category_terms(lq, lp, c1, c2, w, CAT: tl.constexpr):
    """Loss term, ``q·h`` (float32) and ``d = lq − lp`` (float64, 0 where both are ``-inf``) of
    one category from the student's and the teacher's float64 log-probabilities: the dense
    kernels' per-element math (:mod:`.dense`), ``CAT`` its KIND (0 forward KL, 1 reverse KL,
    2 JSD, 5 TVD). ``d`` is formed in float64, so it keeps its relative precision where p ≈ q."""
    both = (lq == _NEG_INF) & (lp == _NEG_INF)
    d = tl.where(both, 0.0, tl.where(both, 0.0, lq) - tl.where(both, 0.0, lp))
    d32 = d.to(tl.float32)
    lq32 = lq.to(tl.float32)
    lp32 = lp.to(tl.float32)
    if CAT == 0:  # forward KL; d = -inf (teacher alive, student not) makes the row +inf
        q = tl.exp(lq32)
        p = tl.exp(lp32)
        t = tl.where(d32 == _NEG_INF, float("inf"), xmul(p, -d32))
        qg = -p_minus_q(d32, q, p)
    else:
        t, qg, q = terms(lq32, lp32, d32, c1, c2, w, CAT)
    return t, qg, d


@triton.jit
def _sparse_kernel(
    s_ptr, sid_ptr, slp_ptr, sw_ptr, bnd_ptr, tail_ptr, labels_ptr, rows_ptr, g_ptr, gs_ptr,
    s_stride, g_stride, V, V_full, k, nb, ignore_index,
    inv_t, loss_scale, gs_val, g_mul, c1, c2, w,
    MODE: tl.constexpr, CAT: tl.constexpr, LISTED_LSE: tl.constexpr, HAS_TAIL: tl.constexpr,
    HAS_LABELS: tl.constexpr, NEED_GRAD: tl.constexpr, GS_PTR: tl.constexpr, KC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NEG_INF = _NEG_INF
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    slots = row * k
    bnd = bnd_ptr + row * (nb + 1)
    offs = tl.arange(0, BLOCK)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    v_read = tl.where(keep, V, 0)  # masked rows read nothing

    # 1. The slots, in chunks of KC (float64).
    kk = tl.arange(0, KC)
    invalid = 0
    mass = tl.zeros([], tl.float64)
    t_lp_a = tl.zeros([], tl.float64)  # Σ t (lp − a)
    l_max = tl.full([], NEG_INF, tl.float64)  # log-sum-exp of the listed a (bucket, categories)
    l_sum = tl.zeros([], tl.float64)
    for c in range(0, k, KC):
        idx = c + kk
        sid = tl.load(sid_ptr + slots + idx, mask=idx < k, other=_UNUSED)
        valid = sid < v_read  # nothing is listed in a masked row
        invalid += tl.sum((sid > _UNUSED).to(tl.int32), 0)
        if MODE != 2:  # sorted, so a repeated id sits next to itself
            nxt = tl.load(sid_ptr + slots + idx + 1, mask=idx + 1 < k, other=_UNUSED)
            invalid += tl.sum((valid & (nxt == sid)).to(tl.int32), 0)
        lp = tl.load(slp_ptr + slots + idx, mask=valid, other=NEG_INF).to(tl.float64)
        a = (tl.load(s_row + sid, mask=valid, other=NEG_INF).to(tl.float32) * inv_t).to(tl.float64)
        if MODE == 2:
            t = tl.load(sw_ptr + slots + idx, mask=valid, other=0.0).to(tl.float64)
        else:
            t = tl.exp(lp)
        live = t > 0.0
        mass += tl.sum(t, 0)
        t_lp_a += tl.sum(tl.where(live, t * (tl.where(live, lp, 0.0) - tl.where(live, a, 0.0)), 0.0), 0)
        if LISTED_LSE:
            m_new = tl.maximum(l_max, tl.max(a, 0))
            sh = tl.where(m_new == NEG_INF, 0.0, m_new)
            l_sum = l_sum * tl.exp(l_max - sh) + tl.sum(tl.exp(a - sh), 0)
            l_max = m_new

    # 2. Online log-sum-exp of a (bucket: of the unlisted columns only).
    m = tl.full([], NEG_INF, tl.float32)
    z = tl.zeros([], tl.float32)
    for start in range(0, v_read, BLOCK):
        cols = start + offs
        x = tl.load(s_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_t
        if MODE == 0:
            b = start // BLOCK
            for s in range(tl.load(bnd + b), tl.load(bnd + b + 1)):
                x = tl.where(cols == tl.load(sid_ptr + slots + s), NEG_INF, x)
        m_new = tl.maximum(m, tl.max(x, 0))
        sh = tl.where(m_new == NEG_INF, 0.0, m_new)
        z = z * tl.exp(m - sh) + tl.sum(tl.exp(x - sh), 0)
        m = m_new
    lse_z = tl.where(z > 0.0, m.to(tl.float64) + tl.log(tl.where(z > 0.0, z, 1.0).to(tl.float64)), NEG_INF)
    lse = lse_z
    lse_l = tl.where(l_sum > 0.0, l_max + tl.log(tl.where(l_sum > 0.0, l_sum, 1.0)), NEG_INF)
    if MODE == 0:
        hi = tl.maximum(lse_l, lse_z)
        hi_s = tl.where(hi == NEG_INF, 0.0, hi)
        lse = hi + tl.log(1.0 + tl.exp(tl.minimum(lse_l, lse_z) - hi_s))
    ok = (lse > NEG_INF) & (lse < float("inf"))  # False for NaN too
    lse = tl.where(ok, lse, 0.0)

    # The loss (float64).
    q_factor = mass
    p_tail = tl.zeros([], tl.float64)
    lp_tail = tl.zeros([], tl.float64)
    inv_mass = tl.full([], 1.0, tl.float64)
    lp_raw = tl.full([], NEG_INF, tl.float64)  # log p_tail, decided on the log (p_tail may underflow)
    if MODE == 0:
        if HAS_TAIL:
            lp_tail = tl.load(tail_ptr + row).to(tl.float64)
            p_tail = tl.exp(lp_tail)
            lp_raw = lp_tail
        else:
            p_tail = tl.maximum(1.0 - mass, 0.0)
            lp_tail = tl.log(tl.where(p_tail > 0.0, p_tail, 1.0))
            lp_raw = tl.where(p_tail > 0.0, lp_tail, NEG_INF)
        all_listed = tl.load(bnd + nb) == V  # every id listed: empty bucket
        p_tail = tl.where(all_listed, 0.0, p_tail)
        lp_raw = tl.where(all_listed, NEG_INF, lp_raw)
        has = p_tail > 0.0
        lp_tail = tl.where(has, lp_tail, 0.0)
        lq_tail = tl.where(has, lse_z, lse) - lse
        loss = t_lp_a + lse * mass + tl.where(has, p_tail * (lp_tail - lq_tail), 0.0)
        q_factor = mass + p_tail
    elif MODE == 1:
        inv_mass = 1.0 / tl.where(mass > 0.0, mass, 1.0)
        loss = t_lp_a * inv_mass - tl.log(tl.where(mass > 0.0, mass, 1.0)) + lse
        loss = tl.where(mass > 0.0, loss, 0.0)
        q_factor = tl.full([], 1.0, tl.float64)
    else:
        loss = t_lp_a + lse * mass
    nan_row = (invalid > 0) | ~ok
    if MODE == 1:
        nan_row = (invalid > 0) | (~ok & (mass > 0.0))

    # 2b. Another divergence over the categories (kdfast-core categories.rs): the listed ids
    # (student log q_i, or log q̃_i = a_i − lse_listed for renorm) and the bucket.
    ln_mass = tl.zeros([], tl.float64)
    lse_c = lse
    h_sum = tl.zeros([], tl.float64)
    if CAT >= 0:
        if MODE == 1:
            ln_mass = tl.log(tl.where(mass > 0.0, mass, 1.0))
            nan_row = nan_row | ((mass > 0.0) & (lse_l == NEG_INF))  # q̃ undefined
            lse_c = tl.where(lse_l > NEG_INF, lse_l, 0.0)
        loss = tl.zeros([], tl.float64)
        q_l = tl.zeros([], tl.float64)
        for c in range(0, k, KC):
            idx = c + kk
            sid = tl.load(sid_ptr + slots + idx, mask=idx < k, other=_UNUSED)
            valid = sid < v_read
            lp = tl.load(slp_ptr + slots + idx, mask=valid, other=NEG_INF).to(tl.float64)
            a = (tl.load(s_row + sid, mask=valid, other=NEG_INF).to(tl.float32) * inv_t).to(tl.float64)
            lq = tl.where(a > NEG_INF, tl.where(a > NEG_INF, a, 0.0) - lse_c, NEG_INF)
            t_cat, qg_cat, d_cat = _category_terms(lq, lp - ln_mass, c1, c2, w, CAT)
            loss += tl.sum(tl.where(valid, t_cat, 0.0).to(tl.float64), 0)
            h_sum += tl.sum(tl.where(valid, qg_cat, 0.0).to(tl.float64), 0)
            q_l += tl.sum(tl.where(valid, tl.exp(lq), 0.0), 0)
        q_factor = tl.zeros([], tl.float64)
        if MODE == 0:
            # The bucket (unless empty on both sides), and h_tail = q·h at unit mass.
            present = (lp_raw > NEG_INF) | (lse_z > NEG_INF)
            lq_t = tl.where(lse_z > NEG_INF, tl.where(lse_z > NEG_INF, lse_z, 0.0) - lse, NEG_INF)
            t_t, qg_t, d_t = _category_terms(lq_t, lp_raw, c1, c2, w, CAT)
            loss += tl.where(present, t_t, 0.0).to(tl.float64)
            d_t = d_t.to(tl.float32)  # q = 1, p = e^{-d} (clamped: TVD reads only the sign of q − p)
            t_unit, h_t, q_unit = terms(tl.zeros([], tl.float32), tl.minimum(-d_t, 80.0), d_t, c1, c2, w, CAT)
            alive = present & (lq_t > NEG_INF) & (loss < float("inf"))
            h_t = tl.where(alive, h_t, 0.0).to(tl.float64)
            q_factor = tl.where(alive, h_t * q_l - h_sum, 0.0)  # h_tail − H
            h_sum += tl.where(alive, tl.exp(lq_t) * h_t, 0.0)
        if MODE == 1:
            loss = tl.where(mass > 0.0, loss, 0.0)
    infinite = loss == float("inf")
    h_sum = tl.where(infinite, 0.0, h_sum)
    loss = tl.where(nan_row, float("nan"), loss.to(tl.float32) * loss_scale)
    tl.store(rows_ptr + row, tl.where(keep, loss, 0.0))

    # 3. The gradient, written once per block.
    if NEED_GRAD:
        g_row = g_ptr + row * g_stride
        gs = gs_val
        if GS_PTR:
            gs = tl.load(gs_ptr).to(tl.float32)
        gs = gs * g_mul
        gs = tl.where(nan_row, float("nan"), gs)
        zero = ~keep | infinite  # the +inf rule: a zero gradient row
        if MODE == 1:
            zero = zero | (mass == 0.0)
        gs = tl.where(zero, 0.0, gs)
        # q_j = exp((a_j − hi) − lo) with lse = hi + lo (float32 hi, its float32 remainder).
        hi32 = lse.to(tl.float32)
        lo32 = (lse - hi32.to(tl.float64)).to(tl.float32)
        qf32 = q_factor.to(tl.float32)
        # Bucket forward KL, unlisted: exp((a_j − thi) + tlo) = p_tail q_j / q_tail.
        has_t = (p_tail > 0.0) & (lse_z > NEG_INF) & (CAT < 0)
        thi = tl.where(has_t, lse_z, 0.0).to(tl.float32)
        tlo = tl.where(has_t, (lp_tail - (tl.where(has_t, lse_z, 0.0) - thi.to(tl.float64))).to(tl.float32), NEG_INF)
        v_in = tl.where(zero, 0, V)
        for start in range(0, V_full, BLOCK):
            cols = start + offs
            x = tl.load(s_row + cols, mask=cols < v_in, other=NEG_INF).to(tl.float32) * inv_t
            q = tl.exp((x - hi32) - lo32)
            g = q * qf32
            if MODE == 0:  # listed lanes are replaced below; the clamp only avoids overflow there
                g = g - tl.exp(tl.minimum((x - thi) + tlo, 80.0))
            g = g * gs
            b = tl.minimum(start // BLOCK, nb)
            for s in range(tl.load(bnd + b), tl.load(bnd + tl.minimum(b + 1, nb))):
                sid_s = tl.load(sid_ptr + slots + s)
                here = cols == sid_s
                if MODE == 2:
                    g = tl.where(here, g - (tl.load(sw_ptr + slots + s) * gs), g)
                elif CAT >= 0:  # qg_c − Q_c H
                    a_s = (tl.load(s_row + sid_s, mask=v_in > 0, other=NEG_INF).to(tl.float32) * inv_t).to(tl.float64)
                    lq_s = tl.where(a_s > NEG_INF, tl.where(a_s > NEG_INF, a_s, 0.0) - lse_c, NEG_INF)
                    lp_s = tl.load(slp_ptr + slots + s).to(tl.float64) - ln_mass
                    # (named results: a loop-carried `_` would change type between the calls)
                    t_c, qg_s, d_c = _category_terms(lq_s, lp_s, c1, c2, w, CAT)
                    g = tl.where(here, ((qg_s.to(tl.float64) - tl.exp(lq_s) * h_sum) * gs).to(tl.float32), g)
                else:
                    t_s = tl.exp(tl.load(slp_ptr + slots + s).to(tl.float64)) * inv_mass
                    g = tl.where(here, ((q.to(tl.float64) * q_factor - t_s) * gs).to(tl.float32), g)
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=cols < V_full)


def _sorted_slots(ids: torch.Tensor, lp: torch.Tensor, w: Optional[torch.Tensor], v: int, sampled: bool,
                  block: int):
    """Slots sorted by id per row (listed first, then unused, then invalid), their log-probs and
    weights in that order (float32, contiguous), and ``bounds [N, nb + 1]``: for block ``b`` the
    listed slots with ids in ``[b·block, (b+1)·block)`` are ``bounds[b] .. bounds[b+1]``
    (``bounds[nb]`` = the number of listed slots)."""
    ids = ids.to(torch.int64)
    in_range = (ids >= 0) & (ids < v)
    bad = (ids < -1) | (ids >= v)
    if sampled:
        w_ok = torch.isfinite(w) & (w >= 0)
        bad = bad | (in_range & ~w_ok)
        in_range = in_range & w_ok & (w > 0)
    key = torch.where(in_range, ids, torch.where(bad, _INVALID.value, _UNUSED.value))
    sids, perm = torch.sort(key, dim=1)
    slp = lp.gather(1, perm).to(torch.float32).contiguous()
    sw = None if w is None else w.gather(1, perm).to(torch.float32).contiguous()
    nb = triton.cdiv(v, block)
    edges = (torch.arange(nb + 1, device=ids.device, dtype=torch.int64) * block).clamp_(max=v)
    bounds = torch.searchsorted(sids, edges.expand(ids.shape[0], nb + 1).contiguous())
    return sids.contiguous(), slp, sw, bounds, nb


def _f32(x: float) -> float:
    return float(np.float32(x))


def _category(mode: str, loss: str, param: float):
    """``(CAT, ln β, ln(1−β), β)`` of ``loss`` in ``mode`` (kdfast-core ``CatLoss::new``): jsd at
    β ∈ {0, 1} is forward / reverse KL over the same categories (forward over the bucket's
    categories is sparse_kl's, CAT −1); sampled targets take forward KL only."""
    if loss not in _CATS:
        raise ValueError(f"loss: expected one of {', '.join(map(repr, _CATS))}, got {loss!r}")
    if loss == "jsd" and not 0.0 <= param <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1], got {param!r}")
    if mode == "sampled" and loss != "forward_kl":
        raise ValueError(f"loss: sampled targets support only 'forward_kl' (the one unbiased estimate), got {loss!r}")
    if loss == "jsd" and param in (0.0, 1.0):
        loss = "forward_kl" if param == 0.0 else "reverse_kl"
        if loss == "forward_kl" and mode == "renorm":
            return _CATS["forward_kl"], 0.0, 0.0, 0.0
    if loss == "forward_kl":
        return -1, 0.0, 0.0, 0.0
    if loss == "jsd":
        return _CATS["jsd"], math.log(param), math.log1p(-param), param
    return _CATS[loss], 0.0, 0.0, 0.0


def sparse_call(mode: str, s2: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, w: Optional[torch.Tensor],
                tail: Optional[torch.Tensor], labels: Optional[torch.Tensor], ignore_index: int,
                temperature: float, t2_scale: bool, grad_scale: Union[float, torch.Tensor],
                rows: torch.Tensor, grad: Optional[torch.Tensor], loss: str = "forward_kl",
                param: float = 0.0) -> None:
    """Per-row losses into ``rows`` (float32 ``[N]``, times T² when ``t2_scale``) and, when
    ``grad`` (``[N, V']``, ``V' ≥ V``, unit column stride) is given, ``grad_scale · ∂ℓ_r/∂z_s``
    into it in its dtype (zero beyond V, in rows whose label is ``ignore_index``, in
    renormalised rows without teacher mass and in ``+inf`` rows).

    The semantics of :func:`kdfast._native.sparse_call` on CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``): ``mode`` ``"bucket"``, ``"renorm"`` or ``"sampled"``; ``loss``
    ``"forward_kl"`` or (top-k) ``"reverse_kl"``, ``"jsd"`` (``param`` = β), ``"tvd"``; ``s2``
    ``[N, V]`` student logits (any row stride); ``ids`` integer ``[N, k]``; ``lp``, ``w``
    (sampled only, else None) float ``[N, k]``; ``tail`` ``[N]`` or None (bucket); ``labels``
    ``[N]`` or None. ``grad_scale`` is a float or a one-element float tensor on the device (read
    by the kernel: no host sync). ``grad`` may alias ``s2`` (in place). Invalid targets give NaN
    rows (see the module docstring) instead of raising.
    """
    n, v = s2.shape
    if n == 0:
        return
    if mode not in MODES:
        raise ValueError(f"mode: expected 'bucket', 'renorm' or 'sampled', got {mode!r}")
    cat, c1, c2, beta = _category(mode, loss, param)
    if grad is not None and (grad.dim() != 2 or grad.shape[0] != n or grad.shape[1] < v
                             or (grad.shape[1] > 1 and grad.stride(1) != 1)):
        raise ValueError(f"grad: expected [{n}, >= {v}] with unit column stride, got shape "
                         f"{tuple(grad.shape)} strides {grad.stride()}")
    if grad is None or grad.data_ptr() != s2.data_ptr():
        s2 = unit_columns(s2)  # a copy would break the aliasing, which needs unit strides anyway
    k = ids.shape[1]
    block, warps = block_and_warps(v)
    sampled = mode == "sampled"
    sids, slp, sw, bounds, nb = _sorted_slots(ids, lp, w if sampled else None, v, sampled, block)
    has_tail = mode == "bucket" and tail is not None
    has_labels = labels is not None  # ignore_index is an int64 (checked by the caller)
    gs_is_tensor = isinstance(grad_scale, torch.Tensor)
    t32 = np.float32(temperature)
    loss_scale = t32 * t32 if t2_scale else np.float32(1.0)
    _sparse_kernel[(n,)](
        s2, sids, slp, slp if sw is None else sw, bounds,
        tail.to(torch.float32).contiguous() if has_tail else rows,
        labels.to(torch.int64).contiguous() if has_labels else rows,
        rows, s2 if grad is None else grad,
        grad_scale.reshape(1).to(torch.float32) if gs_is_tensor else rows,
        s2.stride(0), 0 if grad is None else grad.stride(0), v, v if grad is None else grad.shape[1], k, nb,
        int(ignore_index) if has_labels else 0,
        _f32(np.float32(1.0) / t32), float(loss_scale), 1.0 if gs_is_tensor else float(grad_scale),
        _f32(loss_scale / t32), c1, c2, beta,
        MODE=MODES[mode], CAT=cat, LISTED_LSE=mode == "bucket" or cat >= 0, HAS_TAIL=has_tail,
        HAS_LABELS=has_labels, NEED_GRAD=grad is not None, GS_PTR=gs_is_tensor,
        KC=min(max(16, triton.next_power_of_2(k)), 1024), BLOCK=block, num_warps=warps,
    )
