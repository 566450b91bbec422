"""Distillation losses fused with the LM head: no ``[N, V]`` logits in memory (api.md §3).

For hidden states ``h`` ``[N, H]``, a head ``W`` ``[V, H]`` (bias ``b``) and a per-row loss
ℓ(z_s, teacher) of :mod:`kdfast.losses` or :func:`kdfast.sparse_loss`, with ``z_s = h Wᵀ + b``::

    L = Σ_r w_r ℓ_r            (w_r = 1/D for "mean", 1 for "sum")
    ∂L/∂h = G W,   ∂L/∂W = Gᵀ h,   ∂L/∂b = Σ_r G_r,   G = ∂L/∂z_s   [N, V]

Rows are processed in chunks of C tokens. For each chunk the student logits are computed with
float32 accumulation *and* a float32 result (bf16-rounded logits are what made Liger's fused
bf16 gradients 4–23 % wrong), the loss kernel turns them into that chunk's ``G`` (the Triton
kernel in place, the Rust kernel into one reused buffer), and ``∂L/∂h`` (that chunk's rows) and
``∂L/∂W``, ``∂L/∂b`` (accumulated) are formed at once, so backward only scales by the
incoming gradient. Peak memory is O(C · V) beyond the inputs and the gradients, flat in N.

The default C keeps a chunk's float32 logits near 64 MiB on CPU and 1 GiB on CUDA. That is the
other half of the speed story: every chunk pays one ``V × H`` update of ``∂L/∂W``, so small
chunks at small N (Liger's ~33-row chunks at N = 1024) make the fused loss several times slower
than the unfused one; with large chunks N ≤ C is a single chunk, exactly the unfused work.

With ``reduction="none"`` the row weights are only known in backward, which then recomputes
each chunk's logits (one extra matmul per chunk) instead of keeping ``G``.

The whole computation is the custom op ``kdfast::fused_linear`` (with a fake implementation
and autograd formula), so it runs unchanged inside ``torch.compile(fullgraph=True)``. With a
``process_group`` (heads sharded by vocabulary rows) it is :mod:`kdfast.parallel.fused` instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _dispatch, _ops
from . import reference_sparse as _ref_sparse
from ._buffers import gradient
from ._head import HALF, float_copy, logits_f32
from ._errors import DtypeError
from ._reduction import Reduction
from ._registry import LOSSES, param_names
from ._registry import get as get_loss
from ._validate import LOGIT_DTYPES, as_rows, check_flag, check_int, check_labels, check_temperature, check_vocab, reject_unknown
from .losses import COMMON_KWARGS
from .parallel.collectives import check_backend, local_vocab
from .parallel.fused import Plan, fused_loss, head_slices
from .sparse_losses import check_sparse_loss, prepare_sparse

__all__ = ["fused_linear_distill_loss"]
# Elements of one chunk's float32 logits (64 MiB on CPU, 1 GiB on CUDA).
_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 28}


# ----------------------------------------------------------------------------- per-chunk math


def _chunk_rows_and_grad(spec, backend, z, teacher, labels, weight, need_grad, buf=None):
    """Per-row losses of one chunk and (when ``need_grad``) ``G = ∂(Σ w_r ℓ_r)/∂z``.

    ``teacher`` is the chunk's teacher logits or its ``(ids, lp, w, tail)`` target arrays;
    ``weight`` a 0-d tensor (all rows) or the chunk's ``[C]`` row weights. The Triton kernels
    write ``G`` over ``z`` in place; the Rust kernels into ``buf`` (a reused ``[≥C, V]``
    buffer: the kernels read and write through separate slices, so they may not alias).
    """
    loss, mode, param, temperature, t2_scale, ignore_index = spec
    c = z.shape[0]
    rows = torch.empty(c, dtype=torch.float32, device=z.device)
    per_row = weight.dim() == 1
    if backend == "rust":
        grad = (buf[:c] if buf is not None else torch.empty_like(z)) if need_grad else None
        scale = 1.0 if per_row else float(weight)
    else:
        grad = z if need_grad else None
        scale = torch.ones((), device=z.device) if per_row else weight.to(torch.float32)
    if mode:
        ids, lp, w, tail = teacher
        _ops.sparse_call(backend)(mode, z, ids, lp, w, tail, labels, ignore_index, temperature, t2_scale,
                                  scale, rows, grad, loss=loss, param=param)
    else:
        _ops.dense_call(backend)(loss, param, z, teacher, labels, ignore_index, temperature, t2_scale,
                                 scale, rows, grad)
    if need_grad and per_row:
        grad.mul_(weight.to(grad.dtype).unsqueeze(1))
    return rows, grad


# ----------------------------------------------------------------------------- the custom op


@torch.library.custom_op("kdfast::fused_linear", mutates_args=())
def _fused_linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    ids: Optional[torch.Tensor],
    logprobs: Optional[torch.Tensor],
    sample_weights: Optional[torch.Tensor],
    tail: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    row_weight: torch.Tensor,
    loss: str,
    mode: str,
    param: float,
    temperature: float,
    t2_scale: bool,
    ignore_index: int,
    vocab: int,
    chunk: int,
    backend: str,
    reduce: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, ∂/∂hidden, ∂/∂weight, ∂/∂bias)`` of ``L = Σ_r row_weight_r ℓ_r``.

    ``out`` is L (0-d) when ``reduce``, else the rows ℓ ``[N]``; a gradient not asked for is an
    empty tensor. ``row_weight`` is 0-d or ``[N]``. Only the first ``vocab`` rows of the heads
    take part; the rest of ``∂/∂weight`` and ``∂/∂bias`` is 0.
    """
    n, h_dim = hidden.shape
    dev = hidden.device
    w_used = weight[:vocab]
    # CPU matmuls in half precision round their output: multiply by a float32 copy instead.
    half = weight.dtype in HALF
    w32 = float_copy(w_used)
    tw32 = None
    if teacher_weight is not None:
        tw_used = teacher_weight[:vocab]
        tw32 = float_copy(tw_used)

    need_grad = need_hidden or need_weight or need_bias
    rows_all = torch.empty(n, dtype=torch.float32, device=dev)
    g_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    # ∂/∂W accumulates over chunks in float32 on CPU and for one-chunk float32 heads; on CUDA a
    # half-precision head accumulates in its own dtype (one rounding per chunk; chunks are few).
    acc_dtype = weight.dtype if (dev.type == "cuda" and half) else torch.float32
    g_w_acc = g_b_acc = None  # written by the first chunk, accumulated into by the others

    spec = (loss, mode, param, temperature, t2_scale, ignore_index)
    buf = gradient((min(chunk, n), vocab), torch.float32, dev) if (backend == "rust" and need_grad) else None
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h_c = hidden[c0:c1]
        z = logits_f32(h_c, w_used, None if bias is None else bias[:vocab], w32)
        if mode:
            sel = (lambda t: None if t is None else t[c0:c1])
            teacher = (ids[c0:c1], logprobs[c0:c1], sel(sample_weights), sel(tail))
        elif teacher_logits is not None:
            teacher = teacher_logits[c0:c1, :vocab]
        else:
            tb = None if teacher_bias is None else teacher_bias[:vocab]
            teacher = logits_f32(teacher_hidden[c0:c1], tw_used, tb, tw32)
        w_c = row_weight[c0:c1] if row_weight.dim() == 1 else row_weight
        lab = None if labels is None else labels[c0:c1]
        rows, g = _chunk_rows_and_grad(spec, backend, z, teacher, lab, w_c, need_grad, buf)
        rows_all[c0:c1] = rows
        del z, teacher  # the logits are spent (the Triton kernels overwrote them with g)
        if not need_grad:
            continue
        # The matmul operands: float32 on CPU (with the float32 head), the head's dtype on CUDA.
        g_mm = g if w32 is not None else g.to(w_used.dtype)
        if need_hidden:
            g_hidden[c0:c1] = g_mm @ (w32 if w32 is not None else w_used)
        if need_weight:
            a, b = g_mm.t().to(acc_dtype), h_c.to(acc_dtype)
            g_w_acc = torch.mm(a, b) if g_w_acc is None else g_w_acc.addmm_(a, b)
        if need_bias:
            g_b_acc = g.sum(0, dtype=torch.float32) if g_b_acc is None else g_b_acc.add_(g.sum(0, dtype=torch.float32))
        del g, g_mm

    out = (rows_all * row_weight).sum() if reduce else rows_all
    if need_weight and vocab == weight.shape[0]:
        g_weight = g_w_acc.to(weight.dtype)  # no copy when it accumulated in the head's dtype
    elif need_weight:
        g_weight = torch.zeros_like(weight)
        g_weight[:vocab] = g_w_acc
    else:
        g_weight = weight.new_empty(0)
    if need_bias:
        g_bias = torch.zeros_like(bias)
        g_bias[:vocab] = g_b_acc
    else:
        g_bias = hidden.new_empty(0)
    return out, g_hidden, g_weight, g_bias


