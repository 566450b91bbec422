"""``kdfast capture``: run a Hugging Face causal-LM teacher over text and cache sparse targets.

:func:`capture` (and the ``kdfast capture`` command, :func:`add_parser` / :func:`main`) loads a
``transformers`` causal LM from a **local** directory, reads documents, runs the teacher under
``torch.inference_mode()`` batch by batch and streams each batch's logits through
:func:`kdfast.compress_topk` / :func:`kdfast.compress_sample` into a :class:`kdfast.cache.CacheWriter`
— at most one batch of logits exists at a time, padding positions are never compressed.

Modes:

* ``score`` — teacher forcing on the given text: one cached sequence per document, the
  teacher's distribution at every position (``prompt_length`` 0).
* ``generate`` — sequence-level KD: each document is a prompt, the teacher writes a response
  with ``model.generate`` (greedy, or sampling with ``do_sample=True`` seeded per batch, at most
  ``max_new_tokens``, stopping after the tokenizer's/model's EOS, which is kept); the cached
  sequence is prompt + response, scored by one teacher-forcing pass, with the teacher's
  distribution at every position — the generated ones included — and ``prompt_length``
  marking where the response starts (``Collator(response_only=True)`` trains on it only).

Data (``data``):

* ``.txt`` — one document per line (``txt_docs="line"``, the default), or documents separated
  by blank lines (``txt_docs="blank"``, newlines inside a document kept); empty documents
  are skipped.
* ``.jsonl`` — one JSON object per line, the text in ``text_field`` (default: ``"text"``, else
  ``"prompt"``; in generate mode ``"prompt"`` first).
* a directory saved by ``datasets`` (``save_to_disk``) — the ``split`` of a ``DatasetDict``,
  same field rule.

Sequence ``i`` (the cache's ``seq_id``) is the i-th non-empty document. Score mode keeps the
first ``max_length`` tokens; generate mode keeps the last ``max_length`` tokens of each
prompt (its end is what the response continues). ``max_length`` defaults to the teacher's
context (minus ``max_new_tokens`` when generating).

Tokenizer: ``AutoTokenizer`` from the model directory when it has tokenizer files (special
tokens added as the tokenizer does by default); otherwise the byte-level fallback
:class:`ByteTokenizer`: token id = UTF-8 byte (0..255), no special tokens, padding id 0 —
the model's vocabulary must have at least 256 entries.

Resume: the cache's identity (``CacheWriter`` parameters plus a ``config`` holding the mode,
a sha256 of the documents, tokenizer, lengths, seed, generation options and dtype) is
compared on reopening; a capture interrupted at any point and rerun with the same arguments
stores only the sequences that are missing, so each sequence ends up in the cache exactly
once. Sampled targets are reproducible regardless of batching or ranks (the draws of
sequence i use ``row_offset = i × max_positions``); sampled *generations* are reproducible for
the same data, batch size and number of ranks on a fresh run.

Multi-process (``torchrun``; ``RANK`` / ``WORLD_SIZE`` set): rank r takes the sequences with
``i % world_size == r`` and writes ``shard-r{r:03d}-*.arrow`` and ``manifest.rank{r:03d}.json``
into the same directory; after a barrier (``torch.distributed``, gloo unless a process group
already exists) rank 0 merges them into ``manifest.json`` (:func:`kdfast.cache.merge_manifests`),
which is what readers open. ``--device cuda`` means ``cuda:LOCAL_RANK`` under torchrun.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from typing import List, Optional, Sequence

__all__ = ["capture", "CaptureSummary", "ByteTokenizer", "read_documents", "add_parser", "main"]

MODES = ("score", "generate")
METHODS = ("topk", "sample")
TXT_DOCS = ("line", "blank")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "spiece.model", "vocab.txt")
DEFAULT_CONTEXT = 2048


# ----------------------------------------------------------------------------- tokenizers


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


def _load_tokenizer(model_dir: Optional[str], tokenizer):
    if tokenizer is not None and tokenizer != "auto":
        if tokenizer == "bytes":
            return ByteTokenizer()
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "pad_token_id") and hasattr(tokenizer, "name"):
            return tokenizer
        return _HFTokenizer(tokenizer, getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    if model_dir is not None and any(os.path.exists(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        return _HFTokenizer(tok, os.path.basename(os.path.normpath(model_dir)))
    return ByteTokenizer()


# ----------------------------------------------------------------------------- data


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


def _documents_sha256(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------- summary


@dataclasses.dataclass
class CaptureSummary:
    """What :func:`capture` did. ``sequences``/``tokens``/``bytes`` describe the whole cache
    (all ranks); ``new_*`` what this run added (all ranks)."""

    path: str
    sequences: int
    tokens: int
    new_sequences: int
    new_tokens: int
    bytes: int
    seconds: float
    rank: int = 0
    world_size: int = 1
    shards: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def __str__(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"kdfast capture: {self.sequences} sequences ({self.new_sequences} new), {self.tokens} tokens "
                f"({self.new_tokens} new) in {self.shards} shards, {self.bytes / 2**20:.2f} MiB = "
                f"{self.bytes_per_token:.1f} bytes/token; {self.seconds:.1f} s ({rate:.0f} new tokens/s)"
                f"{f' on {self.world_size} ranks' if self.world_size > 1 else ''} -> {self.path}")


# ----------------------------------------------------------------------------- distributed


class _Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)) or 0)
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self.created = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[int]) -> List[int]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        if dist.get_backend() == "nccl":  # pragma: no cover - GPU clusters
            t = t.cuda()
        dist.all_reduce(t)
        return [int(x) for x in t.cpu().tolist()]

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _clear_cache_dir(path: str) -> None:
    pat = re.compile(r"^(manifest(\.rank\d+)?\.json|shard-(r\d+-)?\d+\.arrow|\.lock\.rank\d+|\..*\.tmp-\d+)$")
    if os.path.isdir(path):
        for name in os.listdir(path):
            if pat.match(name):
                os.remove(os.path.join(path, name))


# ----------------------------------------------------------------------------- model


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _load_model(model, dtype: str, device):
    if isinstance(model, (str, os.PathLike)):
        import transformers
        from transformers import AutoModelForCausalLM

        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: {path} is not a directory (capture loads local models only)")
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        m = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{key: _torch_dtype(dtype)})
        name = os.path.basename(os.path.normpath(path))
    else:
        m = model
        if dtype != "auto":
            m = m.to(_torch_dtype(dtype))
        name = getattr(getattr(m, "config", None), "name_or_path", "") or type(m).__name__
    m = m.to(device)
    m.eval()
    return m, name, str(next(m.parameters()).dtype).replace("torch.", "")


def _context_length(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _vocab_size(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def _eos_ids(tokenizer, model) -> List[int]:
    ids = []
    for v in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if v is None:
            continue
        ids.extend(v if isinstance(v, (list, tuple)) else [v])
    return sorted({int(i) for i in ids})


# ----------------------------------------------------------------------------- capture


def capture(model, data, output, *, mode: str = "score", method: str = "topk", k: int = 64,
            num_samples: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 8,
            max_length: Optional[int] = None, max_new_tokens: int = 128, do_sample: bool = False,
            generation_temperature: float = 1.0, top_p: float = 1.0, device: str = "cpu",
            dtype: str = "auto", tokenizer=None, text_field: Optional[str] = None, split: str = "train",
            txt_docs: str = "line", encoding: str = "packed", shard_size: int = 1024,
            teacher_name: Optional[str] = None, limit: Optional[int] = None, overwrite: bool = False,
            progress: bool = True, verbose: bool = True) -> CaptureSummary:
    """Run the teacher ``model`` over ``data`` and store sparse targets in the cache ``output``.

    Args:
        model: a local model directory (``AutoModelForCausalLM``), or a loaded causal LM.
        data: a ``.txt`` / ``.jsonl`` file or a saved ``datasets`` directory (see the module
            docstring), or a list of strings.
        output: the cache directory; an existing cache with the same parameters is resumed.
        mode: ``"score"`` (teacher forcing on the text) or ``"generate"`` (the teacher answers
            each prompt; sequence-level KD).
        method, k, num_samples, temperature, seed: the compression (:func:`kdfast.compress_topk`
            with ``k``, or :func:`kdfast.compress_sample` with ``num_samples`` draws and
            ``seed``) at the capture temperature.
        batch_size: sequences per teacher forward (batches are formed by length).
        max_length: tokens kept per document (prompt, in generate mode); default: the teacher's
            context (minus ``max_new_tokens`` in generate mode).
        max_new_tokens, do_sample, generation_temperature, top_p: generation (generate mode);
            greedy unless ``do_sample``; sampling is seeded with ``seed``.
        device: ``"cpu"``, ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun) or ``"cuda:N"``.
        dtype: the teacher's dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``,
            ``"float16"``.
        tokenizer: None/``"auto"`` (the model directory's, else bytes), ``"bytes"``, or an
            object (a ``transformers`` tokenizer).
        text_field, split, txt_docs: how documents are read (module docstring).
        encoding, shard_size: cache storage (:class:`kdfast.cache.CacheWriter`).
        teacher_name: recorded in the manifest (default: the model directory's name).
        limit: use only the first ``limit`` documents.
        overwrite: delete an existing cache at ``output`` first instead of resuming.
        progress: a tqdm progress bar (rank 0) with tokens/s. verbose: print the summary.

    Returns:
        a :class:`CaptureSummary` (whole cache on rank 0 of a multi-process run).
    """
    import torch

    from . import cache as kcache

    t_start = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"mode: expected 'score' or 'generate', got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected 'topk' or 'sample', got {method!r}")
    for name, value in (("batch_size", batch_size), ("k", k), ("num_samples", num_samples),
                        ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer ≥ 1, got {value!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length: expected an integer ≥ 1 or None, got {max_length!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: expected an integer ≥ 0 or None, got {limit!r}")
    output = os.fspath(output)

    dist = _Dist()
    try:
        # Devices and the model.
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.world > 1 else 0)
        model_dir = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        teacher, default_name, model_dtype = _load_model(model, dtype, dev)
        tok = _load_tokenizer(model_dir, tokenizer)
        vocab = _vocab_size(teacher)
        if isinstance(tok, ByteTokenizer) and vocab < 256:
            raise ValueError(f"model: the byte-level tokenizer needs a vocabulary of ≥ 256 ids, "
                             f"the teacher has {vocab}")
        context = _context_length(teacher)
        gen = mode == "generate"
        if max_length is None:
            max_length = (context or DEFAULT_CONTEXT) - (max_new_tokens if gen else 0)
            if max_length < 1:
                raise ValueError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the "
                                 f"teacher's context of {context}")
        total_len = max_length + (max_new_tokens if gen else 0)
        if context is not None and total_len > context:
            what = "max_length + max_new_tokens" if gen else "max_length"
            raise ValueError(f"{what}: {total_len} exceeds the teacher's context of {context} positions")

        # Documents → this rank's token sequences.
        if isinstance(data, (list, tuple)):
            docs = [d for d in data if isinstance(d, str) and d.strip()]
            data_name = f"<{len(docs)} strings>"
        else:
            docs = read_documents(data, mode=mode, text_field=text_field, split=split, txt_docs=txt_docs)
            data_name = os.path.abspath(os.fspath(data))
        if limit is not None:
            docs = docs[:limit]
        config = {
            "mode": mode, "data_sha256": _documents_sha256(docs), "num_documents": len(docs),
            "tokenizer": tok.name, "max_length": max_length, "dtype": model_dtype,
            "seed": seed if (method == "sample" or (gen and do_sample)) else None,
            "max_new_tokens": max_new_tokens if gen else None,
            "do_sample": bool(do_sample) if gen else None,
            "generation_temperature": float(generation_temperature) if gen and do_sample else None,
            "top_p": float(top_p) if gen and do_sample else None,
        }
        stride = total_len  # row_offset stride of compress_sample: one stream per position

        if overwrite:
            if dist.rank == 0:
                _clear_cache_dir(output)
            dist.barrier()
        writer = kcache.CacheWriter(
            output, method=method, temperature=temperature, vocab_size=vocab,
            k=k if method == "topk" else None, num_samples=num_samples if method == "sample" else None,
            teacher_name=teacher_name if teacher_name is not None else default_name,
            shard_size=shard_size, encoding=encoding, rank=dist.rank, world_size=dist.world,
            config=config, info={"data": data_name, "kdfast_capture": _capture_info()},
        )
        with writer:
            mine = [i for i in range(dist.rank, len(docs), dist.world) if i not in writer.done]
            seqs = {}
            for i in mine:
                ids = tok.encode(docs[i])
                ids = ids[-max_length:] if gen else ids[:max_length]
                if ids:
                    seqs[i] = ids
            order = sorted(seqs, key=lambda i: (-len(seqs[i]), i))
            batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
            bar = _progress(progress and dist.rank == 0, gen, sum(len(s) for s in seqs.values()), len(order))
            eos = _eos_ids(tok, teacher)
            new_tokens = 0
            t_loop = time.perf_counter()
            try:
                for batch in batches:
                    prompts = [seqs[i] for i in batch]
                    if gen:
                        fulls = _generate(teacher, prompts, tok.pad_token_id, eos, dev, max_new_tokens,
                                          do_sample, generation_temperature, top_p, seed, batch[0])
                    else:
                        fulls = prompts
                    lengths = [len(s) for s in fulls]
                    ids = torch.full((len(fulls), max(lengths)), tok.pad_token_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for r, s in enumerate(fulls):
                        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                        mask[r, :len(s)] = 1
                    with torch.inference_mode():
                        logits = teacher(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
                        for r, i in enumerate(batch):
                            n = lengths[r]
                            t = _compress_rows(logits[r, :n, :vocab], method, k, num_samples, temperature,
                                               seed, i * stride)
                            writer.append(ids[r, :n], t, seq_id=i, prompt_length=len(prompts[r]) if gen else 0)
                        del logits
                    new_tokens += sum(lengths)
                    if bar is not None:
                        if gen:
                            bar.update(len(batch))
                            bar.set_postfix_str(f"{new_tokens / max(1e-9, time.perf_counter() - t_loop):.0f} tok/s")
                        else:
                            bar.update(sum(lengths))
            finally:
                if bar is not None:
                    bar.close()
            new_sequences = len(order)
        # All ranks finished (writer closed); merge, then report.
        new_sequences, new_tokens = dist.sum([new_sequences, new_tokens])
        dist.barrier()
        if dist.world > 1 and dist.rank == 0:
            manifest = kcache.merge_manifests(output, dist.world)
        else:
            manifest = writer.manifest
        dist.barrier()
        summary = CaptureSummary(
            path=output, sequences=manifest["num_sequences"], tokens=manifest["num_tokens"],
            new_sequences=new_sequences, new_tokens=new_tokens,
            bytes=sum(s["bytes"] for s in manifest["shards"]), seconds=time.perf_counter() - t_start,
            rank=dist.rank, world_size=dist.world, shards=len(manifest["shards"]),
        )
        if verbose and dist.rank == 0:
            print(summary, flush=True)
        return summary
    finally:
        dist.close()


def _compress_rows(rows, method, k, num_samples, temperature, seed, row_offset, chunk_rows=None):
    """Targets of one sequence's ``[S, V]`` teacher logits, on the CPU.

    On the CPU one Rust call streams over the rows. Elsewhere kdfast's PyTorch backend sorts
    whole rows, so the rows go in chunks of about 2**26 logits to bound its temporary memory
    (the results do not depend on the chunking: top-k is per row and the sampler keys each
    row's draws by ``row_offset + row``).
    """
    import torch

    from . import sparse

    def one(x, offset):
        if method == "topk":
            return sparse.compress_topk(x, k, temperature=temperature)
        return sparse.compress_sample(x, num_samples, temperature=temperature, seed=seed, row_offset=offset)

    if chunk_rows is None:
        if rows.device.type == "cpu":
            return one(rows, row_offset)
        chunk_rows = max(1, (1 << 26) // rows.shape[-1])
    step = chunk_rows
    parts = [one(rows[a:a + step], row_offset + a).to("cpu") for a in range(0, rows.shape[0], step)]
    if len(parts) == 1:
        return parts[0]
    cat = (lambda name: None if getattr(parts[0], name) is None
           else torch.cat([getattr(p, name) for p in parts], 0))
    return sparse.SparseTargets(indices=cat("indices"), logprobs=cat("logprobs"), weights=cat("weights"),
                                tail_logprob=cat("tail_logprob"), temperature=parts[0].temperature,
                                method=parts[0].method)


def _capture_info() -> dict:
    try:
        from importlib.metadata import version

        v = version("kdfast")
    except Exception:  # pragma: no cover
        v = "unknown"
    return {"kdfast_version": v, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _progress(enabled: bool, gen: bool, tokens: int, sequences: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is part of the capture extra
        return None
    if gen:
        return tqdm(total=sequences, unit="seq", desc="kdfast capture (generate)", dynamic_ncols=True)
    return tqdm(total=tokens, unit="tok", unit_scale=True, desc="kdfast capture", dynamic_ncols=True)


def _generate(model, prompts, pad_id, eos, dev, max_new_tokens, do_sample, gen_temperature, top_p, seed, first_id):
    """Prompt + response token lists (responses cut after the first EOS, which is kept)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding: generation continues at the right edge
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "pad_token_id": pad_id}
    if eos:
        kwargs["eos_token_id"] = eos
    if do_sample:
        kwargs.update(temperature=float(gen_temperature), top_p=float(top_p))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed((int(seed) * 1_000_003 + int(first_id)) % (1 << 63))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
    out = out[:, width:].cpu().tolist()
    fulls = []
    eos_set = set(eos)
    for p, resp in zip(prompts, out):
        cut = len(resp)
        for j, t in enumerate(resp):
            if t in eos_set:
                cut = j + 1
                break
        fulls.append(list(p) + resp[:cut])
    return fulls


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kdfast capture`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "capture",
        help="run a Hugging Face teacher over text and cache sparse (top-k / sampled) targets",
        description=(
            "Run a local Hugging Face causal LM teacher over a text dataset (score: teacher "
            "forcing; generate: the teacher answers prompts) and stream compressed targets into "
            "an Arrow cache readable by kdfast.cache.TeacherCache and Hugging Face datasets. "
            "Rerun with the same arguments to resume. Under torchrun each rank writes its own shards."
        ),
    )
    p.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM)")
    p.add_argument("--data", required=True, help=".txt, .jsonl, or a directory saved by datasets")
    p.add_argument("--output", "-o", required=True, help="cache directory")
    p.add_argument("--mode", choices=MODES, default="score")
    p.add_argument("--method", choices=METHODS, default="topk")
    p.add_argument("--k", type=int, default=64, help="top-k ids per position (default 64)")
    p.add_argument("--num-samples", type=int, default=64, help="draws per position for --method sample")
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens kept per document (generate: per prompt); default: the teacher's context")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="generate by sampling (seeded) instead of greedily")
    p.add_argument("--generation-temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "bytes"),
                   help="auto: the model directory's tokenizer, else bytes")
    p.add_argument("--text-field", default=None, help="JSON/datasets field with the text")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    p.add_argument("--txt-docs", choices=TXT_DOCS, default="line",
                   help=".txt documents: one per line, or separated by blank lines")
    p.add_argument("--encoding", choices=("packed", "raw"), default="packed")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard")
    p.add_argument("--teacher-name", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Handler of ``kdfast capture``; returns the exit status."""
    try:
        capture(
            args.model, args.data, args.output, mode=args.mode, method=args.method, k=args.k,
            num_samples=args.num_samples, temperature=args.temperature, seed=args.seed,
            batch_size=args.batch_size, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample, generation_temperature=args.generation_temperature, top_p=args.top_p,
            device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, text_field=args.text_field,
            split=args.split, txt_docs=args.txt_docs, encoding=args.encoding, shard_size=args.shard_size,
            teacher_name=args.teacher_name, limit=args.limit, overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"kdfast capture: error: {exc}", file=sys.stderr)
        return 2
    return 0
