"""Offline distillation: sparse teacher targets and the loss against them (api.md §2).

A teacher's full ``[..., V]`` distribution is expensive to store; offline distillation keeps a
few ids per token instead:

* :func:`compress_topk` — the k most probable ids, their log-probabilities (normalised over the
  full vocabulary) and the log of the mass left outside them (``tail_logprob``);
* :func:`compress_sample` — ``num_samples`` draws with replacement from the teacher, the distinct
  ids weighted by ``count / N`` (Random-Sampling KD: an unbiased estimate of the full loss's
  gradient);
* :class:`SparseTargets` holds either, and :func:`sparse_kl` is the loss of a student against
  them; :func:`encode_targets` / :func:`decode_targets` pack them into fixed-size byte records
  for storage.

On CPU the work runs in the Rust kernels (one streaming pass over each teacher row, bounded
memory; the loss and its gradient fused in forward), on CUDA in the Triton kernels of
:mod:`kdfast._triton.compress` and :mod:`kdfast._triton.sparse` (the same algorithms), and for
float64 in the pure PyTorch :mod:`kdfast.reference_sparse`. All three list the same top-k ids
and, for sampling, replay the same draws, so the same seed gives the same targets on every
backend and thread count. :func:`prepare_sparse` and the chunk-level ``sparse_call`` of
:mod:`kdfast._native` and :mod:`kdfast._triton.sparse` are what
:func:`kdfast.fused_linear_distill_loss` reuses.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import _native, _triton
from . import reference_sparse as _ref
from ._validate import (
    DtypeError,
    check_backend,
    check_int,
    check_logits,
    check_num_items,
    check_pair,
    check_reduction,
    check_temperature,
    reduce_scale,
    reduce_scale_on_device,
)
from .losses import _RustDense, finish_fused_forward, register_rows_autograd

__all__ = [
    "SparseTargets",
    "compress_topk",
    "compress_sample",
    "sparse_kl",
    "EncodedTargets",
    "encode_targets",
    "decode_targets",
]

METHODS = ("topk", "sample")
TAILS = ("bucket", "renorm")
_U64 = 1 << 64


# ----------------------------------------------------------------------------- SparseTargets


def _tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def _float_tensor(x, name: str, shape, device) -> torch.Tensor:
    x = _tensor(x, name)
    if not x.dtype.is_floating_point:
        raise DtypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name}: expected device {device} (that of indices), got {x.device}")
    return x


class SparseTargets:
    """Sparse teacher targets for every row (token) of a batch; built by keyword.

    Args:
        indices: integer tensor ``[..., k]`` of vocabulary ids; ``-1`` marks an unused slot.
        logprobs: float tensor ``[..., k]``: the teacher's log-probability of each id,
            normalised over the full vocabulary at ``temperature`` (``-inf`` in unused slots).
        weights: float tensor ``[..., k]`` (sampled targets: ``count / N``) or None (top-k).
        tail_logprob: float tensor ``[...]`` or None: log of the teacher mass outside
            ``indices`` (top-k; without it the loss uses ``1 − Σ exp(logprobs)``).
        temperature: the temperature the teacher log-probs were computed at (> 0).
        method: ``"topk"`` (no ``weights``) or ``"sample"`` (``weights`` required, no tail).

    The fields are attributes; :meth:`to` moves every tensor. Shapes, dtypes, devices and the
    method are validated on construction (``ValueError``/``TypeError`` naming the field);
    values (id range, duplicates, NaN) are checked by :func:`sparse_kl` against the student.
    """

    __slots__ = ("indices", "logprobs", "weights", "tail_logprob", "temperature", "method")

    def __init__(self, *, indices: torch.Tensor, logprobs: torch.Tensor,
                 weights: Optional[torch.Tensor] = None, tail_logprob: Optional[torch.Tensor] = None,
                 temperature: float = 1.0, method: str = "topk"):
        indices = _tensor(indices, "indices")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise DtypeError(f"indices: expected an integer tensor of vocabulary ids, got {indices.dtype}")
        if indices.dim() == 0 or indices.shape[-1] == 0:
            raise ValueError(f"indices: expected shape [..., k] with k ≥ 1, got {tuple(indices.shape)}")
        dev = indices.device
        logprobs = _float_tensor(logprobs, "logprobs", indices.shape, dev)
        if weights is not None:
            weights = _float_tensor(weights, "weights", indices.shape, dev)
        if tail_logprob is not None:
            tail_logprob = _float_tensor(tail_logprob, "tail_logprob", indices.shape[:-1], dev)
        if method not in METHODS:
            raise ValueError(f"method: expected 'topk' or 'sample', got {method!r}")
        if method == "sample" and weights is None:
            raise ValueError("weights: method='sample' needs weights (count / N per slot), got None")
        if method == "topk" and weights is not None:
            raise ValueError("weights: top-k targets have no weights; pass method='sample' for sampled targets")
        if method == "sample" and tail_logprob is not None:
            raise ValueError("tail_logprob: sampled targets have no tail; pass tail_logprob=None")
        self.indices = indices
        self.logprobs = logprobs
        self.weights = weights
        self.tail_logprob = tail_logprob
        self.temperature = check_temperature(temperature)
        self.method = method

    @property
    def shape(self) -> torch.Size:
        """The leading shape ``[...]`` (that of the student logits without V)."""
        return self.indices.shape[:-1]

    @property
    def k(self) -> int:
        """Slots per row."""
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def _replace(self, **changes) -> "SparseTargets":
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return SparseTargets(**fields)

    def to(self, device, *, non_blocking: bool = False) -> "SparseTargets":
        """The same targets with every tensor on ``device``."""
        move = (lambda t: None if t is None else t.to(device, non_blocking=non_blocking))
        return self._replace(indices=move(self.indices), logprobs=move(self.logprobs),
                             weights=move(self.weights), tail_logprob=move(self.tail_logprob))

    def reshape(self, *shape) -> "SparseTargets":
        """Targets with leading shape ``shape`` (e.g. ``reshape(-1)`` for ``[N, k]``)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        lead = torch.empty(self.shape, device="meta").reshape(shape).shape
        k = self.k
        return self._replace(
            indices=self.indices.reshape(*lead, k), logprobs=self.logprobs.reshape(*lead, k),
            weights=None if self.weights is None else self.weights.reshape(*lead, k),
            tail_logprob=None if self.tail_logprob is None else self.tail_logprob.reshape(lead),
        )

    def __repr__(self) -> str:
        return (f"SparseTargets(method={self.method!r}, shape={tuple(self.shape)}, k={self.k}, "
                f"temperature={self.temperature}, tail={'yes' if self.tail_logprob is not None else 'no'}, "
                f"device={self.device})")


