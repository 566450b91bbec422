"""The bridge to the Rust extension ``kdfast._kdfast``: thread count, instruction set, output
allocation, and one wrapper per Rust entry point.

The extension takes torch tensors themselves (it checks device, dtype, shape, strides and
pointers at its border) and typed configurations; this module owns allocation policy: outputs
are allocated here, and only after their size was compared with the memory the process can
have, so that an oversized ``k`` or ``num_samples`` is a ``ValueError`` naming it, never an
aborted interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from . import _kdfast
from ._validate import KERNEL_DTYPES, check_count, env_int

NATIVE_DTYPES = KERNEL_DTYPES  # what the binding reads


def num_threads() -> int:
    """Worker threads for the Rust kernels: ``KDFAST_NUM_THREADS`` or ``torch.get_num_threads()``."""
    return env_int("KDFAST_NUM_THREADS", max(1, torch.get_num_threads()), minimum=1, what="a positive integer")


def isa() -> str:
    """Instruction set of the kernels: ``KDFAST_ISA`` (auto, scalar, baseline, avx2, avx512)."""
    return os.environ.get("KDFAST_ISA", "auto")


@functools.lru_cache(maxsize=16)
def _runtime_of(isa_name: str, threads: int) -> _kdfast.Runtime:
    return _kdfast.Runtime(isa_name, threads)


def _runtime() -> _kdfast.Runtime:
    return _runtime_of(isa(), num_threads())


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D CPU tensor whose rows the kernels can read in place (unit column stride)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    rows, cols = x.shape
    if (cols > 1 and x.stride(1) != 1) or (rows > 1 and x.stride(0) < cols):
        x = x.contiguous()  # transposed or broadcast (stride-0) rows: the kernels need unit stride
    return x


# ------------------------------------------------------------------------ output allocation


def _memory_limit():
    """Bytes this process may map: its address-space limit if set, else physical memory (None
    if neither is known)."""
    with contextlib.suppress(ImportError, OSError, ValueError):  # no resource module: not Unix
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return soft
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _empty(name: str, value: int, *specs):
    """Fresh CPU tensors ``torch.empty(shape, dtype)`` for each ``(shape, dtype)``, or a
    ``ValueError`` naming the argument ``name`` (of value ``value``) that sized them when they
    cannot fit in memory."""
    need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs)
    limit = _memory_limit()

    def too_large(detail: str):
        return ValueError(f"{name}: expected a value whose outputs fit in memory, got {value}: "
                          f"the outputs would need {need} bytes; {detail}")

    if limit is not None and need > limit:
        raise too_large(f"this process can have at most {limit}")
    try:
        return tuple(torch.empty(shape, dtype=dtype) for shape, dtype in specs)
    except (RuntimeError, MemoryError) as e:  # torch's allocator: "can't allocate memory"
        raise too_large(f"allocation failed ({e})") from None


# ------------------------------------------------------------------------- loss kernels


def dense_call(loss, param, s2, t2, labels, ignore_index, temperature, t2_scale, grad_scale, rows, grad):
    """Run the Rust dense kernel: per-row losses into ``rows``, the gradient into ``grad``."""
    cfg = _kdfast.DenseConfig(loss, param, temperature, t2_scale, grad_scale, ignore_index)
    _kdfast.dense_loss(cfg, s2, t2, labels, rows, grad, _runtime())


def sparse_call(mode, s2, ids, lp, w, tail, labels, ignore_index, temperature, t2_scale, grad_scale, rows, grad,
                loss="forward_kl", param=0.0):
    """Run the Rust sparse kernel (kdfast-core ``sparse.rs``) on one chunk of rows.

    ``mode``: ``"bucket"``, ``"renorm"`` or ``"sampled"``; ``loss``: ``"forward_kl"`` (every
    mode; ``sparse_kl``) or, for top-k targets, ``"reverse_kl"``, ``"jsd"`` (``param`` = β) or
    ``"tvd"`` over the categories of the mode; ``s2`` ``[N, V]`` student logits
    (unit column stride); ``ids`` int64 ``[N, k]``; ``lp`` float32 ``[N, k]``; ``w`` float32
    ``[N, k]`` or None (sampled only); ``tail`` float32 ``[N]`` or None; ``labels`` int64 ``[N]``
    or None; all contiguous CPU tensors. Writes the per-row losses into ``rows`` (float32 ``[N]``)
    and, when ``grad`` is given (a fresh contiguous ``[N, V']`` buffer of the student's dtype,
    ``V' ≥ V``, not aliasing ``s2``), ``grad_scale`` × ∂row/∂(student logits) into it (columns
    beyond V zero-filled). Bad values raise ``ValueError`` naming the argument.
    """
    cfg = _kdfast.SparseConfig(mode, temperature, t2_scale, grad_scale, ignore_index, loss, param)
    _kdfast.sparse_loss(cfg, s2, (ids, lp, w, tail), labels, rows, grad, _runtime())


# ------------------------------------------------------------------------- compression


def compress_topk(x2: torch.Tensor, k: int, temperature: float):
    """Top-k of ``[N, V]`` CPU logits: ``(ids int64 [N, k], logprobs float32 [N, k], tail float32 [N])``."""
    k = check_count(k, "k")
    x2 = as_rows(x2)
    n = x2.shape[0]
    ids, lp, tail = _empty("k", k, ((n, k), torch.int64), ((n, k), torch.float32), ((n,), torch.float32))
    _kdfast.compress_topk(_kdfast.TopK(k, temperature), x2, (ids, lp, None, tail), _runtime())
    return ids, lp, tail


def compress_sample(x2: torch.Tensor, num_samples: int, temperature: float, seed: int, row_offset: int):
    """Sampling compression of ``[N, V]`` CPU logits: ``(ids, logprobs, weights)``, each ``[N, num_samples]``."""
    num_samples = check_count(num_samples, "num_samples")
    x2 = as_rows(x2)
    shape = (x2.shape[0], num_samples)
    ids, lp, w = _empty("num_samples", num_samples, (shape, torch.int64), (shape, torch.float32), (shape, torch.float32))
    options = _kdfast.Sampling(num_samples, temperature, seed, row_offset)
    _kdfast.compress_sample(options, x2, (ids, lp, w, None), _runtime())
    return ids, lp, w


# ------------------------------------------------------------------------- encoding


def encoded_row_bytes(k: int, vocab_size: int, has_tail: bool, num_samples) -> int:
    """Bytes of one encoded record (kdfast-core ``encode.rs``)."""
    return _kdfast.Layout(k, vocab_size, has_tail, num_samples).row_bytes


def encode_targets(ids, lp, w, tail, vocab_size: int, num_samples) -> torch.Tensor:
    """Pack contiguous CPU targets (``ids`` int64 ``[R, k]``, ``lp``/``w`` float32 ``[R, k]``,
    ``tail`` float32 ``[R]``) into uint8 ``[R, row_bytes]``."""
    rows, k = ids.shape
    layout = _kdfast.Layout(k, vocab_size, tail is not None, num_samples)
    data = torch.empty((rows, layout.row_bytes), dtype=torch.uint8)
    _kdfast.encode_targets(layout, (ids, lp, w, tail), data, _runtime())
    return data


def decode_targets(data: torch.Tensor, k: int, vocab_size: int, num_samples, has_tail: bool):
    """Unpack contiguous uint8 records ``[R, row_bytes]``: ``(ids, lp, w or None, tail or None)``;
    sampled records (with weights) iff ``num_samples`` is not None."""
    layout = _kdfast.Layout(k, vocab_size, has_tail, num_samples)
    rows = data.shape[0]
    ids = torch.empty((rows, k), dtype=torch.int64)
    lp = torch.empty((rows, k), dtype=torch.float32)
    w = torch.empty((rows, k), dtype=torch.float32) if num_samples is not None else None
    tail = torch.empty(rows, dtype=torch.float32) if has_tail else None
    _kdfast.decode_targets(layout, data, (ids, lp, w, tail))
    return ids, lp, w, tail


@functools.lru_cache(maxsize=64)
def compact_codec(method: str, vocab_size: int, has_tail: bool, num_samples):
    """The compact record codec of a cache (kdfast-core ``compact.rs``)."""
    return _kdfast.CompactCodec(method, vocab_size, has_tail, num_samples)


def compact_encode(codec, ids, lp, w, tail):
    """``(record bytes, k_row)`` of one sequence's contiguous CPU targets (``ids`` int64
    ``[S, k]``, ``lp``/``w`` float32 ``[S, k]``, ``tail`` float32 ``[S]``)."""
    return codec.encode((ids, lp, w, tail))


def compact_decode(codec, data: torch.Tensor, rows: int, k_row: int, sampled: bool, has_tail: bool):
    """Decode one record (uint8 ``[bytes]``): ``(ids, lp, w or None, tail or None)`` of
    ``[rows, k_row]`` slots."""
    ids = torch.empty((rows, k_row), dtype=torch.int64)
    lp = torch.empty((rows, k_row), dtype=torch.float32)
    w = torch.empty((rows, k_row), dtype=torch.float32) if sampled else None
    tail = torch.empty(rows, dtype=torch.float32) if has_tail else None
    codec.decode(data, rows, k_row, (ids, lp, w, tail))
    return ids, lp, w, tail


# ------------------------------------------------------- sampling a vocabulary across ranks


def sharded_sample(step: int, x2: torch.Tensor, num_samples: int, temperature: float, seed: int, row_offset: int,
                   offset: int, vocab: int, maxima: torch.Tensor, carry_in=None, sums=None, checkpoints=None,
                   out=None) -> None:
    """One step of sampling compression on this rank's slice ``x2`` (ids ``offset ..`` of
    ``vocab``); the tensors of each step are described at kdfast-py ``compress::sharded_sample``."""
    options = _kdfast.Sampling(num_samples, temperature, seed, row_offset)
    _kdfast.sharded_sample(step, options, x2, offset, vocab, maxima, carry_in, sums, checkpoints, out, _runtime())


def slice_plan(offset: int, cols: int, vocab: int):
    """``(blocks, checkpoints per row, receives a carry, sends a carry)`` of this rank's slice."""
    return _kdfast.sharded_slice_plan(offset, cols, vocab)


