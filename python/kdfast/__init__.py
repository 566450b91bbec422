"""kdfast: fast, exact knowledge-distillation losses for LLMs.

The dense losses of api.md §1 (:func:`forward_kl`, :func:`reverse_kl`, :func:`jsd`,
:func:`skew_forward_kl`, :func:`skew_reverse_kl`, :func:`tvd`) compute the loss and its gradient
w.r.t. the student logits in one fused pass: a Rust kernel on CPU, or the pure-PyTorch
:mod:`kdfast.reference` elsewhere.
"""

from . import reference
from ._kdfast import __version__
from ._validate import DtypeError
from .losses import forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd

__all__ = [
    "__version__",
    "DtypeError",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "reference",
]