@_fused_linear_op.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, ids, logprobs,
      sample_weights, tail, labels, row_weight, loss, mode, param, temperature, t2_scale, ignore_index,
      vocab, chunk, backend, reduce, need_hidden, need_weight, need_bias):
    n = hidden.shape[0]
    out = hidden.new_empty((), dtype=torch.float32) if reduce else hidden.new_empty(n, dtype=torch.float32)
    g_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    g_w = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    g_b = torch.empty_like(bias) if need_bias else hidden.new_empty(0)
    return out, g_h, g_w, g_b


_N_OP_ARGS = 26
_ROW_WEIGHT, _REDUCE, _NEEDS = 12, 22, slice(23, 26)


def _setup(ctx, inputs, output):
    ctx.reduce = inputs[_REDUCE]
    ctx.needs = inputs[_NEEDS]
    # The gradients are outputs, not functions to differentiate: no zeros of their shapes
    # (one of them V × H) handed to backward for them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    if ctx.reduce:
        ctx.save_for_backward(*output[1:])
    else:  # "none": recompute in backward with the incoming per-row weights
        tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs[:_ROW_WEIGHT]]
        ctx.save_for_backward(*tensors)
        ctx.scalars = inputs[_ROW_WEIGHT + 1:_REDUCE]


def _backward(ctx, grad_out, _gh, _gw, _gb):
    needs = tuple(ctx.needs_input_grad[i] for i in range(3))
    if ctx.reduce:
        grads = list(ctx.saved_tensors)
        # Scale in place (the gradients are this op's own outputs); skip it for the usual 1 on
        # CPU, where checking costs nothing. On CUDA the check would sync with the host.
        if torch.compiler.is_compiling() or grad_out.device.type != "cpu" or bool(grad_out != 1):
            grads = [g.mul_(grad_out.to(g.dtype)) if need else None for g, need in zip(grads, needs)]
        grads = [g if need else None for g, need in zip(grads, needs)]
    else:
        inputs = ctx.saved_tensors
        _, g_h, g_w, g_b = _fused_linear_op(*inputs, grad_out, *ctx.scalars, True, *needs)
        grads = [g if need else None for g, need in zip((g_h, g_w, g_b), needs)]
    return tuple(grads) + (None,) * (_N_OP_ARGS - 3)


