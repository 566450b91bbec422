"""The fused linear loss (api.md §3) with the LM heads sharded by vocabulary rows (api.md §6).

Rank r holds rows ``W_r`` ``[V_r, H]`` (bias ``b_r``) of the student's head — contiguous, in
rank order — and the same rows of the teacher's head (or the same columns of the teacher's
logits); the hidden states ``h`` ``[N, H]`` are the same on every rank (replicated). With
``z_r = h W_rᵀ + b_r`` (this rank's columns of the logits) and the whole vocabulary's loss
``L = Σ_n w_n ℓ_n(z_1, …, z_R)``, ``G_r = ∂L/∂z_r`` ``[N, V_r]``::

    ∂L/∂W_r = G_rᵀ h,   ∂L/∂b_r = Σ_n G_r,   ∂L/∂h = Σ_r G_r W_r

The last is the complete gradient of ``h`` (the ranks' partial products added by one
all-reduce of ``[N, H]``, in backward), the same on every rank.

Rows go in chunks of C tokens, so peak memory is O(C · V_r): for each chunk the student's
local logits (float32, :func:`kdfast._head.logits_f32`; float64 for float64 inputs), the
chunk's whole-vocabulary rows ℓ by :func:`.dense.dense_rows` or :func:`.sparse.sparse_rows`
(PyTorch autograd on the slice, the collectives of those modules), ``G_r`` of that chunk by
``torch.autograd.grad``, and at once its part of the three gradients. With ``reduction="none"``
the row weights are only known in backward, which recomputes the chunks instead.

Every rank must make the same calls with the same ``h``, ``labels`` and targets, and the
upstream gradient of the loss must be the same on every rank (as for every loss of
:mod:`kdfast.parallel`). Eager only: the chunk loop reads row masks on the host and runs
collectives, so it is not traceable by ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .. import reference_sparse as ref_sparse
from .._head import float_copy, logits_f32, mm_f32
from .collectives import slice_sizes, world
from .dense import dense_rows
from .sparse import sparse_rows

Tensor = torch.Tensor


@dataclasses.dataclass
class Plan:
    """What one sharded fused call computes, besides the student's head.

    ``teacher``: ``(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, ids, logprobs,
    sample_weights, tail)`` (the teacher's form, the rest None; heads and logits local, target
    ids global); ``spec``: ``(loss, mode, param, temperature, t2_scale, ignore_index)``;
    ``vocab``: how many local head rows take part (a global ``vocab_size`` cuts the padding);
    ``offset``, ``total``: where the slice starts and the whole vocabulary's size."""

    teacher: tuple
    labels: Optional[Tensor]
    spec: tuple
    vocab: int
    chunk: int
    offset: int
    total: int
    group: object


def head_slices(group, student: int, teacher: int, device) -> Tuple[int, int, int]:
    """``(offset, total, widest)`` of this rank's ``student`` head rows in the whole vocabulary
    (``widest``: the largest slice, which sizes the chunks every rank must share), in one
    all-reduce; the teacher's ``teacher`` rows (or logit columns) must match on every rank. Both
    rules raise ``ValueError`` on every rank together (a rank's slice may be empty)."""
    sizes = slice_sizes(group, device, "student_weight", student, teacher)
    bad = (sizes[0] != sizes[1]).nonzero()
    if bad.numel():
        r = int(bad[0])
        raise ValueError(f"process_group: the student's and the teacher's slices of the vocabulary must match; "
                         f"rank {r} holds {int(sizes[0, r])} student head rows and {int(sizes[1, r])} of the teacher")
    rank, _ = world(group)
    return int(sizes[0, :rank].sum()), int(sizes[0].sum()), int(sizes[0].max())


def fused_loss(h: Tensor, w: Tensor, b: Optional[Tensor], row_weight: Tensor, plan: Plan, reduce: bool) -> Tensor:
    """``L = Σ_n row_weight · ℓ_n`` (0-d) when ``reduce``, else the rows ℓ ``[N]`` (masked rows
    0), of the whole vocabulary; differentiable w.r.t. ``h`` ``[N, H]``, ``w`` ``[V_r, H]`` and
    ``b`` (see the module docstring)."""
    if plan.spec[1]:  # sparse targets: the kernels' value checks, once (the same on every rank)
        _, _, _, _, ids, lp, sw, tail = plan.teacher
        ref_sparse.check_target_values(ids, lp, sw, tail, plan.spec[1])
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad,
             grad_on and b is not None and b.requires_grad)
    return _ShardedFused.apply(h, w, b, row_weight, plan, reduce, needs)


class _ShardedFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, row_weight, plan: Plan, reduce: bool, needs):
        ctx.plan, ctx.reduce, ctx.summed = plan, reduce, False
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        if reduce:  # the row weights are known: the gradients now, backward only scales them
            rows, g_h, g_w, g_b = _sweep(h, w, b, plan, row_weight, needs)
            ctx.grads = (g_h, g_w, g_b)  # intermediates, not inputs: kept on ctx (summed in place once)
            return (rows * row_weight.to(rows.dtype)).sum()
        rows = _sweep(h, w, b, plan, None, (False, False, False))[0]
        ctx.save_for_backward(h, w, b)
        return rows

    @staticmethod
    def backward(ctx, grad):
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.reduce:
            g_h, g_w, g_b = ctx.grads
            if g_h is not None and needs[0] and not ctx.summed:
                dist.all_reduce(g_h, op=dist.ReduceOp.SUM, group=ctx.plan.group)  # Σ_r G_r W_r
                ctx.summed = True  # (a second backward with retain_graph reuses the sum)
            scaled = [None if g is None or not need else g * grad.to(g.dtype)
                      for g, need in zip((g_h, g_w, g_b), needs)]
        else:
            h, w, b = ctx.saved_tensors
            _, g_h, g_w, g_b = _sweep(h, w, b, ctx.plan, grad, needs)
            if g_h is not None:
                dist.all_reduce(g_h, op=dist.ReduceOp.SUM, group=ctx.plan.group)
            scaled = [g if need else None for g, need in zip((g_h, g_w, g_b), needs)]
        grads = tuple(None if g is None else g.to(dtype) for g, dtype in zip(scaled, ctx.dtypes))
        return grads + (None, None, None, None)


