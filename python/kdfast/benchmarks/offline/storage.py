"""Bytes per token of stored sparse targets (part 3 of the offline benchmark, with fidelity).

All sizes come from the public storage format, :func:`kdfast.encode_targets`:

* **record** — ``EncodedTargets.row_bytes`` of the targets as produced (sampled targets keep
  all N slots of :func:`kdfast.compress_sample`);
* **trimmed** — the same format with the slots cut to the batch's largest number of ids;
* **variable** — the mean over positions of the record size for each position's own number of
  ids (a variable-length variant of the same per-slot format, no length header);
* **ids+counts** (sampled only, a what-if, not implemented) — ``ceil(u · (ceil(log2 V) +
  ceil(log2(N+1))) / 8)`` for u distinct ids: the gradient does not need the stored log-probs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

import kdfast

# The target of the sampled record (✓/✗ in the fidelity table).
TARGET_SAMPLE_BYTES = 40.0  # sampled targets, N = 50: at most 40 bytes per token


@functools.lru_cache(maxsize=None)
def record_bytes(slots: int, vocab_size: int, method: str, num_samples: Optional[int] = None) -> int:
    """``encode_targets(...).row_bytes`` of targets with ``slots`` slots per row (one row is
    encoded; the record size depends only on the slots, V, the method and N)."""
    slots = max(1, slots)
    ids = (torch.arange(slots) % vocab_size).unsqueeze(0)
    lp = torch.full((1, slots), -1.0)
    if method == "sample":
        n = num_samples or slots
        targets = kdfast.SparseTargets(indices=ids, logprobs=lp, weights=torch.full((1, slots), 1.0 / n),
                                       method="sample")
        return kdfast.encode_targets(targets, vocab_size, num_samples=n).row_bytes
    targets = kdfast.SparseTargets(indices=ids, logprobs=lp, tail_logprob=torch.full((1,), -1.0))
    return kdfast.encode_targets(targets, vocab_size).row_bytes


def storage_row(encoded: kdfast.EncodedTargets, used: torch.Tensor) -> dict[str, Any]:
    """The four sizes above for ``encoded`` targets whose rows use ``used`` (``[rows]``) slots."""
    v, method, n = encoded.vocab_size, encoded.method, encoded.num_samples
    counts = used.tolist()
    variable = sum(record_bytes(u, v, method, n) for u in counts) / len(counts)
    lean = None
    if method == "sample":
        bits = max(1, math.ceil(math.log2(v))) + math.ceil(math.log2(n + 1))
        lean = float(((used * bits + 7) // 8).float().mean())
    return {"bytes_record": encoded.row_bytes, "bytes_trimmed": record_bytes(max(counts), v, method, n),
            "bytes_variable": float(variable), "bytes_lean_ids_counts": lean}
