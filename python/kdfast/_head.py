"""The LM head's logits ``h Wᵀ + b`` as float32, for the fused losses (one place for both the
single-process op of :mod:`kdfast.fused_linear` and the vocabulary-parallel one of
:mod:`kdfast.parallel.fused`).

Float32 accumulation *and* a float32 result: bf16-rounded logits are what made Liger's fused
bf16 gradients 4–23 % wrong. On the CPU, half-precision matmuls round their output, so a
half-precision head is multiplied as one float32 copy (:func:`float_copy`); on CUDA the tensor
cores give a float32 output straight from half-precision operands.
"""

from __future__ import annotations

from typing import Optional

import torch

HALF = (torch.bfloat16, torch.float16)


def float_copy(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The float32 copy of a half-precision CPU head that :func:`logits_f32` multiplies by
    (None where the head is used as it is)."""
    return w.float() if (w.device.type == "cpu" and w.dtype in HALF) else None


def logits_f32(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], w32: Optional[torch.Tensor]) -> torch.Tensor:
    """``h wᵀ + b`` as a float32 ``[C, V]`` tensor, accumulated in float32 (``w32``: the float
    copy of ``w`` from :func:`float_copy`, or None)."""
    if w32 is not None:  # CPU half precision: one float32 copy of the head per call
        z = h.float() @ w32.t()
    elif h.dtype == torch.float32 and w.dtype == torch.float32:
        z = h @ w.t()
    else:  # CUDA half precision: float32 output straight from the tensor cores
        z = mm_f32(h, w.t().to(h.dtype))
    if b is not None:
        z = z + b.to(z.dtype)
    return z


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with a float32 result."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a PyTorch without mm(..., out_dtype): upcast instead
        return a.float() @ b.float()
