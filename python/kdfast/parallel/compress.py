"""``compress_topk`` over a vocabulary sharded across ranks: the ids one pass over the row lists.

Each rank finds its slice's best ``k`` of ``x = z · (1/T)`` (float32, as the kernels scale; ties
→ lower id, exactly: all values above the k-th, then the equal ones in id order), all ranks
gather the ``k`` candidates of every rank (one all-gather of ``k`` (value, id) pairs per row)
and keep the best ``k`` by the same order — so the ids are those of the one-pass compressor.
The tail's own log-sum-exp (every id not kept, in float64) takes one pair of all-reduces; then
``log p_i = x_i − lse_all`` and ``tail_logprob = lse_tail − lse_all``, with
``lse_all = logaddexp(lse_topk, lse_tail)``, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import global_lse, world

NEG_INF = float("-inf")


def _local_best(x: torch.Tensor, k: int):
    """``(values, local ids)`` ``[N, min(k, V_local)]`` of the best entries of each row of ``x``,
    ties → lower id; entries of value ``-inf`` come back with id -1."""
    n, v = x.shape
    kk = min(k, v)
    if kk == 0:
        return x.new_empty(n, 0), torch.empty(n, 0, dtype=torch.int64, device=x.device)
    kth = torch.topk(x, kk, dim=-1).values[:, -1:]
    above = x > kth
    tied = x == kth
    take = above | (tied & (tied.cumsum(-1) <= kk - above.sum(-1, keepdim=True)))
    ids = take.nonzero()[:, 1].reshape(n, kk)  # row-major: ascending ids
    vals = x.gather(1, ids)
    return vals, torch.where(vals == NEG_INF, -1, ids)


def compress_topk_rows(z: torch.Tensor, k: int, temperature: float, group):
    """``(ids, logprobs, tail)`` of the whole vocabulary's top-k for the local slice ``z``
    ``[N, V_local]`` (global ids), the same on every rank."""
    from .collectives import slice_bounds

    offset, total = slice_bounds(group, z.shape[1], z.device, "teacher_logits")
    x = z.float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    n = x.shape[0]
    vals, ids = _local_best(x, k)
    pad = k - vals.shape[1]
    mine = torch.full((n, k, 2), NEG_INF, dtype=torch.float64, device=x.device)
    mine[:, :, 1] = -1.0
    mine[:, :k - pad, 0] = vals.double()
    mine[:, :k - pad, 1] = torch.where(ids >= 0, ids + offset, -1).double()
    _, size = world(group)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    cand = torch.cat(everyone, 1)  # [N, size·k, 2], each rank's candidates in id order, ranks in id order
    order = torch.sort(cand[:, :, 0], dim=1, descending=True, stable=True).indices[:, :k]
    best = cand.gather(1, order[:, :, None].expand(-1, -1, 2))
    top_x, top_id = best[:, :, 0], best[:, :, 1].long()
    used = (top_id >= 0) & (top_x > NEG_INF)
    top_id = torch.where(used, top_id, -1)
    # The tail: every id not kept, from the tail's own log-sum-exp (float64).
    kept = torch.zeros(n, x.shape[1] + 1, dtype=torch.bool, device=x.device)
    local = top_id - offset
    mask = used & (local >= 0) & (local < x.shape[1])
    kept.scatter_(1, torch.where(mask, local, x.shape[1]), True)
    (lse_tail,) = global_lse(group, x.double().masked_fill(kept[:, :-1], NEG_INF), what="teacher_logits")
    lse_top = torch.logsumexp(torch.where(used, top_x, NEG_INF), dim=-1)
    lse_all = torch.logaddexp(lse_top, lse_tail)
    bad = ~torch.isfinite(lse_all)
    if bool(bad.any()):
        raise ValueError(f"teacher_logits: row {int(bad.nonzero()[0])} is entirely -inf or holds +inf or NaN "
                         f"(over the whole vocabulary); every row needs at least one finite logit")
    logprobs = torch.where(used, top_x - lse_all[:, None], NEG_INF).float()
    tail = (lse_tail - lse_all).float()
    return top_id, logprobs, tail
