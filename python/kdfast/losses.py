"""Dense (full-vocabulary) distillation losses, api.md §1: one public function per entry of the
registry (:mod:`kdfast._registry`), all computed by :func:`dense_loss`.

For one row, with ``q = softmax(z_s / T)`` (student) and ``p = softmax(z_t / T)`` (teacher), the
per-row value ℓ of each loss is in its registry entry. The data flow of every call::

    public function → registry (parameter check, edge canonicalisation)
                    → dispatch (rust / triton / torch) → kernel (custom op kdfast::dense, or the
                      PyTorch reference) → reduction (kdfast._reduction.Reduction)

On the kernels (Rust on CPU, Triton on CUDA) the loss and its gradient w.r.t. the student
logits are computed together in forward; backward only scales that gradient.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from . import _dispatch, _ops
from ._reduction import Reduction
from ._registry import LOSSES, LossSpec
from ._validate import Pair, check_flag, check_pair, check_temperature, reject_unknown
from .parallel.collectives import agreed, as_local, check_backend, device_of, is_sharded, local_vocab, slice_bounds

__all__ = ["dense_loss", *LOSSES]

#: The keyword arguments every dense loss takes, with their defaults (api.md §1).
COMMON_KWARGS = dict(temperature=1.0, t2_scale=False, labels=None, ignore_index=-100, reduction="mean",
                     num_items_in_batch=None, vocab_size=None, backend="auto", process_group=None)


def dense_loss(spec: LossSpec, student_logits, teacher_logits, *, param=None, temperature=1.0,
               t2_scale=False, labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
               vocab_size=None, backend="auto", process_group=None) -> torch.Tensor:
    """The dense loss ``spec`` (with its parameter ``param``; None: the default) of the student
    logits against the teacher's; the keywords are those of api.md §1 (``process_group``: §6)."""
    param = spec.check_param(spec.param.default if (param is None and spec.param) else param)
    student_logits, teacher_logits, process_group = _local_slices(student_logits, teacher_logits, process_group)
    if isinstance(param, torch.Tensor) and param.device not in (torch.device("cpu"), device_of(student_logits)):
        raise ValueError(f"{spec.param.name}: expected a tensor on the CPU or on the logits' device, got {param.device}")
    t = check_temperature(temperature)
    red = Reduction(reduction, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    t2_scale = check_flag(t2_scale, "t2_scale")
    if process_group is not None:
        return _vocab_parallel(spec, param, student_logits, teacher_logits, t, t2_scale, labels, red,
                               vocab_size, backend, process_group)
    pair = check_pair(student_logits, teacher_logits, vocab_size=vocab_size, labels=labels)
    spec, param = spec.canonical(param)
    backend = _dispatch.resolve(backend, pair.s2.device, (pair.s2.dtype, pair.t2.dtype), op=spec.name,
                                available=spec.backends)
    n = pair.s2.shape[0]
    if n == 0:  # still connected to the graph, so backward gives an (empty) gradient
        wide = torch.float64 in (pair.s2.dtype, pair.t2.dtype)
        zeros = pair.student.to(torch.float64 if wide else torch.float32).sum(-1) * 0.0
        return zeros if red.per_row else zeros.sum()
    if backend == "torch":
        rows = _reference_rows(spec, param, pair, t, red)
        if t2_scale:
            rows = rows * (t * t)
        return red.apply(rows, pair.lead_shape, pair.labels)
    need_grad = pair.student.requires_grad and torch.is_grad_enabled()
    student = pair.s_rows if need_grad else pair.s_rows.detach()
    tensor_param = param.to(pair.s2.device) if isinstance(param, torch.Tensor) else None
    out, _ = _ops.dense(student, pair.t2.detach(), pair.labels, red.weight(n, pair.labels, pair.s2.device),
                        tensor_param, spec.name, 0.0 if tensor_param is not None else float(param), t, t2_scale,
                        red.ignore_index, pair.vocab, not red.per_row, need_grad, backend)
    return out.reshape(pair.lead_shape) if red.per_row else out


def _local_slices(student, teacher, group):
    """``DTensor`` logits sharded on the vocabulary → their local slices and their mesh's group."""
    if not is_sharded(group, student, teacher):
        return student, teacher, None
    student, group = as_local(student, group)
    teacher, group = as_local(teacher, group)
    return student, teacher, group


def _vocab_parallel(spec: LossSpec, param, student, teacher, t: float, t2_scale: bool, labels, red: Reduction,
                    vocab_size, backend: str, group) -> torch.Tensor:
    """The loss over a vocabulary sharded across ``group`` (api.md §6; :mod:`kdfast.parallel`)."""
    from .parallel.dense import dense_rows

    def checked() -> Pair:
        check_backend(backend)
        return check_pair(student, teacher, vocab_size=None, labels=labels, empty_ok=True)  # a slice may be empty

    pair = agreed(group, device_of(student), checked)  # no rank left waiting for one whose tensors are wrong
    s2, t2 = pair.s2, pair.t2
    if vocab_size is not None:  # global: cut each slice where the padded columns begin
        keep = local_vocab(vocab_size, *slice_bounds(group, s2.shape[1], s2.device, "student_logits"), s2.shape[1])
        s2, t2 = s2[:, :keep], t2[:, :keep]
    spec, param = spec.canonical(param)
    if pair.labels is None:
        rows = dense_rows(spec.name, param, s2, t2, t, group)
    else:
        idx = red.keep(pair.labels).nonzero().squeeze(1)
        vals = dense_rows(spec.name, param, s2[idx], t2[idx], t, group)
        rows = vals.new_zeros(s2.shape[0]).index_put((idx,), vals)
    if t2_scale:
        rows = rows * (t * t)
    return red.apply(rows, pair.lead_shape, pair.labels)


def _reference_rows(spec: LossSpec, param: float, pair: Pair, t: float, red: Reduction) -> torch.Tensor:
    """Per-row ℓ by the PyTorch reference, 0 in masked rows. In eager mode masked rows are never
    computed (their logits may be anything); under ``torch.compile`` (and for meta tensors, which
    have no values) they are masked out."""
    teacher = pair.t2.detach()
    if pair.labels is None:
        return spec.row_losses(pair.s2, teacher, t, param)
    keep = red.keep(pair.labels)
    if not _dispatch.host_reads_allowed(pair.s2.device):
        return torch.where(keep, spec.row_losses(pair.s2, teacher, t, param), 0.0)
    idx = keep.nonzero().squeeze(1)
    vals = spec.row_losses(pair.s2[idx], teacher[idx], t, param)
    return vals.new_zeros(pair.s2.shape[0]).index_put((idx,), vals)


_COMMON_DOC = """
    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (or float64, exact on the torch backend).
        teacher_logits: ``[..., V]``, same leading shape and device; never receives a gradient.{param}
        temperature: T > 0; both distributions are ``softmax(z / T)``.
        t2_scale: multiply ℓ by T² (Hinton).
        labels, ignore_index: rows whose label is ``ignore_index`` contribute 0 and get no gradient.
        reduction: ``"none"`` (ℓ per row, leading shape), ``"sum"``, or ``"mean"``/``"batchmean"``
            (Σℓ / D, D = ``num_items_in_batch`` or max(1, unmasked rows): a per-token mean).
        num_items_in_batch: the D of ``"mean"`` under gradient accumulation (int or 1-element tensor).
        vocab_size: use only the first ``vocab_size`` columns of both (padded vocabularies).
        backend: ``"auto"`` (Rust for CPU and Triton for CUDA float32/bf16/fp16 tensors, else
            PyTorch), ``"rust"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded: the
            last dimension is this rank's contiguous slice (rank order, sizes may differ),
            ``vocab_size`` is global; the result is the whole vocabulary's loss on every rank
            and the gradient that of the local slice (api.md §6). A ``DTensor`` sharded on its
            last dimension needs none. Computed with PyTorch operations on the slices.

    Returns:
        float32 loss (float64 for float64 input on the torch backend).
"""


def _public(spec: LossSpec) -> Callable:
    """The public function of ``spec``: its parameter (if any) and the common keywords."""
    p = spec.param
    own_kwargs = (*COMMON_KWARGS, *((p.name,) if p is not None else ()))

    def loss_fn(student_logits, teacher_logits, **kwargs):
        reject_unknown(f"{spec.name}()", kwargs, own_kwargs)
        if p is not None and p.required and p.name not in kwargs:
            raise TypeError(f"{spec.name}() missing required keyword argument {p.name!r} ({p.doc})")
        param = spec.check_param(kwargs.pop(p.name)) if (p is not None and p.name in kwargs) else None
        return dense_loss(spec, student_logits, teacher_logits, param=param, **kwargs)

    kw = inspect.Parameter.KEYWORD_ONLY
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("student_logits", pos), inspect.Parameter("teacher_logits", pos)]
    if p is not None:
        params.append(inspect.Parameter(p.name, kw) if p.required else inspect.Parameter(p.name, kw, default=p.default))
    params += [inspect.Parameter(name, kw, default=d) for name, d in COMMON_KWARGS.items()]
    loss_fn.__signature__ = inspect.Signature(params, return_annotation=torch.Tensor)
    loss_fn.__name__ = loss_fn.__qualname__ = spec.name
    loss_fn.__module__ = __name__
    param_doc = "" if p is None else f"\n        {p.name}: {p.doc}" + ("." if p.required else f" (default {p.default:g}).")
    loss_fn.__doc__ = spec.summary + "\n" + _COMMON_DOC.format(param=param_doc)
    return loss_fn


globals().update({name: _public(spec) for name, spec in LOSSES.items()})
