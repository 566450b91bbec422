"""``compress_sample`` over a vocabulary sharded across ranks: the draws of one pass, bit for bit.

The sampler works in absolute blocks of 4096 ids (kdfast-core ``compress``): per block ``b`` the
max ``m_b``, the running sum ``c_i`` of ``exp(x_i − m_b)`` in id order and its total ``S_b``,
then ``N`` draws over the blocks and, inside block ``b``, its first ``n_b`` draws ``t = u S_b``
→ the first ``c_i > t``. Every quantity is sequential in id order, and a block may straddle
ranks, so the Rust steps (kdfast-core ``compress::sharded``) run on each rank's slice with
these collectives between them:

1. part maxima per block → all-reduce (max): every ``m_b``, and the NaN / +inf check on every
   rank together;
2. running sums from the *carry* the previous rank hands on (one point-to-point float64 per
   row, only where a block straddles the boundary) → all-reduce (max) of ``S_b`` and of each
   block's last id of positive weight: the same additions in the same order as one pass. The
   running sums every 16 ids stay on the rank (float64, an eighth of float32 logits);
3. the over-the-blocks draws (repeated on every rank) and the within-block draws each rank's
   part holds, each located from those checkpoints and one re-summed segment → all-gather of
   ``N`` (value, id) pairs per rank, merged as one pass would.

Per row that is ``4 (B + 1) + 16 B + 8 + 16 N · ranks`` bytes in four collectives and the carry
(``B = ⌈V / 4096⌉``, 32 at V = 128256), never the ``[N, V]`` logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _native
from .collectives import raise_bad_rows, slice_bounds, world

def _max_over_ranks(x: torch.Tensor, group, device) -> torch.Tensor:
    """Element-wise maximum over the ranks, communicated on the logits' device (NCCL needs CUDA
    tensors), returned on the CPU."""
    y = x.to(device)
    dist.all_reduce(y, op=dist.ReduceOp.MAX, group=group)
    return y.cpu()


def _carry_in(rows: int, receives: bool, group, device) -> torch.Tensor:
    """The previous rank's carry: the running sums where its part of this rank's first block
    ends (zeros when this slice starts a block)."""
    rank, _ = world(group)
    carry_in = torch.zeros(rows, dtype=torch.float64)
    if receives:
        buf = carry_in.to(device)
        dist.recv(buf, src=dist.get_global_rank(group, rank - 1), group=group)
        carry_in = buf.cpu()
    return carry_in


def compress_sample_rows(z: torch.Tensor, num_samples: int, temperature: float, seed: int, row_offset: int, group):
    """``(ids, logprobs, weights)`` ``[N, num_samples]`` of the whole vocabulary's draws for the
    local slice ``z`` ``[N, V_local]`` (global ids), the same on every rank."""
    device = z.device
    offset, vocab = slice_bounds(group, z.shape[1], device, "teacher_logits")
    rank, size = world(group)
    x = _native.as_rows(z.detach().cpu())
    rows = x.shape[0]
    nb, _, receives, sends = _native.slice_plan(offset, x.shape[1], vocab)

    def step(k, maxima, carry_in=None, sums=None, out=None):
        _native.sharded_sample(k, x, num_samples, temperature, seed, row_offset, offset, vocab, maxima,
                               carry_in, sums, checkpoints, out)

    checkpoints = _native.checkpoints_buffer(x, offset, vocab)
    maxima = torch.empty(rows, nb + 1, dtype=torch.float32)
    step(1, maxima)
    maxima = _max_over_ranks(maxima, group, device)
    raise_bad_rows(maxima[:, -1] != 0, (maxima[:, :-1] == float("inf")).any(-1))

    carry_in = _carry_in(rows, receives, group, device)
    sums, carry_out = torch.empty(rows, 2 * nb, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    step(2, maxima, carry_in, out=(sums, carry_out))
    if sends:  # the next rank continues this rank's last block
        dist.send(carry_out.to(device), dst=dist.get_global_rank(group, rank + 1), group=group)
    sums = _max_over_ranks(sums, group, device)

    picked, lse = _native.draws_buffer(rows, num_samples), torch.empty(rows, dtype=torch.float64)
    step(3, maxima, carry_in, sums, out=(picked, lse))
    everyone = [torch.empty_like(picked, device=device) for _ in range(size)]
    dist.all_gather(everyone, picked.to(device), group=group)
    ids, lp, w = _native.merge_sample_draws(torch.cat([p.cpu() for p in everyone], 1), lse, num_samples)
    return ids.to(device), lp.to(device), w.to(device)
