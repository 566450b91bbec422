"""kdfast: fast, exact knowledge-distillation losses for LLMs.

The dense losses of api.md §1 (:func:`forward_kl`, :func:`reverse_kl`, :func:`jsd`,
:func:`skew_forward_kl`, :func:`skew_reverse_kl`, :func:`tvd`, :func:`akl`, :func:`taid` with its
:class:`TAIDSchedule`) compute the loss and its gradient
w.r.t. the student logits in one fused pass: a Rust kernel on CPU, or the pure-PyTorch
:mod:`kdfast.reference` elsewhere.

Offline distillation (api.md §2): :func:`compress_topk` / :func:`compress_sample` turn teacher
logits into :class:`SparseTargets`, :func:`sparse_loss` (forward KL: :func:`sparse_kl`; reverse
KL, JSD, TVD) is the loss against them, and
:func:`encode_targets` / :func:`decode_targets` pack them for storage.

Fused linear (api.md §3): :func:`fused_linear_distill_loss` computes any of these losses from
hidden states and the LM head chunk by chunk, never holding the ``[N, V]`` logits.

Training loops (api.md §4): :class:`DistillationLoss` mixes a distillation loss with the
cross-entropy on the labels; :mod:`kdfast.integrations.transformers` has a Hugging Face Trainer.

CPU gradients are written into reused buffers (no page faults per call); :func:`set_gradient_pool`
caps the memory kept for them.
"""

from . import losses, reference
from ._buffers import gradient_pool_bytes, set_gradient_pool
from ._errors import DtypeError
from ._kdfast import __version__
from ._registry import LOSSES
from .distill import DistillationLoss
from .fused_linear import fused_linear_distill_loss
from .schedule import TAIDSchedule
from .sparse import compress_sample, compress_topk, sparse_kl, sparse_loss
from .targets import EncodedTargets, SparseTargets, decode_targets, encode_targets

# The dense losses of api.md §1, one per registry entry (kdfast.forward_kl, kdfast.jsd, ...).
globals().update({name: getattr(losses, name) for name in LOSSES})

__all__ = [
    "__version__",
    "DtypeError",
    *LOSSES,
    "TAIDSchedule",
    "reference",
    "SparseTargets",
    "compress_topk",
    "compress_sample",
    "sparse_kl",
    "sparse_loss",
    "EncodedTargets",
    "encode_targets",
    "decode_targets",
    "DistillationLoss",
    "fused_linear_distill_loss",
    "set_gradient_pool",
    "gradient_pool_bytes",
]
