"""Vocabulary-parallel forward KL on CPU slices with the Rust kernels (kdfast-core ``dense::slice``).

With ``x = s / T``, ``y = t / T`` and the whole row's log-sum-exps ``L_x``, ``L_y``::

    KL(p‖q) = Σ_v p_v (y_v − x_v) − L_y + L_x,      ∂KL/∂s_v = (q_v − p_v) / T

so a rank needs only the global ``L_x``, ``L_y``: pass 1 gives its slice's ``(max, Σ e^(· − max))``
of ``x`` and ``y``, one all-gather of those 4 floats per row merges them on every rank, and
pass 2 gives its slice's ``Σ p (y − x)`` and the gradient of its slice at once, which one
all-reduce of the partial sums completes. Backward scales the saved gradient by the upstream
gradient of each row (the same on every rank): no collective. A row whose KL is ``+inf`` gets a
zero gradient row, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native
from .._buffers import gradient
from .collectives import check_lse_rows, require_vocabulary, world


def applies(student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the Rust kernels read these slices (CPU float32/bfloat16/float16)."""
    return all(x.device.type == "cpu" and x.dtype in _native.NATIVE_DTYPES for x in (student, teacher))


def _merged(stats: torch.Tensor) -> torch.Tensor:
    """``log Σ_r sum_r e^(max_r)`` over the ranks of ``(max, sum)`` pairs ``[ranks, N, 2]``."""
    mx, sm = stats[..., 0], stats[..., 1]
    terms = torch.where(sm == 0, -torch.inf, mx + sm.log())  # a NaN or +inf stays one
    return torch.logsumexp(terms, dim=0)


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        s2, t2 = _native.as_rows(student.detach()), _native.as_rows(teacher.detach())
        n = s2.shape[0]
        stats = torch.zeros(n + 1, 4, dtype=torch.float64)
        _native.slice_forward_kl(1, s2, t2, temperature, stats[:n])
        stats[n, 0] = s2.shape[1]  # the slice's width rides along: 0 on every rank is no vocabulary
        _, size = world(group)
        everyone = [torch.empty_like(stats) for _ in range(size)]
        dist.all_gather(everyone, stats, group=group)
        ranks = torch.stack(everyone)  # [ranks, N + 1, 4]
        require_vocabulary(bool(ranks[:, n, 0].amax() > 0), "student_logits")
        ranks = ranks[:, :n]
        lse = torch.stack([_merged(ranks[..., :2]), _merged(ranks[..., 2:])], 1)  # [N, 2]: L_x, L_y
        check_lse_rows(lse[:, 0], "student_logits")
        check_lse_rows(lse[:, 1], "teacher_logits")
        grad = gradient(tuple(s2.shape), s2.dtype, s2.device) if ctx.needs_input_grad[0] else None
        partial = torch.empty(n, dtype=torch.float64)
        _native.slice_forward_kl(2, s2, t2, temperature, partial, lse=lse.contiguous(), grad=grad)
        dist.all_reduce(partial, group=group)
        rows = partial - lse[:, 1] + lse[:, 0]
        if grad is not None:
            grad[torch.isinf(rows)] = 0  # no finite descent direction
            ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return rows.float()

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows[:, None].to(grad.dtype)).reshape(ctx.shape), None, None, None


def forward_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, group) -> torch.Tensor:
    """Per-row forward KL ``[N]`` of the local slices ``[N, V_local]`` (the whole vocabulary's,
    the same on every rank), differentiable w.r.t. the student slice."""
    return _ForwardKL.apply(student, teacher, temperature, group)
