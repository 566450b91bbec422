"""The bridge to the Rust extension: tensor descriptors, thread count, instruction set."""

from __future__ import annotations

import os

import torch

from . import _kdfast

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int64: "int64",
}
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def num_threads() -> int:
    """Worker threads for the Rust kernels: ``KDFAST_NUM_THREADS`` or ``torch.get_num_threads()``."""
    env = os.environ.get("KDFAST_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"KDFAST_NUM_THREADS: expected a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"KDFAST_NUM_THREADS: expected a positive integer, got {env!r}")
        return n
    return max(1, torch.get_num_threads())


def isa() -> str:
    """Instruction set of the kernels: ``KDFAST_ISA`` (auto, scalar, baseline, avx2, avx512)."""
    return os.environ.get("KDFAST_ISA", "auto")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A 2-D CPU tensor whose rows the kernels can read in place (unit column stride)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    rows, cols = x.shape
    if (cols > 1 and x.stride(1) != 1) or (rows > 1 and x.stride(0) < cols):
        x = x.contiguous()  # transposed or broadcast (stride-0) rows: the kernels need unit stride
    return x


def desc(x: torch.Tensor) -> tuple:
    """``(data_ptr, rows, cols, row_stride, dtype)`` of a 2-D (or 1-D) CPU tensor."""
    if x.dim() == 1:
        return (x.data_ptr(), 1, x.shape[0], x.shape[0], _DTYPE_NAMES[x.dtype])
    rows, cols = x.shape
    stride = x.stride(0) if rows > 1 else cols
    return (x.data_ptr(), rows, cols, stride, _DTYPE_NAMES[x.dtype])


def dense_call(loss, param, s2, t2, labels, ignore_index, temperature, t2_scale, grad_scale, rows, grad):
    """Run the Rust dense kernel: per-row losses into ``rows``, the gradient into ``grad``."""
    _kdfast.dense_loss(
        loss,
        param,
        desc(s2),
        desc(t2),
        None if labels is None else desc(labels),
        ignore_index,
        temperature,
        t2_scale,
        grad_scale,
        desc(rows),
        None if grad is None else desc(grad),
        0 if grad is None else grad.shape[1],
        isa(),
        num_threads(),
    )


def sparse_call(mode, s2, ids, lp, w, tail, labels, ignore_index, temperature, t2_scale, grad_scale, rows, grad):
    """Run the Rust sparse kernel (kdfast-core ``sparse.rs``) on one chunk of rows.

    ``mode``: ``"bucket"``, ``"renorm"`` or ``"sampled"``; ``s2`` ``[N, V]`` student logits
    (unit column stride); ``ids`` int64 ``[N, k]``; ``lp`` float32 ``[N, k]``; ``w`` float32
    ``[N, k]`` or None (sampled only); ``tail`` float32 ``[N]`` or None; ``labels`` int64 ``[N]``
    or None; all contiguous CPU tensors. Writes the per-row losses into ``rows`` (float32 ``[N]``)
    and, when ``grad`` is given (a fresh contiguous ``[N, V']`` buffer of the student's dtype,
    ``V' ≥ V``, not aliasing ``s2``), ``grad_scale`` × ∂row/∂(student logits) into it (columns
    beyond V zero-filled). Bad values raise ``ValueError`` naming the argument.
    """
    opt = (lambda t: None if t is None else desc(t))
    _kdfast.sparse_kl(
        mode, desc(s2), desc(ids), desc(lp), opt(w), opt(tail), opt(labels), ignore_index,
        temperature, t2_scale, grad_scale, desc(rows), opt(grad),
        s2.shape[1] if grad is None else grad.shape[1], isa(), num_threads(),
    )


def compress_topk(x2: torch.Tensor, k: int, temperature: float):
    """Top-k of ``[N, V]`` CPU logits: ``(ids int64 [N, k], logprobs float32 [N, k], tail float32 [N])``."""
    x2 = as_rows(x2)
    n = x2.shape[0]
    ids = torch.empty((n, k), dtype=torch.int64)
    lp = torch.empty((n, k), dtype=torch.float32)
    tail = torch.empty(n, dtype=torch.float32)
    _kdfast.compress_topk(desc(x2), k, temperature, desc(ids), desc(lp), desc(tail), isa(), num_threads())
    return ids, lp, tail


def compress_sample(x2: torch.Tensor, num_samples: int, temperature: float, seed: int, row_offset: int):
    """Sampling compression of ``[N, V]`` CPU logits: ``(ids, logprobs, weights)``, each ``[N, num_samples]``."""
    x2 = as_rows(x2)
    n = x2.shape[0]
    ids = torch.empty((n, num_samples), dtype=torch.int64)
    lp = torch.empty((n, num_samples), dtype=torch.float32)
    w = torch.empty((n, num_samples), dtype=torch.float32)
    _kdfast.compress_sample(desc(x2), num_samples, temperature, seed, row_offset, desc(ids), desc(lp), desc(w),
                            isa(), num_threads())
    return ids, lp, w


def encoded_row_bytes(k: int, vocab_size: int, has_tail: bool, num_samples) -> int:
    """Bytes of one encoded record (kdfast-core ``encode.rs``)."""
    return _kdfast.encoded_row_bytes(k, vocab_size, has_tail, num_samples)


def _opt_desc(t):
    return None if t is None else desc(t)


def encode_targets(ids, lp, w, tail, vocab_size: int, num_samples) -> torch.Tensor:
    """Pack contiguous CPU targets (``ids`` int64 ``[R, k]``, ``lp``/``w`` float32 ``[R, k]``,
    ``tail`` float32 ``[R]``) into uint8 ``[R, row_bytes]``."""
    rows, k = ids.shape
    rb = encoded_row_bytes(k, vocab_size, tail is not None, num_samples)
    data = torch.empty((rows, rb), dtype=torch.uint8)
    if rows:
        _kdfast.encode_targets(desc(ids), desc(lp), _opt_desc(w), _opt_desc(tail), vocab_size, num_samples,
                               (data.data_ptr(), data.numel()), num_threads())
    return data


def decode_targets(data: torch.Tensor, k: int, vocab_size: int, num_samples, has_tail: bool):
    """Unpack contiguous uint8 records ``[R, row_bytes]``: ``(ids, lp, w or None, tail or None)``;
    sampled records (with weights) iff ``num_samples`` is not None."""
    rows = data.shape[0]
    ids = torch.empty((rows, k), dtype=torch.int64)
    lp = torch.empty((rows, k), dtype=torch.float32)
    w = torch.empty((rows, k), dtype=torch.float32) if num_samples is not None else None
    tail = torch.empty(rows, dtype=torch.float32) if has_tail else None
    if rows:
        _kdfast.decode_targets((data.data_ptr(), data.numel()), rows, k, vocab_size, num_samples,
                               desc(ids), desc(lp), _opt_desc(w), _opt_desc(tail))
    return ids, lp, w, tail
