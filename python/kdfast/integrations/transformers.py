"""Knowledge distillation with the Hugging Face ``transformers.Trainer``.

:class:`DistillationTrainer` is a ``Trainer`` whose loss is a :class:`kdfast.DistillationLoss`
of the student against

* a **live teacher** (``teacher_model=``): run under ``torch.no_grad`` on every batch, its logits
  go to the dense loss (forward KL, JSD, ... by name), or
* a **kdfast teacher cache** (offline): batches carry ``targets`` (:class:`kdfast.SparseTargets`
  ``[B, S, k]``, e.g. from :func:`kdfast.cache.collate` over a :class:`kdfast.cache.TeacherCache`)
  and the loss is :func:`kdfast.sparse_kl`. When a batch has ``targets`` they are used, even if a
  teacher model was also given.

Everything else is the ``Trainer``: optimiser, schedule, mixed precision, checkpoints, callbacks.

Label alignment. ``labels[t]`` must end up as the token that the logits at position ``t``
predict. Batches with ``targets`` (kdfast's collate) and batches with a ``shift_labels`` key are
taken as already aligned; other batches follow the Hugging Face causal-LM convention
(``labels == input_ids`` with -100 at padding, shifted inside) — ``labels_shifted=`` overrides
this. A batch without labels is distilled on its ``input_ids`` (padding from ``attention_mask``
masked), as a causal-LM collator would have labelled it.

Gradient accumulation. The Trainer counts the unmasked labels of the whole accumulation window
(``num_items_in_batch``; this class counts them after the alignment above, so position 0 of
unshifted labels is not counted) and both parts of the loss are divided by that count, so the
accumulated gradient is that of the window's per-token mean, whatever the micro-batch sizes.

Logging. At each logging step the unweighted parts are added to the Trainer's logs, averaged
like its ``loss``: ``soft_loss`` (the distillation loss) and ``hard_loss`` (the student's
cross-entropy on the labels, computed for monitoring even when ``hard_weight`` is 0).

On-policy and sequence-level distillation (GKD). ``lmbda=p`` has the student complete each
training batch's prompts with probability ``p``, ``seq_kd=True`` has the teacher complete them
(first, as in TRL); the loss then covers the generated tokens only (see
:mod:`kdfast.integrations.gkd`). Items give their prompt as ``prompt_length`` or
``completion_mask``; in this mode batches that are not generated have their prompt masked.

TAID. With ``distill_loss`` of ``loss="taid"`` and a :class:`kdfast.TAIDSchedule` (the
default), the schedule is advanced after every optimizer step with that step's distillation
loss and the progress ``global_step / max_steps``, saved into every checkpoint
(``kdfast_taid_schedule.json``) and restored by ``train(resume_from_checkpoint=...)``.

Columns. Set ``remove_unused_columns=False`` in ``TrainingArguments`` when the dataset items
are dicts with extra fields; this trainer also keeps ``targets`` and ``shift_labels`` through
the Trainer's column filter itself. Only model inputs reach the models: ``targets``, ``labels``,
``shift_labels`` and the extras of :func:`kdfast.cache.collate` (``response_mask``,
``prompt_length``, ``seq_id``) are taken out of the batch first.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Optional, Union

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kdfast.integrations.transformers needs the `transformers` and `accelerate` packages: "
        "pip install 'kdfast[demo]' accelerate"
    ) from exc

from .._validate import check_flag, check_int, check_real
from ..distill import DistillationLoss
from . import gkd, heads
from ..targets import SparseTargets

__all__ = ["DistillationTrainer"]

_KEEP_COLUMNS = ("targets", "shift_labels", "prompt_length", "completion_mask")
# Batch keys that are not model inputs: labels and the extras of kdfast.cache.collate.
_NOT_MODEL_INPUTS = ("targets", "labels", "shift_labels", "response_mask", "prompt_length", "seq_id",
                     "completion_mask")


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) by knowledge distillation.

    Args:
        model, args, ...: as for ``transformers.Trainer`` (positional or keyword).
        teacher_model: the teacher for online distillation: a causal LM module (or a model
            directory / hub name, loaded with ``AutoModelForCausalLM``). It is put in eval mode,
            frozen and, unless it already lives on an accelerator or is dispatched across
            devices, moved to ``args.device``. Not needed when the batches carry ``targets``.
        distill_loss: a :class:`kdfast.DistillationLoss`, a loss name (``"forward_kl"``,
            ``"jsd"``, ...) or a dict of its keyword arguments (``{"loss": "jsd", "beta": 0.5,
            "hard_weight": 0.1, "temperature": 2.0}``). Default: forward KL, soft weight 1, hard
            weight 0. Its ``reduction`` must be ``"mean"``.
        labels_shifted: True if ``labels`` are already aligned with the logits, False for the
            Hugging Face convention (shifted here), None (default) to decide per batch (see the
            module docstring).
        fused: None (default): the fused path (final hidden states and heads to
            :meth:`kdfast.DistillationLoss.fused`, no ``[N, V]`` logits) whenever the heads
            allow it exactly (:func:`kdfast.integrations.heads.find_head`), else the logits path;
            True: the fused path or a ``ValueError`` with the reason; False: the logits path.

    If ``data_collator`` is not given and the training dataset is a
    :class:`kdfast.cache.TeacherCache`, :func:`kdfast.cache.collate` is used (padding with the
    tokenizer's pad id when a ``processing_class`` with one is given, else 0).
    """

    def __init__(self, *args: Any, teacher_model: Union[torch.nn.Module, str, None] = None,
                 distill_loss: Union[DistillationLoss, str, dict, None] = None,
                 labels_shifted: Optional[bool] = None, fused: Optional[bool] = None, lmbda: float = 0.0,
                 seq_kd: bool = False, max_new_tokens: int = 128, generation_kwargs: Optional[dict] = None,
                 **kwargs: Any):
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: DistillationTrainer computes the loss with kdfast; "
                             "configure it with distill_loss=... instead")
        if labels_shifted is not None and not isinstance(labels_shifted, bool):
            raise TypeError(f"labels_shifted: expected True, False or None, got {labels_shifted!r}")
        self.distill_loss = _as_loss(distill_loss)
        self.labels_shifted = labels_shifted
        _default_collator(args, kwargs)
        super().__init__(*args, **kwargs)
        if getattr(self.args, "label_smoothing_factor", 0.0):
            raise ValueError("label_smoothing_factor: not supported by DistillationTrainer "
                             f"(got {self.args.label_smoothing_factor}); the soft targets play that role")
        # Our loss is divided by `num_items_in_batch` when there is one; otherwise it is a
        # per-batch mean that the Trainer must divide by the accumulation steps. Newer
        # transformers read `loss_is_scaled_for_ga` (set per call in compute_loss); older ones
        # decide from `model_accepts_loss_kwargs` and also count the items only when it is True.
        self.model_accepts_loss_kwargs = True
        self.teacher_model = _prepare_teacher(teacher_model, self.args.device)
        self._student_head, self._teacher_head = _fused_heads(fused, self.model, self.teacher_model)
        self.lmbda = check_real(lmbda, "lmbda", low=0.0, high=1.0)
        self.seq_kd = check_flag(seq_kd, "seq_kd")
        self.max_new_tokens = check_int(max_new_tokens, "max_new_tokens", low=1)
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise TypeError(f"generation_kwargs: expected a dict or None, got {type(generation_kwargs).__name__}")
        self.generation_kwargs = dict(generation_kwargs or {})
        if (self.lmbda > 0 or self.seq_kd) and self.teacher_model is None:
            raise ValueError("teacher_model: on-policy (lmbda > 0) and sequence-level (seq_kd=True) distillation "
                             "need a live teacher to score (or write) the completions")
        # The per-batch on-policy draws: their own stream, reproducible from args.seed.
        self._gkd_rng = random.Random(self.args.seed)
        #: Whether training steps take the fused path (no [N, V] logits).
        self.fused = self._student_head is not None
        if self.distill_loss.schedule is not None:
            self.add_callback(_TAIDCallback(self))
        self._taid_loss = None  # this optimizer step's distillation loss (TAID's schedule)
        self._kd_sums = {"soft_loss": 0.0, "hard_loss": 0.0}
        self._kd_counted = {"soft_loss": False, "hard_loss": False}
        self._kd_last_step = 0

    # ------------------------------------------------------------------------------ batches

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        cols = getattr(self, "_signature_columns", None)
        if isinstance(cols, list):
            cols.extend(c for c in _KEEP_COLUMNS if c not in cols)

    def _aligned_labels(self, inputs: dict) -> Optional[torch.Tensor]:
        """Labels aligned with the logits (labels[t] = the target of logits[t]), or None."""
        ignore = self.distill_loss.ignore_index
        if inputs.get("shift_labels") is not None:
            return inputs["shift_labels"]
        labels = inputs.get("labels")
        if labels is None:
            ids = inputs.get("input_ids")
            if ids is None:
                return None
            labels = ids
            mask = inputs.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, ignore)
            shifted = False
        elif self.labels_shifted is not None:
            shifted = self.labels_shifted
        else:
            shifted = inputs.get("targets") is not None
        if shifted:
            return labels
        pad = labels.new_full((*labels.shape[:-1], 1), ignore)
        return torch.cat([labels[..., 1:], pad], dim=-1)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Unmasked, aligned labels in the accumulation window (summed over processes when
        ``average_tokens_across_devices``)."""
        ignore = self.distill_loss.ignore_index
        total = None
        for batch in batch_samples:
            labels = self._aligned_labels(batch) if isinstance(batch, dict) else None
            if labels is None:
                return None
            n = labels.ne(ignore).sum()
            total = n if total is None else total + n
        if total is None:
            return None
        total = total.to(device)
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    # ------------------------------------------------------------------------------ the loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch=None):
        inputs = dict(inputs)
        if self.lmbda > 0 or self.seq_kd:
            inputs = self._gkd_inputs(model, inputs)
            num_items_in_batch = None  # the completions' token count is known only now
        labels = self._aligned_labels(inputs)
        targets = inputs.get("targets")
        for key in _NOT_MODEL_INPUTS:
            inputs.pop(key, None)
        if self.fused and not return_outputs:
            loss, soft, hard = self._fused_loss(model, inputs, labels, targets, num_items_in_batch)
            return self._finish(model, loss, soft, hard, num_items_in_batch, None, False)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]

        if targets is not None:
            teacher = _check_targets(targets).to(logits.device)
        elif self.teacher_model is not None:
            with torch.no_grad():
                t_out = self.teacher_model(**inputs)
            teacher = t_out["logits"] if isinstance(t_out, dict) else t_out[0]
            teacher = teacher.to(logits.device)
        else:
            raise ValueError(_NO_TEACHER)
        if labels is not None:
            labels = labels.to(logits.device)

        loss, soft, hard = self.distill_loss(logits, teacher, labels, num_items_in_batch=num_items_in_batch,
                                             return_parts=True)
        return self._finish(model, loss, soft, hard, num_items_in_batch, outputs, return_outputs)

    def _gkd_inputs(self, model, inputs: dict) -> dict:
        """GKD (api.md §4): in training, the teacher completes the prompts (``seq_kd``), then with
        probability ``lmbda`` the student does; the loss covers the completions only. Batches
        not generated keep their own completions, with the prompt masked."""
        generated = False
        if model.training:
            kw = dict(max_new_tokens=self.max_new_tokens, generation_kwargs=self.generation_kwargs,
                      ignore_index=self.distill_loss.ignore_index)
            if self.seq_kd:
                inputs = gkd.complete(self.teacher_model, inputs, **kw, **self._special_ids(self.teacher_model))
                generated = True
            if self.lmbda > 0 and self._gkd_rng.random() < self.lmbda:
                student = self.accelerator.unwrap_model(model)
                inputs = gkd.complete(student, inputs, **kw, **self._special_ids(student))
                generated = True
        if not generated:
            labels = self._aligned_labels(inputs)
            if labels is not None:
                inputs["shift_labels"] = gkd.mask_prompts(labels, inputs, self.distill_loss.ignore_index)
        return inputs

    def _special_ids(self, model) -> dict:
        """Padding and end-of-sequence ids for generation: the tokenizer's, else the model's."""
        proc = self.processing_class
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(proc, "eos_token_id", None)
        if eos is None:
            eos = getattr(gen_cfg, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
        pad = getattr(proc, "pad_token_id", None)
        if pad is None:
            pad = getattr(gen_cfg, "pad_token_id", None) or getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) or 0
        return {"pad_id": int(pad), "eos_id": eos}

    def _fused_loss(self, model, inputs: dict, labels, targets, num_items_in_batch):
        """The loss from the final hidden states and the heads (api.md §4): the models run
        with their heads replaced by a capture of the heads' inputs."""
        head = self._student_head
        with heads.head_inputs(model, head) as cap:
            model(**inputs)
        hidden = cap.hidden
        if targets is not None:
            teacher = _check_targets(targets).to(hidden.device)
        elif self.teacher_model is not None:
            t_head = self._teacher_head
            with torch.no_grad(), heads.head_inputs(self.teacher_model, t_head) as t_cap:
                self.teacher_model(**inputs)
            parts = (t_cap.hidden, t_head.weight) + (() if t_head.bias is None else (t_head.bias,))
            teacher = tuple(x.to(hidden.device) for x in parts)
        else:
            raise ValueError(_NO_TEACHER)
        if labels is not None:
            labels = labels.to(hidden.device)
        return self.distill_loss.fused(hidden, head.weight, teacher, labels, student_bias=head.bias,
                                       num_items_in_batch=num_items_in_batch, return_parts=True)

    def _finish(self, model, loss, soft, hard, num_items_in_batch, outputs, return_outputs: bool):
        scaled = num_items_in_batch is not None
        # transformers >= 5 reads this right after compute_loss (see the class docstring).
        self.loss_is_scaled_for_ga = scaled
        if (scaled and getattr(self.args, "average_tokens_across_devices", False)
                and self.args.world_size > 1):
            # The count was summed over processes and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes

        if model.training:
            ga = 1 if scaled else getattr(self, "current_gradient_accumulation_steps",
                                          self.args.gradient_accumulation_steps)
            if self.distill_loss.schedule is not None:
                step_part = soft.detach().double() / ga
                self._taid_loss = step_part if self._taid_loss is None else self._taid_loss + step_part
            for key, part in (("soft_loss", soft), ("hard_loss", hard)):
                if part is not None:
                    self._kd_sums[key] = self._kd_sums[key] + part.detach().float() / ga
                    self._kd_counted[key] = True
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        """``Trainer.train``; on resume the TAID schedule is restored from the checkpoint."""
        schedule = self.distill_loss.schedule
        if schedule is not None and resume_from_checkpoint:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            if path and os.path.isfile(os.path.join(path, TAID_STATE_FILE)):
                with open(os.path.join(path, TAID_STATE_FILE), encoding="utf-8") as f:
                    schedule.load_state_dict(json.load(f))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _advance_taid(self) -> None:
        """One TAID update per optimizer step, with the step's distillation loss (averaged
        over processes) and the progress ``global_step / max_steps``."""
        loss, self._taid_loss = self._taid_loss, None
        if loss is None:
            return
        if self.args.world_size > 1:
            loss = self.accelerator.reduce(loss.reshape(1), reduction="mean").reshape(())
        max_steps = max(1, self.state.max_steps or 1)
        self.distill_loss.schedule.update(loss, min(1.0, self.state.global_step / max_steps))

    # ------------------------------------------------------------------------------ logging

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        steps = self.state.global_step - self._kd_last_step
        if "loss" in logs and steps > 0:
            for key, value in self._kd_sums.items():
                if not self._kd_counted[key]:
                    continue
                value = torch.as_tensor(value, dtype=torch.float32, device=self.args.device).reshape(1)
                if self.args.world_size > 1:
                    value = self.accelerator.gather(value)
                logs[key] = value.mean().item() / steps
                self._kd_sums[key] = 0.0
                self._kd_counted[key] = False
            self._kd_last_step = self.state.global_step
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------- helpers

