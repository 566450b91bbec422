"""The losses against sparse teacher targets (api.md §2): :func:`sparse_loss` and :func:`sparse_kl`.

Per row, with ``q = softmax(z_s / T)`` the student's full-vocabulary distribution and the
teacher's stored ``p_i = exp(targets.logprobs[i])`` for the listed ids, a top-k row gives two
*category* distributions, and the loss is a dense divergence (api.md §1) between them:

* ``tail="bucket"``: k + 1 categories, the listed ids and one bucket for the rest of the
  vocabulary on both sides: ``P = (p_1 … p_k, p_tail)``, ``Q = (q_1 … q_k, q_tail)``, with
  ``p_tail = exp(targets.tail_logprob)`` (``max(0, 1 − Σp)`` without one; 0 when every id is
  listed) and ``q_tail = Σ_{unlisted} q_j`` computed without cancellation;
* ``tail="renorm"``: the k ids, the teacher renormalised over them, ``P̃ = p / Σp``; for
  ``reverse_kl``, ``jsd`` and ``tvd`` the student is renormalised over the same ids too,
  ``Q̃ = q_K / Σ_K q`` (so unlisted logits get no gradient), while ``forward_kl`` keeps
  ``sparse_kl``'s full-vocabulary ``log q``: ``Σ_i p̃_i (log p̃_i − log q_i)``.

Sampled targets (``method="sample"``) allow only forward KL, ``Σ_i w_i (log p_i − log q_i)``:
its expectation over the draws is ``KL(p‖q)`` up to a constant, the one unbiased estimate.

The work runs in the custom op ``kdfast::sparse`` (Rust kernels on CPU, Triton on CUDA: one
log-sum-exp pass over the student row, the k gathers, one gradient pass) or in the float64-exact
PyTorch :mod:`kdfast.reference_sparse`. :func:`prepare_sparse` (the validated flat target
arrays) is what :func:`kdfast.fused_linear_distill_loss` reuses.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import _dispatch, _ops
from . import reference_sparse as _ref
from ._reduction import Reduction
from ._registry import get as _get_spec
from ._validate import as_rows, check_flag, check_labels, check_logits, check_temperature
from .parallel.collectives import agreed, as_local, check_backend, device_of, is_sharded, slice_bounds
from .targets import SparseTargets

__all__ = ["sparse_loss", "sparse_kl", "prepare_sparse", "check_sparse_loss", "SparseInputs", "TAILS",
           "SPARSE_LOSSES"]

TAILS = ("bucket", "renorm")
#: The losses of sparse top-k targets (sampled targets: ``forward_kl`` only).
SPARSE_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


class _DefaultBeta(float):
    """The default ``beta`` (0.5), told apart from an explicit one: only ``jsd`` takes ``beta``."""

    __slots__ = ()


_BETA = _DefaultBeta(_get_spec("jsd").param.default)


def check_sparse_loss(loss, beta=None, *, what: str = "sparse_loss") -> Tuple[str, float]:
    """``(loss, param)`` for the kernels: ``loss`` one of :data:`SPARSE_LOSSES` (``ValueError``
    listing them), ``param`` β for ``jsd`` (``beta``, default 0.5, in [0, 1]: ``ValueError``
    naming it) and 0 otherwise; ``beta`` given (not None) with another loss is a ``TypeError``
    (``what``: the function named in it), as for the dense losses' foreign parameters."""
    if not isinstance(loss, str) or loss not in SPARSE_LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(map(repr, SPARSE_LOSSES))} (the losses of sparse "
                         f"targets), got {loss!r}")
    if loss != "jsd":
        if beta is not None:
            raise TypeError(f"{what}: 'beta' does not apply to loss={loss!r} (only to loss='jsd')")
        return loss, 0.0
    spec = _get_spec("jsd")
    return loss, spec.check_param(spec.param.default if beta is None else beta)


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
                   float_dtype: torch.dtype = torch.float32, name: str = "student_logits",
                   loss: str = "forward_kl") -> SparseInputs:
    """Validate sparse ``targets`` (and ``tail``, ``temperature``, ``labels``, and that sampled
    targets come with ``loss="forward_kl"``) against a student of leading shape ``lead_shape``,
    vocabulary ``vocab`` on ``device``, and return the flat arrays the kernels take
    (:class:`SparseInputs`). ``name`` is the student argument named in errors.

    Raises ``TypeError``/``ValueError`` naming the argument. The id range check reads the ids on
    the host; it is skipped while compiling and during CUDA-graph capture (the Triton kernel
    then gives such a row a NaN loss). The other value checks (log-probs, weights, repeated
    ids) are the backends' (:func:`check_values` for the PyTorch path).
    """
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    if tail not in TAILS:
        raise ValueError(f"tail: expected 'bucket' or 'renorm', got {tail!r}")
    if targets.method == "sample" and loss != "forward_kl":
        raise ValueError(f"loss: sampled targets (method='sample') support only loss='forward_kl', whose "
                         f"Σ w (log p − log q) is the one unbiased estimate of the full loss; got loss={loss!r} "
                         f"(use top-k targets for it)")
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


