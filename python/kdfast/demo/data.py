"""The text of a ``kdfast demo`` run: the corpus, its tokenizer, the training and validation chunks."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from kdfast import tiny
from kdfast.capture.tokenizer import has_tokenizer_files
from kdfast.demo.presets import Preset


class Tokenizer:
    """Bytes (the demo's own teacher), or the ``--teacher-dir`` tokenizer as capture uses it."""

    def __init__(self, teacher_dir: Optional[str]):
        self.hf = None
        if teacher_dir is not None and has_tokenizer_files(teacher_dir):  # as kdfast capture decides
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
        self.unit = "byte" if self.hf is None else "token"

    def encode(self, text: str) -> List[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def chunks(self, text: str, context: int) -> List[str]:
        # ~4 characters per token for subword tokenizers; capture cuts each chunk to `context`.
        return tiny.byte_chunks(text, context if self.hf is None else 4 * context)


@dataclasses.dataclass
class DemoData:
    """The corpus cut for one run: ``train_chunks`` (captured, ≤ ``context`` units each) and
    ``val`` (token ids of the validation chunks)."""

    text: str
    train_text: str
    train_chunks: List[str]
    val: List[List[int]]
    tokenizer: Tokenizer


def load_data(data: Optional[str], tok: Tokenizer, p: Preset, seed: int) -> DemoData:
    """The pydoc topics (or the ``--data`` file), split 90/10, chunked and capped as ``p`` says."""
    if data is None:
        text = tiny.pydoc_text()
    else:
        from kdfast.capture import read_documents

        text = "\n\n".join(read_documents(data, txt_docs="blank")) + "\n"
    train_text, val_text = tiny.split_text(text)
    train_chunks = tok.chunks(train_text, p.context)
    val_chunks = tok.chunks(val_text, p.context)
    if p.max_train_chunks is not None and len(train_chunks) > p.max_train_chunks:
        # a contiguous piece (not a random subset), chosen by the seed
        g = torch.Generator().manual_seed(seed)
        start = int(torch.randint(0, len(train_chunks) - p.max_train_chunks + 1, (1,), generator=g))
        train_chunks = train_chunks[start: start + p.max_train_chunks]
    if p.max_val_chunks is not None and len(val_chunks) > p.max_val_chunks:
        stride = len(val_chunks) / p.max_val_chunks  # evenly spread over the validation text
        val_chunks = [val_chunks[int(i * stride)] for i in range(p.max_val_chunks)]
    val = [tok.encode(c)[: p.context] for c in val_chunks]
    val = [v for v in val if len(v) > 1]
    if len(train_chunks) < p.batch_size or not val:
        raise ValueError(f"data: too little text ({len(train_chunks)} training chunks, {len(val)} validation chunks "
                         f"of ≤ {p.context} {tok.unit}s); need at least {p.batch_size} and 1")
    return DemoData(text=text, train_text=train_text, train_chunks=train_chunks, val=val, tokenizer=tok)