def checkpoints_buffer(x2: torch.Tensor, offset: int, vocab: int) -> torch.Tensor:
    """float64 ``[N, C]`` for step 2's running-sum checkpoints of this rank's slice ``x2``
    (``C`` = 256 per 4096-id block the slice has a part of: an eighth of float32 logits)."""
    rows, cols = x2.shape
    per_row = slice_plan(offset, cols, vocab)[1]
    (cps,) = _empty("teacher_logits", f"{rows} × {cols}", ((rows, per_row), torch.float64))
    return cps


def draws_buffer(rows: int, num_samples: int) -> torch.Tensor:
    """float64 ``[rows, 2 · num_samples]`` for a rank's draws (value, id)."""
    num_samples = check_count(num_samples, "num_samples")
    (picked,) = _empty("num_samples", num_samples, ((rows, 2 * num_samples), torch.float64))
    return picked


def merge_sample_draws(picked: torch.Tensor, lse: torch.Tensor, num_samples: int):
    """``(ids, logprobs, weights)`` ``[N, num_samples]`` from every rank's draws side by side."""
    shape = (lse.shape[0], num_samples)
    ids, lp, w = _empty("num_samples", num_samples, (shape, torch.int64), (shape, torch.float32), (shape, torch.float32))
    _kdfast.merge_sample_draws(num_samples, picked, lse, (ids, lp, w, None))
    return ids, lp, w


