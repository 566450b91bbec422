"""The custom ops: one per kernel family, serving eager calls and ``torch.compile`` alike.

* ``kdfast::dense`` — a dense loss (api.md §1) on the Rust or Triton kernel;
* ``kdfast::sparse`` — :func:`kdfast.sparse_loss` against sparse targets (api.md §2);
* ``kdfast::fused_linear`` — the LM-head-fused loss, in :mod:`kdfast.fused_linear`.

Each op returns ``(out, grad)``: ``out`` is ``Σ_r w ℓ_r`` (``reduce``) or the rows ``ℓ``
``[N]``, and ``grad = w · ∂ℓ/∂student`` is produced by the kernel *in forward*, with the
reduction's row weight ``w`` (1/D of a mean, a 0-d tensor or None for 1) already folded in.
Backward only scales that saved gradient by the incoming one, in place — a no-op for the usual
``grad_output = 1`` on CPU — so a training step costs one kernel pass; on the device the scale is
read by a kernel (no host sync). The in-place scaling bumps the saved tensor's version, so a
second backward through a retained graph raises instead of reusing a scaled gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _native, _triton
from ._buffers import gradient


def kernel_scale(backend: str, weight: Optional[torch.Tensor]):
    """The kernels' ``grad_scale``: a float for Rust (reading a CPU scalar is free), the tensor
    itself for Triton (read by the kernel on the device)."""
    if weight is None:
        return 1.0
    return float(weight) if backend == "rust" else weight


def reduce_rows(rows: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    total = rows.sum()
    return total if weight is None else total * weight


def dense_call(backend: str):
    """``dense_call(loss, param, s2, t2, labels, ignore_index, T, t2_scale, grad_scale, rows,
    grad)`` of ``backend`` (see :func:`kdfast._native.dense_call`)."""
    if backend == "rust":
        def call(loss, param, s2, t2, *rest):
            _native.dense_call(loss, param, _native.as_rows(s2), _native.as_rows(t2), *rest)
        return call
    return _triton.kernels("dense").dense_call


def sparse_call(backend: str):
    """``sparse_call(mode, s2, ids, lp, w, tail, labels, ignore_index, T, t2_scale, grad_scale,
    rows, grad, loss="forward_kl", param=0.0)`` of ``backend`` (see
    :func:`kdfast._native.sparse_call`)."""
    if backend == "rust":
        def call(mode, s2, *rest, **loss):
            _native.sparse_call(mode, _native.as_rows(s2), *rest, **loss)
        return call
    return _triton.kernels("sparse").sparse_call


def _outputs(student: torch.Tensor, need_grad: bool):
    n = student.numel() // student.shape[-1]
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = gradient((n, student.shape[-1]), student.dtype, student.device) if need_grad else student.new_empty(0)
    return rows, grad


def _fake(student: torch.Tensor, reduce: bool, need_grad: bool):
    n = student.numel() // student.shape[-1]
    out = student.new_empty((), dtype=torch.float32) if reduce else student.new_empty(n, dtype=torch.float32)
    return out, student.new_empty((n, student.shape[-1]) if need_grad else (0,))


@torch.library.custom_op("kdfast::dense", mutates_args=())
def dense(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
          weight: Optional[torch.Tensor], param_tensor: Optional[torch.Tensor], loss: str, param: float,
          temperature: float, t2_scale: bool, ignore_index: int, vocab: int, reduce: bool, need_grad: bool,
          backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A dense loss of the first ``vocab`` columns of ``student`` ``[..., V_s]`` and ``teacher``
    ``[..., V_t]``; ``grad`` is ``[N, V_s]`` (zero beyond ``vocab``), empty without ``need_grad``.
    The loss's parameter is ``param``, or the 0-d float32 ``param_tensor`` when given (TAID's
    ``t``: read by the Triton kernel on the device; on the CPU reading it is free)."""
    rows, grad = _outputs(student, need_grad)
    if rows.shape[0]:
        s2 = student.reshape(-1, student.shape[-1])[:, :vocab]
        t2 = teacher.reshape(-1, teacher.shape[-1])[:, :vocab]
        if param_tensor is not None:
            param = float(param_tensor) if backend == "rust" else param_tensor
        dense_call(backend)(loss, param, s2, t2, labels, ignore_index, temperature, t2_scale,
                            kernel_scale(backend, weight), rows, grad if need_grad else None)
    return (reduce_rows(rows, weight) if reduce else rows), grad


