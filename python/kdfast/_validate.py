"""Argument checks shared by every loss: bad input gets a clear exception, never a crash."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean")
BACKENDS = ("auto", "rust", "triton", "torch")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


from ._errors import DtypeError  # noqa: F401  (re-exported)


def check_logits(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of logits, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise DtypeError(
            f"{name}: expected floating-point logits (float32, bfloat16, float16 or float64), "
            f"got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: expected logits of shape [..., V], got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: empty vocabulary (last dimension is 0) in shape {tuple(x.shape)}")
    return x


def check_real(value, name: str, *, low: float, high: float, high_open: bool = False,
               low_open: bool = False) -> float:
    """A real number in [low, high] (with open ends as asked); returns it as float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (math.isfinite(v) and lo_ok and hi_ok):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_temperature(t) -> float:
    return check_real(t, "temperature", low=0.0, high=math.inf, low_open=True, high_open=True)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return "mean" if reduction == "batchmean" else reduction


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def check_num_items(n) -> Optional[float]:
    """``num_items_in_batch``: None, a positive int, or a one-element tensor. 0 is treated as 1
    (a fully masked accumulation window gives loss 0, not NaN)."""
    if n is None:
        return None
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype.is_complex:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got shape {tuple(n.shape)}")
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(float(n)):
        raise TypeError(f"num_items_in_batch: expected a non-negative number, got {n!r}")
    if n < 0:
        raise ValueError(f"num_items_in_batch: expected a non-negative number, got {n!r}")
    return max(float(n), 1.0)


@dataclass
class Pair:
    """Validated student/teacher logits as 2-D ``[N, V]`` views (vocabulary already cut)."""

    student: torch.Tensor  # the caller's tensor (autograd input)
    s2: torch.Tensor
    t2: torch.Tensor
    labels: Optional[torch.Tensor]  # int64 [N] or None
    lead_shape: torch.Size
    vocab: int


def check_pair(student, teacher, *, vocab_size, labels) -> Pair:
    student = check_logits(student, "student_logits")
    teacher = check_logits(teacher, "teacher_logits")
    if student.device != teacher.device:
        raise ValueError(
            f"teacher_logits: expected the device of student_logits ({student.device}), got {teacher.device}"
        )
    lead = student.shape[:-1]
    if teacher.shape[:-1] != lead:
        raise ValueError(
            f"teacher_logits: expected leading shape {tuple(lead)} (that of student_logits {tuple(student.shape)}), "
            f"got {tuple(teacher.shape)}"
        )
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"vocab_size: student_logits has vocabulary size {vs} but teacher_logits has {vt}; "
                f"pass vocab_size=... to use only the first columns of both"
            )
        v = vs
    else:
        v = check_int(vocab_size, "vocab_size")
        if not 1 <= v <= min(vs, vt):
            raise ValueError(
                f"vocab_size: expected 1 <= vocab_size <= min({vs}, {vt}) (student, teacher vocabulary sizes), got {v}"
            )
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise DtypeError(f"labels: expected an integer tensor, got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels: expected shape {tuple(lead)} (the leading shape of the logits), got {tuple(labels.shape)}")
        if labels.device != student.device:
            raise ValueError(f"labels: expected device {student.device}, got {labels.device}")
        labels = labels.reshape(-1).to(torch.int64).contiguous()
    s2 = student.reshape(-1, vs)[:, :v]
    t2 = teacher.reshape(-1, vt)[:, :v]
    return Pair(student, s2, t2, labels, lead, v)


def reduce_scale(reduction: str, n_rows: int, labels: Optional[torch.Tensor], ignore_index: int,
                 num_items: Optional[float]) -> Optional[float]:
    """The factor turning Σℓ into the reduced loss: None for ``"none"``, 1 for ``"sum"``, and for
    ``"mean"`` 1 / D with D = ``num_items`` or max(1, unmasked rows). ``reduction`` must
    already be normalised by :func:`check_reduction`."""
    if reduction == "none":
        return None
    if reduction == "sum":
        return 1.0
    if num_items is not None:
        return 1.0 / num_items
    kept = n_rows if labels is None else int((labels != ignore_index).sum())
    return 1.0 / max(1, kept)


def reduce_scale_on_device(reduction: str, n_rows: int, labels: Optional[torch.Tensor], ignore_index: int,
                           num_items_in_batch):
    """:func:`reduce_scale` without host syncs, for the device kernels: None, a float, or a 0-d
    float32 tensor on the device of ``labels`` / ``num_items_in_batch`` (1 / D of ``"mean"``).
    A ``num_items_in_batch`` tensor on an accelerator is not read on the host: its shape is
    checked, and D = max(1, its value)."""
    if reduction in ("none", "sum"):
        return reduce_scale(reduction, n_rows, labels, ignore_index, None)
    n = num_items_in_batch
    if isinstance(n, torch.Tensor) and n.device.type != "cpu":
        if n.numel() != 1 or n.dtype.is_complex or n.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, "
                             f"got shape {tuple(n.shape)} of {n.dtype}")
        return 1.0 / n.reshape(()).to(torch.float32).clamp_min(1.0)
    num_items = check_num_items(n)
    if num_items is not None or labels is None:
        return reduce_scale(reduction, n_rows, None, ignore_index, num_items)
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
