"""Triton kernels for the dense losses (api.md §1): loss and student gradient, fused.

Notation, per row: ``a = z_s / T``, ``b = z_t / T``, ``lq = log q = a − lse(a)``,
``lp = log p = b − lse(b)``, ``d = lq − lp``. Every loss is ``ℓ = Σ_i t_i`` and its gradient
w.r.t. the student logits is the softmax Jacobian applied to ``g = ∂ℓ/∂q``::

    ∂ℓ/∂z_s,j = (q_j g_j − q_j S) / T,   S = Σ_i q_i g_i

Deviation form: where ``p ≈ q`` the ``g_i`` are nearly one constant and ``g_j − S`` cancels.
With ``g_i = c + h_i`` (``c`` constant), ``g_j − S = h_j − Σ q_i h_i``, so the kernel
accumulates ``q h`` (``h`` small when ``p ≈ q``) instead of ``q g``. Differences come from
``D = p − q = −p·expm1(d)`` (``d ≤ 0``) or ``q·expm1(−d)`` (``d > 0``): the larger side is the
base, so ``D`` is exact where one side is 0 and keeps its relative precision where ``p ≈ q``;
``d`` is formed from the shifted logits, ``(x − y) − (ln Z_a − ln Z_b)`` with ``x = a − M_a``,
``y = b − M_b``, not as ``lq − lp`` (whose rounding, ≈ eps·|ln Z|, the deviation would amplify).

========================  =====================================  ====================================
loss                      t_i                                    q_i h_i
========================  =====================================  ====================================
forward_kl                p (lp − lq)                            −D        (grad (q − p)/T)
reverse_kl                q d                                    q d       (c = 1)
jsd (β)                   β p r_p + (1−β) q r_q                  (1−β) q r_q          (c = 0)
skew_forward_kl (λ)       p r_p                                  −(1−λ)² (q/m) D      (c = −(1−λ))
skew_reverse_kl (λ)       q r_q                                  q r_q + (1−λ)(λq/m) D (c = 1−λ)
tvd                       ½ |q − p|                              ½ q sign(q − p)
akl (μ)                   w_h p (lp − lq) + w_t q d              w_t q d − w_h D      (S = w_t Σ q d)
taid (t)                  p_t (lp_t − lq)                        −D_t      (grad (q − p_t)/T)
========================  =====================================  ====================================

with the mixture log-ratios formed in log space, each by one stable ``logaddexp`` of ``d``
(no ``exp`` that can underflow to 0 and then be divided by, so no NaN when both log-probs are
below −104): for JSD ``m = βp + (1−β)q``, ``r_q = log q − log m = −lae(ln β − d, ln(1−β))``,
``r_p = log p − log m = −lae(ln(1−β) + d, ln β)``; skew forward ``m = λp + (1−λ)q``,
``r_p = −lae(ln λ, ln(1−λ) + d) = −(hi + ln(1 + E))`` with ``E = e^{−|ln λ − ln(1−λ) − d|}``,
and ``q/m = {1 or E} / ((1−λ)(1+E))`` from the same ``E`` (no second ``exp``); skew reverse
``m = λq + (1−λ)p``, ``r_q = −lae(ln λ, ln(1−λ) − d)``, ``λq/m = {E or 1} / (1+E)``. JSD at
β ∈ {0, 1} and the skews at λ = 0 run the plain KLs.

AKL's weights ``w_h = g_H / (g_H + g_T)``, ``w_t = g_T / (g_H + g_T)`` (½ each when both are 0)
are constants for the gradient, with ``g_H``, ``g_T`` the sums of ``|D|`` over the head H and
the rest (float32 lanes, float64 across blocks); H is found by selection (:mod:`.akl`), and a
weight of exactly 0 drops its part, ``+inf`` included. TAID is forward KL against the mixed
teacher ``p_t = softmax(m / T)``, ``m = (1 − t)·z_s + t·z_t`` formed per block in float32 from the
two loaded blocks (``m = z_s`` exactly at t = 0, where ℓ = 0; ``z_t`` at t = 1, forward KL
exactly); a row where ``m`` is ``-inf`` everywhere is ``+inf`` with a zero gradient. AKL's μ and
TAID's t are loaded by the kernel from a one-element device tensor (one compilation for every
value; a tensor ``t`` is never read on the host).

``+inf``: forward KL where the teacher's logit is finite and the student's ``-inf``, reverse KL
where the student's is finite and the teacher's ``-inf`` (decided on the logits, not on
probabilities that may have underflowed) have the row loss ``+inf`` and a zero gradient row (no
finite descent direction; the other rows' update stays finite).

One program per row (int64 row offsets), looping over the vocabulary in blocks of
``BLOCK = min(next_power_of_2(V), 4096)`` columns, all arithmetic in float32:

1. online log-sum-exp of ``a`` and ``b`` (running maximum, rescaled sum); forward KL (and TAID)
   also accumulates ``Σ e^{b−M_b} (b − a)``, so its loss is ``that / Z_b + (M_a − M_b) + ln Z_a − ln Z_b``;
2. (all but forward KL and TAID) the loss ``Σ t_i`` and ``S = Σ q_i g_i``; AKL first runs the
   selection passes of its head (8 at ``NC = 16``, :mod:`.akl`), and sums the gaps here too;
3. (with a gradient) the write pass ``(q g − q S) · grad_scale · (T² if t2_scale) / T``
   (forward KL: ``(q − p) · ...``), zero in masked rows and in columns ``vocab..V_full``.

AKL runs blocks of at most 1024 columns and one warp per 64 of them (its selection compares a
block with ``NC`` candidates at once), without fused multiply-adds (every pass must compute the
same ``p``, bit for bit).

Only the last pass writes, and it reads each block before writing it, so the gradient may
alias the student logits (the fused-linear path overwrites its float32 logits chunk).

Every element with zero probability (``-inf`` logits, out-of-range lanes, underflow) gives
exactly 0: products ``x · y`` where ``x`` may be 0 and ``y`` infinite select ``y → 0`` *before*
multiplying, and ``-inf − -inf`` is never formed, so the kernels raise no floating-point
warnings under the Triton interpreter either. A row without a finite logit (or with +inf/NaN)
has no softmax: it gives NaN here (the Rust kernel raises instead; this one cannot without a
host sync).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._registry import LOSSES
from ..reference import HEAD_TOLERANCE
from .akl import head_level, head_mask
from .launch import block_and_warps, unit_columns
from .rowmath import lae, load_pair, log1p_small, log_probs, p_minus_q, xmul

__all__ = ["dense_call", "scale_grad_"]

# The kernels' KIND is the registry's kernel_id: 0 forward_kl, 1 reverse_kl, 2 jsd,
# 3 skew_forward_kl, 4 skew_reverse_kl, 5 tvd, 6 akl, 7 taid.
_KINDS = {name: spec.kernel_id for name, spec in LOSSES.items() if "triton" in spec.backends}
_MIXTURES = (_KINDS["jsd"], _KINDS["skew_forward_kl"], _KINDS["skew_reverse_kl"])
_AKL, _TAID = _KINDS["akl"], _KINDS["taid"]
#: AKL's widest block (its selection compares a block with NC candidates at once) and NC.
_AKL_BLOCK, _AKL_NC = 1024, 16


@triton.jit
def _terms(lq, lp, d, c1, c2, w, KIND: tl.constexpr):
    """Per element: loss term ``t``, ``q h`` and ``q`` (see the module docstring).
    ``c1, c2, w`` are ``ln θ, ln(1−θ), θ`` for θ = β or λ."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if KIND == 1:  # reverse KL; d = +inf (student alive, teacher -inf) makes the row +inf
        mism = d == float("inf")
        t = tl.where(mism, float("inf"), xmul(q, d))
        qg = xmul(q, tl.where(mism, 0.0, d))
    elif KIND == 2:  # JSD
        rq = -lae(c1 - d, c2)
        rp = -lae(c2 + d, c1)
        tq = xmul(q, rq)
        t = w * xmul(p, rp) + (1.0 - w) * tq
        qg = (1.0 - w) * tq
    elif KIND == 3:  # skew forward KL: lae(ln λ, y) with y = ln(1−λ) + d
        y = c2 + d
        y_hi = y >= c1
        hi = tl.where(y_hi, y, c1)
        e = tl.exp(tl.where(y_hi, c1, y) - hi)
        rp = -(hi + log1p_small(e))
        t = xmul(p, rp)
        q_over_m = tl.where(y_hi, 1.0, e) / ((1.0 - w) * (1.0 + e))
        qg = -((1.0 - w) * (1.0 - w)) * q_over_m * p_minus_q(d, q, p)
    elif KIND == 4:  # skew reverse KL: lae(ln λ, y) with y = ln(1−λ) − d
        y = c2 - d
        y_hi = y >= c1
        hi = tl.where(y_hi, y, c1)
        e = tl.exp(tl.where(y_hi, c1, y) - hi)
        rq = -(hi + log1p_small(e))
        t = xmul(q, rq)
        lam_q_over_m = tl.where(y_hi, e, 1.0) / (1.0 + e)
        qg = t + (1.0 - w) * lam_q_over_m * p_minus_q(d, q, p)
    else:  # TVD
        diff = q - p
        t = 0.5 * tl.abs(diff)
        qg = tl.where(diff > 0.0, 0.5 * q, tl.where(diff < 0.0, -0.5 * q, 0.0))
    return t, qg, q


