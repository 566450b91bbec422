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
backend and thread count. :func:`prepare_sparse` (the validated flat target arrays) is what
:func:`kdfast.fused_linear_distill_loss` reuses. :class:`SparseTargets` and the storage
encoding live in :mod:`kdfast.targets`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _dispatch, _native, _ops, _triton
from . import reference_sparse as _ref
from ._reduction import Reduction
from ._validate import check_count, check_flag, check_int, check_labels, check_logits, check_temperature
from .targets import SparseTargets

__all__ = ["compress_topk", "compress_sample", "sparse_kl", "prepare_sparse", "SparseInputs", "TAILS"]

TAILS = ("bucket", "renorm")


# ----------------------------------------------------------------------------- compression


def _teacher_rows(teacher_logits, backend, op: str):
    """Validated ``[N, V]`` teacher logits (detached) and the backend compressing them."""
    x = check_logits(teacher_logits, "teacher_logits").detach()
    if x.device.type == "meta":
        raise ValueError("teacher_logits: expected a tensor with values, got a meta tensor (compression reads the logits)")
    backend = _dispatch.resolve(backend, x.device, (x.dtype,), op=op)
    return x.reshape(-1, x.shape[-1]), backend


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
    x2, backend = _teacher_rows(teacher_logits, backend, "compress_topk")
    k = check_count(k, "k")
    t = check_temperature(temperature)
    lead = teacher_logits.shape[:-1]
    if backend == "torch" or x2.shape[0] == 0:
        ids, lp, tail = _ref.compress_topk(x2, k, t)
    elif backend == "triton":
        ids, lp, tail = _triton.kernels("compress").compress_topk(x2, k, t)
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
    x2, backend = _teacher_rows(teacher_logits, backend, "compress_sample")
    n_s = check_count(num_samples, "num_samples")
    t = check_temperature(temperature)
    seed = check_int(seed, "seed", low=0, high=2**64 - 1)
    row_offset = check_int(row_offset, "row_offset", low=0, high=2**64 - 1)
    lead = teacher_logits.shape[:-1]
    if backend == "torch" or x2.shape[0] == 0:
        ids, lp, w = _ref.compress_sample(x2, n_s, t, seed, row_offset)
    elif backend == "triton":
        ids, lp, w = _triton.kernels("compress").compress_sample(x2, n_s, t, seed, row_offset)
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
    labels = check_labels(labels, lead, torch.device(device))
    mode = "sampled" if targets.method == "sample" else tail
    k = targets.k
    ids = targets.indices.detach().reshape(-1, k).to(torch.int64).contiguous()
    if _dispatch.host_reads_allowed(ids.device) and ids.numel():
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
            kernels are the custom op ``kdfast::sparse``).

    Returns:
        float32 loss (float64 for float64 students on the torch backend); the gradient w.r.t.
        ``student_logits`` has its dtype. The targets never receive a gradient.
    """
    student_logits = check_logits(student_logits, "student_logits")
    red = Reduction(reduction, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    t2_scale = check_flag(t2_scale, "t2_scale")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    dtype = student_logits.dtype
    float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    prep = prepare_sparse(targets, lead, v, student_logits.device, tail=tail, temperature=temperature,
                          labels=labels, float_dtype=float_dtype)
    s = student_logits.reshape(-1, v)
    backend = _dispatch.resolve(backend, s.device, (dtype,), op="sparse_kl")
    n = s.shape[0]
    if n == 0:
        zeros = student_logits.to(float_dtype).sum(-1) * 0.0
        return zeros if red.per_row else zeros.sum()
    if backend == "torch":
        rows = _reference_rows(s, prep, red)
        if t2_scale:
            rows = rows * (prep.temperature ** 2)
        return red.apply(rows, lead, prep.labels)
    if backend == "triton" and s.device.type == "cpu" and _dispatch.host_reads_allowed(s.device):
        check_values(prep, s, red.ignore_index)  # the Triton kernel cannot raise: check first
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    out, _ = _ops.sparse(s if need_grad else s.detach(), prep.ids, prep.lp, prep.w, prep.tail, prep.labels,
                         red.weight(n, prep.labels, s.device), prep.mode, prep.temperature, t2_scale,
                         red.ignore_index, not red.per_row, need_grad, backend)
    return out.reshape(lead) if red.per_row else out


def _reference_rows(s2: torch.Tensor, prep: SparseInputs, red: Reduction) -> torch.Tensor:
    """Per-row ℓ by the PyTorch reference, 0 in masked rows (never computed in eager mode)."""
    rows_of = (lambda s, sel: _ref.sparse_rows(s, sel(prep.ids), sel(prep.lp), sel(prep.w), sel(prep.tail),
                                               prep.temperature, prep.mode))
    if not _dispatch.host_reads_allowed(s2.device):
        rows = rows_of(s2, lambda x: x)
        return rows if prep.labels is None else torch.where(red.keep(prep.labels), rows, 0.0)
    keep = check_values(prep, s2, red.ignore_index)
    if keep is None:
        return rows_of(s2, lambda x: x)
    vals = rows_of(s2[keep], lambda x: None if x is None else x[keep])
    return vals.new_zeros(s2.shape[0]).index_put((keep,), vals)
