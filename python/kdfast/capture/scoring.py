"""Scoring one batch: the teacher's sparse targets without its ``[B, S, V]`` logits.

A :class:`Scorer` runs the teacher with its head replaced by a capture of the head's input
(:func:`kdfast.integrations.heads.head_inputs`, as the fused trainer does), so the body runs as
usual and returns the final hidden states ``[B, S, H]``; then, per sequence, it computes the
logits of a chunk of its unpadded positions at a time, ``hidden[a:a+c] @ Wᵀ (+ b)`` (times the
head's constant scale), and hands each chunk straight to the compressor with the chunk's row
offset — one buffer of ``c × V`` logits serves every chunk, with ``c`` from a byte budget
(:data:`CHUNK_BYTES`).

The chunk's logits are computed exactly as the model's head computes them: the matmul that
``F.linear`` runs (``addmm`` with a bias, else ``mm``) in the head's dtype (float32 for a float32 teacher; a bfloat16 teacher's logits are bfloat16, as the
materialised path's are), the scale applied after the matmul as the model applies it. So the
targets are those of the materialised path: top-k picks from the same numbers (up to the last
bit of the matmul, which may block differently for another number of rows), and sampled
targets draw the same streams, since :func:`kdfast.compress_sample` keys the draws of row
``j`` of a chunk by ``row_offset + j``.

**A tensor-parallel teacher** (``group``, the ranks that hold one teacher): each rank computes
the logits of its slice of the vocabulary only and compresses with ``process_group`` (so the
targets are those of one pass over the whole row). A head (or materialised logits) of the whole
vocabulary on every rank is split evenly, in rank order; a head of fewer rows (a teacher whose
head is already sharded, its logits arriving as slices) is this rank's slice, and the
vocabulary is what the slices add up to (:func:`~kdfast.capture.teacher.vocab_size`).

Heads that :func:`~kdfast.integrations.heads.find_head` refuses (final-logit soft-capping, a
head that is not an ``nn.Linear``, an unknown logit transform) and ``chunked=False`` take the
materialised path: ``model(...).logits``, sliced to the teacher's vocabulary, one sequence at
a time into the compressor. :attr:`Scorer.fallback` says why; a model whose forward never calls
its head falls back on its first batch (its logits were materialised anyway).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from .teacher import cat_targets

CHUNK_BYTES = 64 << 20  # logits per chunk: 64 MiB (128 rows of float32 at V = 128256)


class Scorer:
    """The targets of a batch from ``model`` (a causal LM in eval mode): chunk by chunk
    through its head, or from its materialised logits (:attr:`fallback` says why)."""

    def __init__(self, model, vocab: int, *, chunked: bool = True, chunk_bytes: Optional[int] = None, group=None):
        from ..integrations import heads

        self.model, self.vocab, self.group = model, int(vocab), group
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
        found = heads.find_head(model) if chunked else "chunked=False"
        self.head = found if isinstance(found, heads.Head) else None
        self.fallback: Optional[str] = None if self.head is not None else found

    def targets(self, ids, mask, lengths: Sequence[int], compress: Callable) -> List:
        """One targets object per sequence ``r`` of the padded batch ``ids``/``mask`` ``[B, S]``
        (on the model's device), over its first ``lengths[r]`` positions; ``compress(rows, r,
        start)`` compresses ``rows`` ``[n, V]``, positions ``start…`` of sequence ``r``."""
        import torch

        if self.head is None:
            return self._from_logits(ids, mask, lengths, compress)
        from ..integrations import heads

        # The scale is applied to the logits below, as the model applies it, not folded in.
        with torch.inference_mode(), heads.head_inputs(self.model, heads.Head(self.head.module)) as cap:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        if cap.hidden is None:  # the forward computed its logits some other way
            self.fallback, self.head = f"{type(self.model).__name__}'s forward does not call its head", None
            return self._rows(out.logits, lengths, compress)
        del out
        weight, bias = self.head.weight[:self.vocab], self.head.bias
        lo, hi = self._columns(weight.shape[0])
        weight, bias = weight[lo:hi], None if bias is None else bias[:self.vocab][lo:hi]
        scale, wt = self.head.scale, weight.t()
        step = max(1, min(max(lengths, default=1), self.chunk_bytes // (max(1, hi - lo) * weight.element_size())))
        result = []
        with torch.inference_mode():
            # One buffer for every chunk: no allocation per chunk (a fresh one each time
            # fragments the heap around the small targets kept between chunks).
            buffer = cap.hidden.new_empty((step, hi - lo))
            for r, n in enumerate(lengths):
                hidden = cap.hidden[r, :n]
                parts = []
                for a in range(0, n, step):
                    h = hidden[a:a + step]
                    logits = buffer[:h.shape[0]]
                    # What F.linear (nn.Linear) runs on the CPU: addmm with a bias, else mm.
                    if bias is None:
                        torch.mm(h, wt, out=logits)
                    else:
                        torch.addmm(bias, h, wt, out=logits)
                    if scale != 1.0:
                        logits.mul_(scale)
                    parts.append(compress(logits, r, a))
                result.append(cat_targets(parts))
            del buffer
        return result

    def _from_logits(self, ids, mask, lengths, compress) -> List:
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            return self._rows(logits, lengths, compress)

    def _rows(self, logits, lengths, compress) -> List:
        import torch

        lo, hi = self._columns(min(logits.shape[-1], self.vocab))
        with torch.inference_mode():
            return [compress(logits[r, :n, lo:hi], r, 0) for r, n in enumerate(lengths)]

    def _columns(self, width: int):
        """``(lo, hi)``: the columns of this rank's slice among the ``width`` columns of its head
        rows or logits (all of them without a group, or when they are its slice already)."""
        if self.group is None or width != self.vocab:
            return 0, width
        from ..parallel.collectives import world

        rank, size = world(self.group)  # the whole vocabulary on every rank: an even split
        base, extra = divmod(self.vocab, size)
        lo = rank * base + min(rank, extra)
        return lo, lo + base + (rank < extra)