def _sweep(h: Tensor, w: Tensor, b: Optional[Tensor], plan: Plan, weights: Optional[Tensor], needs
           ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(rows, ∂/∂h partial, ∂/∂w, ∂/∂b)`` of ``Σ_n weights_n ℓ_n`` over the chunks: the rows
    ℓ ``[N]`` always (float32, float64 for float64 inputs); each gradient only where ``needs``
    says so, else None. ``weights`` is 0-d or ``[N]``. The hidden gradient is this rank's
    ``G_r W_r`` (the caller adds the ranks'); the heads' are full-sized, 0 past ``plan.vocab``."""
    need_h, need_w, need_b = needs
    need_grad = need_h or need_w or need_b
    n, v = h.shape[0], plan.vocab
    dt = torch.float64 if torch.float64 in (h.dtype, w.dtype) else torch.float32
    th, tw, tb, tlog, ids, lp, sw, tail = plan.teacher
    w_used, b_used = w[:v], None if b is None else b[:v]
    w_cast = _cast(w_used, dt)
    if tw is not None:
        tw_used, tb_used = tw[:v], None if tb is None else tb[:v]
        tw_cast = _cast(tw_used, dt)
    mask = None if plan.labels is None else plan.labels != plan.spec[5]

    rows_all = torch.zeros(n, dtype=dt, device=h.device)
    g_h = torch.zeros(n, h.shape[1], dtype=dt, device=h.device) if need_h else None
    g_w = torch.zeros(w.shape, dtype=dt, device=w.device) if need_w else None
    g_b = torch.zeros(b.shape, dtype=dt, device=b.device) if need_b else None
    for c0 in range(0, n, plan.chunk):
        c1 = min(n, c0 + plan.chunk)
        sel = slice(c0, c1) if mask is None else (mask[c0:c1].nonzero().squeeze(1) + c0)
        if mask is not None and sel.numel() == 0:  # every rank skips it (labels are replicated)
            continue
        h_c = h[sel]
        z = _head_logits(h_c, w_used, b_used, w_cast, dt).detach().requires_grad_(need_grad)
        if plan.spec[1]:
            teacher = (ids[sel], lp[sel], None if sw is None else sw[sel], None if tail is None else tail[sel])
        elif tlog is not None:
            teacher = tlog[sel, :v]
        else:
            teacher = _head_logits(th[sel], tw_used, tb_used, tw_cast, dt)
        with torch.enable_grad():
            rows = _chunk_rows(z, teacher, plan)
        rows_all[sel] = rows.detach().to(dt)
        del teacher
        if not need_grad:
            continue
        w_c = weights if weights.dim() == 0 else weights[sel]
        if rows.requires_grad:
            (g,) = torch.autograd.grad(rows, z, grad_outputs=w_c.to(rows.dtype).expand(rows.shape))
        else:
            g = torch.zeros_like(z)
        del z, rows
        if need_h:
            g_h[sel] = _times_head(g, w_used, w_cast)
        if need_w:
            g_w[:v].addmm_(g.t(), h_c.to(dt))
        if need_b:
            g_b[:v] += g.sum(0)
        del g
    return rows_all, g_h, g_w, g_b


def _chunk_rows(z: Tensor, teacher, plan: Plan) -> Tensor:
    """The whole vocabulary's ℓ of a chunk's rows from the local student logits ``z``."""
    loss, mode, param, temperature, t2_scale, _ = plan.spec
    if mode:
        ids, lp, sw, tail = teacher
        rows = sparse_rows(z, temperature, plan.offset, plan.total, plan.group, ids, lp, sw, tail, mode, loss, param)
    else:
        rows = dense_rows(loss, param, z, teacher, temperature, plan.group)
    return rows * (temperature * temperature) if t2_scale else rows


def _cast(w: Tensor, dt: torch.dtype) -> Optional[Tensor]:
    """The copy of a head that the matmuls use (None: the head as it is): float64 for float64
    arithmetic, float32 for a half-precision CPU head (:func:`kdfast._head.float_copy`)."""
    if dt == torch.float64:
        return None if w.dtype == torch.float64 else w.double()
    return float_copy(w)


def _head_logits(h: Tensor, w: Tensor, b: Optional[Tensor], w_cast: Optional[Tensor], dt: torch.dtype) -> Tensor:
    if dt == torch.float32:
        return logits_f32(h, w, b, w_cast)
    z = h.double() @ (w if w_cast is None else w_cast).t()
    return z if b is None else z + b.double()


def _times_head(g: Tensor, w: Tensor, w_cast: Optional[Tensor]) -> Tensor:
    """``g @ w`` in ``g``'s dtype (CUDA half precision: float32 out of the head's dtype)."""
    if w_cast is not None:
        return g @ w_cast
    if w.dtype == g.dtype:
        return g @ w
    return mm_f32(g.to(w.dtype), w)
