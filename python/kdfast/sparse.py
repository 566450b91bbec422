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
memory; the loss and its gradient fused in forward); elsewhere (CUDA, float64) in the pure
PyTorch :mod:`kdfast.reference_sparse`, which for sampling replays the same algorithm, so the
same seed gives the same targets on every backend and thread count.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _kdfast, _native
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
)
from .losses import _RustDense

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


def _compress_backend(backend: str, x: torch.Tensor) -> str:
    backend = check_backend(backend)
    native = x.device.type == "cpu" and x.dtype in _native.NATIVE_DTYPES
    if backend == "auto":
        return "rust" if native else "torch"
    if backend == "rust" and not native:
        if x.device.type != "cpu":
            raise ValueError(f"backend: 'rust' runs on CPU tensors, got a tensor on {x.device}; use backend='auto'")
        raise DtypeError(f"backend: 'rust' supports float32, bfloat16 and float16 logits, got {x.dtype}; use backend='torch'")
    if backend == "triton":
        raise ValueError("backend: 'triton' kernels are not part of this kdfast build; use 'auto', 'rust' or 'torch'")
    return backend


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
        backend: ``"auto"`` (Rust for CPU float32/bf16/fp16 — one streaming pass per row,
            O(k) memory — else PyTorch), ``"rust"`` or ``"torch"``.
    """
    x = check_logits(teacher_logits, "teacher_logits").detach()
    k = _positive_int(k, "k")
    t = check_temperature(temperature)
    backend = _compress_backend(backend, x)
    lead, v = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, v)
    n = x2.shape[0]
    if backend == "torch" or n == 0:
        ids, lp, tail = _ref.compress_topk(x2, k, t)
    else:
        x2 = _native.as_rows(x2)
        ids = torch.empty((n, k), dtype=torch.int64)
        lp = torch.empty((n, k), dtype=torch.float32)
        tail = torch.empty(n, dtype=torch.float32)
        _kdfast.compress_topk(_native.desc(x2), k, t, _native.desc(ids), _native.desc(lp),
                              _native.desc(tail), _native.isa(), _native.num_threads())
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
        backend: as for :func:`compress_topk`.
    """
    x = check_logits(teacher_logits, "teacher_logits").detach()
    n_s = _positive_int(num_samples, "num_samples")
    if n_s >= 1 << 32:
        raise ValueError(f"num_samples: expected an integer below 2**32, got {n_s}")
    t = check_temperature(temperature)
    seed = _seed(seed, "seed")
    row_offset = _seed(row_offset, "row_offset")
    backend = _compress_backend(backend, x)
    lead, v = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, v)
    n = x2.shape[0]
    if backend == "torch" or n == 0:
        ids, lp, w = _ref.compress_sample(x2, n_s, t, seed, row_offset)
    else:
        x2 = _native.as_rows(x2)
        ids = torch.empty((n, n_s), dtype=torch.int64)
        lp = torch.empty((n, n_s), dtype=torch.float32)
        w = torch.empty((n, n_s), dtype=torch.float32)
        _kdfast.compress_sample(_native.desc(x2), n_s, t, seed, row_offset, _native.desc(ids),
                                _native.desc(lp), _native.desc(w), _native.isa(), _native.num_threads())
    return SparseTargets(indices=ids.reshape(*lead, n_s), logprobs=lp.reshape(*lead, n_s),
                         weights=w.reshape(*lead, n_s), temperature=t, method="sample")


# ----------------------------------------------------------------------------- the loss


class _Flat:
    """Validated 2-D views of a sparse_kl call."""

    __slots__ = ("student", "s2", "labels", "lead_shape", "ids", "lp", "w", "tail")


