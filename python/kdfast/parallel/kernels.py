"""Vocabulary-parallel dense losses on CPU slices with the Rust kernels (kdfast-core ``dense::slice``).

With ``a = s / T``, ``b`` the loss's teacher over ``T`` (TAID: its mixture) and the whole row's
maxima ``M`` and sums ``Z = Σ e^(· − M)``, every per-element term of a loss is known on a
slice (``log q = a − M_a − ln Z_a``, ``d = log q − log p`` from the shifted logits), so::

    ℓ = Σ_ranks Σ_slice t_i,      S = Σ_ranks Σ_slice q_i h_i,      ∂ℓ/∂a = q h − q S

(:mod:`kdfast.divergence`'s deviation form; forward KL and TAID: ``∂ℓ/∂a = q − p``). A rank runs
step 1 (its slice's ``(max, Σ e)`` of ``a``, ``t / T`` and, for TAID, ``b``), one all-gather of
those 4 (TAID: 6) floats per row merges them on every rank; step 2 gives its slice's
``(Σ t, Σ q h)`` (forward KL and TAID: the gradient too), one all-reduce completes them; step 3
(the other losses) writes the gradient from the whole row's ``S``. Backward scales the saved
gradient by the upstream gradient of each row (the same on every rank): no collective. A row
whose loss is ``+inf`` gets a zero gradient row, as in the kernels. AKL's head needs a search
over the ranks (:mod:`.akl`): it stays on the PyTorch path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native
from .._buffers import gradient
from .collectives import check_lse_rows, gathered_lse, gathered_softmax, require_vocabulary, world

#: The losses of :mod:`.dense` that the kernels run (their canonical names).
LOSSES = frozenset({"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid"})


def applies(name: str, student: torch.Tensor, teacher: torch.Tensor) -> bool:
    """Whether the Rust kernels run loss ``name`` on these slices (CPU float32/bfloat16/float16)."""
    return name in LOSSES and all(x.device.type == "cpu" and x.dtype in _native.NATIVE_DTYPES for x in (student, teacher))


class _SlicedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, name, param, temperature, group):
        s2, t2 = _native.as_rows(student.detach()), _native.as_rows(teacher.detach())
        n = s2.shape[0]

        def step(k, **buffers):
            _native.slice_dense(k, name, param, s2, t2, temperature, **buffers)

        stats = torch.zeros(n + 1, 6, dtype=torch.float64)
        step(1, out=stats[:n])
        stats[n, 0] = s2.shape[1]  # the slice's width rides along: 0 on every rank is no vocabulary
        # Only TAID's teacher is a mixture: the others' third pair repeats the second.
        sent = stats if name == "taid" else stats[:, :4].contiguous()
        _, size = world(group)
        everyone = [torch.empty_like(sent) for _ in range(size)]
        dist.all_gather(everyone, sent, group=group)
        ranks = torch.stack(everyone)  # [ranks, N + 1, 6 or 4]
        require_vocabulary(bool(ranks[:, n, 0].amax() > 0), "student_logits")
        ranks = ranks[:, :n]
        if name != "taid":
            ranks = torch.cat([ranks, ranks[..., 2:4]], -1)
        check_lse_rows(gathered_lse(ranks[..., 0:2]), "student_logits")
        check_lse_rows(gathered_lse(ranks[..., 2:4]), "teacher_logits")
        # TAID: a mixture that is -inf everywhere (no id finite in both inputs) is a +inf row.
        dead = gathered_lse(ranks[..., 4:6]) == -torch.inf
        softmax = torch.cat([gathered_softmax(ranks[..., 0:2]), gathered_softmax(ranks[..., 4:6])], 1)
        softmax[dead, 2:] = 0.0
        softmax = softmax.contiguous()
        grad = gradient(tuple(s2.shape), s2.dtype, s2.device) if ctx.needs_input_grad[0] else None
        sums = torch.empty(n, 2, dtype=torch.float64)
        step(2, out=sums, softmax=softmax, grad=grad)
        dist.all_reduce(sums, group=group)
        sums[dead, 0] = torch.inf
        if grad is not None:
            step(3, softmax=softmax, sums=sums, grad=grad)  # zero rows where ℓ = +inf
            ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return sums[:, 0].float()

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows[:, None].to(grad.dtype)).reshape(ctx.shape), None, None, None, None, None


def dense_rows(name: str, param, student: torch.Tensor, teacher: torch.Tensor, temperature: float, group) -> torch.Tensor:
    """Per-row ℓ ``[N]`` of loss ``name`` (one of :data:`LOSSES`) between the local slices
    ``[N, V_local]`` (the whole vocabulary's, the same on every rank), differentiable w.r.t. the
    student slice."""
    return _SlicedLoss.apply(student, teacher, name, float(param or 0.0), temperature, group)
