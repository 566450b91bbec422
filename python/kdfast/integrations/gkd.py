"""On-policy and sequence-level distillation for :class:`DistillationTrainer` (GKD, Agarwal et
al. 2024; api.md §4).

A batch's prompts are completed by a model — the student (on-policy, with probability
``lmbda`` per batch) or the teacher (``seq_kd``) — and the loss is taken over the generated
tokens only. :func:`prompt_lengths` reads where each item's prompt ends, :func:`complete`
generates and returns the new batch with aligned labels that cover exactly the generated
tokens (up to and including the end-of-sequence token; the prompt and padding masked).

Batches are right-padded (``attention_mask``); generation needs the prompts left-padded, so
:func:`complete` packs them left, generates, and packs the result right again.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["prompt_lengths", "complete", "mask_prompts"]


def prompt_lengths(batch: dict) -> torch.Tensor:
    """Tokens of prompt per item ``[B]``: ``prompt_length``, else the first position of
    ``completion_mask``, else the whole (unpadded) item."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    lengths = ids.new_full((ids.shape[0],), ids.shape[1]) if mask is None else mask.sum(-1)
    if batch.get("prompt_length") is not None:
        p = torch.as_tensor(batch["prompt_length"], device=ids.device).reshape(-1).to(torch.long)
        if p.shape[0] != ids.shape[0]:
            raise ValueError(f"prompt_length: expected {ids.shape[0]} entries (one per item), got {p.shape[0]}")
        return torch.minimum(p, lengths)
    if batch.get("completion_mask") is not None:
        cm = torch.as_tensor(batch["completion_mask"], device=ids.device).bool()
        if cm.shape != ids.shape:
            raise ValueError(f"completion_mask: expected shape {tuple(ids.shape)} (that of input_ids), got {tuple(cm.shape)}")
        first = torch.where(cm.any(-1), cm.int().argmax(-1), lengths)
        return torch.minimum(first, lengths)
    return lengths


def _pack(rows, pad_id: int, left: bool, device) -> tuple:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        n = len(r)
        if n:
            sl = slice(width - n, width) if left else slice(0, n)
            ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


@torch.no_grad()
def complete(model: torch.nn.Module, batch: dict, *, max_new_tokens: int, generation_kwargs: Optional[dict],
             pad_id: int, eos_id, ignore_index: int) -> dict:
    """``batch`` with each prompt completed by ``model``: ``input_ids``/``attention_mask`` of
    prompt + completion (right-padded) and ``shift_labels`` (aligned: ``shift_labels[t]`` is
    the token after ``t``) equal to the generated tokens and ``ignore_index`` elsewhere."""
    ids = batch["input_ids"]
    plen = prompt_lengths(batch).tolist()
    prompts = [ids[i, : plen[i]] for i in range(ids.shape[0])]
    if any(n == 0 for n in plen):
        raise ValueError("input_ids: every item needs a prompt of at least one token to complete")
    p_ids, p_mask = _pack(prompts, pad_id, left=True, device=ids.device)
    eos = None if eos_id is None else torch.as_tensor(eos_id, device=ids.device).reshape(-1)
    kw = dict(do_sample=True, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if eos is not None:
        kw["eos_token_id"] = eos.tolist()
    kw.update(generation_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=p_ids, attention_mask=p_mask, **kw)
    finally:
        model.train(was_training)
    gen = out[:, p_ids.shape[1]:]
    rows, n_new = [], []
    for i in range(ids.shape[0]):
        g = gen[i]
        ended = torch.isin(g, eos) if eos is not None else torch.zeros_like(g, dtype=torch.bool)
        if ended.any():
            g = g[: int(ended.int().argmax()) + 1]  # through the first end-of-sequence token
        rows.append(torch.cat([prompts[i], g]))
        n_new.append(len(g))
    new_ids, new_mask = _pack(rows, pad_id, left=False, device=ids.device)
    labels = torch.full_like(new_ids, ignore_index)
    for i, (p, n) in enumerate(zip(plen, n_new)):
        labels[i, p - 1: p - 1 + n] = new_ids[i, p: p + n]  # position t predicts token t + 1
    return {"input_ids": new_ids, "attention_mask": new_mask, "shift_labels": labels,
            "prompt_length": torch.tensor(plen, device=ids.device)}


def mask_prompts(labels: torch.Tensor, batch: dict, ignore_index: int) -> torch.Tensor:
    """Aligned ``labels`` with the prompt's positions masked (position t predicts token t + 1,
    so the first completion token is the label of position ``prompt_length − 1``)."""
    plen = prompt_lengths(batch).to(labels.device)
    pos = torch.arange(labels.shape[-1], device=labels.device)
    return labels.masked_fill(pos[None, :] < (plen[:, None] - 1), ignore_index)
