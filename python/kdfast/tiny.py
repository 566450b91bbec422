"""Tiny, CPU-trainable language models and data, shared by ``kdfast demo``, the benchmarks and
the tests.

* **Data**: :func:`pydoc_text` is the embedded corpus — the text of Python's own ``pydoc``
  topics (``pydoc_data.topics``, about 460 KB, shipped with CPython; no download);
  :func:`split_text` cuts it into training and validation text at a paragraph boundary;
  :func:`byte_chunks` cuts text into pieces of at most ``size`` UTF-8 bytes, and
  :func:`byte_ids` turns text into byte-level token ids (vocabulary 256).
* **Models**: :func:`gpt2`, a small ``transformers`` GPT-2 with dropout off; :func:`llama`, a
  random Llama-architecture model (the benchmarks' teacher and student at LLM vocabulary size).
* **Training**: :func:`train_lm` trains a model as a next-token language model on random windows
  of a token stream (AdamW, :func:`lr_schedule`, gradient clipping at 1), for a number of
  steps or about a number of seconds; :func:`evaluate` is the mean next-token cross-entropy
  over padded validation sequences (:func:`pad_batch`).

``transformers`` is imported only by :func:`gpt2` and :func:`llama`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

__all__ = ["pydoc_text", "split_text", "byte_chunks", "byte_ids", "gpt2", "llama", "param_count", "optimizer",
           "lr_schedule", "train_lm", "pad_batch", "evaluate"]

BYTE_VOCAB = 256


# ----------------------------------------------------------------------------- data


def pydoc_text() -> str:
    """The text of every ``pydoc`` topic, in sorted order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(train, val)``: the last ``val_fraction`` of ``text`` is validation, cut at the last
    paragraph boundary before that point (so that no paragraph straddles the split) when there
    is one in the second half."""
    cut = int(len(text) * (1.0 - val_fraction))
    para = text.rfind("\n\n", 0, cut)
    cut = para + 2 if para > len(text) // 2 else cut
    return text[:cut], text[cut:]


def byte_chunks(text: str, size: int) -> List[str]:
    """Consecutive pieces of ``text`` of at most ``size`` UTF-8 bytes (cut between characters),
    whitespace-only pieces dropped."""
    raw = text.encode("utf-8")
    out, i = [], 0
    while i < len(raw):
        j = min(len(raw), i + size)
        while j < len(raw) and j > i and (raw[j] & 0xC0) == 0x80:  # inside a multi-byte character
            j -= 1
        piece = raw[i:j].decode("utf-8")
        if piece.strip():
            out.append(piece)
        i = j
    return out


def byte_ids(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D int64 tensor of token ids (0..255)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


# ----------------------------------------------------------------------------- models


def gpt2(vocab: int, context: int, layers: int, embd: int, heads: int, seed: int):
    """A randomly initialised ``GPT2LMHeadModel`` (seeded), dropout off, no special tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=embd, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                     activation_function="gelu")  # PyTorch's fused GELU: faster on the CPU than gelu_new
    return GPT2LMHeadModel(cfg)


def llama(hidden: int, vocab: int, seed: int, *, layers: int = 2, context: int = 4096):
    """A randomly initialised ``LlamaForCausalLM`` (seeded; 4 heads, MLP width 2 × ``hidden``, an
    untied head): the LLM-vocabulary stand-in of the benchmarks."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=context, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with the usual language-model settings (β₂ = 0.95, weight decay 0.01)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def lr_schedule(opt: torch.optim.Optimizer, steps: Callable[[], int] | int, warmup_fraction: float = 0.05,
                floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then a cosine down to ``floor`` × lr.

    ``steps`` may be a function, read at every step (for a step count fixed while training)."""
    total = steps if callable(steps) else (lambda: steps)

    def lr(step: int) -> float:
        n = total()
        warmup = max(1, int(n * warmup_fraction))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, n - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr)


# ----------------------------------------------------------------------------- training


def train_lm(model: torch.nn.Module, ids: torch.Tensor, *, context: int, batch_size: int, lr: float,
             seed: int, steps: Optional[int] = None, seconds: Optional[float] = None, device="cpu",
             on_step: Optional[Callable[[int, int, float], None]] = None, probe_steps: int = 5) -> int:
    """Train ``model`` (in place) to predict the next token of random ``context``-long windows
    of ``ids`` (1-D), ``batch_size`` windows a step; returns the number of steps taken.

    Either ``steps``, or ``seconds``: the step count is then fixed after timing the first
    ``probe_steps`` steps (at least ``3 · probe_steps``), so that the schedule ends on time.
    ``on_step(step, steps, loss)`` is called after each step (1-based; a progress bar, a
    snapshot of the weights). The windows come from a generator seeded with ``seed``."""
    if (steps is None) == (seconds is None):
        raise ValueError("train_lm: pass exactly one of steps and seconds")
    if len(ids) <= context:
        raise ValueError(f"train_lm: need more than context={context} tokens, got {len(ids)}")
    model.to(device).train()
    data = torch.as_tensor(ids, dtype=torch.long)
    total = steps if steps is not None else 20 * probe_steps  # until the probe has been timed
    opt = optimizer(model, lr)
    sched = lr_schedule(opt, lambda: total)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step = 0
    while step < total:
        starts = torch.randint(0, len(data) - context, (batch_size,), generator=g)
        x = torch.stack([data[s: s + context] for s in starts.tolist()]).to(device)
        logits = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if seconds is not None and step == probe_steps:
            per_step = (time.perf_counter() - t0) / probe_steps
            total = max(3 * probe_steps, int(seconds / per_step))
        if on_step is not None:
            on_step(step, total, loss.item())
    model.eval()
    return step


def pad_batch(seqs: Sequence[Sequence[int]], device="cpu", pad_id: int = 0):
    """``(input_ids, attention_mask)`` ``[len(seqs), longest]``, right-padded with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def evaluate(model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 64, device="cpu") -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over the sequences."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[j: j + batch_size], device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    model.train(was_training)
    return total / max(1, count)