# ----------------------------------------------------------------------------- backends


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"``: Rust on CPU, Triton on CUDA (float32/bf16/fp16), else PyTorch; a forced
    ``"rust"``/``"triton"`` must be able to run on ``device`` and ``dtype``."""
    backend = check_backend(backend)
    native = dtype in _native.NATIVE_DTYPES
    if backend == "auto":
        return _triton.auto_backend(device) if native else "torch"
    if backend == "rust" and device.type != "cpu":
        raise ValueError(f"backend: 'rust' runs on CPU tensors, got tensors on {device}; use backend='auto'")
    if backend == "triton":
        _triton.check_usable(device)
    if backend in ("rust", "triton") and not native:
        raise DtypeError(f"backend: {backend!r} supports float32, bfloat16 and float16 logits, got {dtype}; "
                         f"use backend='torch'")
    return backend


def _triton_op(name: str):
    """``kdfast._triton.<name>``, imported on first use (``import kdfast`` never needs Triton)."""
    import importlib

    return importlib.import_module(f"._triton.{name}", __package__)


def _positive_int(value, name: str) -> int:
    v = check_int(value, name)
    if v < 1:
        raise ValueError(f"{name}: expected an integer ≥ 1, got {v}")
    return v


def _seed(value, name: str) -> int:
    v = check_int(value, name)
    if not 0 <= v < _U64:
        raise ValueError(f"{name}: expected an integer in [0, 2**64), got {v}")
    return v


# ----------------------------------------------------------------------------- compression


def compress_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                  backend: str = "auto") -> SparseTargets:
    """The top-k of ``softmax(teacher_logits / T)`` per row, as :class:`SparseTargets`.

    Returns ``indices`` (int64 ``[..., k]``, most probable first, ties → lower id first),
    ``logprobs`` (float32, normalised over the full vocabulary) and ``tail_logprob`` (float32
    ``[...]``, ``log(1 − Σ p_topk)``, computed from the tail's own log-sum-exp so it is accurate
    even for 1e-30 or e^-5000; ``-inf`` when nothing is left). Zero-probability entries (``-inf``
    logits) are never listed; if fewer than k entries are finite (or k > V) the remaining slots
    hold id -1 and log-prob -inf.

    Args:
        teacher_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on the torch backend).
        k: ids per row, ≥ 1.
        temperature: T > 0, stored as ``targets.temperature``.
        backend: ``"auto"`` (Rust for CPU and Triton for CUDA float32/bf16/fp16 tensors — one
            streaming pass per row, O(k) memory — else PyTorch), ``"rust"``, ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``; k above 1024 falls back to the PyTorch
            sort on the same device) or ``"torch"``. Every backend lists the same ids.
    """
    x = check_logits(teacher_logits, "teacher_logits").detach()
    k = _positive_int(k, "k")
    t = check_temperature(temperature)
    backend = _resolve_backend(backend, x.device, x.dtype)
    lead, v = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, v)
    n = x2.shape[0]
    if backend == "torch" or n == 0:
        ids, lp, tail = _ref.compress_topk(x2, k, t)
    elif backend == "triton":
        ids, lp, tail = _triton_op("compress").compress_topk(x2, k, t)
    else:
        ids, lp, tail = _native.compress_topk(x2, k, t)
    return SparseTargets(indices=ids.reshape(*lead, k), logprobs=lp.reshape(*lead, k),
                         tail_logprob=tail.reshape(lead), temperature=t, method="topk")


def compress_sample(teacher_logits: torch.Tensor, num_samples: int, *, temperature: float = 1.0,
                    seed: int = 0, row_offset: int = 0, backend: str = "auto") -> SparseTargets:
    """``num_samples`` draws with replacement from ``softmax(teacher_logits / T)`` per row.

    The distinct ids drawn are returned with ``weights = count / num_samples`` and their
    log-probabilities (most probable first), padded to ``num_samples`` slots with id -1,
    weight 0 and log-prob -inf. ``Σ_i w_i f(id_i)`` is an unbiased estimate of ``E_p[f]``, so
    :func:`sparse_kl` on these targets has expectation ``KL(p‖q)`` up to a constant and an
    unbiased gradient (Random-Sampling KD).

    Deterministic: the draws of row r depend only on ``(seed, row_offset + r, its logits)``
    (counter-based SplitMix64 streams), never on the thread count, the backend or how the
    batch is split — pass a running row count as ``row_offset`` when compressing a dataset
    batch by batch, so that every token gets its own random stream.

    Args:
        teacher_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on the torch backend).
        num_samples: draws per row N, ≥ 1.
        temperature: T > 0.
        seed, row_offset: integers in [0, 2**64).
        backend: as for :func:`compress_topk`; Rust, Triton and PyTorch draw the same ids
            (they could differ only if a uniform fell within ~1e-15 of a cumulative-sum
            boundary, where two float64 ``exp`` implementations may round differently).
    """
    x = check_logits(teacher_logits, "teacher_logits").detach()
    n_s = _positive_int(num_samples, "num_samples")
    if n_s >= 1 << 32:
        raise ValueError(f"num_samples: expected an integer below 2**32, got {n_s}")
    t = check_temperature(temperature)
    seed = _seed(seed, "seed")
    row_offset = _seed(row_offset, "row_offset")
    backend = _resolve_backend(backend, x.device, x.dtype)
    lead, v = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, v)
    n = x2.shape[0]
    if backend == "torch" or n == 0:
        ids, lp, w = _ref.compress_sample(x2, n_s, t, seed, row_offset)
    elif backend == "triton":
        ids, lp, w = _triton_op("compress").compress_sample(x2, n_s, t, seed, row_offset)
    else:
        ids, lp, w = _native.compress_sample(x2, n_s, t, seed, row_offset)
    return SparseTargets(indices=ids.reshape(*lead, n_s), logprobs=lp.reshape(*lead, n_s),
                         weights=w.reshape(*lead, n_s), temperature=t, method="sample")


# ----------------------------------------------------------------------------- the loss


@dataclasses.dataclass
class SparseInputs:
    """The validated, flattened arrays of a sparse loss call (see :func:`prepare_sparse`).

    ``ids`` int64 ``[N, k]``; ``lp``, ``w`` (sampled only), ``tail`` (bucket only, when the
    targets have one) ``[N, k]``/``[N]`` float32 (float64 when asked), all contiguous;
    ``labels`` int64 ``[N]`` or None; ``mode`` is ``"bucket"``, ``"renorm"`` or ``"sampled"``.
    """

    mode: str
    temperature: float
    ids: torch.Tensor
    lp: torch.Tensor
    w: Optional[torch.Tensor]
    tail: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    lead_shape: torch.Size
    vocab: int


def _host_checks_allowed(device: torch.device) -> bool:
    """Whether value checks may read tensors on the host: not while compiling, not during
    CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def prepare_sparse(targets: SparseTargets, lead_shape, vocab: int, device, *, tail: str = "bucket",
                   temperature: Optional[float] = None, labels: Optional[torch.Tensor] = None,
                   float_dtype: torch.dtype = torch.float32, name: str = "student_logits") -> SparseInputs:
    """Validate sparse ``targets`` (and ``tail``, ``temperature``, ``labels``) against a student
    of leading shape ``lead_shape``, vocabulary ``vocab`` on ``device``, and return the flat
    arrays the kernels take (:class:`SparseInputs`). ``name`` is the student argument named in
    errors.

    Raises ``TypeError``/``ValueError`` naming the argument. The id range check reads the ids on
    the host; it is skipped while compiling and during CUDA-graph capture (the Triton kernel
    then gives such a row a NaN loss). The other value checks (log-probs, weights, repeated
    ids) are the backends' (:func:`check_values` for the PyTorch path).
    """
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    if tail not in TAILS:
        raise ValueError(f"tail: expected 'bucket' or 'renorm', got {tail!r}")
    t = targets.temperature if temperature is None else check_temperature(temperature)
    lead = torch.Size(lead_shape)
    if targets.shape != lead:
        raise ValueError(f"targets: expected leading shape {tuple(lead)} (that of {name}), got {tuple(targets.shape)}")
    if targets.device != torch.device(device):
        raise ValueError(f"targets: expected the device of {name} ({device}), got {targets.device}")
    if labels is not None:
        # The labels checks of the dense losses, on a stand-in for the student (no memory).
        probe = torch.empty((), device=device).expand(*lead, 1)
        labels = check_pair(probe, probe, vocab_size=None, labels=labels).labels
    mode = "sampled" if targets.method == "sample" else tail
    k = targets.k
    ids = targets.indices.detach().reshape(-1, k).to(torch.int64).contiguous()
    if _host_checks_allowed(ids.device) and ids.numel():
        bad = (ids < -1) | (ids >= vocab)
        if bool(bad.any()):
            raise ValueError(
                f"targets.indices: expected vocabulary ids in [0, {vocab}) (the student's vocabulary size) "
                f"or -1 for an unused slot, got {ids[bad][0].item()}"
            )
    flat = (lambda x, *shape: x.detach().reshape(*shape).to(float_dtype).contiguous())
    return SparseInputs(
        mode=mode, temperature=t, ids=ids, lp=flat(targets.logprobs, -1, k),
        w=flat(targets.weights, -1, k) if mode == "sampled" else None,
        tail=flat(targets.tail_logprob, -1) if mode == "bucket" and targets.tail_logprob is not None else None,
        labels=labels, lead_shape=lead, vocab=vocab,
    )


