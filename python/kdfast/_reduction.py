"""The one reduction object: how per-row losses ℓ_r become the returned loss (api.md §1).

* ``"none"``: ℓ per row, in the logits' leading shape (masked rows 0);
* ``"sum"``: Σ ℓ_r;
* ``"mean"`` (alias ``"batchmean"``): Σ ℓ_r / D with D = ``num_items_in_batch`` when given
  (gradient accumulation), else the number of unmasked rows; D ≥ 1 always (a fully masked
  batch gives 0, not NaN).

D is a Python number when it is known on the host for free (CPU tensors in eager mode) and a
0-d tensor otherwise (accelerator tensors, ``torch.compile``), so no path makes a host sync.
Every op — dense, sparse, fused linear, the cross-entropy of :class:`kdfast.DistillationLoss`
— reduces through this class.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from ._validate import check_ignore_index, show_int

REDUCTIONS = ("none", "sum", "mean", "batchmean")
Number = Union[float, torch.Tensor]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return "mean" if reduction == "batchmean" else reduction


def check_num_items(n) -> Optional[Number]:
    """``num_items_in_batch``: None, a non-negative number, or a one-element real tensor.

    Returns None, a float ≥ 1 (0 is treated as 1), or — for a tensor that cannot be read on the
    host for free (on an accelerator, or while compiling) — the tensor itself, used as
    max(1, value) and never read on the host.
    """
    if n is None:
        return None
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype.is_complex or n.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, "
                             f"got shape {tuple(n.shape)} of {n.dtype}")
        if _compiling() or n.device.type != "cpu":
            return n
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"num_items_in_batch: expected a non-negative number, got {type(n).__name__}")
    try:
        v = float(n)
    except OverflowError:
        v = math.inf
    if not (math.isfinite(v) and v >= 0):
        got = show_int(int(n)) if isinstance(n, numbers.Integral) else repr(n)
        raise ValueError(f"num_items_in_batch: expected a finite number ≥ 0, got {got}")
    return max(v, 1.0)


class Reduction:
    """A validated ``reduction`` with its ``ignore_index`` and ``num_items_in_batch``."""

    __slots__ = ("kind", "ignore_index", "num_items")

    def __init__(self, reduction="mean", *, ignore_index=-100, num_items_in_batch=None):
        self.kind = check_reduction(reduction)
        self.ignore_index = check_ignore_index(ignore_index)
        self.num_items = check_num_items(num_items_in_batch)

    @property
    def per_row(self) -> bool:
        return self.kind == "none"

    def keep(self, labels: torch.Tensor) -> torch.Tensor:
        """The unmasked rows as a bool mask."""
        return labels != self.ignore_index

    def denominator(self, n_rows: int, labels: Optional[torch.Tensor]) -> Number:
        """D of ``"mean"`` (≥ 1): a float, or a 0-d tensor where reading it would sync."""
        n = self.num_items
        if isinstance(n, torch.Tensor):
            return n.reshape(()).to(torch.float32).clamp_min(1.0)
        if n is not None:
            return n
        if labels is None:
            return float(max(1, n_rows))
        kept = self.keep(labels).sum()
        if labels.device.type == "cpu" and not _compiling():
            return float(max(1, int(kept)))
        return kept.clamp_min(1).to(torch.float32)

    def weight(self, n_rows: int, labels: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """The kernels' row weight: None for ``"none"``/``"sum"`` (weight 1), else 1/D as a 0-d
        float32 tensor on ``device`` (the kernels fold it into the gradient in forward)."""
        if self.kind != "mean":
            return None
        d = self.denominator(n_rows, labels)
        if isinstance(d, torch.Tensor):
            return (1.0 / d).to(device=device, dtype=torch.float32)
        return torch.full((), 1.0 / d, dtype=torch.float32, device=device)

    def apply(self, rows: torch.Tensor, lead_shape, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Reduce per-row losses ``rows`` ``[N]`` (masked rows already 0) as asked."""
        if self.kind == "none":
            return rows.reshape(lead_shape)
        total = rows.sum()
        if self.kind == "sum":
            return total
        d = self.denominator(rows.shape[0], labels)
        if isinstance(d, torch.Tensor):
            d = d.to(device=total.device, dtype=total.dtype)
        return total / d

    def __repr__(self) -> str:
        return f"Reduction({self.kind!r}, ignore_index={self.ignore_index}, num_items={self.num_items!r})"
