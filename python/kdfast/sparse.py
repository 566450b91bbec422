"""Offline distillation: sparse teacher targets and the loss against them (api.md §2).

A teacher's full ``[..., V]`` distribution is expensive to store; offline distillation keeps a
few ids per token instead:

* :func:`compress_topk` — the k most probable ids, their log-probabilities (normalised over the
  full vocabulary) and the log of the mass left outside them (``tail_logprob``);
* :func:`compress_sample` — ``num_samples`` draws with replacement from the teacher, the distinct
  ids weighted by ``count / N`` (Random-Sampling KD: an unbiased estimate of the full loss's
  gradient);
* :class:`SparseTargets` holds either, and :func:`sparse_loss` (forward KL: :func:`sparse_kl`;
  reverse KL, JSD, TVD for top-k targets) is the loss of a student against them, in
  :mod:`kdfast.sparse_losses` (re-exported here); :func:`encode_targets` /
  :func:`decode_targets` pack them into fixed-size byte records for storage.

On CPU the work runs in the Rust kernels (one streaming pass over each teacher row, bounded
memory; the loss and its gradient fused in forward), on CUDA in the Triton kernels of
:mod:`kdfast._triton.compress` and :mod:`kdfast._triton.sparse` (the same algorithms), and for
float64 in the pure PyTorch :mod:`kdfast.reference_sparse`. All three list the same top-k ids
and, for sampling, replay the same draws, so the same seed gives the same targets on every
backend and thread count. :func:`prepare_sparse` (the validated flat target arrays) is what
:func:`kdfast.fused_linear_distill_loss` reuses. :class:`SparseTargets` and the storage
encoding live in :mod:`kdfast.targets`.
"""
from __future__ import annotations

import torch

from . import _dispatch, _native, _triton
from . import reference_sparse as _ref
from ._errors import DtypeError
from ._validate import as_rows, check_count, check_int, check_logits, check_temperature
from .parallel.collectives import agreed, as_local, check_backend, device_of, is_sharded
from .sparse_losses import SPARSE_LOSSES, TAILS, SparseInputs, prepare_sparse, sparse_kl, sparse_loss
from .targets import SparseTargets

__all__ = ["compress_topk", "compress_sample", "sparse_kl", "sparse_loss", "prepare_sparse", "SparseInputs",
           "TAILS", "SPARSE_LOSSES"]


# ----------------------------------------------------------------------------- compression


def _teacher_rows(teacher_logits, backend, op: str):
    """Validated ``[N, V]`` teacher logits (detached) and the backend compressing them."""
    x = check_logits(teacher_logits, "teacher_logits").detach()
    if x.device.type == "meta":
        raise ValueError("teacher_logits: expected a tensor with values, got a meta tensor (compression reads the logits)")
    backend = _dispatch.resolve(backend, x.device, (x.dtype,), op=op)
    return x.reshape(-1, x.shape[-1]), backend


def compress_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                  backend: str = "auto", process_group=None) -> SparseTargets:
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
        process_group: the ``torch.distributed`` group over which the vocabulary is sharded
            (api.md §6): ``teacher_logits`` is this rank's contiguous slice; every rank gets the
            whole row's targets (global ids, the same ids as one pass over the row) after one
            all-gather of k candidates per rank and its tail's statistics. A ``DTensor``
            sharded on its last dimension needs none. ``backend`` "auto" (the Rust top-k of a
            CPU float32/bf16/fp16 slice, else PyTorch operations), "rust" or "torch".
    """
    k, t = check_count(k, "k"), check_temperature(temperature)
    if is_sharded(process_group, teacher_logits):
        lead, (ids, lp, tail) = _compress_topk_sharded(teacher_logits, k, t, backend, process_group)
    else:
        x2, backend = _teacher_rows(teacher_logits, backend, "compress_topk")
        lead = teacher_logits.shape[:-1]
        if backend == "torch" or x2.shape[0] == 0:
            ids, lp, tail = _ref.compress_topk(x2, k, t)
        elif backend == "triton":
            ids, lp, tail = _triton.kernels("compress").compress_topk(x2, k, t)
        else:
            ids, lp, tail = _native.compress_topk(x2, k, t)
    return SparseTargets(indices=ids.reshape(*lead, k), logprobs=lp.reshape(*lead, k),
                         tail_logprob=tail.reshape(lead), temperature=t, method="topk")


def _compress_topk_sharded(teacher_logits, k: int, t: float, backend, group):
    """``(lead shape, (ids, logprobs, tail))`` of this rank's slice (api.md §6)."""
    from .parallel.compress import compress_topk_rows

    teacher_logits, group = as_local(teacher_logits, group)

    def checked():
        check_backend(backend, allowed=("auto", "rust", "torch"))
        x2 = check_logits(teacher_logits, "teacher_logits", empty_ok=True).detach()  # a slice may be empty
        if backend == "rust" and (x2.device.type != "cpu" or x2.dtype not in _native.NATIVE_DTYPES):
            raise ValueError(f"backend: 'rust' reads CPU float32/bfloat16/float16 slices, got a {x2.dtype} tensor "
                             f"on {x2.device}")
        return x2

    x2 = agreed(group, device_of(teacher_logits), checked)  # no rank left waiting for one that raised
    return x2.shape[:-1], compress_topk_rows(as_rows(x2), k, t, group, rust=backend != "torch")


