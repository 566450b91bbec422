"""``compress_topk`` over a vocabulary sharded across ranks: the ids one pass over the row lists.

Each rank finds its slice's best ``k`` of ``x = z · (1/T)`` (float32, as the kernels scale; ties
→ lower id: the Rust top-k on CPU tensors, PyTorch operations elsewhere) and the log-sum-exp
statistics (max, sum, float64) of every other entry of its slice. One all-gather of those
``k + 2`` pairs per row (the candidates, the tail's statistics, a NaN/+inf status) gives every
rank the same data: the best ``k`` candidates by the same order are the one-pass ids, and the
whole tail is the ranks' tails merged with the candidates not kept. Then
``log p_i = x_i − lse_all`` and ``tail_logprob = lse_tail − lse_all``, with
``lse_all = logaddexp(lse_topk, lse_tail)``, as in the kernels.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native
from .collectives import raise_bad_rows, slice_bounds, world

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
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices  # best first, ties by id
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    return vals, torch.where(vals == NEG_INF, -1, ids)


def _slice_part(z: torch.Tensor, k: int, temperature: float, offset: int, rust: bool) -> torch.Tensor:
    """This rank's ``[N, k + 2, 2]`` float64 part: ``k`` (value, global id) candidates best first
    (id -1 unused), the tail's (max, sum) and (status, 0) — status 1 for +inf, 2 for NaN."""
    n = z.shape[0]
    part = torch.zeros(n, k + 2, 2, dtype=torch.float64, device=z.device)
    if rust and z.device.type == "cpu" and z.dtype in _native.NATIVE_DTYPES:
        ids, vals, stats = _native.compress_topk_slice(z, k, temperature, offset)
        part[:, :k, 0], part[:, :k, 1] = vals.double(), ids.double()
        part[:, k], part[:, k + 1, 0] = stats[:, :2], stats[:, 2]
        return part
    x = z.float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    nan, inf = torch.isnan(x).any(-1), (x == float("inf")).any(-1)
    x.masked_fill_((nan | inf)[:, None], NEG_INF)  # x is this call's own scaled copy
    vals, ids = _local_best(x, k)
    kk = vals.shape[1]
    part[:, :k, 0], part[:, :k, 1] = NEG_INF, -1.0
    part[:, :kk, 0], part[:, :kk, 1] = vals.double(), torch.where(ids >= 0, ids + offset, -1).double()
    rest = x.double()
    if kk:
        rest.scatter_(1, ids.clamp(min=0), NEG_INF)  # id -1: a slice of < k finite entries, all kept
    top = rest.amax(-1) if rest.shape[1] else rest.new_full((n,), NEG_INF)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    part[:, k, 0], part[:, k, 1] = top, torch.exp(rest - shift[:, None]).sum(-1)
    part[:, k + 1, 0] = torch.where(nan, 2.0, torch.where(inf, 1.0, 0.0)).double()
    return part


def compress_topk_rows(z: torch.Tensor, k: int, temperature: float, group, rust: bool = True):
    """``(ids, logprobs, tail)`` of the whole vocabulary's top-k for the local slice ``z``
    ``[N, V_local]`` (global ids), the same on every rank (``rust``: the Rust top-k where it
    can read ``z``)."""
    offset, _ = slice_bounds(group, z.shape[1], z.device, "teacher_logits")
    mine = _slice_part(z, k, temperature, offset, rust)
    _, size = world(group)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    parts = torch.stack(everyone, 1)  # [N, ranks, k + 2, 2], ranks in id order
    status = parts[:, :, k + 1, 0].amax(1)
    raise_bad_rows(status == 2, status == 1)
    cand = parts[:, :, :k].flatten(1, 2)  # each rank's candidates best first, ties in id order
    order = torch.sort(cand[:, :, 0], dim=1, descending=True, stable=True).indices
    ranked = cand.gather(1, order[:, :, None].expand(-1, -1, 2))
    top_x, top_id = ranked[:, :k, 0], ranked[:, :k, 1].long()
    used = (top_id >= 0) & (top_x > NEG_INF)
    top_id = torch.where(used, top_id, -1)
    # The tail: the ranks' tails and the candidates not kept (float64).
    tmax, tsum = parts[:, :, k, 0], parts[:, :, k, 1]
    tails = torch.where(tsum > 0, tmax + tsum.log(), NEG_INF)
    lse_tail = torch.logsumexp(torch.cat([tails, ranked[:, k:, 0]], 1), dim=-1)
    lse_top = torch.logsumexp(torch.where(used, top_x, NEG_INF), dim=-1)
    lse_all = torch.logaddexp(lse_top, lse_tail)
    none = torch.zeros_like(used[:, 0])
    raise_bad_rows(none, none, empty=~torch.isfinite(lse_all))
    logprobs = torch.where(used, top_x - lse_all[:, None], NEG_INF).float()
    tail = (lse_tail - lse_all).clamp(max=0.0).float()
    return top_id, logprobs, tail