def compress_topk_slice(x2: torch.Tensor, k: int, temperature: float, offset: int):
    """This rank's part of a vocabulary-sharded top-k: ``(ids int64 [N, k] (global), values
    float32 [N, k] (scaled logits), stats float64 [N, 3] (tail max, tail sum, status))``."""
    k = check_count(k, "k")
    x2 = as_rows(x2)
    n = x2.shape[0]
    out = _empty("k", k, ((n, k), torch.int64), ((n, k), torch.float32), ((n, 3), torch.float64))
    _kdfast.compress_topk_slice(_kdfast.TopK(k, temperature), x2, offset, out, _runtime())
    return out


def listed_stats(s2: torch.Tensor, ids: torch.Tensor, temperature: float):
    """A sparse loss's view of this rank's student slice (kdfast-py ``sparse::listed_stats``):
    ``(stats float64 [N, 4], at float32 [N, k + 1])``."""
    n, k = ids.shape
    stats, at = torch.empty(n, 4, dtype=torch.float64), torch.empty(n, k + 1, dtype=torch.float32)
    _kdfast.listed_stats(s2, ids, temperature, stats, at, _runtime())
    return stats, at


def listed_gradient(s2: torch.Tensor, ids: torch.Tensor, temperature: float, softmax: torch.Tensor,
                    coef: torch.Tensor, g_at: torch.Tensor, grad: torch.Tensor) -> None:
    """The slice's gradient of a sparse loss into ``grad`` (kdfast-py ``sparse::listed_gradient``)."""
    _kdfast.listed_gradient(s2, ids, temperature, softmax, coef, g_at, grad, _runtime())


def mass_at_least(p: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """float64 ``[N, m]``: per row the mass of ``p`` (CPU float32 ``[N, V]``) at or above each
    probe of ``thresholds`` (int64 float32 bit patterns; kdfast-py ``dense::mass_at_least``)."""
    out = torch.empty(thresholds.shape, dtype=torch.float64)
    _kdfast.mass_at_least(as_rows(p), thresholds.contiguous(), out, _runtime())
    return out


def slice_dense(step: int, loss: str, param: float, s2: torch.Tensor, t2: torch.Tensor, temperature: float,
                out=None, softmax=None, sums=None, grad=None) -> None:
    """A step of a dense loss on this rank's vocabulary slices (kdfast-py ``dense::slice_dense``)."""
    cfg = _kdfast.DenseConfig(loss, param, temperature)
    _kdfast.slice_dense(step, cfg, s2, t2, softmax, sums, out, grad, _runtime())