@dense.register_fake
def _(student, teacher, labels, weight, param_tensor, loss, param, temperature, t2_scale, ignore_index, vocab,
      reduce, need_grad, backend):
    return _fake(student, reduce, need_grad)


@torch.library.custom_op("kdfast::sparse", mutates_args=())
def sparse(student: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, w: Optional[torch.Tensor],
           tail: Optional[torch.Tensor], labels: Optional[torch.Tensor], weight: Optional[torch.Tensor],
           mode: str, loss: str, param: float, temperature: float, t2_scale: bool, ignore_index: int,
           reduce: bool, need_grad: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`kdfast.sparse_loss` of ``student`` ``[..., V]`` against the flat target arrays
    (``ids`` int64 ``[N, k]``, ``lp``/``w`` ``[N, k]``, ``tail`` ``[N]``; see
    :class:`kdfast.sparse_losses.SparseInputs`); ``mode`` is ``"bucket"``, ``"renorm"`` or
    ``"sampled"``, ``loss`` ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (``param`` = β) or ``"tvd"``."""
    rows, grad = _outputs(student, need_grad)
    if rows.shape[0]:
        s2 = student.reshape(-1, student.shape[-1])
        sparse_call(backend)(mode, s2, ids, lp, w, tail, labels, ignore_index, temperature, t2_scale,
                             kernel_scale(backend, weight), rows, grad if need_grad else None,
                             loss=loss, param=param)
    return (reduce_rows(rows, weight) if reduce else rows), grad


@sparse.register_fake
def _(student, ids, lp, w, tail, labels, weight, mode, loss, param, temperature, t2_scale, ignore_index,
      reduce, need_grad, backend):
    return _fake(student, reduce, need_grad)


def scale_saved_grad(grad: torch.Tensor, grad_out: torch.Tensor, per_row: bool, backend: str) -> torch.Tensor:
    """``grad · grad_out`` (per row when ``per_row``) for a gradient saved in forward: in place
    in eager mode, out of place while tracing. Rust skips a ``grad_out`` of exactly 1 (free to
    check on the CPU); Triton's kernel reads ``grad_out`` on the device and always counts as a
    modification (whether it is 1 is not known on the host)."""
    if torch.compiler.is_compiling():
        factor = grad_out.unsqueeze(1) if per_row else grad_out
        return (grad * factor).to(grad.dtype)
    if backend == "triton":
        return _triton.kernels("dense").scale_grad_(grad, grad_out)
    if per_row:
        return grad.mul_(grad_out.reshape(-1, 1))
    if bool(grad_out != 1):
        grad.mul_(grad_out)
    return grad


def _register_autograd(op, n_inputs: int, reduce_at: int) -> None:
    """Autograd of an op ``(student, ...) -> (out, grad)`` whose ``grad`` is ``∂out/∂student``
    (per row when not ``reduce``); no other input gets a gradient."""

    def setup(ctx, inputs, output):
        ctx.per_row = not inputs[reduce_at]
        ctx.backend = inputs[-1]
        ctx.student_shape = inputs[0].shape
        ctx.mark_non_differentiable(output[1])  # a gradient, not a function of the student to differentiate
        ctx.set_materialize_grads(False)  # else autograd passes backward an [N, V] tensor of zeros for it
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_out, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        g = scale_saved_grad(grad, grad_out, ctx.per_row, ctx.backend)
        return (g.reshape(ctx.student_shape),) + (None,) * (n_inputs - 1)

    op.register_autograd(backward, setup_context=setup)


_register_autograd(dense, 14, reduce_at=11)
_register_autograd(sparse, 16, reduce_at=13)