_NO_TEACHER = ("DistillationTrainer: no teacher for this batch: pass teacher_model=... (online) or a dataset "
               "whose batches carry 'targets' (a kdfast.cache.TeacherCache with kdfast.cache.collate)")


def _check_targets(targets) -> SparseTargets:
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets in the batch, got {type(targets).__name__}")
    return targets


def _fused_heads(fused, student, teacher):
    """The (student, teacher) heads of the fused path, or (None, None) for the logits path:
    ``fused=None`` fuses whenever both heads allow it, True requires it (ValueError with the
    reason otherwise), False never fuses."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused: expected True, False or None, got {fused!r}")
    if fused is False:
        return None, None
    found = [("model", heads.find_head(student))]
    if teacher is not None:
        found.append(("teacher_model", heads.find_head(teacher)))
    for name, head in found:
        if isinstance(head, str):
            if fused:
                raise ValueError(f"fused: the fused loss needs logits = hidden @ Wᵀ (+ b), but {name}: {head}; "
                                 "pass fused=False (or None) for the logits path")
            return None, None
    return found[0][1], (found[1][1] if teacher is not None else None)


#: The TAID schedule's state in each checkpoint directory.
TAID_STATE_FILE = "kdfast_taid_schedule.json"


class _TAIDCallback(TrainerCallback):
    """Advances the TAID schedule after every optimizer step and writes it into every checkpoint."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._advance_taid()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, TAID_STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.trainer.distill_loss.schedule.state_dict(), f)