def compress_sample(teacher_logits: torch.Tensor, num_samples: int, *, temperature: float = 1.0,
                    seed: int = 0, row_offset: int = 0, backend: str = "auto",
                    process_group=None) -> SparseTargets:
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
        process_group: the ``torch.distributed`` group over which the vocabulary is sharded
            (api.md §6): ``teacher_logits`` is this rank's contiguous slice (float32, bfloat16
            or float16); every rank gets the whole row's targets (global ids), bit for bit the
            Rust one-pass result for the same seed, from the Rust sampler's steps on the slice
            and four collectives of O(V / 4096 + N) floats per row (``kdfast.parallel.sample``).
            CUDA slices are read on the CPU (the collectives stay on their device). A
            ``DTensor`` sharded on its last dimension needs none. ``backend`` "auto" or "rust".
    """
    n_s, t = check_count(num_samples, "num_samples"), check_temperature(temperature)
    seed = check_int(seed, "seed", low=0, high=2**64 - 1)
    row_offset = check_int(row_offset, "row_offset", low=0, high=2**64 - 1)
    if is_sharded(process_group, teacher_logits):
        lead, (ids, lp, w) = _compress_sample_sharded(teacher_logits, n_s, t, seed, row_offset, backend,
                                                      process_group)
    else:
        x2, backend = _teacher_rows(teacher_logits, backend, "compress_sample")
        lead = teacher_logits.shape[:-1]
        if backend == "torch" or x2.shape[0] == 0:
            ids, lp, w = _ref.compress_sample(x2, n_s, t, seed, row_offset)
        elif backend == "triton":
            ids, lp, w = _triton.kernels("compress").compress_sample(x2, n_s, t, seed, row_offset)
        else:
            ids, lp, w = _native.compress_sample(x2, n_s, t, seed, row_offset)
    return SparseTargets(indices=ids.reshape(*lead, n_s), logprobs=lp.reshape(*lead, n_s),
                         weights=w.reshape(*lead, n_s), temperature=t, method="sample")


def _compress_sample_sharded(teacher_logits, n_s: int, t: float, seed: int, row_offset: int, backend, group):
    """``(lead shape, (ids, logprobs, weights))`` of this rank's slice (api.md §6)."""
    from .parallel.sample import compress_sample_rows

    teacher_logits, group = as_local(teacher_logits, group)

    def checked():
        check_backend(backend, allowed=("auto", "rust"))
        x2 = check_logits(teacher_logits, "teacher_logits", empty_ok=True).detach()  # a slice may be empty
        if x2.dtype not in _native.NATIVE_DTYPES:
            raise DtypeError(f"teacher_logits: vocabulary-parallel sampling runs the Rust sampler; expected dtype "
                             f"float32, bfloat16 or float16, got {x2.dtype}")
        return x2

    x2 = agreed(group, device_of(teacher_logits), checked)  # no rank left waiting for one that raised
    return x2.shape[:-1], compress_sample_rows(as_rows(x2), n_s, t, seed, row_offset, group)
