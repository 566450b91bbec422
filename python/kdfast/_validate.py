"""Argument checks shared by every public function: bad input gets a clear exception naming
the argument, what was expected and what was given — never a crash, a hang or a NaN."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ._errors import DtypeError

#: What the Rust and Triton kernels read (they compute in float32).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Logits, hidden states and heads: the kernels' dtypes, and float64 (exact on the reference).
LOGIT_DTYPES = KERNEL_DTYPES + (torch.float64,)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The kernels compute in float32: T and 1/T must both be normal float32 numbers.
_F32_TINY = 2.0**-126
_F32_MAX = float(torch.finfo(torch.float32).max)
#: Bound of ``k`` and ``num_samples`` (slot indices and counts are 32-bit in the kernels).
MAX_COUNT = 1 << 32


def check_logits(x, name: str, *, empty_ok: bool = False) -> torch.Tensor:
    """Logits ``[..., V]`` of a dtype the kernels or the reference read. ``empty_ok``: V may be 0
    (a rank's slice of a vocabulary sharded across a group, whose whole vocabulary is checked
    after the group's first all-reduce, on every rank together)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of logits, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise DtypeError(
            f"{name}: expected floating-point logits (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: expected logits of shape [..., V], got a 0-d tensor")
    if x.shape[-1] == 0 and not empty_ok:
        raise ValueError(f"{name}: empty vocabulary (last dimension is 0) in shape {tuple(x.shape)}")
    return x


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` as ``[N, V]`` rows (a view when the layout allows), also when V is 0."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def check_real(value, name: str, *, low: float, high: float, high_open: bool = False,
               low_open: bool = False) -> float:
    """A real number in [low, high] (with open ends as asked); returns it as float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf if value > 0 else -math.inf
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (math.isfinite(v) and lo_ok and hi_ok):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name}: expected a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def check_param_tensor(value: torch.Tensor, name: str, low: float, high: float) -> torch.Tensor:
    """A 0-d floating tensor in ``[low, high]``, returned as float32 on its device. A CPU value
    is checked at once (free); a device value by an asynchronous device assertion (no host
    sync: a bad value fails at the next synchronisation)."""
    if value.dim() != 0 or not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a real number or a 0-d floating tensor, "
                        f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
    value = value.detach().to(torch.float32)
    ok = (value >= low) & (value <= high)
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(f"{name}: expected a finite number in [{low}, {high}], got {float(value)!r}")
    elif value.device.type != "meta":
        torch._assert_async(ok, f"{name}: expected a number in [{low}, {high}]")
    return value


def check_class_ids(labels: torch.Tensor, keep: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels of the kept rows are class ids in ``[0, vocab)`` (a host read: the caller skips it
    where :func:`kdfast._dispatch.host_reads_allowed` says no)."""
    bad = keep & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels: expected class ids in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {int(labels[bad][0])}")


def check_temperature(t) -> float:
    """T > 0 such that T and 1/T are normal float32 numbers (the kernels scale by 1/T in float32)."""
    v = check_real(t, "temperature", low=0.0, high=math.inf, low_open=True, high_open=True)
    if not (_F32_TINY <= v <= _F32_MAX and 1.0 / v <= _F32_MAX):
        raise ValueError(f"temperature: expected a number in [{_F32_TINY:.3g}, {_F32_MAX:.3g}] "
                         f"(T and 1/T must be normal float32 numbers), got {t!r}")
    return v


def show_int(v: int) -> str:
    """An integer for an error message: powers of two near them as ``2**k``, others in full
    unless they are absurdly long."""
    a = abs(v)
    for k in range(32, 4096):
        for off, text in ((0, f"2**{k}"), (-1, f"2**{k} - 1")):
            if a == (1 << k) + off:
                return ("-" if v < 0 else "") + (f"({text})" if v < 0 and off else text)
        if a < (1 << k) - 1:
            break
    digits = str(a)
    return digits if len(digits) <= 30 else f"an integer of {len(digits)} digits"


def check_int(value, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (not a bool) in [low, high] when bounds are given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        lo = "-inf" if low is None else show_int(low)
        hi = "inf" if high is None else show_int(high)
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {show_int(v)}")
    return v


def check_count(value, name: str) -> int:
    """``k`` / ``num_samples``: an integer in [1, :data:`MAX_COUNT`)."""
    return check_int(value, name, low=1, high=MAX_COUNT - 1)


def check_ignore_index(value) -> int:
    """``ignore_index`` is compared with int64 labels: it must be an int64."""
    return check_int(value, "ignore_index", low=INT64_MIN, high=INT64_MAX)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


@dataclass
class Pair:
    """Validated student/teacher logits as 2-D ``[N, V]`` views (vocabulary already cut)."""

    student: torch.Tensor  # the caller's tensor
    s_rows: torch.Tensor  # the student as [N, V_s] rows (a view when the layout allows): the kernels' input
    s2: torch.Tensor
    t2: torch.Tensor
    labels: Optional[torch.Tensor]  # int64 [N] or None
    lead_shape: torch.Size
    vocab: int


def check_vocab(vocab_size, vs: int, vt: int, *, what: str = "student_logits", other: str = "teacher_logits") -> int:
    """The vocabulary used: ``vocab_size`` (1 ≤ it ≤ both sizes) or, when None, the common size."""
    if vocab_size is None:
        if vs != vt:
            raise ValueError(
                f"vocab_size: {what} has vocabulary size {vs} but {other} has {vt}; "
                f"pass vocab_size=... to use only the first columns of both"
            )
        return vs
    v = check_int(vocab_size, "vocab_size")
    if not 1 <= v <= min(vs, vt):
        raise ValueError(
            f"vocab_size: expected 1 <= vocab_size <= min({vs}, {vt}) (student, teacher vocabulary sizes), got {v}"
        )
    return v


def check_labels(labels, lead: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    """``labels`` of leading shape ``lead`` on ``device`` as int64 ``[N]`` (or None)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DtypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if labels.shape != lead:
        raise ValueError(f"labels: expected shape {tuple(lead)} (the leading shape of the logits), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: expected device {device}, got {labels.device}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def check_pair(student, teacher, *, vocab_size, labels, empty_ok: bool = False) -> Pair:
    student = check_logits(student, "student_logits", empty_ok=empty_ok)
    teacher = check_logits(teacher, "teacher_logits", empty_ok=empty_ok)
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
    v = check_vocab(vocab_size, vs, vt)
    labels = check_labels(labels, lead, student.device)
    s_rows = as_rows(student)
    t2 = as_rows(teacher)[:, :v]
    return Pair(student, s_rows, s_rows[:, :v], t2, labels, lead, v)


def reject_unknown(what: str, kwargs: dict, allowed) -> None:
    """Python's convention for an unexpected keyword: ``TypeError`` naming it (``what``: the
    function, or ``loss='...'`` when the keywords are a loss's)."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(map(repr, unknown))} not accepted by {what}; "
                        f"expected some of {', '.join(map(repr, sorted(allowed)))}")


def env_int(name: str, default: int, *, minimum: int, what: str) -> int:
    """The integer in environment variable ``name`` (``default`` when unset or empty), at least
    ``minimum``; a ValueError naming the variable otherwise. ``what`` describes it in the message."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}: expected {what}, got {raw!r}") from None
    return value
