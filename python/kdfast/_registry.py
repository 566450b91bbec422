"""The registry of losses: every dense loss is one :class:`LossSpec` here.

Validation, backend choice, the pure-PyTorch reference, the public functions and their
docstrings, :class:`kdfast.DistillationLoss`, :func:`kdfast.fused_linear_distill_loss` and the
tests all read this table; a loss name is written once. Adding a loss means: one entry here,
its math in each backend's kernel file (``reference.py``, ``kdfast-core`` ``divergence.rs`` and
its name in the binding, ``_triton/dense.py``) and tests — the tests parametrise over
:data:`LOSSES`. A loss without a kernel on some backend lists only the ones it has in
``backends``; ``backend="auto"`` then falls back to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._validate import check_param_tensor, check_real


@dataclass(frozen=True)
class Param:
    """A loss's one real parameter: name, default (None: required) and valid range (``[low,
    high]`` or ``[low, high)`` with ``high_open``). With ``tensor``, a 0-d floating tensor is
    accepted as it is (so a value that changes every step, e.g. TAID's ``t``, neither syncs
    with the device nor recompiles a ``torch.compile`` graph)."""

    name: str
    default: Optional[float]
    low: float
    high: float
    high_open: bool = False
    doc: str = ""
    tensor: bool = False

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value):
        if self.tensor and isinstance(value, torch.Tensor):
            return check_param_tensor(value, self.name, self.low, self.high)
        return check_real(value, self.name, low=self.low, high=self.high, high_open=self.high_open)


@dataclass(frozen=True)
class LossSpec:
    """One dense loss of api.md §1.

    ``reference(student, teacher, temperature[, param])`` gives the per-row ℓ of ``[N, V]``
    logits; ``edges`` maps a parameter value to the loss it is exactly (jsd at β = 0 is forward
    KL), so every backend computes an edge the same way; ``kernel_id`` numbers the loss for the
    Triton kernels.
    """

    name: str
    summary: str
    reference: Callable
    param: Optional[Param] = None
    edges: Dict[float, str] = field(default_factory=dict)
    backends: Tuple[str, ...] = ("rust", "triton", "torch")
    kernel_id: int = 0

    def check_param(self, value):
        """The checked parameter: a float, or a 0-d tensor for a ``tensor`` parameter."""
        return 0.0 if self.param is None else self.param.check(value)

    def canonical(self, param) -> Tuple["LossSpec", float]:
        """The loss (and parameter) that every backend runs for ``param``: an edge value is
        the plain loss it equals exactly (a tensor parameter is never read on the host, so it
        is the kernels' to treat exactly)."""
        target = None if isinstance(param, torch.Tensor) else self.edges.get(param)
        return (self, param) if target is None else (LOSSES[target], 0.0)

    def row_losses(self, student, teacher, temperature: float, param=0.0):
        """Per-row ℓ by the pure-PyTorch reference (differentiable; exact in float64)."""
        if self.param is None:
            return self.reference(student, teacher, temperature)
        return self.reference(student, teacher, temperature, param)


def _specs(*specs: LossSpec) -> Dict[str, LossSpec]:
    return {s.name: replace(s, kernel_id=i) for i, s in enumerate(specs)}


_BETA = Param("beta", 0.5, 0.0, 1.0, doc="β ∈ [0, 1]: the mixture weight of the teacher")
_SKEW = Param("skew", 0.1, 0.0, 1.0, high_open=True, doc="λ ∈ [0, 1): the skew of the mixture")
_HEAD_MASS = Param("head_mass", 0.5, 0.0, 1.0, doc="μ ∈ [0, 1]: the teacher mass of the head")
_T = Param("t", None, 0.0, 1.0, tensor=True,
           doc="t ∈ [0, 1], required: the interpolation weight of the teacher, a float or a 0-d tensor "
               "(e.g. from kdfast.TAIDSchedule; no host sync)")

LOSSES: Dict[str, LossSpec] = _specs(
    LossSpec("forward_kl", "Forward KL ``KL(p‖q) = Σ p (log p − log q)`` per row.",
             reference.forward_kl),
    LossSpec("reverse_kl", "Reverse KL ``KL(q‖p) = Σ q (log q − log p)`` per row.",
             reference.reverse_kl),
    LossSpec("jsd", "Generalised Jensen-Shannon divergence ``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = βp + (1−β)q``; "
             "exactly forward KL at β = 0 and reverse KL at β = 1 (the GKD / TRL convention).",
             reference.jsd, _BETA, {0.0: "forward_kl", 1.0: "reverse_kl"}),
    LossSpec("skew_forward_kl", "Skew forward KL ``KL(p ‖ λp + (1−λ)q)``, λ = skew (DistiLLM); exactly forward KL at λ = 0.",
             reference.skew_forward_kl, _SKEW, {0.0: "forward_kl"}),
    LossSpec("skew_reverse_kl", "Skew reverse KL ``KL(q ‖ λq + (1−λ)p)``, λ = skew; exactly reverse KL at λ = 0.",
             reference.skew_reverse_kl, _SKEW, {0.0: "reverse_kl"}),
    LossSpec("tvd", "Total variation distance ``½ Σ |p − q|`` per row.", reference.tvd),
    LossSpec("akl", "Adaptive KL (Wu et al. 2024) ``w_h KL(p‖q) + w_t KL(q‖p)`` per row: with the ids ordered by "
             "p descending (ties: lower id first), the head H is every id whose cumulative teacher mass is ≤ "
             "head_mass, plus the first; ``w_h = g_H / (g_H + g_T)``, ``g_H = Σ_H |p − q|``, ``g_T = Σ_{∉H} |p − q|`` "
             "(½ each when both are 0), constants for the gradient.",
             reference.akl, _HEAD_MASS),
    LossSpec("taid", "TAID (Shing et al., ICLR 2025) ``KL(p_t‖q)`` per row, ``p_t = softmax(((1 − t)·sg(z_s) + "
             "t·z_t) / T)``: exactly forward KL at t = 1, 0 at t = 0 (kdfast.TAIDSchedule moves t).",
             reference.taid, _T, {1.0: "forward_kl"}),
)


def get(name) -> LossSpec:
    """The spec of loss ``name`` (``ValueError`` listing the known names otherwise)."""
    spec = LOSSES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"loss: expected one of {', '.join(map(repr, LOSSES))}, got {name!r}")
    return spec


def param_names() -> Tuple[str, ...]:
    """Every loss parameter's keyword (``beta``, ``skew``, ...)."""
    return tuple(dict.fromkeys(s.param.name for s in LOSSES.values() if s.param is not None))


