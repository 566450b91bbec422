"""Pure-PyTorch implementation of kdfast's offline-distillation numerics (api.md §2).

The ``backend="torch"`` path of :func:`kdfast.compress_topk`, :func:`kdfast.compress_sample`
and :func:`kdfast.sparse_kl` (float64, or any device without Triton), written to be read:

* :func:`compress_topk` — a stable descending sort of ``x = z · (1/T)`` (f32, as the Rust
  kernel computes it): the same ids, in the same order (ties → lower id first), as Rust.
* :func:`compress_sample` — the *same algorithm* as the Rust sampler (``kdfast-core``
  ``compress.rs``): SplitMix64 uniforms keyed by ``(seed, row, stream)``, absolute vocabulary
  blocks of 4096 ids, N within-block draws per block walking the block's f64 running sum,
  then N draws over the blocks' masses choosing how many of each block's draws are used. Same
  seed and input give the same ids and weights as Rust (a draw could only differ if a uniform
  fell within ~1e-15 of a CDF boundary, where the two ``exp`` implementations may round
  differently).
* :func:`sparse_rows` — the per-row loss of every mode, differentiable by autograd (exact in
  float64, used for ``gradcheck``), NaN-free with ``-inf`` logits.

Every function takes 2-D ``[N, V]`` logits (and ``[N, k]`` targets) and does no reduction.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import reference as _reference

NEG_INF = float("-inf")
VOCAB_BLOCK = 4096
BLOCK_SELECT_STREAM = (1 << 64) - 1
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_SEED_SALT = 0x6B64666173742D31  # "kdfast-1"
_EXP_CUTOFF = -708.0  # the Rust sampler's exp flushes below this (e^-708 < 1e-307)


# ----------------------------------------------------------------------------- SplitMix64


def _mix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_keys(seed: int, rows: np.ndarray, stream: np.ndarray) -> np.ndarray:
    """``mix(mix(mix(seed ^ SALT) ^ row) ^ stream)`` broadcast over ``rows`` and ``stream``."""
    s = _mix64(np.array([(seed ^ _SEED_SALT) & _MASK64], dtype=np.uint64))
    k = _mix64(s ^ np.asarray(rows, dtype=np.uint64))
    return _mix64(k ^ np.asarray(stream, dtype=np.uint64))


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """``[..., n]`` uniforms in [0, 1): draw j of stream ``key`` is
    ``(mix(key + (j + 1)·γ) >> 11) · 2^-53``."""
    steps = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN_GAMMA))
    z = _mix64(np.asarray(keys, dtype=np.uint64)[..., None] + steps)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- helpers


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x = z · (1/T)``: float32 products with the float32 reciprocal of the float32 T, as the
    Rust kernels compute them (float64 input: ``z / T`` in float64)."""
    if logits.dtype == torch.float64:
        return logits / temperature
    t = torch.tensor(temperature, dtype=torch.float32)
    inv_t = (torch.tensor(1.0, dtype=torch.float32) / t).to(logits.device)
    return logits.float() * inv_t


def check_rows(x: torch.Tensor, name: str = "teacher_logits", rows: Optional[torch.Tensor] = None) -> None:
    """Every row needs a finite maximum: no NaN, no +inf, not entirely -inf. ``rows`` maps the
    rows of ``x`` to the row numbers reported."""
    if x.numel() == 0:
        return
    for bad, detail in (
        (torch.isnan(x).any(-1), "contains NaN"),
        ((x == float("inf")).any(-1), "contains +inf"),
        ((x == NEG_INF).all(-1), "is entirely -inf"),
    ):
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            row = row if rows is None else int(rows[row])
            raise ValueError(
                f"{name}: row {row} {detail}; every unmasked row needs at least one finite logit "
                f"and no +inf or NaN"
            )


def _exp_cut(d: torch.Tensor) -> torch.Tensor:
    """``exp(d)`` for ``d ≤ 0``, flushed to 0 below the Rust sampler's cutoff."""
    return torch.where(d < _EXP_CUTOFF, torch.zeros_like(d), torch.exp(d.clamp(min=_EXP_CUTOFF)))


