"""The sparse losses (api.md §2) against a student whose vocabulary is sharded across ranks.

The targets name global ids; each listed id lives on exactly one rank. A sparse loss reads the
student only through four row quantities (:class:`kdfast.reference_sparse.DenseStudent`): its
log-sum-exp, its logits at the listed ids, the log-sum-exp over the ids not listed and whether
every id is listed. :class:`ShardedStudent` answers them across ranks — two log-sum-exps in one
pair of all-reduces, the listed logits as one sum of ``k`` floats per row (each rank fills the
ids it owns), one count — and the rest of the loss (:func:`kdfast.reference_sparse.category_rows`)
is computed on ``[N, k]`` tensors, identically on every rank. On CPU float32/bf16/fp16 slices
:class:`NativeShardedStudent` answers them with the Rust kernels (kdfast-core
``sharded_student``) in two collectives (an all-gather of the slices' statistics, an
all-reduce of the listed logits and counts) and none in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native
from .. import reference_sparse as ref_sparse
from .._buffers import gradient
from .collectives import gathered_lse, gathered_softmax, replicated_lse, sum_over_ranks, world

NEG_INF = float("-inf")


class ShardedStudent:
    """The local slice ``a`` ``[N, V_local]`` (ids ``offset ..``) of the scaled student logits
    of a vocabulary of ``total`` ids, for targets ``indices`` ``[N, k]`` (global ids)."""

    def __init__(self, a: torch.Tensor, offset: int, total: int, group, indices: torch.Tensor, valid: torch.Tensor):
        self.a, self.dtype, self.group, self.total = a, a.dtype, group, total
        width = a.shape[1]
        self._own = valid & (indices >= offset) & (indices < offset + width)
        self._local = torch.where(self._own, indices - offset, 0)
        listed = torch.zeros((a.shape[0], width + 1), dtype=torch.bool, device=a.device)
        self._listed = listed.scatter_(1, torch.where(self._own, self._local, width), True)[:, :-1]
        self._lses = None

    def _both(self):
        if self._lses is None:  # the row's and the unlisted ids' log-sum-exps, in one pair of all-reduces
            self._lses = replicated_lse(self.group, self.a, self.a.masked_fill(self._listed, NEG_INF),
                                        what="student_logits")
        return self._lses

    def lse(self) -> torch.Tensor:
        return self._both()[0]

    def unlisted_lse(self) -> torch.Tensor:
        return self._both()[1]

    def at(self, idx0: torch.Tensor) -> torch.Tensor:
        """The student's scaled logits at the listed ids (0 in unused slots), on every rank."""
        if self.a.shape[1] == 0:
            mine = self.a.new_zeros(idx0.shape) + self.a.sum() * 0  # still in the graph
        else:
            mine = torch.where(self._own, self.a.gather(1, self._local), 0.0)
        return sum_over_ranks(mine, self.group)

    def all_listed(self) -> torch.Tensor:
        count = self._listed.sum(-1)
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=self.group)
        return count == self.total


class _Listed(torch.autograd.Function):
    """``(L, L_u, a at the slots, listed count)`` of the whole rows from this rank's slice, where
    ``ids`` ``[N, k]`` are the slots' columns in the slice (−1: not here)."""

    @staticmethod
    def forward(ctx, student, ids, temperature, group):
        s2 = _native.as_rows(student.detach())
        stats, at = _native.listed_stats(s2, ids, temperature)
        _, size = world(group)
        everyone = [torch.empty_like(stats) for _ in range(size)]
        # Both in flight at once: each slot is owned by one rank, so the sum is its logit.
        works = (dist.all_gather(everyone, stats, group=group, async_op=True),
                 dist.all_reduce(at, group=group, async_op=True))
        for work in works:
            work.wait()
        ranks = torch.stack(everyone)  # [ranks, N, 4]
        softmax = torch.cat([gathered_softmax(ranks[..., 0:2]), gathered_softmax(ranks[..., 2:4])], 1)
        ctx.save_for_backward(student, ids, softmax.contiguous())
        ctx.temperature = temperature
        k = ids.shape[1]
        count = at[:, k]
        ctx.mark_non_differentiable(count)
        return gathered_lse(ranks[..., 0:2]), gathered_lse(ranks[..., 2:4]), at[:, :k].double(), count

    @staticmethod
    def backward(ctx, g_lse, g_unlisted, g_at, _):
        student, ids, softmax = ctx.saved_tensors
        s2 = _native.as_rows(student.detach())
        coef = torch.stack([g_lse, g_unlisted], 1).float().contiguous()
        grad = gradient(tuple(s2.shape), s2.dtype, s2.device)  # pooled pages: no fresh page faults
        _native.listed_gradient(s2, ids, ctx.temperature, softmax, coef, g_at.float().contiguous(), grad)
        return grad.reshape(student.shape), None, None, None


class NativeShardedStudent:
    """:class:`ShardedStudent` by the Rust kernels: the local slice ``s`` ``[N, V_local]`` of the
    student logits (CPU float32/bf16/fp16, ids ``offset ..``) at temperature ``T``."""

    # The rest of the loss in float64, as the Rust kernels take the teacher's p = e^lp (a top-k
    # log-probability of -600 still has mass, and a -inf student logit there makes ℓ = +inf).
    dtype = torch.float64

    def __init__(self, s: torch.Tensor, temperature: float, offset: int, total: int, group, indices: torch.Tensor,
                 valid: torch.Tensor):
        own = valid & (indices >= offset) & (indices < offset + s.shape[1])
        ids = torch.where(own, indices - offset, -1).contiguous()
        self._lse, self._unlisted, self._at, self._count = _Listed.apply(s, ids, temperature, group)
        self.total = total

    def lse(self) -> torch.Tensor:
        return self._lse

    def unlisted_lse(self) -> torch.Tensor:
        return self._unlisted

    def at(self, idx0: torch.Tensor) -> torch.Tensor:
        """The scaled logits at the listed ids (0 in unused slots), on every rank."""
        return self._at

    def all_listed(self) -> torch.Tensor:
        return self._count == self.total


def sparse_rows(s: torch.Tensor, temperature: float, offset: int, total: int, group, indices, logprobs, weights,
                tail_logprob, mode: str, loss: str, beta: float) -> torch.Tensor:
    """Per-row ℓ of :func:`kdfast.sparse_loss` from the local slice ``s`` of the student logits
    at ``temperature``: the whole vocabulary's value on every rank, differentiable w.r.t. the slice."""
    valid = indices >= 0
    if mode == "sampled":
        valid = valid & (weights > 0)
    if s.device.type == "cpu" and s.dtype in _native.NATIVE_DTYPES:
        view = NativeShardedStudent(s, temperature, offset, total, group, indices, valid)
    else:
        view = ShardedStudent(ref_sparse.scaled(s, temperature), offset, total, group, indices, valid)
    lse = view.lse()
    bad = ~torch.isfinite(lse.detach())
    if bool(bad.any()):
        raise ValueError(f"student_logits: row {int(bad.nonzero()[0])} is entirely -inf or holds +inf or NaN "
                         f"(over the whole vocabulary); every unmasked row needs at least one finite logit")
    rows = ref_sparse.category_rows(view, indices, logprobs, weights, tail_logprob, mode, loss, beta)
    rows = rows if s.dtype == torch.float64 else rows.float()
    if bool(torch.isnan(rows.detach()).any()):
        r = int(torch.isnan(rows.detach()).nonzero()[0])
        raise ValueError(f"student_logits: row {r} is -inf at every listed id while the teacher lists mass there; "
                         f"tail='renorm' with loss={loss!r} renormalises the student over the listed ids")
    return rows
