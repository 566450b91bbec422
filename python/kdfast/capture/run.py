"""The capture loop: the teacher over the documents, compressed targets streamed into a cache.

:func:`capture` reads the documents (:mod:`.documents`), tokenizes them (:mod:`.tokenizer`),
runs the teacher (:mod:`.teacher`) under ``torch.inference_mode()`` batch by batch — generating
responses first in generate mode — and streams each batch's logits through
:func:`kdfast.compress_topk` / :func:`kdfast.compress_sample` into a
:class:`kdfast.cache.CacheWriter`: the teacher's body gives the final hidden states and the
logits are computed a chunk of rows at a time through its head into the compressor
(:mod:`.scoring`), so no ``[B, S, V]`` logits exist; a head that cannot be computed that way
(soft-capping, not an ``nn.Linear``) falls back to one batch of materialised logits. Padding
positions are never compressed. A tqdm progress bar shows tokens/s on rank 0; under
``torchrun`` each rank writes its own shards (:mod:`.distributed`) and rank 0 merges the
manifests at the end. :class:`CaptureSummary` is what a run reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Optional

from .distributed import Ranks
from .documents import documents_sha256, read_documents
from .scoring import Scorer
from .teacher import compress_rows, context_length, eos_ids, generate, load_model, vocab_size
from .tokenizer import ByteTokenizer, load_tokenizer

MODES = ("score", "generate")
METHODS = ("topk", "sample")
DEFAULT_CONTEXT = 2048  # max_length when the teacher's config names no context


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
    fallback: Optional[str] = None  # why the logits were materialised; None: chunked through the head

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    def __str__(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"kdfast capture: {self.sequences} sequences ({self.new_sequences} new), {self.tokens} tokens "
                f"({self.new_tokens} new) in {self.shards} shards, {self.bytes / 2**20:.2f} MiB = "
                f"{self.bytes_per_token:.1f} bytes/token; {self.seconds:.1f} s ({rate:.0f} new tokens/s)"
                f"{f' on {self.world_size} ranks' if self.world_size > 1 else ''} -> {self.path}")


def capture(model, data, output, *, mode: str = "score", method: str = "topk", k: int = 64,
            num_samples: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 8,
            max_length: Optional[int] = None, max_new_tokens: int = 128, do_sample: bool = False,
            generation_temperature: float = 1.0, top_p: float = 1.0, device: str = "cpu",
            dtype: str = "auto", tokenizer=None, text_field: Optional[str] = None, split: str = "train",
            txt_docs: str = "line", encoding: str = "compact", shard_size: int = 1024,
            teacher_name: Optional[str] = None, limit: Optional[int] = None, overwrite: bool = False,
            chunked_head: bool = True, tensor_parallel: int = 1, progress: bool = True,
            verbose: bool = True) -> CaptureSummary:
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
        overwrite: delete an existing cache at ``output`` first instead of resuming (refused with
            a ``RuntimeError`` while another capture or CacheWriter is writing it).
        chunked_head: compute the logits chunk by chunk through the teacher's head (default);
            False materialises each batch's ``[B, S, V]`` logits (:mod:`kdfast.capture.scoring`).
        tensor_parallel: ranks per teacher (torchrun): groups of this many consecutive ranks run
            the same sequences, each rank computing the logits of its slice of the vocabulary
            (an even split of a whole head, or its own head if that holds fewer rows) and
            compressing with ``process_group``; the group's first rank writes (see
            :mod:`.distributed`). The targets are those of one process.
        progress: a tqdm progress bar (rank 0) with tokens/s. verbose: print the summary.

    Returns:
        a :class:`CaptureSummary` (whole cache on rank 0 of a multi-process run).
    """
    import torch

    from ..cache import CacheWriter, merge_manifests, read_manifest
    from ..cache.writer import clear_cache

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

    dist = Ranks(tensor_parallel)
    try:
        # Devices and the model.
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.world > 1 else 0)
        model_dir = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        teacher, default_name, model_dtype = load_model(model, dtype, dev)
        tok = load_tokenizer(model_dir, tokenizer)
        vocab = vocab_size(teacher, dist.tp_group, dev)
        if isinstance(tok, ByteTokenizer) and vocab < 256:
            raise ValueError(f"model: the byte-level tokenizer needs a vocabulary of ≥ 256 ids, "
                             f"the teacher has {vocab}")
        scorer = Scorer(teacher, vocab, chunked=chunked_head, group=dist.tp_group)
        if mode == "generate" and vocab_size(teacher) < vocab:
            raise ValueError("mode: 'generate' needs the whole vocabulary's logits on every rank, but this "
                             "tensor-parallel teacher's head holds a slice of it; capture its answers with "
                             "mode='score' on generated text instead")
        context = context_length(teacher)
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
            "mode": mode, "data_sha256": documents_sha256(docs), "num_documents": len(docs),
            "tokenizer": tok.name, "max_length": max_length, "dtype": model_dtype,
            "seed": seed if (method == "sample" or (gen and do_sample)) else None,
            "max_new_tokens": max_new_tokens if gen else None,
            "do_sample": bool(do_sample) if gen else None,
            "generation_temperature": float(generation_temperature) if gen and do_sample else None,
            "top_p": float(top_p) if gen and do_sample else None,
        }
        stride = total_len  # row_offset stride of compress_sample: one stream per position

        if overwrite and dist.world > 1:  # one rank clears every rank's files, holding their locks
            if dist.rank == 0:
                clear_cache(output)
            dist.barrier()
        writer = None
        if dist.writes:
            try:
                writer = CacheWriter(
                    output, method=method, temperature=temperature, vocab_size=vocab,
                    k=k if method == "topk" else None, num_samples=num_samples if method == "sample" else None,
                    teacher_name=teacher_name if teacher_name is not None else default_name,
                    shard_size=shard_size, encoding=encoding, rank=dist.dp_rank, world_size=dist.dp_world,
                    config=config, info={"data": data_name, "kdfast_capture": _capture_info()},
                    overwrite=overwrite and dist.world == 1,  # takes the writer's lock, then clears
                )
            except BaseException:
                dist.share(None)  # the group's other ranks raise too
                raise
        with writer if writer is not None else contextlib.nullcontext():
            done = writer.done if writer is not None else ()
            mine = dist.share([i for i in range(dist.dp_rank, len(docs), dist.dp_world) if i not in done])
            seqs = {}
            for i in mine:
                ids = tok.encode(docs[i])
                ids = ids[-max_length:] if gen else ids[:max_length]
                if ids:
                    seqs[i] = ids
            order = sorted(seqs, key=lambda i: (-len(seqs[i]), i))
            batches = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
            bar = _progress(progress and dist.rank == 0, gen, sum(len(s) for s in seqs.values()), len(order))
            eos = eos_ids(tok, teacher)
            new_tokens, noted = 0, False
            t_loop = time.perf_counter()
            try:
                for batch in batches:
                    prompts = [seqs[i] for i in batch]
                    if gen:
                        fulls = generate(teacher, prompts, tok.pad_token_id, eos, dev, max_new_tokens,
                                          do_sample, generation_temperature, top_p, seed, batch[0])
                    else:
                        fulls = prompts
                    lengths = [len(s) for s in fulls]
                    ids = torch.full((len(fulls), max(lengths)), tok.pad_token_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for r, s in enumerate(fulls):
                        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
                        mask[r, :len(s)] = 1
                    def compress(rows, r, start, batch=batch):
                        return compress_rows(rows, method, k, num_samples, temperature, seed,
                                             batch[r] * stride + start, process_group=dist.tp_group)

                    targets = scorer.targets(ids.to(dev), mask.to(dev), lengths, compress)
                    if scorer.fallback is not None and not noted:
                        noted = True  # once per run (a refused head is known before the first batch)
                        if verbose and dist.rank == 0:
                            _note(bar, f"kdfast capture: materialising each batch's logits: {scorer.fallback}")
                    for r, i in enumerate(batch if writer is not None else ()):
                        writer.append(ids[r, :lengths[r]], targets[r], seq_id=i,
                                      prompt_length=len(prompts[r]) if gen else 0)
                    del targets
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
        # All ranks finished (writers closed); merge, then report (each group's writer counts).
        new_sequences, new_tokens = dist.sum([new_sequences, new_tokens] if dist.writes else [0, 0])
        dist.barrier()
        if dist.dp_world > 1 and dist.rank == 0:
            manifest = merge_manifests(output, dist.dp_world)
        elif writer is not None:
            manifest = writer.manifest
        dist.barrier()
        if writer is None:  # a tensor-parallel rank that did not write: the whole cache's counts
            manifest = read_manifest(output)
        summary = CaptureSummary(
            path=output, sequences=manifest["num_sequences"], tokens=manifest["num_tokens"],
            new_sequences=new_sequences, new_tokens=new_tokens,
            bytes=sum(s["bytes"] for s in manifest["shards"]), seconds=time.perf_counter() - t_start,
            rank=dist.rank, world_size=dist.world, shards=len(manifest["shards"]), fallback=scorer.fallback,
        )
        if verbose and dist.rank == 0:
            print(summary, flush=True)
        return summary
    finally:
        dist.close()


def _capture_info() -> dict:
    try:
        from importlib.metadata import version

        v = version("kdfast")
    except Exception:  # pragma: no cover
        v = "unknown"
    return {"kdfast_version": v, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _note(bar, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


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