def _draw(cum: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each uniform ``u[..., j]``: the first index whose running sum exceeds ``u · total``
    (the last positive-weight index if rounding leaves none)."""
    total = cum[..., -1:]
    idx = torch.searchsorted(cum.contiguous(), (u * total).contiguous(), right=True)
    pos = torch.arange(w.shape[-1], device=w.device).expand_as(w)
    last = torch.where(w > 0, pos, torch.zeros_like(pos)).amax(-1, keepdim=True)
    return torch.where(idx >= w.shape[-1], last.expand_as(idx), idx)


# ----------------------------------------------------------------------------- compression


def compress_topk(logits: torch.Tensor, k: int, temperature: float):
    """``(ids int64 [N, k], logprobs float32 [N, k], tail_logprob float32 [N])`` of ``[N, V]``."""
    x = scaled(logits, temperature)
    check_rows(x)
    n, v = x.shape
    vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
    kk = min(k, v)
    x64 = x.double()
    lse = torch.logsumexp(x64, dim=-1, keepdim=True)
    top = vals[:, :kk]
    finite = top > NEG_INF
    ids = torch.where(finite, order[:, :kk], torch.full_like(order[:, :kk], -1))
    lp = torch.where(finite, (top.double() - lse), torch.full_like(lse, NEG_INF).expand(-1, kk)).float()
    if v > kk:
        tail = (torch.logsumexp(vals[:, kk:].double(), dim=-1) - lse[:, 0]).clamp(max=0.0)
    else:
        tail = torch.full((n,), NEG_INF, dtype=torch.float64, device=x.device)
    if k > kk:
        ids = torch.cat([ids, ids.new_full((n, k - kk), -1)], dim=1)
        lp = torch.cat([lp, lp.new_full((n, k - kk), NEG_INF)], dim=1)
    return ids, lp, tail.float()


def compress_sample(logits: torch.Tensor, num_samples: int, temperature: float, seed: int,
                    row_offset: int = 0, *, chunk_rows: int = 256):
    """``(ids int64 [N, n], logprobs float32 [N, n], weights float32 [N, n])``: the Rust
    sampler's algorithm (see the module docstring), row ``r`` keyed as ``row_offset + r``."""
    x = scaled(logits, temperature)
    check_rows(x)
    outs = [
        _sample_chunk(x[r0:r0 + chunk_rows], num_samples, seed, row_offset + r0)
        for r0 in range(0, x.shape[0], chunk_rows)
    ]
    if not outs:
        n = num_samples
        dev = x.device
        return (torch.empty((0, n), dtype=torch.int64, device=dev), torch.empty((0, n), device=dev),
                torch.empty((0, n), device=dev))
    return tuple(torch.cat(parts, dim=0) for parts in zip(*outs))


def _sample_chunk(x: torch.Tensor, n: int, seed: int, row0: int):
    rows, v = x.shape
    dev = x.device
    nb = -(-v // VOCAB_BLOCK)
    pad = nb * VOCAB_BLOCK - v
    xb = torch.nn.functional.pad(x, (0, pad), value=NEG_INF).reshape(rows, nb, VOCAB_BLOCK)
    row_ids = np.arange(row0, row0 + rows, dtype=np.uint64)

    # Per block: weights relative to the block max, running sum, log-mass, N draws.
    m = xb.amax(-1)  # float32, as Rust
    empty = m == NEG_INF
    m64 = torch.where(empty, torch.zeros_like(m), m).double()
    w = _exp_cut(xb.double() - m64[..., None])
    cum = torch.cumsum(w, dim=-1)
    lse_b = torch.where(empty, torch.full_like(m64, NEG_INF), m64 + torch.log(cum[..., -1]))
    keys = stream_keys(seed, row_ids[:, None], np.arange(nb, dtype=np.uint64)[None, :])
    u = torch.from_numpy(uniforms(keys, n)).to(dev)  # [rows, nb, n]
    idx = _draw(cum, w, u)
    block_base = (torch.arange(nb, device=dev) * VOCAB_BLOCK)[None, :, None]
    draw_ids = idx + block_base

    # Over the blocks: how many draws each block contributes.
    top = lse_b.amax(-1, keepdim=True)
    wb = _exp_cut(lse_b - top)
    cumb = torch.cumsum(wb, dim=-1)
    lse_all = top[:, 0] + torch.log(cumb[:, -1])
    keys = stream_keys(seed, row_ids, np.full(rows, BLOCK_SELECT_STREAM, dtype=np.uint64))
    ub = torch.from_numpy(uniforms(keys, n)).to(dev)  # [rows, n]
    blk = _draw(cumb, wb, ub)
    counts = torch.zeros((rows, nb), dtype=torch.int64, device=dev).scatter_add_(1, blk, torch.ones_like(blk))
    take = torch.arange(n, device=dev)[None, None, :] < counts[..., None]  # first n_b draws of block b

    # Distinct ids with their counts, ordered by (x desc, id asc).
    big = torch.iinfo(torch.int64).max
    picked = torch.where(take, draw_ids, torch.full_like(draw_ids, big)).reshape(rows, nb * n)
    srt, _ = picked.sort(dim=-1)
    used = srt != big
    new = torch.ones_like(used)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = torch.cumsum(new.long(), dim=-1) - 1
    g_count = torch.zeros_like(srt).scatter_add_(1, group, used.long())
    g_id = torch.full_like(srt, big).scatter_(1, group, srt)
    g_ok = g_count > 0
    g_x = torch.where(g_ok, x.gather(1, torch.where(g_ok, g_id, 0)), torch.full(g_id.shape, NEG_INF, device=dev))
    order = torch.sort(g_x, dim=-1, descending=True, stable=True).indices[:, :n]
    g_id, g_count, g_x, g_ok = (t.gather(1, order) for t in (g_id, g_count, g_x, g_ok))
    ids = torch.where(g_ok, g_id, torch.full_like(g_id, -1))
    lp = torch.where(g_ok, g_x.double() - lse_all[:, None], torch.full_like(g_x, NEG_INF).double()).float()
    wts = torch.where(g_ok, g_count.float() / float(n), torch.zeros_like(g_x, dtype=torch.float32))
    return ids, lp, wts


# ----------------------------------------------------------------------------- the loss


def _lse_where(a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` of ``a`` over ``keep`` per row; −inf (with a finite backward) where the
    row keeps nothing finite."""
    masked = a.masked_fill(~keep, NEG_INF)
    empty = ~(masked > NEG_INF).any(-1, keepdim=True)
    safe = torch.where(empty, torch.zeros_like(masked), masked)
    out = torch.logsumexp(safe, dim=-1, keepdim=True)
    return torch.where(empty, torch.full_like(out, NEG_INF), out)[:, 0]


class DenseStudent:
    """The scaled student logits ``a`` ``[N, V]`` of one process, as :func:`category_rows` reads
    them: the row log-sum-exp, ``a`` at given ids, the log-sum-exp over the ids not listed and
    whether every id is listed. (:class:`kdfast.parallel.sparse.ShardedStudent` answers the
    same over a vocabulary sharded across ranks.)"""

    def __init__(self, a: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor):
        self.a, self.dtype = a, a.dtype
        self._indices, self._valid, self._listed = indices, valid, None

    def lse(self) -> torch.Tensor:
        return torch.logsumexp(self.a, dim=-1)

    def at(self, idx0: torch.Tensor) -> torch.Tensor:
        return self.a.gather(1, idx0)

    def listed(self) -> torch.Tensor:
        if self._listed is None:  # unused slots scatter into a spare column (False at id 0 could undo a True)
            a = self.a
            self._listed = torch.zeros((a.shape[0], a.shape[1] + 1), dtype=torch.bool, device=a.device).scatter_(
                1, torch.where(self._valid, self._indices, a.shape[1]), True)[:, :-1]
        return self._listed

    def unlisted_lse(self) -> torch.Tensor:
        return _lse_where(self.a, ~self.listed())

    def all_listed(self) -> torch.Tensor:
        return self.listed().all(-1)


def sparse_rows(student: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                weights: Optional[torch.Tensor], tail_logprob: Optional[torch.Tensor],
                temperature: float, mode: str, loss: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-row ℓ of :func:`kdfast.sparse_loss` for ``[N, V]`` student logits and ``[N, k]``
    targets; ``mode`` is ``"bucket"``, ``"renorm"`` or ``"sampled"`` (see kdfast-core
    ``sparse.rs``), ``loss`` ``"forward_kl"`` (:func:`kdfast.sparse_kl`, every mode) or, for
    top-k targets, ``"reverse_kl"``, ``"jsd"`` (with ``beta``) or ``"tvd"`` over the mode's
    categories (kdfast-core ``categories.rs``). Float32 (float64 for float64 students),
    differentiable by autograd; a ``+inf`` row has a zero gradient (the +inf rule)."""
    valid = _valid(indices, weights, mode)
    view = DenseStudent(scaled(student, temperature), indices, valid)
    return category_rows(view, indices, logprobs, weights, tail_logprob, mode, loss, beta)


def _valid(indices, weights, mode):
    valid = indices >= 0
    return valid & (weights > 0) if mode == "sampled" else valid


def category_rows(view, indices: torch.Tensor, logprobs: torch.Tensor, weights: Optional[torch.Tensor],
                  tail_logprob: Optional[torch.Tensor], mode: str, loss: str = "forward_kl",
                  beta: float = 0.5) -> torch.Tensor:
    """:func:`sparse_rows` from a student ``view`` (:class:`DenseStudent` or a sharded one)."""
    lse = view.lse()
    valid = _valid(indices, weights, mode)
    idx0 = torch.where(valid, indices, torch.zeros_like(indices))
    lp0 = torch.where(valid, logprobs.to(view.dtype), NEG_INF)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0 and mode == "bucket"):
        rows = _forward_rows(view, lse, idx0, lp0, valid, weights, tail_logprob, mode)
    elif mode == "sampled":
        raise ValueError(f"loss: sampled targets support only 'forward_kl' (the one unbiased estimate), got {loss!r}")
    elif mode == "renorm":
        rows = _renorm_category_rows(view.at(idx0), lp0, valid, loss, beta)
    else:
        lp_tail = _bucket_tail(lp0, tail_logprob, view.all_listed())[1]
        lq = torch.where(valid, view.at(idx0) - lse[:, None], NEG_INF)
        lq_tail = view.unlisted_lse() - lse
        rows = _reference.divergence(loss, torch.cat([lq, lq_tail[:, None]], 1),
                                     torch.cat([lp0, lp_tail[:, None]], 1), beta)
    # The +inf rule: no finite descent direction, a zero gradient row.
    return torch.where(rows.detach() == float("inf"), rows.detach(), rows)


def _bucket_tail(lp0: torch.Tensor, tail_logprob: Optional[torch.Tensor], everything: torch.Tensor):
    """``(p_tail, log p_tail)``: ``exp(tail_logprob)`` (``max(0, 1 − Σp)`` without one, summed
    in float64), 0 where every id is listed (``everything``)."""
    if tail_logprob is not None:
        lp_tail = tail_logprob.to(lp0.dtype)
        p_tail = lp_tail.exp()
    else:  # in float64, as Rust: a tail below float32 resolution still has its log (reverse KL)
        p64 = (1.0 - lp0.double().exp().sum(-1)).clamp(min=0.0)
        p_tail, lp_tail = p64.to(lp0.dtype), torch.log(p64).to(lp0.dtype)
    return torch.where(everything, 0.0, p_tail), torch.where(everything, NEG_INF, lp_tail)


def _forward_rows(view, lse, idx0, lp0, valid, weights, tail_logprob, mode):
    """:func:`kdfast.sparse_kl`'s forward KL against the full-vocabulary ``log q``."""
    lq_sel = view.at(idx0) - lse[:, None]
    if mode == "sampled":
        w = torch.where(valid, weights.to(view.dtype), 0.0)
        lp_s = torch.where(valid, lp0, 0.0)
        return (w * (lp_s - torch.where(valid, lq_sel, torch.zeros_like(lq_sel)))).sum(-1)
    p = lp0.exp()
    live = p > 0
    lp_live = torch.where(live, lp0, 0.0)
    lq_live = torch.where(live, lq_sel, torch.zeros_like(lq_sel))
    big_p = p.sum(-1)
    if mode == "renorm":
        has = big_p > 0
        ln_p = torch.log(torch.where(has, big_p, torch.ones_like(big_p)))
        pt = p / torch.where(has, big_p, torch.ones_like(big_p))[:, None]
        rows = torch.where(live, pt * ((lp_live - ln_p[:, None]) - lq_live), torch.zeros_like(pt)).sum(-1)
        return torch.where(has, rows, torch.zeros_like(rows))

    # Bucket: the listed ids against one tail bucket.
    p_tail, lp_tail = _bucket_tail(lp0, tail_logprob, view.all_listed())
    has_tail = p_tail > 0
    lq_tail = view.unlisted_lse() - lse
    lq_tail = torch.where(has_tail, lq_tail, torch.zeros_like(lq_tail))
    lp_tail = torch.where(has_tail, lp_tail, torch.zeros_like(lp_tail))
    rows = torch.where(live, p * (lp_live - lq_live), torch.zeros_like(p)).sum(-1)
    return rows + torch.where(has_tail, p_tail * (lp_tail - lq_tail), torch.zeros_like(rows))


def _renorm_category_rows(a_sel, lp0, valid, loss, beta):
    """``loss`` between the teacher and the student both renormalised over the listed ids:
    ``P̃ = p / Σp``, ``Q̃ = q / Σq``. 0 where the teacher lists no mass; NaN where the student is
    ``-inf`` at every listed id (``Q̃`` undefined; the host checks raise there first)."""
    big_p = lp0.exp().sum(-1)
    has = big_p > 0
    lp_t = lp0 - torch.log(torch.where(has, big_p, torch.ones_like(big_p)))[:, None]
    lse_k = _lse_where(a_sel, valid)
    undefined = has & (lse_k == NEG_INF)
    lq_t = torch.where(valid, a_sel - torch.where(undefined, 0.0, lse_k)[:, None], NEG_INF)
    rows = _reference.divergence(loss, lq_t, lp_t, beta)
    rows = torch.where(has, rows, 0.0)
    return torch.where(undefined, float("nan"), rows)


def check_target_values(indices: torch.Tensor, logprobs: torch.Tensor,
                        weights: Optional[torch.Tensor], tail_logprob: Optional[torch.Tensor],
                        mode: str) -> None:
    """The value checks the Rust kernel makes, for the torch backend (same messages)."""
    valid = indices >= 0
    if mode == "sampled":
        bad_w = valid & ~(torch.isfinite(weights) & (weights >= 0))
        if bool(bad_w.any()):
            r, s = (int(i) for i in bad_w.nonzero()[0])
            raise ValueError(f"targets.weights: expected finite weights ≥ 0, got {weights[r, s].item()} at row {r}, slot {s}")
        valid = valid & (weights > 0)
    bad = valid & (torch.isnan(logprobs) | (logprobs == float("inf")))
    if mode == "sampled":
        bad = bad | (valid & (logprobs == NEG_INF))
    if bool(bad.any()):
        r, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"targets.logprobs: expected log-probabilities (finite or -inf; finite where the weight "
            f"is positive) at every used slot, got {logprobs[r, s].item()} at row {r}, slot {s}"
        )
    if tail_logprob is not None and mode == "bucket":
        bad = torch.isnan(tail_logprob) | (tail_logprob == float("inf"))
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets.tail_logprob: expected a log-probability (finite or -inf), got {tail_logprob[r].item()} at row {r}")
    if mode != "sampled" and indices.shape[-1] > 1:
        srt, _ = torch.where(valid, indices, torch.full_like(indices, -1)).sort(dim=-1)
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            r, s = (int(i) for i in dup.nonzero()[0])
            raise ValueError(
                f"targets.indices: expected distinct ids within a row of top-k targets, got id "
                f"{int(srt[r, s + 1])} twice in row {r}"
            )


def check_renorm_student(s2: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                         rows: Optional[torch.Tensor] = None) -> None:
    """The Rust kernel's check for the losses that renormalise the student over the listed ids:
    every row with teacher mass needs a finite student logit at some listed id (same message).
    ``rows`` maps the rows of ``s2`` to the row numbers reported."""
    valid = indices >= 0
    has = (valid & (logprobs > NEG_INF)).any(-1)
    a = s2.gather(1, torch.where(valid, indices, torch.zeros_like(indices)))
    bad = has & ~(valid & (a > NEG_INF)).any(-1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        r = r if rows is None else int(rows[r])
        raise ValueError("student_logits: expected a finite logit at some listed id (tail='renorm' renormalises "
                         f"the student over the listed ids), got -inf at every listed id of row {r}")
