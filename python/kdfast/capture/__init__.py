"""``kdfast capture``: run a Hugging Face causal-LM teacher over text and cache sparse targets.

:func:`capture` (and the ``kdfast capture`` command, :func:`add_parser` / :func:`main`) loads a
``transformers`` causal LM from a **local** directory, reads documents, runs the teacher under
``torch.inference_mode()`` batch by batch and streams its logits through
:func:`kdfast.compress_topk` / :func:`kdfast.compress_sample` into a :class:`kdfast.cache.CacheWriter`
— computed from the final hidden states a chunk of rows at a time through the teacher's head, so
no ``[B, S, V]`` logits exist (a head that is not ``hidden @ Wᵀ (+ b)``, such as final-logit
soft-capping, falls back to one batch of materialised logits); padding positions are never
compressed.

Modes:

* ``score`` — teacher forcing on the given text: one cached sequence per document, the
  teacher's distribution at every position (``prompt_length`` 0).
* ``generate`` — sequence-level KD: each document is a prompt, the teacher writes a response
  with ``model.generate`` (greedy, or sampling with ``do_sample=True`` seeded per batch, at most
  ``max_new_tokens``, stopping after the tokenizer's/model's EOS, which is kept); the cached
  sequence is prompt + response, scored by one teacher-forcing pass, with the teacher's
  distribution at every position — the generated ones included — and ``prompt_length``
  marking where the response starts (``Collator(response_only=True)`` trains on it only).

Data (``data``): a ``.txt`` file (one document per line, or separated by blank lines), a
``.jsonl`` file, or a directory saved by ``datasets`` (:mod:`kdfast.capture.documents`).

Sequence ``i`` (the cache's ``seq_id``) is the i-th non-empty document. Score mode keeps the
first ``max_length`` tokens; generate mode keeps the last ``max_length`` tokens of each
prompt (its end is what the response continues). ``max_length`` defaults to the teacher's
context (minus ``max_new_tokens`` when generating).

Tokenizer: ``AutoTokenizer`` from the model directory when it has tokenizer files; otherwise
the byte-level fallback :class:`ByteTokenizer` (token id = UTF-8 byte, no special tokens,
padding id 0; :mod:`kdfast.capture.tokenizer`).

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
With ``--tensor-parallel P`` groups of P ranks hold one teacher, each computing and compressing
its slice of the vocabulary (``process_group``), and the group's first rank writes
(:mod:`~kdfast.capture.distributed`, :mod:`~kdfast.capture.scoring`).

One module per job: :mod:`~kdfast.capture.documents` (reading the data),
:mod:`~kdfast.capture.tokenizer` (tokenizers), :mod:`~kdfast.capture.teacher` (loading the
model, generation, compressing logits), :mod:`~kdfast.capture.scoring` (a batch's targets through
the chunked head, or the materialised logits), :mod:`~kdfast.capture.distributed` (``torchrun``
ranks), :mod:`~kdfast.capture.run` (the capture loop, :func:`capture`) and
:mod:`~kdfast.capture.cli` (the ``kdfast capture`` command).
"""

from __future__ import annotations

from .cli import add_parser, main
from .documents import TXT_DOCS, read_documents
from .run import DEFAULT_CONTEXT, METHODS, MODES, CaptureSummary, capture
from .teacher import DTYPES
from .tokenizer import TOKENIZER_FILES, ByteTokenizer, has_tokenizer_files

__all__ = ["capture", "CaptureSummary", "ByteTokenizer", "read_documents", "add_parser", "main"]