def _as_loss(distill_loss) -> DistillationLoss:
    if distill_loss is None:
        loss = DistillationLoss()
    elif isinstance(distill_loss, DistillationLoss):
        loss = distill_loss
    elif isinstance(distill_loss, str):
        loss = DistillationLoss(distill_loss)
    elif isinstance(distill_loss, dict):
        loss = DistillationLoss(**distill_loss)
    else:
        raise TypeError(
            f"distill_loss: expected a kdfast.DistillationLoss, a loss name or a dict of its arguments, "
            f"got {type(distill_loss).__name__}"
        )
    if loss.reduction != "mean":
        raise ValueError(f"distill_loss: the Trainer needs reduction='mean', got {loss.reduction!r}")
    return loss


def _prepare_teacher(teacher, device) -> Optional[torch.nn.Module]:
    if teacher is None:
        return None
    if isinstance(teacher, str):
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(teacher)
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher_model: expected a torch.nn.Module or a model path, got {type(teacher).__name__}")
    teacher.eval()
    teacher.requires_grad_(False)
    dispatched = getattr(teacher, "hf_device_map", None) is not None
    params = list(teacher.parameters())
    on_cpu = not params or params[0].device.type == "cpu"
    if not dispatched and on_cpu and torch.device(device).type != "cpu":
        teacher.to(device)
    return teacher


def _default_collator(args: tuple, kwargs: dict) -> None:
    """Use kdfast.cache.collate for a TeacherCache training set when no collator was given."""
    if len(args) > 2 or kwargs.get("data_collator") is not None:
        return  # a collator (or the datasets) given positionally: leave them as they are
    train = kwargs.get("train_dataset")
    try:
        from .. import cache
    except ImportError:
        return
    cache_type = getattr(cache, "TeacherCache", None)
    if cache_type is None or not isinstance(train, cache_type):
        return
    proc = kwargs.get("processing_class")
    pad = getattr(proc, "pad_token_id", None)
    kwargs["data_collator"] = cache.Collator(0 if pad is None else int(pad))
