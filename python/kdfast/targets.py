"""Sparse teacher targets (api.md §2): :class:`SparseTargets`, and their storage encoding.

:class:`SparseTargets` holds a teacher's top-k or sampled targets for every row of a batch;
:func:`encode_targets` / :func:`decode_targets` pack them into fixed-size byte records
(:class:`EncodedTargets`, the Rust ``encode.rs`` format) for the teacher cache.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _native
from ._errors import DtypeError
from ._validate import check_count, check_int, check_temperature

__all__ = ["SparseTargets", "EncodedTargets", "encode_targets", "decode_targets", "METHODS"]

METHODS = ("topk", "sample")

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
        n_s = k if num_samples is None else check_count(num_samples, "num_samples")
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
