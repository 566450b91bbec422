"""Tiny, randomly initialised Hugging Face teachers and text data for the capture tests."""

from __future__ import annotations

import json
import os

VOCAB = 256
CONTEXT = 64

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to match a large teacher.",
    "a",
    "Sparse targets keep only a few ids per token.",
    "Offline capture runs the teacher once; training reads the cache many times.",
    "héllo wörld — non-ASCII bytes too",
    "Top-k is biased; random sampling is not.",
    "short",
    "Arrow IPC shards are memory-mapped by the reader.",
    "Resume after an interruption stores every sequence exactly once.",
    "The last document of the tiny corpus.",
]


def save_tiny_gpt2(path, *, seed: int = 0, eos_token_id=None) -> str:
    """A 2-layer GPT-2 (n_embd 32, vocab 256, context 64) saved with save_pretrained; no
    tokenizer files, so capture falls back to the byte-level tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                     bos_token_id=None, eos_token_id=eos_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper than the default init: distributions with real structure
        model.lm_head.weight.mul_(8.0)
    logging.disable_progress_bar()
    model.save_pretrained(os.fspath(path))
    return os.fspath(path)


def load_model(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    m = AutoModelForCausalLM.from_pretrained(os.fspath(path), local_files_only=True)
    m.eval()
    return m


def write_txt(path, docs=DOCS) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    return os.fspath(path)


def write_jsonl(path, docs=DOCS, field="text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "other": 1}) + "\n")
    return os.fspath(path)


def dying(real, at: int):
    """``real``, except that its ``at``-th call raises KeyboardInterrupt (a capture killed midway)."""
    calls = {"n": 0}

    def call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt(f"killed at call {at}")
        return real(*args, **kwargs)

    return call
