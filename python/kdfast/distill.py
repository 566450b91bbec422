"""The training-loop loss object, api.md §4: distillation plus optional cross-entropy.

:class:`DistillationLoss` mixes a distillation loss against the teacher (dense logits → one of
the §1 losses by name; :class:`~kdfast.SparseTargets` → :func:`~kdfast.sparse_loss` with that
loss) with the
ordinary cross-entropy of the student on the labels::

    total = soft_weight · distill(student, teacher) + hard_weight · CE(student at T = 1, labels)

Both parts use the same masking (rows whose label is ``ignore_index`` count for neither) and the
same reduction: ``"mean"`` is Σ / D with D = ``num_items_in_batch`` when given (gradient
accumulation) else the number of unmasked rows, so the two parts are on the same per-token
scale and their sum over the micro-batches of an accumulation window is the window's mean.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from . import _dispatch, losses
from .losses import COMMON_KWARGS
from ._reduction import Reduction
from ._registry import LOSSES as _SPECS
from ._registry import get as _get_spec
from ._validate import check_class_ids, check_flag, check_int, check_labels, check_temperature, reject_unknown
from .sparse_losses import SPARSE_LOSSES, TAILS, sparse_loss
from .distill_fused import fused_parts
from .schedule import TAIDSchedule
from .targets import SparseTargets

__all__ = ["DistillationLoss", "LOSSES"]

#: Dense loss name → function (api.md §1). ``"sparse_kl"`` (sparse teacher only) is accepted too.
LOSSES = {name: getattr(losses, name) for name in _SPECS}
_SPARSE_OK = SPARSE_LOSSES + ("sparse_kl",)  # the losses a SparseTargets teacher takes
# The loss keywords fixed at construction; labels and num_items_in_batch come with each call.
_COMMON = tuple(k for k in COMMON_KWARGS if k not in ("labels", "num_items_in_batch"))


def _weight(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name}: expected a finite number ≥ 0, got {value!r}")
    return v


def _allowed_kwargs(loss: str) -> tuple:
    if loss == "sparse_kl":
        return _COMMON + ("tail",)
    spec = _get_spec(loss)
    own = (spec.param.name,) if spec.param is not None else ()
    return _COMMON + own + (("tail",) if loss in _SPARSE_OK else ())


class DistillationLoss(torch.nn.Module):
    """``soft_weight · distill + hard_weight · cross-entropy`` in one module.

    Args:
        loss: the distillation loss for dense teacher logits — ``"forward_kl"``,
            ``"reverse_kl"``, ``"jsd"``, ``"skew_forward_kl"``, ``"skew_reverse_kl"`` or
            ``"tvd"``. A :class:`~kdfast.SparseTargets` teacher uses :func:`~kdfast.sparse_loss`
            with that loss: ``"forward_kl"`` (also as ``"sparse_kl"``, which refuses dense
            teachers), or for top-k targets ``"reverse_kl"``, ``"jsd"`` or ``"tvd"`` (sampled
            targets take forward KL only; the skew losses have no sparse form).
        hard_weight: weight of the cross-entropy on ``labels`` (the student at T = 1), ≥ 0.
        soft_weight: weight of the distillation loss, ≥ 0. Not both 0.
        **loss_kwargs: passed to the loss: ``temperature``, ``t2_scale``, ``ignore_index``
            (also used by the cross-entropy), ``reduction`` (both parts), ``vocab_size`` (both
            parts use only the first ``vocab_size`` columns of the student; for sparse targets
            the student is cut to them), ``backend``, ``beta`` (jsd), ``skew`` (skew KLs),
            ``head_mass`` (akl), ``t`` (taid: a number, a 0-d tensor, or a
            :class:`~kdfast.TAIDSchedule` — the default — whose current ``t`` each call uses;
            :class:`~kdfast.integrations.transformers.DistillationTrainer` advances it every
            step, a plain loop calls ``loss.schedule.update(soft_loss, progress)``),
            ``tail`` (sparse top-k targets: ``"bucket"`` or ``"renorm"``). Without
            ``temperature`` a sparse teacher uses the temperature it was captured at
            (``targets.temperature``) and a dense one uses 1.

    ``forward(student_logits, teacher, labels=None, *, num_items_in_batch=None,
    return_parts=False)``: ``student_logits`` ``[..., V]``; ``teacher`` dense logits ``[..., V]``
    or ``SparseTargets`` with leading shape ``[...]``; ``labels`` ``[...]`` already aligned with
    the logits (shifted by the caller), rows equal to ``ignore_index`` masked in both parts
    (required when ``hard_weight > 0``). Returns the total loss, or ``(total, soft, hard)`` with
    ``return_parts=True``: the unweighted parts, detached; ``hard`` is None without labels. A
    part whose weight is 0 is computed (without gradient) only when ``return_parts=True``.
    """

    def __init__(self, loss: str = "forward_kl", *, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 **loss_kwargs: Any):
        super().__init__()
        if loss != "sparse_kl":
            _get_spec(loss)  # ValueError listing the losses
        self.loss = loss
        self.hard_weight = _weight(hard_weight, "hard_weight")
        self.soft_weight = _weight(soft_weight, "soft_weight")
        if self.hard_weight == 0.0 and self.soft_weight == 0.0:
            raise ValueError("hard_weight, soft_weight: at least one weight must be > 0, got both 0")
        reject_unknown(f"loss={loss!r}", loss_kwargs, _allowed_kwargs(loss))
        kw = dict(loss_kwargs)
        # Validate eagerly, so that a bad configuration fails when the module is built.
        if "temperature" in kw:
            kw["temperature"] = check_temperature(kw["temperature"])
        red = Reduction(kw.pop("reduction", "mean"), ignore_index=kw.pop("ignore_index", -100))
        self.reduction: str = red.kind
        self.ignore_index: int = red.ignore_index
        if "backend" in kw:
            kw["backend"] = _dispatch.check_backend(kw["backend"])
        if "t2_scale" in kw:
            kw["t2_scale"] = check_flag(kw["t2_scale"], "t2_scale")
        if kw.get("vocab_size") is not None:
            kw["vocab_size"] = check_int(kw["vocab_size"], "vocab_size", low=1)
        spec = _SPECS.get(loss)
        #: TAID's schedule of ``t`` (``loss="taid"`` without a fixed ``t``), else None.
        self.schedule: Optional[TAIDSchedule] = None
        if loss == "taid" and isinstance(kw.get("t", None), (TAIDSchedule, type(None))):
            self.schedule = kw.pop("t", None) or TAIDSchedule()
        if spec is not None and spec.param is not None and spec.param.name in kw:
            kw[spec.param.name] = spec.param.check(kw[spec.param.name])
        if "tail" in kw and kw["tail"] not in TAILS:
            raise ValueError(f"tail: expected 'bucket' or 'renorm', got {kw['tail']!r}")
        self.vocab_size: Optional[int] = kw.pop("vocab_size", None)
        self.loss_kwargs = kw

    def get_extra_state(self) -> dict:
        """The TAID schedule's state (so that ``state_dict()`` checkpoints it)."""
        return {"taid_schedule": None if self.schedule is None else self.schedule.state_dict()}

    def set_extra_state(self, state) -> None:
        saved = state.get("taid_schedule") if isinstance(state, dict) else None
        if saved is not None and self.schedule is not None:
            self.schedule.load_state_dict(saved)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.loss_kwargs.items())
        return (f"loss={self.loss!r}, soft_weight={self.soft_weight}, hard_weight={self.hard_weight}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}{kw}")

    # ------------------------------------------------------------------------------------------

    def forward(self, student_logits: torch.Tensor, teacher: Union[torch.Tensor, SparseTargets],
                labels: Optional[torch.Tensor] = None, *, num_items_in_batch=None,
                return_parts: bool = False):
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits: expected a torch.Tensor of logits, got {type(student_logits).__name__}")
        sparse = isinstance(teacher, SparseTargets)
        if not sparse and not isinstance(teacher, torch.Tensor):
            raise TypeError(
                f"teacher: expected teacher logits (torch.Tensor) or kdfast.SparseTargets, got {type(teacher).__name__}"
            )
        self._check_teacher(sparse)
        if self.hard_weight > 0 and labels is None:
            raise ValueError(f"labels: hard_weight={self.hard_weight} > 0 needs labels for the cross-entropy, got None")
        # Under torch.compile a tensor count stays a tensor (no host sync); the losses take it as is.
        red = Reduction(self.reduction, ignore_index=self.ignore_index, num_items_in_batch=num_items_in_batch)
        common = dict(labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
                      num_items_in_batch=red.num_items, **self.loss_kwargs)

        want_soft = self.soft_weight > 0 or return_parts
        want_hard = labels is not None and (self.hard_weight > 0 or return_parts)
        soft = hard = None
        if want_soft:
            s = student_logits if self.soft_weight > 0 else student_logits.detach()
            if sparse:
                if self.vocab_size is not None:
                    s = s[..., : self.vocab_size]
                soft = sparse_loss(s, teacher, loss="forward_kl" if self.loss == "sparse_kl" else self.loss, **common)
            else:
                own = {} if self.schedule is None else {"t": self.schedule.t}
                soft = LOSSES[self.loss](s, teacher, vocab_size=self.vocab_size, **common, **own)
        if want_hard:
            s = student_logits if self.hard_weight > 0 else student_logits.detach()
            hard = self._cross_entropy(s, labels, red)

        return self._combine(soft, hard, return_parts)

    def _combine(self, soft, hard, return_parts: bool):
        total = None
        for w, part in ((self.soft_weight, soft), (self.hard_weight, hard)):
            if w > 0:
                total = w * part if total is None else total + w * part
        if not return_parts:
            return total
        return total, soft.detach(), (None if hard is None else hard.detach())

    def _check_teacher(self, sparse: bool) -> None:
        if sparse and self.loss not in _SPARSE_OK:
            raise ValueError(
                f"teacher: sparse targets (kdfast.SparseTargets) support only loss in "
                f"{', '.join(map(repr, _SPARSE_OK))}, got loss={self.loss!r}; pass dense teacher logits instead"
            )
        if not sparse and self.loss == "sparse_kl":
            raise ValueError("teacher: loss='sparse_kl' expects kdfast.SparseTargets, got dense teacher logits")

    def fused(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher=None,
              labels: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
              num_items_in_batch=None, return_parts: bool = False, chunk_size: Optional[int] = None):
        """:meth:`forward` on ``student_hidden @ student_weightᵀ (+ student_bias)`` without the
        ``[N, V]`` logits: both parts go through :func:`kdfast.fused_linear_distill_loss`.

        ``teacher`` is ``(teacher_hidden, teacher_weight[, teacher_bias])``, teacher logits, or
        :class:`~kdfast.SparseTargets`; the other arguments and the result are as for
        :meth:`forward` (``chunk_size``: tokens per chunk of the head, see the fused loss).
        """
        if teacher is None:
            raise TypeError("teacher: expected (teacher_hidden, teacher_weight[, teacher_bias]), teacher logits "
                            "or kdfast.SparseTargets, got None")
        self._check_teacher(isinstance(teacher, SparseTargets))
        if self.hard_weight > 0 and labels is None:
            raise ValueError(f"labels: hard_weight={self.hard_weight} > 0 needs labels for the cross-entropy, got None")
        soft, hard = fused_parts(self, student_hidden, student_weight, teacher, labels, student_bias=student_bias,
                                 num_items_in_batch=num_items_in_batch,
                                 want_soft=self.soft_weight > 0 or return_parts,
                                 want_hard=labels is not None and (self.hard_weight > 0 or return_parts),
                                 chunk_size=chunk_size)
        return self._combine(soft, hard, return_parts)

    def _cross_entropy(self, student_logits: torch.Tensor, labels, red: Reduction) -> torch.Tensor:
        """Cross-entropy of the student at T = 1, masked and reduced like the distillation part."""
        lead = student_logits.shape[:-1]
        y = check_labels(labels, lead, student_logits.device)
        z = student_logits if self.vocab_size is None else student_logits[..., : self.vocab_size]
        v = z.shape[-1]
        z2 = z.reshape(-1, v).float()
        keep = red.keep(y)
        if z2.shape[0] == 0:
            return red.apply(z2.sum(-1) * 0.0, lead, y)
        if _dispatch.host_reads_allowed(z2.device):
            check_class_ids(y, keep, v, self.ignore_index)
        rows = F.cross_entropy(z2, y.masked_fill(~keep, 0), reduction="none") * keep
        return red.apply(rows, lead, y)
