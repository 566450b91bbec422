"""Reading a capture's input into documents: ``.txt``, ``.jsonl`` or a saved ``datasets`` directory.

* ``.txt`` — one document per line (``txt_docs="line"``, the default), or documents separated
  by blank lines (``txt_docs="blank"``, newlines inside a document kept); empty documents
  are skipped.
* ``.jsonl`` — one JSON object per line, the text in ``text_field`` (default: ``"text"``, else
  ``"prompt"``; in generate mode ``"prompt"`` first).
* a directory saved by ``datasets`` (``save_to_disk``) — the ``split`` of a ``DatasetDict``,
  same field rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import List, Optional, Sequence

TXT_DOCS = ("line", "blank")


def read_documents(data, *, mode: str = "score", text_field: Optional[str] = None, split: str = "train",
                   txt_docs: str = "line") -> List[str]:
    """The non-empty documents of ``data`` (.txt, .jsonl, or a ``datasets`` directory), in order."""
    path = os.fspath(data)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: {path} does not exist")
    if txt_docs not in TXT_DOCS:
        raise ValueError(f"txt_docs: expected 'line' or 'blank', got {txt_docs!r}")
    fields = [text_field] if text_field else (["prompt", "text"] if mode == "generate" else ["text", "prompt"])

    def pick(record, where):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with a {' or '.join(map(repr, fields))} field")
        for f in fields:
            if f in record:
                value = record[f]
                if not isinstance(value, str):
                    raise ValueError(f"{where}: field {f!r} is not a string ({type(value).__name__})")
                return value
        raise ValueError(f"{where}: no {' or '.join(map(repr, fields))} field (has {', '.join(map(repr, record))})")

    if os.path.isdir(path):
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path}: no split {split!r} (has {', '.join(ds)})")
            ds = ds[split]
        column = next((f for f in fields if f in ds.column_names), None)
        if column is None:
            raise ValueError(f"{path}: no {' or '.join(map(repr, fields))} column (has {', '.join(ds.column_names)})")
        docs = [d for d in ds[column] if isinstance(d, str)]
    elif path.endswith(".jsonl"):
        docs = []
        with open(path, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON ({exc})") from None
                docs.append(pick(record, f"{path}:{n}"))
    elif path.endswith(".txt"):
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
        if txt_docs == "line":
            docs = text.splitlines()
        else:
            docs = [p.strip("\r\n") for p in re.split(r"\r?\n[ \t]*\r?\n", text)]
    else:
        raise ValueError(f"data: expected a .txt file, a .jsonl file or a directory saved by datasets, got {path}")
    return [d for d in docs if d.strip()]


def documents_sha256(docs: Sequence[str]) -> str:
    """A digest of the documents in order (part of a capture's identity, compared on resume)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
