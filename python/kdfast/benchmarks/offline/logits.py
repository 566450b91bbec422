"""The inputs of the offline benchmarks: synthetic, LLM-like teacher and student logits.

:func:`zipf_logits` is the distribution of parts 1 and 2 and of the synthetic fidelity case;
:func:`distribution_stats` says how LLM-like a batch of logits is (entropy, top-1, top-64 mass).
"""

from __future__ import annotations

import math

import torch

# The k of top-k and the N of sampled targets in parts 1 and 2 (the sizes).
TOPK = 64
NUM_SAMPLES = 50


def zipf_logits(n: int, v: int, *, seed: int, dtype: torch.dtype = torch.float32,
                prior_seed: int = 1234) -> torch.Tensor:
    """Heavy-tailed, LLM-like logits ``[n, v]``.

    ``x = s_row · (−log(1 + rank_j) + ε + boost)``: a Zipf (α = 1) prior over a fixed random
    permutation of the ids (``prior_seed``; shared by every row and by teacher and student, like
    unigram frequencies), standard normal noise ε per element, and 64 "context" ids per row
    boosted by ``max(0, 13 + ln(V/32000) + 2·N(0,1) − 2·ln(1 + j))`` (j = 0..63), the row scaled
    by ``s_row ~ U(0.7, 1.4)``. At V = 32000: mean entropy ≈ 2.2 nats, top-1 probability ≈ 0.56,
    top-64 mass ≈ 0.92, ≈ 12 distinct ids among 50 draws (the Sparse Logit Sampling paper's
    figure for a real 8B teacher). Generated in float32 in 256-row chunks, then cast to ``dtype``.
    """
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(prior_seed))
    prior = torch.empty(v)
    prior[perm] = -torch.log1p(torch.arange(v, dtype=torch.float32))
    g = torch.Generator().manual_seed(seed)
    m = 64
    decay = 2.0 * torch.log1p(torch.arange(m, dtype=torch.float32))
    boost0 = 13.0 + math.log(v / 32000)
    out = torch.empty(n, v, dtype=dtype)
    for r0 in range(0, n, 256):
        r1 = min(n, r0 + 256)
        x = torch.randn(r1 - r0, v, generator=g)
        x += prior
        ids = torch.randint(0, v, (r1 - r0, m), generator=g)
        b = (boost0 + 2.0 * torch.randn(r1 - r0, m, generator=g) - decay).clamp_(min=0.0)
        x.scatter_add_(1, ids, b)
        x *= torch.empty(r1 - r0, 1).uniform_(0.7, 1.4, generator=g)
        out[r0:r1] = x
    return out


def distribution_stats(logits: torch.Tensor, rows: int = 512) -> dict[str, float]:
    """Mean entropy (nats), top-1 probability and top-64 mass of ``softmax`` of the first rows."""
    lp = torch.log_softmax(logits[:rows].double(), dim=-1)
    p = lp.exp()
    top = p.topk(min(64, p.shape[-1]), dim=-1).values
    return {
        "entropy_nats": float(-(p * lp).nansum(-1).mean()),
        "top1_prob": float(top[:, 0].mean()),
        "top64_mass": float(top.sum(-1).mean()),
    }
