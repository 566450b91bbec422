"""TRL with kdfast's losses: change one import (api.md §4, issue: TRL users).

* :func:`generalized_jsd_loss` — TRL's ``GKDTrainer.generalized_jsd_loss`` (same signature,
  defaults and reductions) computed by :func:`kdfast.jsd`: ``beta = 0`` forward KL, ``beta = 1``
  reverse KL, else ``β KL(p‖m) + (1−β) KL(q‖m)``; masked by ``labels != -100``; with
  ``num_items_in_batch`` the sum over it; ``"batchmean"`` the sum over the unmasked tokens (over
  the first dimension without labels, as TRL); ``"sum"``; ``"mean"`` the sum over every element
  of TRL's per-element tensor (tokens × V). ``reduction="none"`` (TRL's per-element tensor) is
  TRL's own function.
* :class:`GKDTrainer` — ``trl.experimental.gkd.GKDTrainer`` whose loss is kdfast's: fused with
  the LM heads (no ``[N, V]`` logits of either model) when both heads are plain linear maps
  (:func:`kdfast.integrations.heads.find_head`), else on the logits with
  :func:`generalized_jsd_loss`. Everything else — ``lmbda``, ``seq_kd``, ``beta``, generation,
  the configuration — is TRL's.

``from trl.experimental.gkd import GKDTrainer`` → ``from kdfast.integrations.trl import GKDTrainer``.
Needs TRL (``pip install "kdfast[peers]"`` or ``pip install trl``).
"""

from __future__ import annotations

import torch

try:
    from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError("kdfast.integrations.trl needs TRL: pip install trl") from exc

from .. import losses
from ..fused_linear import fused_linear_distill_loss
from . import heads

__all__ = ["generalized_jsd_loss", "GKDTrainer"]

_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized JSD (see the module docstring) by :func:`kdfast.jsd`."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    if reduction == "none" and num_items_in_batch is None:
        return _TRLGKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                                   temperature=temperature, reduction="none")
    total = losses.jsd(student_logits, teacher_logits, beta=float(beta), temperature=temperature, labels=labels,
                       reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / _denominator(reduction, student_logits, labels)


def _denominator(reduction: str, logits: torch.Tensor, labels):
    if reduction == "sum":
        return 1
    rows = (labels != -100).sum() if labels is not None else None
    if reduction == "batchmean":
        return rows.clamp_min(1) if rows is not None else max(logits.shape[0], 1)
    # "mean": TRL averages its per-element tensor, [kept tokens, V] or [..., V]
    return (rows if rows is not None else logits.numel() // logits.shape[-1]) * logits.shape[-1]


class GKDTrainer(_TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` with kdfast's loss (see the module docstring)."""

    generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head, t_head = heads.find_head(model), heads.find_head(self.teacher_model)
        if return_outputs or isinstance(head, str) or isinstance(t_head, str):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        feed = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        with heads.head_inputs(model, head) as cap:
            model(**feed)
        self.teacher_model.eval()
        with torch.no_grad(), heads.head_inputs(self.teacher_model, t_head) as t_cap:
            self.teacher_model(**feed)
        # As TRL: logits at position i predict token i + 1; labels mask prompt and padding.
        hidden = cap.hidden[:, :-1]
        t_hidden = t_cap.hidden[:, :-1].to(hidden.device)
        labels = inputs["labels"][:, 1:].to(hidden.device)
        kw = dict(teacher_hidden=t_hidden, teacher_weight=t_head.weight.to(hidden.device), loss="jsd",
                  beta=float(self.beta), student_bias=head.bias, labels=labels, reduction="sum")
        if t_head.bias is not None:
            kw["teacher_bias"] = t_head.bias.to(hidden.device)
        total = fused_linear_distill_loss(hidden, head.weight, **kw)
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return total / (labels != -100).sum().clamp_min(1)