class _RustSparse(_RustDense):
    """Loss rows from the Rust kernel, the gradient produced in forward (backward as dense)."""

    @staticmethod
    def forward(ctx, student, flat: _Flat, spec: tuple, ignore_index: int, reduce_scale):
        mode, temperature, t2_scale = spec
        s2 = _native.as_rows(flat.s2)
        n, v = s2.shape
        rows = torch.empty(n, dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        grad_scale = 1.0 if reduce_scale is None else reduce_scale
        grad = torch.empty((n, v), dtype=student.dtype) if need_grad else None
        opt = (lambda t: None if t is None else _native.desc(t))
        _kdfast.sparse_kl(
            mode, _native.desc(s2), _native.desc(flat.ids), _native.desc(flat.lp), opt(flat.w),
            opt(flat.tail), opt(flat.labels), ignore_index, temperature, t2_scale, grad_scale,
            _native.desc(rows), opt(grad), v, _native.isa(), _native.num_threads(),
        )
        ctx.per_row = reduce_scale is None
        ctx.student_shape = student.shape
        if need_grad:
            ctx.save_for_backward(grad)
        if reduce_scale is None:
            return rows.reshape(flat.lead_shape)
        return rows.sum() * reduce_scale


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

    Args:
        student_logits: ``[..., V]`` float32/bfloat16/float16 (float64 on the torch backend).
        targets: :class:`SparseTargets` with leading shape ``[...]`` on the same device.
        tail: ``"bucket"`` or ``"renorm"`` (top-k targets).
        temperature: None uses ``targets.temperature``; another T > 0 puts the student at T and
            uses the stored teacher log-probs as they are.
        t2_scale, labels, ignore_index, reduction, num_items_in_batch, backend: as for the
            dense losses (:func:`kdfast.forward_kl`); ``t2_scale`` multiplies by the student's T².

    Returns:
        float32 loss (float64 for float64 students on the torch backend); the gradient w.r.t.
        ``student_logits`` has its dtype. The targets never receive a gradient.
    """
    student_logits = check_logits(student_logits, "student_logits")
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    if tail not in TAILS:
        raise ValueError(f"tail: expected 'bucket' or 'renorm', got {tail!r}")
    t = targets.temperature if temperature is None else check_temperature(temperature)
    reduction = check_reduction(reduction)
    backend = check_backend(backend)
    ignore_index = check_int(ignore_index, "ignore_index")
    num_items = check_num_items(num_items_in_batch)
    if not isinstance(t2_scale, (bool, int)):
        raise TypeError(f"t2_scale: expected a bool, got {type(t2_scale).__name__}")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    if targets.shape != lead:
        raise ValueError(
            f"targets: expected leading shape {tuple(lead)} (that of student_logits {tuple(student_logits.shape)}), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != student_logits.device:
        raise ValueError(f"targets: expected the device of student_logits ({student_logits.device}), got {targets.device}")
    # The labels checks of the dense losses (the student stands in for the teacher).
    pair = check_pair(student_logits, student_logits.detach(), vocab_size=None, labels=labels)
    mode = "sampled" if targets.method == "sample" else tail

    k = targets.k
    ids = targets.indices.detach().reshape(-1, k)
    if ids.numel() and bool(((ids < -1) | (ids >= v)).any()):
        bad = ids[(ids < -1) | (ids >= v)][0].item()
        raise ValueError(
            f"targets.indices: expected vocabulary ids in [0, {v}) (the student's vocabulary size) "
            f"or -1 for an unused slot, got {bad}"
        )
    flat = _Flat()
    flat.student, flat.s2, flat.labels, flat.lead_shape = student_logits, pair.s2, pair.labels, lead
    flat.ids = ids.to(torch.int64)
    flat.lp = targets.logprobs.detach().reshape(-1, k)
    flat.w = None if mode != "sampled" else targets.weights.detach().reshape(-1, k)
    flat.tail = None if (mode != "bucket" or targets.tail_logprob is None) else targets.tail_logprob.detach().reshape(-1)

    s = pair.s2
    on_cpu = s.device.type == "cpu"
    native = on_cpu and s.dtype in _native.NATIVE_DTYPES
    if backend == "auto":
        backend = "rust" if native else "torch"
    elif backend == "rust" and not native:
        if not on_cpu:
            raise ValueError(f"backend: 'rust' runs on CPU tensors, got tensors on {s.device}; use backend='auto'")
        raise DtypeError(f"backend: 'rust' supports float32, bfloat16 and float16 logits, got {s.dtype}; use backend='torch'")
    elif backend == "triton":
        raise ValueError("backend: 'triton' kernels are not part of this kdfast build; use 'auto', 'rust' or 'torch'")

    n = s.shape[0]
    if n == 0:
        out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        zeros = student_logits.to(out_dtype).sum(-1) * 0.0
        return zeros if reduction == "none" else zeros.sum()
    scale = reduce_scale(reduction, n, pair.labels, ignore_index, num_items)

    if backend == "rust":
        flat.ids = flat.ids.contiguous()
        flat.lp = flat.lp.to(torch.float32).contiguous()
        if flat.w is not None:
            flat.w = flat.w.to(torch.float32).contiguous()
        if flat.tail is not None:
            flat.tail = flat.tail.to(torch.float32).contiguous()
        return _RustSparse.apply(student_logits, flat, (mode, t, bool(t2_scale)), ignore_index, scale)

    _ref.check_target_values(flat.ids, flat.lp, flat.w, flat.tail, mode)
    if pair.labels is None:
        _ref.check_rows(s.detach(), "student_logits")
        rows = _ref.sparse_rows(s, flat.ids, flat.lp, flat.w, flat.tail, t, mode)
    else:
        keep = (pair.labels != ignore_index).nonzero().squeeze(1)
        _ref.check_rows(s.detach()[keep], "student_logits", rows=keep)
        sel = (lambda x: None if x is None else x[keep])
        vals = _ref.sparse_rows(s[keep], flat.ids[keep], flat.lp[keep], sel(flat.w), sel(flat.tail), t, mode)
        rows = vals.new_zeros(n).index_put((keep,), vals)
    if t2_scale:
        rows = rows * (t * t)
    if scale is None:
        return rows.reshape(lead)
    return rows.sum() * scale


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
    rb = _kdfast.encoded_row_bytes(k, vocab, has_tail, n_s)
    data = torch.empty((rows, rb), dtype=torch.uint8)
    if rows:
        opt = (lambda t: None if t is None else _native.desc(t))
        _kdfast.encode_targets(_native.desc(ids), _native.desc(lp), opt(w), opt(tail), vocab, n_s,
                               (data.data_ptr(), data.numel()), _native.num_threads())
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
    rb = _kdfast.encoded_row_bytes(k, encoded.vocab_size, encoded.has_tail, n_s)
    if data.shape[-1] != rb:
        raise ValueError(f"encoded.data: expected records of {rb} bytes for k={k}, V={encoded.vocab_size}, got {data.shape[-1]}")
    lead = data.shape[:-1]
    flat = data.detach().to("cpu").reshape(-1, rb).contiguous()
    rows = flat.shape[0]
    ids = torch.empty((rows, k), dtype=torch.int64)
    lp = torch.empty((rows, k), dtype=torch.float32)
    w = torch.empty((rows, k), dtype=torch.float32) if sampled else None
    tail = torch.empty(rows, dtype=torch.float32) if encoded.has_tail else None
    if rows:
        opt = (lambda t: None if t is None else _native.desc(t))
        _kdfast.decode_targets((flat.data_ptr(), flat.numel()), rows, k, encoded.vocab_size, n_s,
                               _native.desc(ids), _native.desc(lp), opt(w), opt(tail))
    out = SparseTargets(
        indices=ids.reshape(*lead, k), logprobs=lp.reshape(*lead, k),
        weights=None if w is None else w.reshape(*lead, k),
        tail_logprob=None if tail is None else tail.reshape(lead),
        temperature=encoded.temperature, method=encoded.method,
    )
    return out if device is None else out.to(device)
