"""Dense (full-vocabulary) distillation losses, api.md §1.

For one row, with ``q = softmax(z_s / T)`` (student) and ``p = softmax(z_t / T)`` (teacher):

============================  ===============================================================
``forward_kl``                ``KL(p‖q) = Σ p (log p − log q)``
``reverse_kl``                ``KL(q‖p)``
``jsd`` (β = 0.5)             ``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = βp + (1−β)q``; exactly
                              ``forward_kl`` at β = 0 and ``reverse_kl`` at β = 1
``skew_forward_kl`` (λ=0.1)   ``KL(p ‖ λp + (1−λ)q)``
``skew_reverse_kl`` (λ=0.1)   ``KL(q ‖ λq + (1−λ)p)``
``tvd``                       ``½ Σ |p − q|``
============================  ===============================================================

On CPU (``backend="rust"``) the loss and its gradient w.r.t. the student logits are computed
together in the forward call by the Rust kernels, on CUDA (``backend="triton"``) by the Triton
kernels of :mod:`kdfast._triton.dense`; backward only scales that gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _native, _triton, reference
from ._validate import (
    DtypeError,
    Pair,
    check_backend,
    check_int,
    check_num_items,
    check_pair,
    check_real,
    check_reduction,
    check_temperature,
    reduce_scale,
    reduce_scale_on_device,
)

__all__ = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


def finish_fused_forward(ctx, student, rows, grad, lead_shape, reduce_scale):
    """The end of a fused kernel's autograd ``forward``: save the gradient (None without one)
    for backward, and return the per-row losses (``reduce_scale`` None) or their reduction."""
    ctx.per_row = reduce_scale is None
    ctx.student_shape = student.shape
    if grad is not None:
        ctx.save_for_backward(grad)
    if reduce_scale is None:
        return rows.reshape(lead_shape)
    return rows.sum() * reduce_scale


class _RustDense(torch.autograd.Function):
    """Loss rows from the Rust kernel; the gradient is produced in forward and saved."""

    @staticmethod
    def forward(ctx, student, pair: Pair, spec: tuple, ignore_index: int, reduce_scale):
        loss, param, temperature, t2_scale = spec
        s2, t2 = _native.as_rows(pair.s2), _native.as_rows(pair.t2)
        n, v_full = s2.shape[0], student.shape[-1]
        rows = torch.empty(n, dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        # Sum/mean: fold the reduction's 1/D into the gradient now, so backward is a no-op
        # for the usual grad_output of 1. "none": scaled per row in backward.
        grad_scale = 1.0 if reduce_scale is None else reduce_scale
        grad = torch.empty((n, v_full), dtype=student.dtype) if need_grad else None
        _native.dense_call(
            loss, param, s2, t2, pair.labels, ignore_index, temperature, t2_scale, grad_scale, rows, grad
        )
        return finish_fused_forward(ctx, student, rows, grad, pair.lead_shape, reduce_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return fused_backward(ctx, grad_out, _scale_on_cpu)


def _scale_on_cpu(grad, grad_out, per_row):
    if per_row:
        grad.mul_(grad_out.reshape(-1, 1))
    elif bool(grad_out != 1):
        grad.mul_(grad_out)


def fused_backward(ctx, grad_out, scale):
    """The backward of a fused kernel's Function (inputs ``student`` and four non-tensors):
    the saved gradient, scaled in place by ``scale(grad, grad_out, per_row)``. In place: a
    second backward through a retained graph fails torch's saved-tensor version check with a
    clear error instead of using a scaled gradient twice."""
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale(grad, grad_out, ctx.per_row)
    return grad.reshape(ctx.student_shape), None, None, None, None


def _resolve_backend(backend: str, pair: Pair) -> str:
    s, t = pair.s2, pair.t2
    on_cpu = s.device.type == "cpu"
    native_dtypes = s.dtype in _native.NATIVE_DTYPES and t.dtype in _native.NATIVE_DTYPES
    if backend == "auto":
        return _triton.auto_backend(s.device) if native_dtypes else "torch"
    if backend == "rust" and not on_cpu:
        raise ValueError(f"backend: 'rust' runs on CPU tensors, got tensors on {s.device}; use backend='auto'")
    if backend == "triton":
        _triton.check_usable(s.device)
    if backend in ("rust", "triton") and not native_dtypes:
        raise DtypeError(
            f"backend: {backend!r} supports float32, bfloat16 and float16 logits, got {s.dtype} and {t.dtype}; "
            f"use backend='torch' for float64"
        )
    return backend


def _dense(
    loss: str,
    param: float,
    student_logits,
    teacher_logits,
    *,
    temperature,
    t2_scale,
    labels,
    ignore_index,
    reduction,
    num_items_in_batch,
    vocab_size,
    backend,
) -> torch.Tensor:
    t = check_temperature(temperature)
    reduction = check_reduction(reduction)
    backend = check_backend(backend)
    ignore_index = check_int(ignore_index, "ignore_index")
    if not isinstance(t2_scale, (bool, int)):
        raise TypeError(f"t2_scale: expected a bool, got {type(t2_scale).__name__}")
    pair = check_pair(student_logits, teacher_logits, vocab_size=vocab_size, labels=labels)
    backend = _resolve_backend(backend, pair)
    out_dtype = torch.float64 if torch.float64 in (pair.s2.dtype, pair.t2.dtype) else torch.float32
    n = pair.s2.shape[0]

    if n == 0:
        # Still connected to the graph, so backward gives a (empty) zero gradient.
        zeros = pair.student.to(out_dtype).sum(-1) * 0.0
        return zeros if reduction == "none" else zeros.sum()

    if _compiling():
        return _dense_traced(loss, param, pair, t, bool(t2_scale), ignore_index, reduction,
                             num_items_in_batch, backend)
    if backend == "triton":
        # No host sync: 1/D may stay a tensor on the device, read by the kernel.
        scale = reduce_scale_on_device(reduction, n, pair.labels, ignore_index, num_items_in_batch)
    else:
        scale = reduce_scale(reduction, n, pair.labels, ignore_index, check_num_items(num_items_in_batch))

    if backend in ("rust", "triton"):
        spec = (loss, float(param), t, bool(t2_scale))
        # Under torch.no_grad() a student that requires grad must not cost a gradient.
        student = pair.student if torch.is_grad_enabled() else pair.student.detach()
        fn = _RustDense if backend == "rust" else _triton_dense().TritonDense
        return fn.apply(student, pair, spec, ignore_index, scale)

    rows = _torch_rows(loss, param, pair, t, ignore_index)
    if t2_scale:
        rows = rows * (t * t)
    if scale is None:
        return rows.reshape(pair.lead_shape)
    return rows.sum() * scale


def _torch_rows(loss: str, param: float, pair: Pair, t: float, ignore_index: int) -> torch.Tensor:
    if pair.labels is None:
        return reference.row_losses(loss, param, pair.s2, pair.t2, t)
    keep = (pair.labels != ignore_index).nonzero().squeeze(1)
    vals = reference.row_losses(loss, param, pair.s2[keep], pair.t2[keep], t)
    return vals.new_zeros(pair.s2.shape[0]).index_put((keep,), vals)


def _triton_dense():
    """:mod:`kdfast._triton.dense`, imported on first use (``import kdfast`` never needs Triton)."""
    from ._triton import dense

    return dense


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@torch.library.custom_op("kdfast::dense_rows", mutates_args=())
def _dense_rows_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    loss: str,
    param: float,
    temperature: float,
    t2_scale: bool,
    ignore_index: int,
    vocab: int,
    need_grad: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` and the unscaled student gradient ``[N, V_student]`` (empty when
    ``need_grad`` is False): the Rust (``backend="rust"``) or Triton kernel as an opaque op for
    ``torch.compile``."""
    v_full = student.shape[-1]
    s2 = student.reshape(-1, v_full)[:, :vocab]
    t2 = teacher.reshape(-1, teacher.shape[-1])[:, :vocab]
    if backend == "rust":
        call, s2, t2 = _native.dense_call, _native.as_rows(s2), _native.as_rows(t2)
    else:
        call = _triton_dense().dense_call
    n = s2.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v_full), dtype=student.dtype, device=student.device) if need_grad else student.new_empty(0)
    if n:
        call(loss, param, s2, t2, labels, ignore_index, temperature, t2_scale, 1.0, rows, grad if need_grad else None)
    return rows, grad