# The per-element math, shared with :mod:`.sparse` (its category losses).
terms = _terms


@triton.jit
def _dense_kernel(
    s_ptr, t_ptr, labels_ptr, rows_ptr, grad_ptr, gs_ptr, par_ptr,
    s_stride, t_stride, g_stride,
    V, V_full, ignore_index,
    inv_t, loss_scale, gs_val, c1, c2, w,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, NEED_GRAD: tl.constexpr, GS_PTR: tl.constexpr,
    BLOCK: tl.constexpr, NC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_row = grad_ptr + row * g_stride
    offs = tl.arange(0, BLOCK)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row) != ignore_index
    tm = 0.0
    if KIND == 7:  # TAID's t, read on the device
        tm = tl.load(par_ptr).to(tl.float32)
    loss = 0.0
    zero_from = 0
    if keep:
        # Pass 1: online log-sum-exp of a = z_s/T and b = z_t/T (TAID: b = m/T; forward KL and
        # TAID: their loss too).
        ma = float("-inf")
        mb = float("-inf")
        za = 0.0
        zb = 0.0
        kl = 0.0
        n_inf = 0
        for start in range(0, V, BLOCK):
            cols = start + offs
            msk = cols < V
            a, b = load_pair(s_row, t_row, cols, msk, inv_t, tm, KIND == 7)
            if KIND == 0 or KIND == 7:  # +inf: the teacher alive where the student's logit is -inf
                n_inf += tl.sum(((a == float("-inf")) & (b != float("-inf"))).to(tl.int32), 0)
            ma_new = tl.maximum(ma, tl.max(a, 0))
            mb_new = tl.maximum(mb, tl.max(b, 0))
            # While everything seen is -inf, shift by 0 instead (no -inf − -inf).
            sha = tl.where(ma_new == float("-inf"), 0.0, ma_new)
            shb = tl.where(mb_new == float("-inf"), 0.0, mb_new)
            rb = tl.exp(mb - shb)
            eb = tl.exp(b - shb)
            za = za * tl.exp(ma - sha) + tl.sum(tl.exp(a - sha), 0)
            zb = zb * rb + tl.sum(eb, 0)
            if KIND == 0 or KIND == 7:
                live = eb > 0.0
                diff = tl.where(live, b, 0.0) - tl.where(live, a, 0.0)
                kl = xmul(rb, kl) + tl.sum(eb * diff, 0)
            ma = ma_new
            mb = mb_new
        if KIND == 7:  # no id finite on both sides (0 < t < 1): loss +inf, gradient 0
            dead = mb == float("-inf")
            n_inf += dead.to(tl.int32)
            mb = tl.where(dead, 0.0, mb)  # (finite stand-ins: no log 0, no -inf − -inf)
            zb = tl.where(dead, 1.0, zb)
        ln_za = tl.log(za)
        ln_zb = tl.log(zb)
        # ln Z_a − ln Z_b as one log of a ratio: its rounding is a few eps, not eps·|ln Z|.
        cz = tl.log(za / zb)
        gs = gs_val
        if GS_PTR:
            gs = tl.load(gs_ptr).to(tl.float32)
        gs = gs * loss_scale * inv_t

        if KIND == 0 or KIND == 7:
            loss = kl / zb + ((ma - mb) + (ln_za - ln_zb))
            loss = tl.where(n_inf > 0, float("inf"), loss)
            gs = tl.where(n_inf > 0, 0.0, gs)
            if NEED_GRAD:  # (q − p) · gs = −D · gs
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    msk = cols < V
                    lq, lp, d = log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, KIND == 7)
                    g = -p_minus_q(d, tl.exp(lq), tl.exp(lp)) * gs
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=msk)
        elif KIND == 6:
            # Passes 2…: AKL's head by selection (kdfast._triton.akl), then its loss parts,
            # S = Σ q d and the gaps |D| (f32 lanes, f64 across blocks) in one pass.
            u, n_ties = head_level(t_row, V, inv_t, mb, ln_zb, tl.load(par_ptr), BLOCK, NC)
            acc_f = tl.zeros([BLOCK], dtype=tl.float32)
            acc_r = tl.zeros([BLOCK], dtype=tl.float32)
            acc_s = tl.zeros([BLOCK], dtype=tl.float32)
            g_h = tl.zeros([], dtype=tl.float64)
            g_t = tl.zeros([], dtype=tl.float64)
            ties = 0
            for start in range(0, V, BLOCK):
                cols = start + offs
                msk = cols < V
                lq, lp, d = log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, False)
                q = tl.exp(lq)
                p = tl.exp(lp)
                head, ties = head_mask(p, msk, u, n_ties, ties)
                gap = tl.abs(p_minus_q(d, q, p))
                g_h += tl.sum(tl.where(head, gap, 0.0), 0).to(tl.float64)
                g_t += tl.sum(tl.where(head, 0.0, gap), 0).to(tl.float64)
                rev = d == float("inf")  # the student alive where the teacher is -inf
                acc_f += tl.where(d == float("-inf"), float("inf"), xmul(p, -d))
                acc_r += tl.where(rev, float("inf"), xmul(q, d))
                acc_s += xmul(q, tl.where(rev, 0.0, d))
            total = g_h + g_t
            some = total > 0.0
            w_h = tl.where(some, g_h / tl.where(some, total, 1.0), 0.5).to(tl.float32)
            w_t = tl.where(some, g_t / tl.where(some, total, 1.0), 0.5).to(tl.float32)
            # A weight of exactly 0 takes its part out, +inf included.
            loss = xmul(w_h, tl.sum(acc_f, 0)) + xmul(w_t, tl.sum(acc_r, 0))
            if NEED_GRAD:  # w_h (q − p) + w_t q (d − S); a +inf row gets 0
                s_sum = w_t * tl.sum(acc_s, 0)
                gs = tl.where(loss == float("inf"), 0.0, gs)
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    msk = cols < V
                    lq, lp, d = log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, False)
                    q = tl.exp(lq)
                    qd = xmul(q, tl.where(d == float("inf"), 0.0, d))
                    g = (w_t * qd - w_h * p_minus_q(d, q, tl.exp(lp)) - q * s_sum) * gs
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=msk)
        else:
            # Pass 2: the loss and S = Σ q g.
            acc_t = tl.zeros([BLOCK], dtype=tl.float32)
            acc_s = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                msk = cols < V
                lq, lp, d = log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, False)
                t, qg, q = _terms(lq, lp, d, c1, c2, w, KIND)
                acc_t += t
                acc_s += qg
            loss = tl.sum(acc_t, 0)
            if NEED_GRAD:  # Pass 3: (q h − q Σ q h) · gs; a +inf row gets 0
                s_sum = tl.sum(acc_s, 0)
                gs = tl.where(loss == float("inf"), 0.0, gs)
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    msk = cols < V
                    lq, lp, d = log_probs(s_row, t_row, cols, msk, inv_t, tm, ma, ln_za, mb, ln_zb, cz, False)
                    t, qg, q = _terms(lq, lp, d, c1, c2, w, KIND)
                    g = (qg - q * s_sum) * gs
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=msk)
        loss = loss * loss_scale
        zero_from = V
    tl.store(rows_ptr + row, loss)
    if NEED_GRAD:  # masked rows, and the padded columns V..V_full
        for start in range(zero_from, V_full, BLOCK):
            cols = start + offs
            tl.store(g_row + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < V_full)


