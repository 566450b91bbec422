""":meth:`kdfast.DistillationLoss.fused` (api.md §4): the same total and parts as ``forward`` on
the materialised logits, from hidden states and the LM heads, through
:func:`kdfast.fused_linear_distill_loss` — no ``[N, V]`` tensor of the student or the teacher.

The cross-entropy part is the fused sparse loss against one-hot targets: with
``p = 1`` on the label and an empty tail bucket, ``sparse_kl``'s bucket loss is
``1·(log 1 − log q_label) = −log q_label`` at T = 1, the cross-entropy exactly, with the
gradient ``q − onehot`` computed chunk by chunk like the distillation part.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from ._reduction import Reduction
from ._validate import check_class_ids, check_labels
from .fused_linear import fused_linear_distill_loss
from .targets import SparseTargets

__all__ = ["fused_parts"]


def _teacher_form(teacher) -> dict:
    """``fused_linear_distill_loss``'s teacher keywords for ``teacher``: ``(hidden, weight[,
    bias])``, logits, or :class:`SparseTargets`."""
    if isinstance(teacher, SparseTargets):
        return {"targets": teacher}
    if isinstance(teacher, torch.Tensor):
        return {"teacher_logits": teacher}
    if isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
        form = {"teacher_hidden": teacher[0], "teacher_weight": teacher[1]}
        if len(teacher) == 3:
            form["teacher_bias"] = teacher[2]
        return form
    raise TypeError("teacher: expected (teacher_hidden, teacher_weight[, teacher_bias]), teacher logits "
                    f"(torch.Tensor) or kdfast.SparseTargets, got {type(teacher).__name__}")


def _hard_targets(labels: torch.Tensor, keep: torch.Tensor, vocab: int, ignore_index: int) -> SparseTargets:
    """One-hot targets at the labels (masked rows point at id 0; the loss masks them)."""
    if _dispatch.host_reads_allowed(labels.device):
        check_class_ids(labels, keep, vocab, ignore_index)
    y = labels.masked_fill(~keep, 0)
    ids = y.unsqueeze(-1)
    lp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    tail = torch.full(y.shape, float("-inf"), dtype=torch.float32, device=ids.device)
    return SparseTargets(indices=ids, logprobs=lp, tail_logprob=tail, temperature=1.0, method="topk")


def fused_parts(crit, student_hidden, student_weight, teacher, labels, *, student_bias, num_items_in_batch,
                want_soft: bool, want_hard: bool, chunk_size: Optional[int]):
    """The (soft, hard) parts of :class:`~kdfast.DistillationLoss` ``crit`` (None where not
    wanted), each through the fused head. A part whose weight is 0 is computed without a
    gradient."""
    if not isinstance(student_hidden, torch.Tensor):
        raise TypeError(f"student_hidden: expected a torch.Tensor, got {type(student_hidden).__name__}")
    if not isinstance(student_weight, torch.Tensor):
        raise TypeError(f"student_weight: expected a torch.Tensor, got {type(student_weight).__name__}")
    form = _teacher_form(teacher)
    red = Reduction(crit.reduction, ignore_index=crit.ignore_index, num_items_in_batch=num_items_in_batch)
    common = dict(labels=labels, ignore_index=crit.ignore_index, reduction=crit.reduction,
                  num_items_in_batch=red.num_items, chunk_size=chunk_size)
    # The student's padded head rows take part in neither loss: the sparse and cross-entropy
    # parts get the head cut to vocab_size, the dense loss cuts both heads itself.
    cut_w, cut_b = student_weight, student_bias
    if crit.vocab_size is not None:
        cut_w = student_weight[: crit.vocab_size]
        cut_b = None if student_bias is None else student_bias[: crit.vocab_size]
    soft = hard = None
    if want_soft:
        kw = dict(crit.loss_kwargs)
        if crit.schedule is not None:
            kw["t"] = crit.schedule.t
        w, b = cut_w, cut_b
        if "targets" not in form and crit.vocab_size is not None:
            kw["vocab_size"] = crit.vocab_size
            w, b = student_weight, student_bias
        with torch.set_grad_enabled(torch.is_grad_enabled() and crit.soft_weight > 0):
            soft = fused_linear_distill_loss(student_hidden, w, loss=crit.loss, student_bias=b, **form, **common, **kw)
    if want_hard:
        lead = student_hidden.shape[:-1]
        y = check_labels(labels, lead, student_hidden.device)
        targets = _hard_targets(y.reshape(lead), red.keep(y).reshape(lead), cut_w.shape[0], crit.ignore_index)
        backend = {"backend": crit.loss_kwargs["backend"]} if "backend" in crit.loss_kwargs else {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and crit.hard_weight > 0):
            hard = fused_linear_distill_loss(student_hidden, cut_w, targets=targets, student_bias=cut_b,
                                             temperature=1.0, **common, **backend)
    return soft, hard