@_dense_rows_op.register_fake
def _(student, teacher, labels, loss, param, temperature, t2_scale, ignore_index, vocab, need_grad, backend):
    n = student.numel() // student.shape[-1]
    grad_shape = (n, student.shape[-1]) if need_grad else (0,)
    return student.new_empty(n, dtype=torch.float32), student.new_empty(grad_shape)


def register_rows_autograd(op, n_inputs: int) -> None:
    """Autograd for a custom op ``(student, ...) -> (rows, grad)`` whose ``grad`` is the unscaled
    ``∂rows/∂student`` per row: backward is ``grad · grad_rows`` (no gradient for the other
    ``n_inputs − 1`` inputs)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.student_shape = inputs[0].shape

    def backward(ctx, grad_rows, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        g = (grad * grad_rows.unsqueeze(1)).to(grad.dtype).reshape(ctx.student_shape)
        return (g,) + (None,) * (n_inputs - 1)

    op.register_autograd(backward, setup_context=setup)


register_rows_autograd(_dense_rows_op, 11)


def _dense_traced(loss, param, pair: Pair, t, t2_scale, ignore_index, reduction, num_items, backend):
    """The path taken under ``torch.compile``: no host syncs and no data-dependent shapes; the
    Rust and Triton kernels are the custom op ``kdfast::dense_rows``, reductions are tensor ops."""
    if backend in ("rust", "triton"):
        need_grad = pair.student.requires_grad and torch.is_grad_enabled()
        rows, _ = _dense_rows_op(pair.student, pair.t2.detach(), pair.labels, loss, float(param), t,
                                 t2_scale, ignore_index, pair.vocab, need_grad, backend)
    else:
        rows = reference.row_losses(loss, param, pair.s2, pair.t2, t)
        if pair.labels is not None:
            rows = torch.where(pair.labels != ignore_index, rows, 0.0)
        if t2_scale:
            rows = rows * (t * t)
    if reduction == "none":
        return rows.reshape(pair.lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items is not None:
        d = torch.as_tensor(num_items, dtype=total.dtype, device=total.device).clamp_min(1)
    elif pair.labels is not None:
        d = (pair.labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    else:
        d = max(1, pair.s2.shape[0])
    return total / d


_COMMON_DOC = """
    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (or float64 on the torch backend).
        teacher_logits: ``[..., V]``, same leading shape and device; never receives a gradient.
        temperature: T > 0; both distributions are ``softmax(z / T)``.
        t2_scale: multiply ℓ by T² (Hinton).
        labels, ignore_index: rows whose label is ``ignore_index`` contribute 0 and get no gradient.
        reduction: ``"none"`` (ℓ per row, leading shape), ``"sum"``, or ``"mean"``/``"batchmean"``
            (Σℓ / D, D = ``num_items_in_batch`` or max(1, unmasked rows): a per-token mean).
        num_items_in_batch: the D of ``"mean"`` under gradient accumulation (int or 1-element tensor).
        vocab_size: use only the first ``vocab_size`` columns of both (padded vocabularies).
        backend: ``"auto"`` (Rust for CPU and Triton for CUDA float32/bf16/fp16 tensors, else
            PyTorch), ``"rust"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``.

    Returns:
        float32 loss (float64 for float64 input on the torch backend).