_fused_linear_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- the public function

def _matrix(x, name: str, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise DtypeError(f"{name}: expected float32, bfloat16, float16 or float64, got {x.dtype}")
    if dim == 2 and x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [V, H] weight, got shape {tuple(x.shape)}")
    if dim == 1 and x.dim() < 1:
        raise ValueError(f"{name}: expected [..., H] hidden states, got a 0-d tensor")
    return x


def _check_bias(bias, name: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    bias = _matrix(bias, name, 0)
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"{name}: expected shape ({weight.shape[0]},) (one entry per vocabulary row), got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"{name}: expected device {weight.device}, got {bias.device}")
    return bias


def _row_weight(red: Reduction, n: int, labels, device, dtype) -> torch.Tensor:
    """The 0-d weight of every row (``1`` for sum, ``1/D`` for mean), as a tensor: no host sync."""
    if red.kind != "mean":
        return torch.ones((), dtype=dtype, device=device)
    d = red.denominator(n, labels)
    d = d.to(device=device, dtype=dtype) if isinstance(d, torch.Tensor) else torch.tensor(d, dtype=dtype, device=device)
    return 1.0 / d


def fused_linear_distill_loss(student_hidden, student_weight, *, teacher_hidden=None, teacher_weight=None,
                              teacher_logits=None, targets=None, loss="forward_kl", student_bias=None,
                              teacher_bias=None, chunk_size=None, **loss_kwargs) -> torch.Tensor:
    """A distillation loss on ``student_hidden @ student_weightᵀ (+ student_bias)`` without ever
    holding the ``[N, V]`` logits.

    Equal (within float32 rounding) to calling the unfused loss on the materialised logits:
    ``kdfast.<loss>(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t, **loss_kwargs)``, or ``kdfast.sparse_loss(...,
    targets, loss=loss)``. Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``;
    the teacher never receives one.

    Args:
        student_hidden: ``[..., H]`` float32/bfloat16/float16 (float64 on the torch backend).
        student_weight: ``[V_s, H]``; ``student_bias``: ``[V_s]`` or None.
        teacher_hidden, teacher_weight, teacher_bias: the teacher as hidden states ``[..., H_t]``
            (same leading shape) and head ``[V_t, H_t]`` (+ bias), or
        teacher_logits: ``[..., V_t]``, or
        targets: :class:`kdfast.SparseTargets` (then the loss is :func:`kdfast.sparse_loss`).
            Exactly one of the three teacher forms.
        loss: the name of a dense loss (``kdfast.LOSSES``: ``"forward_kl"``, ``"jsd"``, ...);
            with ``targets``, a :func:`kdfast.sparse_loss` loss (``"forward_kl"`` — also as
            ``"sparse_kl"`` —, ``"reverse_kl"``, ``"jsd"``, ``"tvd"``; sampled targets:
            ``"forward_kl"`` only).
        chunk_size: tokens per chunk; default keeps a chunk's float32 logits near 64 MiB (CPU)
            or 1 GiB (CUDA). Peak extra memory is O(chunk_size · V).
        **loss_kwargs: those of the loss: ``temperature``, ``t2_scale``, ``labels``,
            ``ignore_index``, ``reduction``, ``num_items_in_batch``, ``vocab_size``, ``backend``,
            ``beta`` (jsd, dense or sparse), ``skew`` (skew KLs), ``tail`` (sparse).
        process_group: a ``torch.distributed`` group over which the heads are sharded by
            vocabulary (api.md §6; tensor parallelism of the LM head): ``student_weight``,
            ``student_bias``, ``teacher_weight``, ``teacher_bias`` are this rank's contiguous
            rows ``[V_local, H]`` (rank order, sizes may differ), ``teacher_logits`` this rank's
            columns ``[..., V_local]``; ``targets`` ids and ``vocab_size`` are global; the hidden
            states are replicated (the same on every rank). The result is the whole vocabulary's
            loss, the same on every rank. ``student_weight`` and ``student_bias`` get the
            gradient of their local rows; ``student_hidden`` gets its *complete* gradient
            ``Σ_r G_r W_r`` (one all-reduce of ``[N, H]`` in backward), the same on every rank
            — the exact gradient of this op w.r.t. each of its inputs. So do not pass the hidden
            states through a region whose backward all-reduces them again (Megatron's
            ``copy_to_tensor_model_parallel_region``): that would count the gradient once per
            rank. Every rank must call with the same hidden states, labels and targets, and
            give the loss the same upstream gradient. Chunked as without a group (peak memory
            O(chunk_size · V_local)); computed with PyTorch operations (``backend`` "auto" or
            "torch"), eagerly: not inside ``torch.compile``.

    Returns:
        float32 loss (float64 for float64 inputs), reduced as asked.
    """
    reject_unknown("fused_linear_distill_loss", loss_kwargs, (*COMMON_KWARGS, *param_names(), "tail"))
    h = _matrix(student_hidden, "student_hidden", 1)
    w = _matrix(student_weight, "student_weight", 2)
    if w.device != h.device:
        raise ValueError(f"student_weight: expected the device of student_hidden ({h.device}), got {w.device}")
    lead, h_dim = h.shape[:-1], h.shape[-1]
    if w.shape[1] != h_dim:
        raise ValueError(f"student_weight: expected [V, {h_dim}] (H of student_hidden), got {tuple(w.shape)}")
    b = _check_bias(student_bias, "student_bias", w)
    forms = [name for name, x in (("teacher_hidden/teacher_weight", teacher_hidden if teacher_hidden is not None else teacher_weight),
                                  ("teacher_logits", teacher_logits), ("targets", targets)) if x is not None]
    if len(forms) != 1:
        raise ValueError(f"expected exactly one teacher: teacher_hidden+teacher_weight, teacher_logits or targets; got {forms or 'none'}")

    red = Reduction(loss_kwargs.get("reduction", "mean"), ignore_index=loss_kwargs.get("ignore_index", -100),
                    num_items_in_batch=loss_kwargs.get("num_items_in_batch"))
    t2_scale = check_flag(loss_kwargs.get("t2_scale", False), "t2_scale")
    labels = check_labels(loss_kwargs.get("labels"), lead, h.device)  # int64 [N] or None
    v_s = w.shape[0]
    group = loss_kwargs.get("process_group")
    if group is not None:  # the heads' rows are this rank's slice of the vocabulary (possibly empty)
        check_backend(loss_kwargs.get("backend", "auto"))

    th = tw = tb = tlog = ids = lp = sw = tail_lp = None
    mode, param = "", 0.0
    kernels = ("rust", "triton", "torch")
    if targets is not None:
        for key in (*param_names(), "vocab_size"):
            if key in loss_kwargs and key != "beta":
                raise TypeError(f"fused_linear_distill_loss: {key!r} does not apply to sparse targets")
        loss, param = check_sparse_loss("forward_kl" if loss == "sparse_kl" else loss, loss_kwargs.get("beta"),
                                        what="fused_linear_distill_loss")
        if group is not None:
            offset, v_global, widest = head_slices(group, v_s, v_s, h.device)
        prep = prepare_sparse(targets, lead, v_s if group is None else v_global, h.device, tail=loss_kwargs.get("tail", "bucket"),
                              temperature=loss_kwargs.get("temperature"), name="student_hidden", loss=loss)
        ids, lp, sw, tail_lp, mode, t = prep.ids, prep.lp, prep.w, prep.tail, prep.mode, prep.temperature
        vocab = v_s
    else:
        spec = get_loss(loss)
        if "tail" in loss_kwargs:
            raise TypeError("fused_linear_distill_loss: 'tail' applies only to sparse targets")
        param = _loss_param(spec, loss_kwargs)
        spec, param = spec.canonical(param)
        loss, kernels = spec.name, spec.backends
        t = check_temperature(loss_kwargs.get("temperature", 1.0))
        if teacher_logits is not None:
            tlog = _matrix(teacher_logits, "teacher_logits", 1)
            if tlog.shape[:-1] != lead:
                raise ValueError(f"teacher_logits: expected leading shape {tuple(lead)} (that of student_hidden), got {tuple(tlog.shape)}")
            if tlog.device != h.device:
                raise ValueError(f"teacher_logits: expected device {h.device}, got {tlog.device}")
            v_t = tlog.shape[-1]
            tlog = as_rows(tlog.detach())
        else:
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError("teacher_hidden and teacher_weight: expected both (the teacher's hidden states and head)")
            th = _matrix(teacher_hidden, "teacher_hidden", 1)
            tw = _matrix(teacher_weight, "teacher_weight", 2)
            if th.shape[:-1] != lead:
                raise ValueError(f"teacher_hidden: expected leading shape {tuple(lead)} (that of student_hidden), got {tuple(th.shape)}")
            if tw.shape[1] != th.shape[-1]:
                raise ValueError(f"teacher_weight: expected [V, {th.shape[-1]}] (H of teacher_hidden), got {tuple(tw.shape)}")
            for name, x in (("teacher_hidden", th), ("teacher_weight", tw)):
                if x.device != h.device:
                    raise ValueError(f"{name}: expected device {h.device}, got {x.device}")
            tb = _check_bias(teacher_bias, "teacher_bias", tw)
            th, tw = th.detach().reshape(-1, th.shape[-1]), tw.detach()
            tb = None if tb is None else tb.detach()
            v_t = tw.shape[0]
        if group is None:
            vocab = check_vocab(loss_kwargs.get("vocab_size"), v_s, v_t, what="the student head", other="the teacher")
        else:  # the slices' sizes, and that they match, decided on every rank together
            offset, v_global, widest = head_slices(group, v_s, v_t, h.device)
            vocab = local_vocab(loss_kwargs.get("vocab_size"), offset, v_global, v_s)

    n = h.numel() // h_dim if h_dim else 0
    wide = torch.float64 in (h.dtype, w.dtype)
    backend = "torch" if group is not None else _dispatch.resolve(
        loss_kwargs.get("backend", "auto"), h.device, (h.dtype, w.dtype), op="fused_linear_distill_loss",
        available=kernels)
    out_dtype = torch.float64 if wide else torch.float32
    h2 = h.reshape(n, h_dim)
    if n == 0:
        zero = (h2.sum() * 0.0 + w.sum() * 0.0).to(out_dtype)
        return zero.expand(lead) if red.per_row else zero
    if chunk_size is None:
        # with a group, from the widest slice: every rank must run the same chunks (collectives)
        chunk = max(1, _CHUNK_ELEMS.get(h.device.type, 1 << 24) // max(1, vocab if group is None else widest))
    else:
        chunk = check_int(chunk_size, "chunk_size")
        if chunk < 1:
            raise ValueError(f"chunk_size: expected an integer ≥ 1, got {chunk}")
    chunk = min(chunk, n)

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h.requires_grad, grad_on and w.requires_grad, grad_on and b is not None and b.requires_grad)
    reduce = not red.per_row
    row_weight = _row_weight(red, n, labels, h.device, out_dtype)
    teacher = (th, tw, tb, tlog, ids, lp, sw, tail_lp)
    spec = (loss, mode, float(param), float(t), t2_scale, red.ignore_index)
    if group is not None:
        plan = Plan(teacher, labels, spec, vocab, chunk, offset, v_global, group)
        out = fused_loss(h2, w, b, row_weight, plan, reduce)
        return out if reduce else out.reshape(lead)
    if backend == "torch":
        rows = _torch_rows(h2, w, b, teacher, labels, spec, vocab, chunk)
        return (rows * row_weight).sum() if reduce else rows.reshape(lead)
    out = _fused_linear_op(h2, w, b, *teacher, labels, row_weight, *spec[:2], *spec[2:], vocab, chunk, backend,
                           reduce, *(needs if reduce else (False, False, False)))[0]
    return out if reduce else out.reshape(lead)


def _torch_rows(h2, w, b, teacher, labels, spec, vocab, chunk) -> torch.Tensor:
    """The pure-PyTorch backend (float64, devices without kernels, the reference): plain autograd
    through the unfused losses, each chunk checkpointed so its logits are freed after forward and
    recomputed in backward: memory stays O(chunk · V)."""
    n = h2.shape[0]
    wide = torch.float64 in (h2.dtype, w.dtype)
    keep = None
    if labels is not None and not torch.compiler.is_compiling():
        keep = (labels != spec[5]).nonzero().squeeze(1)  # eager: masked rows are never computed
    parts = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        idx = torch.arange(c0, c1, device=h2.device) if keep is None else keep[(keep >= c0) & (keep < c1)]
        # Teacher hidden states, logits and target arrays are per row; its head (tw, tb) is shared.
        t_c = [x if (x is None or i in (1, 2)) else x[idx] for i, x in enumerate(teacher)]
        parts.append(torch.utils.checkpoint.checkpoint(
            _torch_chunk_rows, h2[idx], w, b, *t_c, spec=spec, vocab=vocab, wide=wide, use_reentrant=False))
    rows = torch.cat(parts)
    if keep is not None:
        rows = rows.new_zeros(n).index_put((keep,), rows)
    elif labels is not None:
        rows = torch.where(labels != spec[5], rows, 0.0)
    return rows


def _torch_chunk_rows(h, w, b, th, tw, tb, tlog, ids, lp, sw, tail, *, spec, vocab, wide):
    loss, mode, param, temperature, t2_scale, _ = spec
    dt = torch.float64 if wide else torch.float32
    z = h.to(dt) @ w[:vocab].to(dt).t()
    if b is not None:
        z = z + b[:vocab].to(dt)
    if mode:
        rows = _ref_sparse.sparse_rows(z, ids, lp, sw, tail, temperature, mode, loss, param)
    else:
        if tlog is not None:
            t_logits = tlog[:, :vocab]
        else:
            t_logits = th.to(dt) @ tw[:vocab].to(dt).t()
            if tb is not None:
                t_logits = t_logits + tb[:vocab].to(dt)
        rows = LOSSES[loss].row_losses(z, t_logits, temperature, param)
    if t2_scale:
        rows = rows * (temperature * temperature)
    return rows.to(dt)


def _loss_param(spec, kw: dict) -> float:
    """The loss's own parameter from ``kw`` (its default when absent); another loss's is a TypeError."""
    own = spec.param.name if spec.param is not None else None
    for key in param_names():
        if key in kw and key != own:
            raise TypeError(f"fused_linear_distill_loss: {key!r} does not apply to loss={spec.name!r}")
    if own and spec.param.required and own not in kw:
        raise TypeError(f"fused_linear_distill_loss: loss={spec.name!r} needs {own}= ({spec.param.doc})")
    value = spec.check_param(kw.get(own, spec.param.default) if own else None)
    # The chunked kernels take the parameter as a number (for a CUDA tensor: one host sync).
    return float(value) if isinstance(value, torch.Tensor) else value