def check_values(prep: SparseInputs, s2: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """The value checks the Rust kernel makes (same messages), on the host: the targets'
    log-probs, weights and repeated ids, and a finite maximum in every unmasked student row.
    Returns the unmasked row numbers (None without labels)."""
    _ref.check_target_values(prep.ids, prep.lp, prep.w, prep.tail, prep.mode)
    if prep.labels is None:
        _ref.check_rows(s2.detach(), "student_logits")
        return None
    keep = (prep.labels != ignore_index).nonzero().squeeze(1)
    _ref.check_rows(s2.detach()[keep], "student_logits", rows=keep)
    return keep


class _RustSparse(_RustDense):
    """Loss rows from the Rust kernel, the gradient produced in forward (backward as dense)."""

    @staticmethod
    def forward(ctx, student, flat: tuple, spec: tuple, ignore_index: int, reduce_scale):
        s2, prep = flat
        (t2_scale,) = spec
        s2 = _native.as_rows(s2)
        n, v = s2.shape
        rows = torch.empty(n, dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty((n, v), dtype=student.dtype) if need_grad else None
        _native.sparse_call(prep.mode, s2, prep.ids, prep.lp, prep.w, prep.tail, prep.labels, ignore_index,
                            prep.temperature, t2_scale, 1.0 if reduce_scale is None else reduce_scale, rows, grad)
        return finish_fused_forward(ctx, student, rows, grad, prep.lead_shape, reduce_scale)


def sparse_kl(student_logits: torch.Tensor, targets: SparseTargets, *, tail: str = "bucket",
              temperature: Optional[float] = None, labels: Optional[torch.Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
              t2_scale: bool = False, backend: str = "auto") -> torch.Tensor:
    """Distillation loss of ``student_logits`` against sparse teacher ``targets``.

    Per row, with ``log q`` the student's full-vocabulary log-softmax at temperature T and
    ``p_i = exp(targets.logprobs[i])`` for the listed ids:

    * top-k, ``tail="bucket"``: KL over k + 1 categories, the listed ids plus one bucket for the
      rest of the vocabulary on both sides:
      ``Σ_i p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)``, with
      ``p_tail = exp(targets.tail_logprob)`` (``1 − Σ p`` without one; 0 when every id is
      listed) and ``q_tail = 1 − Σ_i q_i`` computed without cancellation;
    * top-k, ``tail="renorm"``: ``Σ_i p̃_i (log p̃_i − log q_i)``, ``p̃ = p / Σ p``;
    * sampled targets (``method="sample"``, ``tail`` is ignored):
      ``Σ_i w_i (log p_i − log q_i)``, whose expectation over the draws is ``KL(p‖q)``.

    With ``k = V`` and ``tail="bucket"``, top-k targets give exactly :func:`kdfast.forward_kl`.

    Conventions: slots with id -1 (and sampled slots of weight 0) are ignored; ids outside
    ``[0, V)`` raise ``ValueError``. A repeated id is an error for top-k targets and allowed for
    sampled ones (each slot counts, as if their weights were summed: raw draws of weight 1/N can
    be passed as they are). A renormalised row with no teacher mass contributes 0.

    Where the values are checked: always on CPU tensors (Rust raises; the PyTorch and Triton
    paths check first, with the same messages); on CUDA the ids are range-checked in eager mode
    (one host sync), while the Triton kernel itself never syncs and turns what it cannot raise
    for (an out-of-range id under ``torch.compile`` or CUDA-graph capture, a repeated top-k id,
    a NaN) into a NaN loss for that row.

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on the torch backend).
        targets: :class:`SparseTargets` with leading shape ``[...]`` on the same device.
        tail: ``"bucket"`` or ``"renorm"`` (top-k targets).
        temperature: None uses ``targets.temperature``; another T > 0 puts the student at T and
            uses the stored teacher log-probs as they are.
        t2_scale, labels, ignore_index, reduction, num_items_in_batch: as for the dense losses
            (:func:`kdfast.forward_kl`); ``t2_scale`` multiplies by the student's T².
        backend: ``"auto"`` (Rust for CPU and Triton for CUDA float32/bf16/fp16 tensors, else
            PyTorch), ``"rust"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``"torch"``. Usable inside ``torch.compile(fullgraph=True)`` on every backend (the
            kernels are the custom op ``kdfast::sparse_rows``).

    Returns:
        float32 loss (float64 for float64 students on the torch backend); the gradient w.r.t.
        ``student_logits`` has its dtype. The targets never receive a gradient.
    """
    student_logits = check_logits(student_logits, "student_logits")
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    if tail not in TAILS:
        raise ValueError(f"tail: expected 'bucket' or 'renorm', got {tail!r}")
    reduction = check_reduction(reduction)
    backend = check_backend(backend)
    ignore_index = check_int(ignore_index, "ignore_index")
    if not isinstance(t2_scale, (bool, int)):
        raise TypeError(f"t2_scale: expected a bool, got {type(t2_scale).__name__}")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    dtype = student_logits.dtype
    float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    prep = prepare_sparse(targets, lead, v, student_logits.device, tail=tail, temperature=temperature,
                          labels=labels, float_dtype=float_dtype)
    s = student_logits.reshape(-1, v)
    backend = _resolve_backend(backend, s.device, dtype)
    t2_scale = bool(t2_scale)

    n = s.shape[0]
    if n == 0:
        zeros = student_logits.to(float_dtype).sum(-1) * 0.0
        return zeros if reduction == "none" else zeros.sum()
    if torch.compiler.is_compiling():
        return _sparse_traced(student_logits, s, prep, t2_scale, ignore_index, reduction, num_items_in_batch, backend)
    # Under torch.no_grad() a student that requires grad must not cost a gradient.
    student = student_logits if torch.is_grad_enabled() else student_logits.detach()

    if backend == "triton":
        if s.device.type == "cpu":
            check_values(prep, s, ignore_index)
        scale = reduce_scale_on_device(reduction, n, prep.labels, ignore_index, num_items_in_batch)
        return _triton_op("sparse").TritonSparse.apply(student, (s, prep), (t2_scale,), ignore_index, scale)
    scale = reduce_scale(reduction, n, prep.labels, ignore_index, check_num_items(num_items_in_batch))
    if backend == "rust":
        return _RustSparse.apply(student, (s, prep), (t2_scale,), ignore_index, scale)

    keep = check_values(prep, s, ignore_index)
    if keep is None:
        rows = _ref.sparse_rows(s, prep.ids, prep.lp, prep.w, prep.tail, prep.temperature, prep.mode)
    else:
        sel = (lambda x: None if x is None else x[keep])
        vals = _ref.sparse_rows(s[keep], prep.ids[keep], prep.lp[keep], sel(prep.w), sel(prep.tail),
                                prep.temperature, prep.mode)
        rows = vals.new_zeros(n).index_put((keep,), vals)
    if t2_scale:
        rows = rows * (prep.temperature ** 2)
    if scale is None:
        return rows.reshape(lead)
    return rows.sum() * scale


# ----------------------------------------------------------------------------- torch.compile


@torch.library.custom_op("kdfast::sparse_rows", mutates_args=())
def _sparse_rows_op(
    student: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    w: Optional[torch.Tensor],
    tail: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    mode: str,
    temperature: float,
    t2_scale: bool,
    ignore_index: int,
    need_grad: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``[N]`` and the unscaled student gradient ``[N, V]`` (empty when
    ``need_grad`` is False): the Rust (``backend="rust"``) or Triton sparse kernel as an opaque
    op for ``torch.compile``."""
    v = student.shape[-1]
    s2 = student.reshape(-1, v)
    n = s2.shape[0]
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device) if need_grad else student.new_empty(0)
    call = _native.sparse_call if backend == "rust" else _triton_op("sparse").sparse_call
    if backend == "rust":
        s2 = _native.as_rows(s2)
    if n:
        call(mode, s2, ids, lp, w, tail, labels, ignore_index, temperature, t2_scale, 1.0, rows,
             grad if need_grad else None)
    return rows, grad


@_sparse_rows_op.register_fake
def _(student, ids, lp, w, tail, labels, mode, temperature, t2_scale, ignore_index, need_grad, backend):
    n = student.numel() // student.shape[-1]
    grad_shape = (n, student.shape[-1]) if need_grad else (0,)
    return student.new_empty(n, dtype=torch.float32), student.new_empty(grad_shape)


register_rows_autograd(_sparse_rows_op, 12)


def _sparse_traced(student, s2, prep: SparseInputs, t2_scale, ignore_index, reduction, num_items, backend):
    """The path taken under ``torch.compile``: no host syncs, no data-dependent shapes, no value
    checks (out-of-range ids give NaN rows on Triton; Rust still raises)."""
    labels = prep.labels
    if backend in ("rust", "triton"):
        need_grad = student.requires_grad and torch.is_grad_enabled()
        rows, _ = _sparse_rows_op(student, prep.ids, prep.lp, prep.w, prep.tail, labels, prep.mode,
                                  prep.temperature, t2_scale, ignore_index, need_grad, backend)
    else:
        rows = _ref.sparse_rows(s2, prep.ids, prep.lp, prep.w, prep.tail, prep.temperature, prep.mode)
        if labels is not None:
            rows = torch.where(labels != ignore_index, rows, 0.0)
        if t2_scale:
            rows = rows * (prep.temperature ** 2)
    if reduction == "none":
        return rows.reshape(prep.lead_shape)
    kept = None if labels is None else (labels != ignore_index).sum()
    return rows.sum() / _traced_denominator(reduction, num_items, kept, rows.shape[0])


def _traced_denominator(reduction: str, num_items, kept: Optional[torch.Tensor], n: int):
    """D of ``"mean"`` (1 for ``"sum"``) as traceable tensor ops: ``num_items_in_batch`` (number
    or tensor), else the unmasked row count ``kept``, else ``n``; at least 1."""
    if reduction == "sum":
        return 1.0
    if num_items is not None:
        return torch.as_tensor(num_items, dtype=torch.float32).clamp_min(1)
    if kept is not None:
        return kept.clamp_min(1).to(torch.float32)
    return float(max(1, n))


# ----------------------------------------------------------------------------- storage


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedTargets:
    """:class:`SparseTargets` packed into fixed-size byte records, one per row.

    ``data`` is uint8 ``[..., row_bytes]``; each record holds (see kdfast-core ``encode.rs``):

    * the ids, ``b = max(1, ceil(log2 vocab_size))`` bits each, little-endian bit order
      (``ceil(k·b/8)`` bytes);
    * the log-probs as uint16 codes ``round(−logprob · 2048)`` saturated to 65534, 65535 = -inf
      (``2k`` bytes). **Error bound**: ``|decoded − logprob| ≤ 2^-12 ≈ 2.44e-4`` for
      ``logprob ≥ −31.999`` (each probability within ±0.025 %); smaller log-probs decode as
      −31.999 (probabilities below 1.3e-14 are overstated by at most that); values above 0
      (rounding noise) decode as 0; -inf is exact. A slot with log-prob -inf decodes as unused
      (id -1);
    * ``tail_logprob`` as float32 (4 bytes, exact) when ``has_tail``;
    * for sampled targets, ``weights · num_samples`` as uint16 counts (``2k`` bytes), decoded
      exactly as ``count / num_samples``.

    Records are independent and fixed-size: slice ``data`` by row, memory-map it, concatenate it.
    """

    data: torch.Tensor
    vocab_size: int
    k: int
    method: str
    temperature: float
    has_tail: bool
    num_samples: Optional[int] = None

    @property
    def row_bytes(self) -> int:
        return self.data.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape[:-1]


def encode_targets(targets: SparseTargets, vocab_size: int, *, num_samples: Optional[int] = None) -> EncodedTargets:
    """Pack ``targets`` (any device; encoded on CPU) for a vocabulary of ``vocab_size`` ids.

    ``num_samples`` (sampled targets only; default ``targets.k``, as produced by
    :func:`compress_sample`) is the N of ``weights = count / N``; weights that are not
    multiples of 1/N raise ``ValueError``. See :class:`EncodedTargets` for the format and the
    log-prob error bound.
    """
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    vocab = check_int(vocab_size, "vocab_size")
    if not 1 <= vocab <= 1 << 32:
        raise ValueError(f"vocab_size: expected an integer in [1, 2**32], got {vocab}")
    k = targets.k
    sampled = targets.method == "sample"
    if sampled:
        n_s = k if num_samples is None else _positive_int(num_samples, "num_samples")
        if n_s >= 1 << 32:
            raise ValueError(f"num_samples: expected an integer below 2**32, got {n_s}")
    elif num_samples is not None:
        raise ValueError("num_samples: only sampled targets (method='sample') have a num_samples")
    else:
        n_s = None
    has_tail = targets.tail_logprob is not None
    lead = targets.shape
    cpu = (lambda x, dt: None if x is None else x.detach().to("cpu", dt).reshape(-1, *x.shape[len(lead):]).contiguous())
    ids = cpu(targets.indices, torch.int64)
    lp = cpu(targets.logprobs, torch.float32)
    w = cpu(targets.weights, torch.float32)
    tail = None if not has_tail else targets.tail_logprob.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    rows = ids.shape[0]
    data = _native.encode_targets(ids, lp, w, tail, vocab, n_s)
    rb = data.shape[1]
    return EncodedTargets(data=data.reshape(*lead, rb), vocab_size=vocab, k=k, method=targets.method,
                          temperature=targets.temperature, has_tail=has_tail, num_samples=n_s)


def decode_targets(encoded: EncodedTargets, *, device=None) -> SparseTargets:
    """Unpack :class:`EncodedTargets` into :class:`SparseTargets` (on ``device``, default CPU)."""
    if not isinstance(encoded, EncodedTargets):
        raise TypeError(f"encoded: expected kdfast.EncodedTargets, got {type(encoded).__name__}")
    data = encoded.data
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() == 0:
        raise ValueError(f"encoded.data: expected a uint8 tensor [..., row_bytes], got {getattr(data, 'dtype', type(data))}")
    k = encoded.k
    sampled = encoded.method == "sample"
    n_s = encoded.num_samples if sampled else None
    rb = _native.encoded_row_bytes(k, encoded.vocab_size, encoded.has_tail, n_s)
    if data.shape[-1] != rb:
        raise ValueError(f"encoded.data: expected records of {rb} bytes for k={k}, V={encoded.vocab_size}, got {data.shape[-1]}")
    lead = data.shape[:-1]
    flat = data.detach().to("cpu").reshape(-1, rb).contiguous()
    ids, lp, w, tail = _native.decode_targets(flat, k, encoded.vocab_size, n_s, encoded.has_tail)
    out = SparseTargets(
        indices=ids.reshape(*lead, k), logprobs=lp.reshape(*lead, k),
        weights=None if w is None else w.reshape(*lead, k),
        tail_logprob=None if tail is None else tail.reshape(lead),
        temperature=encoded.temperature, method=encoded.method,
    )
    return out if device is None else out.to(device)
