"""Teacher-target caches for offline distillation (api.md §5): Arrow IPC shards and a manifest.

A cache is a directory::

    cache/
      manifest.json              what is in the cache; the only file a reader trusts
      shard-00000.arrow          Arrow IPC *stream* files, one record batch each, immutable
      shard-00001.arrow
      ...

Write it with :class:`CacheWriter` (resumable; ``kdfast capture`` drives one), read it with
:class:`TeacherCache` (a memory-mapped, random-access ``torch.utils.data.Dataset``, also
loadable through Hugging Face ``datasets``) and batch its items with :func:`collate`::

    batch = collate([cache[i] for i in idx])
    logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])

One module per job:

* :mod:`~kdfast.cache.format` — the on-disk format: file names, the shard schema (one row per
  sequence), the manifest and its checks (:func:`read_manifest`).
* :mod:`~kdfast.cache.durable` — atomic writes, checksums, opening files without following
  links, the one-writer lock.
* :mod:`~kdfast.cache.records` — one sequence ↔ one shard row (packed or raw targets).
* :mod:`~kdfast.cache.shard` — one shard mapped and parsed, its offsets checked.
* :mod:`~kdfast.cache.writer` — :class:`CacheWriter`: shards and manifest, resume.
* :mod:`~kdfast.cache.merge` — :func:`merge_manifests` for multi-rank (``torchrun``) captures.
* :mod:`~kdfast.cache.reader` — :class:`TeacherCache` and :func:`decode_record` (``datasets``).
* :mod:`~kdfast.cache.collation` — :class:`Collator` / :func:`collate`: padded batches whose
  labels and targets line up for :func:`kdfast.sparse_kl`.

**Durability.** A shard is written to a hidden temporary file, fsync'ed and renamed into place
(``os.replace``); then the manifest is rewritten the same way. A shard not listed in the
manifest does not exist for readers. A writer killed at any point leaves a valid cache holding
every shard it completed; reopening it with the same parameters resumes.

**File safety.** Nothing in a manifest or a shard can make kdfast read or write outside the
cache directory: shard names are bare names of the expected pattern, symbolic links and
non-regular files are refused, sizes must match the manifest, and list offsets and per-row
lengths are checked before anything is sliced or decoded. A manifest that disagrees with its
shards — a decoding parameter, a count, a shard entry — is refused on open, naming the file and
the field (:mod:`~kdfast.cache.format` says what is checked, and what a checksum cannot tell).
"""

from __future__ import annotations

try:
    import pyarrow  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kdfast.cache needs pyarrow; install it with: pip install 'kdfast[capture]'"
    ) from exc

from .collation import Collator, collate
from .format import (
    DEFAULT_SHARD_BYTES,
    DEFAULT_SHARD_SIZE,
    ENCODINGS,
    FORMAT,
    FORMAT_VERSION,
    IGNORE_INDEX,
    MANIFEST,
    MAX_SHARD_BYTES,
    METHODS,
    read_manifest,
)
from .merge import merge_manifests
from .reader import TeacherCache, decode_record
from .writer import CacheWriter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CacheWriter",
    "TeacherCache",
    "Collator",
    "collate",
    "merge_manifests",
    "decode_record",
    "read_manifest",
]