@triton.jit
def _scale_kernel(g_ptr, f_ptr, f_stride, V, BLOCK: tl.constexpr):
    """``g[r, :] *= f[r · f_stride]`` (``f_stride = 0``: one scalar), skipped where f = 1."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(f_ptr + row * f_stride).to(tl.float32)
    if f != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        msk = cols < V
        ptr = g_ptr + row * V + cols
        x = tl.load(ptr, mask=msk, other=0.0).to(tl.float32)
        tl.store(ptr, (x * f).to(g_ptr.dtype.element_ty), mask=msk)


def _kind(loss: str, param) -> tuple:
    """The kernel variant, ``(ln θ, ln(1−θ), θ)`` and the parameter the kernel loads (AKL's μ,
    TAID's t; else None); parameter edges run the loss they are (the registry's ``edges``). A
    tensor parameter of AKL or TAID is never read on the host."""
    if loss not in _KINDS:
        raise ValueError(f"loss: expected one of {', '.join(_KINDS)}, got {loss!r}")
    if isinstance(param, torch.Tensor) and _KINDS[loss] in (_AKL, _TAID):
        return _KINDS[loss], 0.0, 0.0, 0.0, param
    spec, param = LOSSES[loss].canonical(float(param))
    kind = _KINDS[spec.name]
    if kind in _MIXTURES:
        return kind, math.log(param), math.log1p(-param), param, None
    return kind, 0.0, 0.0, 0.0, param if kind in (_AKL, _TAID) else None


def _device_param(kind: int, param, device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
    """The one-element tensor the kernel loads the parameter from, made on the device from a
    float or a tensor (no host sync), so that one compiled kernel serves every value: for AKL
    the float64 bound ``μ + HEAD_TOLERANCE`` of its head's cumulative masses (the reference's
    rule), for TAID the float32 ``t``."""
    if param is None:
        return dummy
    dtype = torch.float64 if kind == _AKL else torch.float32
    if isinstance(param, torch.Tensor):
        value = param.detach().reshape(1).to(device=device, dtype=dtype)
    else:
        value = torch.full((1,), float(param), dtype=dtype, device=device)
    return value + HEAD_TOLERANCE if kind == _AKL else value


def dense_call(loss: str, param: float | torch.Tensor, s2: torch.Tensor, t2: torch.Tensor, labels: torch.Tensor | None,
               ignore_index: int, temperature: float, t2_scale: bool, grad_scale: float | torch.Tensor,
               rows: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Per-row losses into ``rows`` (float32 ``[N]``, times T² when ``t2_scale``) and, when
    ``grad`` (``[N, V_full]``, ``V_full ≥ vocab``) is given, ``grad_scale · ∂ℓ_r/∂z_s`` into it
    in its dtype (zero beyond ``vocab`` and in rows whose label is ``ignore_index``).

    The semantics of :func:`kdfast._native.dense_call`, on CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``). ``s2``/``t2`` are ``[N, vocab]`` views with any row stride;
    ``grad_scale`` is a float or a one-element tensor on the device (read by the kernel: no
    host sync), and so is ``param`` for ``taid`` (and ``akl``). ``grad`` may alias ``s2``.
    """
    n, v = s2.shape
    if n == 0:
        return
    s2, t2 = unit_columns(s2), unit_columns(t2)
    kind, c1, c2, w, param = _kind(loss, param)
    has_labels = labels is not None  # ignore_index is an int64 (checked by the caller)
    labels = labels.contiguous() if has_labels else rows
    if isinstance(grad_scale, torch.Tensor):
        gs_ptr, gs_val = grad_scale.reshape(1).to(torch.float32), 1.0
    else:
        gs_ptr, gs_val = rows, float(grad_scale)
    if grad is not None:
        if grad.dim() != 2 or grad.shape[0] != n or grad.shape[1] < v or (grad.shape[1] > 1 and grad.stride(1) != 1):
            raise ValueError(f"grad: expected [{n}, >= {v}] with unit column stride, got shape "
                             f"{tuple(grad.shape)} strides {grad.stride()}")
        g, g_stride, v_full = grad, grad.stride(0), grad.shape[1]
    else:
        g, g_stride, v_full = rows, 0, v
    t = float(temperature)
    block, warps = block_and_warps(v)
    if kind == _AKL:  # its selection compares [BLOCK, NC]: 32 of those lanes per thread
        block = min(block, _AKL_BLOCK)
        warps = max(1, block * _AKL_NC // 1024)
    _dense_kernel[(n,)](
        s2, t2, labels, rows, g, gs_ptr, _device_param(kind, param, s2.device, rows),
        s2.stride(0), t2.stride(0), g_stride,
        v, v_full, int(ignore_index) if has_labels else 0,
        1.0 / t, t * t if t2_scale else 1.0, gs_val, c1, c2, w,
        KIND=kind, HAS_LABELS=has_labels, NEED_GRAD=grad is not None,
        GS_PTR=isinstance(grad_scale, torch.Tensor), BLOCK=block, NC=_AKL_NC, num_warps=warps,
        # AKL: no fused multiply-adds, so every pass computes the same p bit for bit.
        enable_fp_fusion=kind != _AKL,
    )


def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place, ``grad [N, V] *= factor``: per row (``factor`` has N elements) or by one scalar
    (one element; nothing is done when it is exactly 1). The factor is read by the kernel, so
    backward makes no host sync. ``grad`` must be contiguous."""
    n = grad.shape[0]
    v = grad.numel() // n if n else 0
    if n == 0 or v == 0:
        return grad
    f = factor.reshape(-1)
    stride = 0 if f.numel() == 1 else f.stride(0)
    block, warps = block_and_warps(v)
    _scale_kernel[(n, triton.cdiv(v, block))](grad, f, stride, v, BLOCK=block, num_warps=warps)
    # Written behind autograd's back: record it, so that a saved ``grad`` cannot be reused.
    torch.autograd.graph.increment_version(grad)
    return grad