"""


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, t2_scale=False, labels=None,
               ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
               backend="auto") -> torch.Tensor:
    return _dense("forward_kl", 0.0, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, t2_scale=False, labels=None,
               ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
               backend="auto") -> torch.Tensor:
    return _dense("reverse_kl", 0.0, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, t2_scale=False, labels=None,
        ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
        backend="auto") -> torch.Tensor:
    beta = check_real(beta, "beta", low=0.0, high=1.0)
    return _dense("jsd", beta, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


def skew_forward_kl(student_logits, teacher_logits, *, skew=0.1, temperature=1.0, t2_scale=False,
                    labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                    vocab_size=None, backend="auto") -> torch.Tensor:
    skew = check_real(skew, "skew", low=0.0, high=1.0, high_open=True)
    return _dense("skew_forward_kl", skew, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


def skew_reverse_kl(student_logits, teacher_logits, *, skew=0.1, temperature=1.0, t2_scale=False,
                    labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                    vocab_size=None, backend="auto") -> torch.Tensor:
    skew = check_real(skew, "skew", low=0.0, high=1.0, high_open=True)
    return _dense("skew_reverse_kl", skew, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


def tvd(student_logits, teacher_logits, *, temperature=1.0, t2_scale=False, labels=None,
        ignore_index=-100, reduction="mean", num_items_in_batch=None, vocab_size=None,
        backend="auto") -> torch.Tensor:
    return _dense("tvd", 0.0, student_logits, teacher_logits, temperature=temperature,
                  t2_scale=t2_scale, labels=labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, backend=backend)


forward_kl.__doc__ = "Forward KL ``KL(p‖q)`` per row, averaged as asked." + _COMMON_DOC
reverse_kl.__doc__ = "Reverse KL ``KL(q‖p)`` per row." + _COMMON_DOC
jsd.__doc__ = (
    "Generalised Jensen-Shannon divergence ``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = βp + (1−β)q``; "
    "β ∈ [0, 1], exactly forward KL at β=0 and reverse KL at β=1 (GKD/TRL convention)." + _COMMON_DOC
)
skew_forward_kl.__doc__ = "Skew forward KL ``KL(p ‖ λp + (1−λ)q)``, λ = skew ∈ [0, 1) (DistiLLM)." + _COMMON_DOC
skew_reverse_kl.__doc__ = "Skew reverse KL ``KL(q ‖ λq + (1−λ)p)``, λ = skew ∈ [0, 1)." + _COMMON_DOC
tvd.__doc__ = "Total variation distance ``½ Σ |p − q|``." + _COMMON_DOC