def check_values(prep: SparseInputs, s2: torch.Tensor, ignore_index: int, loss: str = "forward_kl"
                 ) -> Optional[torch.Tensor]:
    """The value checks the Rust kernel makes (same messages), on the host: the targets'
    log-probs, weights and repeated ids, a finite maximum in every unmasked student row, and
    (``tail="renorm"`` with a loss that renormalises the student) a finite student logit at
    some listed id. Returns the unmasked row numbers (None without labels)."""
    _ref.check_target_values(prep.ids, prep.lp, prep.w, prep.tail, prep.mode)
    keep = None if prep.labels is None else (prep.labels != ignore_index).nonzero().squeeze(1)
    s = s2.detach() if keep is None else s2.detach()[keep]
    _ref.check_rows(s, "student_logits", rows=keep)
    if prep.mode == "renorm" and loss != "forward_kl":
        sel = (lambda x: x if keep is None else x[keep])
        _ref.check_renorm_student(s, sel(prep.ids), sel(prep.lp), rows=keep)
    return keep


def sparse_loss(student_logits: torch.Tensor, targets: SparseTargets, *, loss: str = "forward_kl",
                beta: float = _BETA, tail: str = "bucket", temperature: Optional[float] = None,
                labels: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                num_items_in_batch=None, t2_scale: bool = False, backend: str = "auto",
                process_group=None) -> torch.Tensor:
    """A distillation loss of ``student_logits`` against sparse teacher ``targets``.

    For top-k targets, the dense loss ``loss`` (api.md §1) between the category distributions of
    the module docstring: ``tail="bucket"`` over the k listed ids and one tail bucket on both
    sides (``P = (p_i, p_tail)``, ``Q = (q_i, q_tail)``), ``tail="renorm"`` over the k ids with
    ``P̃ = p / Σp``:

    ===============  ==============================================  ===================================
    ``loss``         bucket (k + 1 categories)                       renorm (k categories)
    ===============  ==============================================  ===================================
    ``forward_kl``   ``KL(P‖Q)`` (= :func:`sparse_kl`)                ``Σ p̃ (log p̃ − log q)``, full-vocab q
    ``reverse_kl``   ``KL(Q‖P)``                                      ``KL(Q̃‖P̃)``, ``Q̃ = q_K / Σ_K q``
    ``jsd``          ``β KL(P‖M) + (1−β) KL(Q‖M)``, ``M = βP+(1−β)Q``  the same with ``P̃``, ``Q̃``
    ``tvd``          ``½ Σ_c |P_c − Q_c|``                            ``½ Σ_i |p̃_i − q̃_i|``
    ===============  ==============================================  ===================================

    ``jsd`` at β = 0 is exactly forward KL and at β = 1 exactly reverse KL *over the same
    categories* (the dense convention). In renorm mode that makes ``jsd(beta=0)`` the
    renormalised ``KL(P̃‖Q̃)``, which differs from ``sparse_kl``'s renorm (``loss="forward_kl"``,
    full-vocabulary ``log q``; the student's mass outside the k ids also gets a gradient there):
    the losses that compare the student's distribution (reverse KL, JSD, TVD) renormalise it
    like the teacher, so that both sides are distributions over the same k ids.

    With ``k = V`` and ``tail="bucket"`` each loss equals the dense :func:`kdfast.forward_kl`,
    :func:`kdfast.reverse_kl`, :func:`kdfast.jsd`, :func:`kdfast.tvd`. Sampled targets
    (``method="sample"``) allow only ``loss="forward_kl"``: ``Σ_i w_i (log p_i − log q_i)``,
    whose expectation is ``KL(p‖q)`` (the one unbiased estimate); another loss is a
    ``ValueError``.

    Gradient: with ``g_c = ∂ℓ/∂Q_c`` and ``a = z_s / T``, ``∂ℓ/∂a_j = q_j (G_j − S)``,
    ``S = Σ_c g_c Q_c``, ``G_j = g_c`` for ``j`` listed as ``c`` and ``g_tail`` for an unlisted
    ``j`` (renorm: ``q̃_j`` over the k ids, 0 elsewhere). The +inf rule of the dense losses holds:
    a KL whose first argument has mass on a category where the second has none (e.g.
    ``reverse_kl`` with ``tail_logprob = -inf`` while the student has mass outside the listed
    ids) is ``+inf`` for the row, with a zero gradient row; mixtures with β ∈ (0, 1) are finite,
    and categories without mass on either side contribute 0. A renormalising loss needs a
    finite student logit at some listed id of every row with teacher mass (``ValueError`` on
    CPU tensors, a NaN row on CUDA).

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
        loss: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` or ``"tvd"``.
        beta: β ∈ [0, 1] of ``jsd`` (the teacher's weight in the mixture); given with another
            loss: ``TypeError``.
        tail: ``"bucket"`` or ``"renorm"`` (top-k targets; ignored for sampled ones).
        temperature: None uses ``targets.temperature``; another T > 0 puts the student at T and
            uses the stored teacher log-probs as they are.
        t2_scale, labels, ignore_index, reduction, num_items_in_batch: as for the dense losses
            (:func:`kdfast.forward_kl`); ``t2_scale`` multiplies by the student's T².
        backend: ``"auto"`` (Rust for CPU and Triton for CUDA float32/bf16/fp16 tensors, else
            PyTorch), ``"rust"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``"torch"``. Usable inside ``torch.compile(fullgraph=True)`` on every backend (the
            kernels are the custom op ``kdfast::sparse``).
        process_group: the ``torch.distributed`` group over which the student's vocabulary is
            sharded (api.md §6): ``student_logits`` is this rank's contiguous slice, the target
            ids are global; every rank gets the whole vocabulary's loss and its slice's gradient.
            A ``DTensor`` student sharded on its last dimension needs none. The Rust kernels read a
            CPU float32/bf16/fp16 slice, PyTorch operations any other (``backend`` "auto" or "torch").

    Returns:
        float32 loss (float64 for float64 students on the torch backend); the gradient w.r.t.
        ``student_logits`` has its dtype. The targets never receive a gradient.
    """
    loss, param = check_sparse_loss(loss, None if beta is _BETA else beta)
    red = Reduction(reduction, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    t2_scale = check_flag(t2_scale, "t2_scale")
    target_kw = dict(tail=tail, temperature=temperature, labels=labels, loss=loss)
    if process_group is not None or is_sharded(process_group, student_logits):
        return _sharded_loss(student_logits, targets, target_kw, red, param, t2_scale, backend, process_group)
    student_logits = check_logits(student_logits, "student_logits")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    dtype = student_logits.dtype
    float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    prep = prepare_sparse(targets, lead, v, student_logits.device, float_dtype=float_dtype, **target_kw)
    s = as_rows(student_logits)
    backend = _dispatch.resolve(backend, s.device, (dtype,), op="sparse_loss")
    n = s.shape[0]
    if n == 0:
        zeros = student_logits.to(float_dtype).sum(-1) * 0.0
        return zeros if red.per_row else zeros.sum()
    if backend == "torch":
        rows = _reference_rows(s, prep, red, loss, param)
        if t2_scale:
            rows = rows * (prep.temperature ** 2)
        return red.apply(rows, lead, prep.labels)
    if backend == "triton" and s.device.type == "cpu" and _dispatch.host_reads_allowed(s.device):
        check_values(prep, s, red.ignore_index, loss)  # the Triton kernel cannot raise: check first
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    out, _ = _ops.sparse(s if need_grad else s.detach(), prep.ids, prep.lp, prep.w, prep.tail, prep.labels,
                         red.weight(n, prep.labels, s.device), prep.mode, loss, param, prep.temperature, t2_scale,
                         red.ignore_index, not red.per_row, need_grad, backend)
    return out.reshape(lead) if red.per_row else out


def sparse_kl(student_logits: torch.Tensor, targets: SparseTargets, *, tail: str = "bucket",
              temperature: Optional[float] = None, labels: Optional[torch.Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
              t2_scale: bool = False, backend: str = "auto", process_group=None) -> torch.Tensor:
    """Forward KL of ``student_logits`` against sparse teacher ``targets``: exactly
    :func:`sparse_loss` with ``loss="forward_kl"`` (see it for the keywords).

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
    A row whose loss is ``+inf`` (teacher mass on a listed id, or in the tail, where the
    student's logits are all ``-inf``) gets a zero gradient row (the +inf rule).
    """
    return sparse_loss(student_logits, targets, loss="forward_kl", tail=tail, temperature=temperature,
                       labels=labels, ignore_index=ignore_index, reduction=reduction,
                       num_items_in_batch=num_items_in_batch, t2_scale=t2_scale, backend=backend,
                       process_group=process_group)


def _sharded_loss(student_logits, targets, target_kw: dict, red: Reduction, param: float, t2_scale: bool, backend,
                  group) -> torch.Tensor:
    """:func:`sparse_loss` over a vocabulary sharded across ``group`` (api.md §6). Each rank's own
    arguments are checked and agreed on before the ranks compute (no rank is left waiting)."""
    if is_sharded(group, student_logits):
        student_logits, group = as_local(student_logits, group)
    device = device_of(student_logits)
    try:
        student_logits, error = check_logits(student_logits, "student_logits", empty_ok=True), None  # may be empty
        check_backend(backend)
    except Exception as e:  # noqa: BLE001 - raised by slice_bounds, on every rank together
        error = e
    v = 0 if error is not None else student_logits.shape[-1]
    offset, v_total = slice_bounds(group, v, device, "student_logits", error=error)
    lead = student_logits.shape[:-1]
    float_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32

    def prepared() -> SparseInputs:
        prep = prepare_sparse(targets, lead, v_total, device, float_dtype=float_dtype, **target_kw)
        _ref.check_target_values(prep.ids, prep.lp, prep.w, prep.tail, prep.mode)
        return prep

    prep = agreed(group, device, prepared)
    rows = _sharded_rows(as_rows(student_logits), prep, red, target_kw["loss"], param, offset, v_total, group)
    if t2_scale:
        rows = rows * (prep.temperature ** 2)
    return red.apply(rows, lead, prep.labels)


def _sharded_rows(s2: torch.Tensor, prep: SparseInputs, red: Reduction, loss: str, param: float, offset: int,
                  total: int, group) -> torch.Tensor:
    """Per-row ℓ over a vocabulary sharded across ``group`` (:mod:`kdfast.parallel.sparse`)."""
    from .parallel.sparse import sparse_rows as sharded

    t = prep.temperature
    if prep.labels is None:
        return sharded(s2, t, offset, total, group, prep.ids, prep.lp, prep.w, prep.tail, prep.mode, loss, param)
    keep = red.keep(prep.labels).nonzero().squeeze(1)
    sel = (lambda x: None if x is None else x[keep])
    vals = sharded(s2[keep], t, offset, total, group, prep.ids[keep], prep.lp[keep], sel(prep.w), sel(prep.tail),
                   prep.mode, loss, param)
    return vals.new_zeros(s2.shape[0]).index_put((keep,), vals)


def _reference_rows(s2: torch.Tensor, prep: SparseInputs, red: Reduction, loss: str, param: float) -> torch.Tensor:
    """Per-row ℓ by the PyTorch reference, 0 in masked rows (never computed in eager mode)."""
    rows_of = (lambda s, sel: _ref.sparse_rows(s, sel(prep.ids), sel(prep.lp), sel(prep.w), sel(prep.tail),
                                               prep.temperature, prep.mode, loss, param))
    if not _dispatch.host_reads_allowed(s2.device):
        rows = rows_of(s2, lambda x: x)
        return rows if prep.labels is None else torch.where(red.keep(prep.labels), rows, 0.0)
    keep = check_values(prep, s2, red.ignore_index, loss)
    if keep is None:
        return rows_of(s2, lambda x: x)
    vals = rows_of(s2[keep], lambda x: None if x is None else x[keep])
    return vals.new_zeros(s2.shape[0]).index_put((keep,), vals)
