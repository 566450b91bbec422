"""Tokenizers for ``kdfast capture``: the model directory's, or the byte-level fallback.

``AutoTokenizer`` from the model directory when it has tokenizer files (special tokens added as
the tokenizer does by default); otherwise :class:`ByteTokenizer`: token id = UTF-8 byte
(0..255), no special tokens, padding id 0 — the model's vocabulary must have at least 256
entries. Either is seen through one small interface: ``encode``, ``decode``, ``name``,
``pad_token_id``, ``eos_token_id``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

# Files whose presence in a model directory means it has its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


class ByteTokenizer:
    """Byte-level fallback: token id = UTF-8 byte value (0..255); no special tokens; pad id 0."""

    name = "bytes"
    vocab_size = 256
    pad_token_id = 0
    eos_token_id = None

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class _HFTokenizer:
    """A ``transformers`` tokenizer seen through the small interface capture needs."""

    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.eos_token_id = tok.eos_token_id
        pad = tok.pad_token_id
        self.pad_token_id = pad if pad is not None else (tok.eos_token_id if tok.eos_token_id is not None else 0)

    def encode(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def has_tokenizer_files(model_dir: str) -> bool:
    """Whether the model directory holds the files of a ``transformers`` tokenizer."""
    return any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Optional[str], tokenizer):
    """The tokenizer of a capture: ``tokenizer`` itself (an object with ``encode``,
    ``pad_token_id`` and ``name``; or a ``transformers`` tokenizer, wrapped), ``"bytes"`` →
    :class:`ByteTokenizer`, ``None`` / ``"auto"`` → the model directory's tokenizer if it has
    one, else :class:`ByteTokenizer`."""
    if tokenizer is not None and tokenizer != "auto":
        if tokenizer == "bytes":
            return ByteTokenizer()
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "name"):
            return tokenizer
        return _HFTokenizer(tokenizer, getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if model_dir is not None and has_tokenizer_files(model_dir):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return _HFTokenizer(tok, os.path.basename(os.path.normpath(model_dir)))
    return ByteTokenizer()
