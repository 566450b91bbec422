"""Batching cache items for training: :class:`Collator` / :func:`collate`.

**Alignment.** ``targets[t]`` is the teacher's distribution at position ``t``, i.e. over the
token at position ``t + 1`` (the teacher's logits at ``t``); it is stored for every position,
the last one included. :func:`collate` builds ``labels[t] = input_ids[t + 1]`` with -100 at the
last position and in padding, so the student's logits at position ``t`` line up with
``targets[t]`` and ``labels[t]`` with no further shifting::

    batch = collate([cache[i] for i in idx])
    logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..targets import SparseTargets
from .format import IGNORE_INDEX


class Collator:
    """Pads a list of :class:`TeacherCache` items into a training batch.

    Returns ``input_ids`` [B, S] (``pad_id`` in padding), ``attention_mask`` [B, S] (1 on
    tokens), ``labels`` [B, S] (``labels[t] = input_ids[t + 1]``; ``ignore_index`` at each
    sequence's last position and in padding), ``targets`` (:class:`~kdfast.SparseTargets`
    [B, S, K], K the widest item: id -1, log-prob -inf, weight 0 and tail log-prob 0 — all
    mass in the tail — in padded positions and slots), ``response_mask`` [B, S] (True where
    ``labels[t]`` is a response token, i.e. ``t + 1 ≥ prompt_length``; every labelled position
    for given text), ``prompt_length`` and ``seq_id`` [B].

    With ``response_only=True`` the labels are also ``ignore_index`` where the next token is
    part of the prompt, so losses train on generated responses only (sequence-level KD).
    The batch is ready for ``kdfast.sparse_kl(student_logits, batch["targets"],
    labels=batch["labels"])`` with no further shifting.
    """

    def __init__(self, pad_id: int = 0, *, response_only: bool = False, ignore_index: int = IGNORE_INDEX):
        self.pad_id = int(pad_id)
        self.response_only = bool(response_only)
        self.ignore_index = int(ignore_index)

    def __call__(self, batch: Sequence[dict]) -> dict:
        if not batch:
            raise ValueError("collate: empty batch")
        fast = getattr(batch, "compact_rows", None)  # a TeacherCache batch of compact records
        rows = fast() if fast is not None else None
        if rows is not None:
            meta = [(r["seq_id"], r["input_ids"], r["prompt_length"], r["k"]) for r in rows.rows]
            method, temperature, has_tail = rows.params["method"], float(rows.params["temperature"]), \
                rows.params["has_tail"]
        else:
            meta = [(item.get("seq_id", -1), item["input_ids"], item.get("prompt_length", 0), item["targets"].k)
                    for item in batch]
            t0 = batch[0]["targets"]
            method, temperature, has_tail = t0.method, t0.temperature, t0.tail_logprob is not None
        b = len(meta)
        lengths = [int(m[1].shape[0]) for m in meta]
        s, k = max(lengths), max(m[3] for m in meta)
        sampled = method == "sample"
        full = _Arena([((b, s), torch.int64)] * 3 + [((b, s, k), torch.int64), ((b, s, k), torch.float32)]
                      + [((b, s, k), torch.float32)] * sampled + [((b, s), torch.float32)] * has_tail
                      + [((b, s), torch.bool)])
        input_ids = full((b, s), self.pad_id, torch.int64)
        attention = full((b, s), 0, torch.int64)
        labels = full((b, s), self.ignore_index, torch.int64)
        fill = rows is None  # the decoder writes every slot itself
        ids = full((b, s, k), -1 if fill else None, torch.int64)
        lps = full((b, s, k), float("-inf") if fill else None, torch.float32)
        weights = full((b, s, k), 0.0 if fill else None, torch.float32) if sampled else None
        tails = full((b, s), 0.0 if fill else None, torch.float32) if has_tail else None
        response = full((b, s), False, torch.bool)
        for r, (_, x, pl, _) in enumerate(meta):
            n = lengths[r]
            input_ids[r, :n] = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.int64))
            attention[r, :n] = 1
            if n > 1:
                labels[r, :n - 1] = input_ids[r, 1:n]
                first = max(0, int(pl) - 1)  # first position whose next token is a response token
                response[r, first:n - 1] = True
                if self.response_only:
                    labels[r, :first] = self.ignore_index
        if rows is None:
            _fill_targets(batch, lengths, method, temperature, has_tail, ids, lps, weights, tails)
        else:
            rows.decode_into(s, k, ids, lps, weights, tails)
        targets = SparseTargets(indices=ids, logprobs=lps, weights=weights, tail_logprob=tails,
                                temperature=temperature, method=method)
        return {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels, "targets": targets,
            "response_mask": response,
            "prompt_length": torch.tensor([int(m[2]) for m in meta]),
            "seq_id": torch.tensor([int(m[0]) for m in meta]),
        }


def _fill_targets(batch, lengths, method, temperature, has_tail, ids, lps, weights, tails) -> None:
    """Copy each item's targets into the padded batch tensors."""
    for r, item in enumerate(batch):
        n = lengths[r]
        t = item["targets"]
        if t.method != method or (t.tail_logprob is not None) != has_tail:
            raise ValueError("collate: items mix target methods or tail layouts")
        if not math.isclose(t.temperature, temperature, rel_tol=1e-9):
            raise ValueError("collate: items have targets at different temperatures")
        if tuple(t.shape) != (n,):
            raise ValueError(f"collate: item {r} has {n} tokens but targets of leading shape {tuple(t.shape)}")
        kr = t.k
        ids[r, :n, :kr] = t.indices
        lps[r, :n, :kr] = t.logprobs
        if weights is not None:
            weights[r, :n, :kr] = t.weights
        if tails is not None:
            tails[r, :n] = t.tail_logprob


class _Arena:
    """The tensors of one batch, carved in order from one block of memory: in a DataLoader worker,
    one block of shared memory, where the batch must go anyway to reach the main process (as
    ``default_collate`` does, which saves a copy of every tensor); one block instead of one per
    tensor, because each costs a file, a mapping and a descriptor passed between processes."""

    def __init__(self, layout):
        sizes = [-(-math.prod(shape) * dtype.itemsize // 8) * 8 for shape, dtype in layout]  # 8-byte aligned
        total = max(8, sum(sizes))
        if torch.utils.data.get_worker_info() is None:
            self.storage = torch.empty(total, dtype=torch.uint8).untyped_storage()
        else:
            self.storage = torch.UntypedStorage._new_shared(total)
        self.offset = 0

    def __call__(self, shape, value, dtype) -> torch.Tensor:
        """The next tensor of ``shape`` and ``dtype``, filled with ``value`` (None: not filled)."""
        start = self.offset // dtype.itemsize
        self.offset += -(-math.prod(shape) * dtype.itemsize // 8) * 8
        out = torch.empty(0, dtype=dtype).set_(self.storage, start, shape)
        return out if value is None else out.fill_(value)


def collate(batch: Sequence[dict], pad_id: int = 0, *, response_only: bool = False) -> dict:
    """``Collator(pad_id, response_only=response_only)(batch)``; see :class:`Collator`."""
    return Collator(pad_id, response_only=response_only)(batch)
