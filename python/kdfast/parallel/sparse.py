"""The sparse losses (api.md §2) against a student whose vocabulary is sharded across ranks.

The targets name global ids; each listed id lives on exactly one rank. A sparse loss reads the
student only through four row quantities (:class:`kdfast.reference_sparse.DenseStudent`): its
log-sum-exp, its logits at the listed ids, the log-sum-exp over the ids not listed and whether
every id is listed. :class:`ShardedStudent` answers them across ranks — two log-sum-exps in one
pair of all-reduces, the listed logits as one sum of ``k`` floats per row (each rank fills the
ids it owns), one count — and the rest of the loss (:func:`kdfast.reference_sparse.category_rows`)
is computed on ``[N, k]`` tensors, identically on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import reference_sparse as ref_sparse
from .collectives import replicated_lse, sum_over_ranks

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


def sparse_rows(a: torch.Tensor, offset: int, total: int, group, indices, logprobs, weights, tail_logprob,
                mode: str, loss: str, beta: float) -> torch.Tensor:
    """Per-row ℓ of :func:`kdfast.sparse_loss` from the local slice ``a`` of the scaled student
    logits: the whole vocabulary's value on every rank, differentiable w.r.t. the slice."""
    valid = indices >= 0
    if mode == "sampled":
        valid = valid & (weights > 0)
    view = ShardedStudent(a, offset, total, group, indices, valid)
    lse = view.lse()
    bad = ~torch.isfinite(lse.detach())
    if bool(bad.any()):
        raise ValueError(f"student_logits: row {int(bad.nonzero()[0])} is entirely -inf or holds +inf or NaN "
                         f"(over the whole vocabulary); every unmasked row needs at least one finite logit")
    rows = ref_sparse.category_rows(view, indices, logprobs, weights, tail_logprob, mode, loss, beta)
    if bool(torch.isnan(rows.detach()).any()):
        r = int(torch.isnan(rows.detach()).nonzero()[0])
        raise ValueError(f"student_logits: row {r} is -inf at every listed id while the teacher lists mass there; "
                         f"tail='renorm' with loss={loss!r} renormalises the student over the listed ids")
    return rows
