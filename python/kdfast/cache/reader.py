"""Reading a cache: :class:`TeacherCache`, a memory-mapped ``torch.utils.data.Dataset``.

On open, the manifest is read and checked (:func:`kdfast.cache.read_manifest`), every listed
shard is mapped (a regular file inside the cache directory, of the recorded size), verified
against its sha256 and parsed with its offsets checked and its schema metadata and counts
compared with the manifest (:mod:`kdfast.cache.shard`); an item then decodes only its own bytes
(:mod:`kdfast.cache.records`).

**What an open cache guarantees.** The manifest and the shards agree (every decoding parameter,
every count, every ``seq_id`` once), or the open fails with a ``ValueError`` naming the file and
the field; nothing outside the cache directory is read. The identity of each shard file (device,
inode, size, modification time) is recorded at open: a DataLoader worker that maps the shards
again refuses a file that was replaced since (a cache rewritten in place, e.g. by a capture with
``--overwrite``) instead of reading other targets under the old manifest. The checksums detect
corruption, not a malicious writer that rewrites shards and manifest consistently (see
:mod:`kdfast.cache.format`).

**Hugging Face datasets.** Shards are Arrow IPC *stream* files, the format of ``datasets``' own
cache files, so ``datasets.Dataset.from_file(shard)`` memory-maps one and
``load_dataset("arrow", data_files=...)`` (or ``load_dataset(cache_dir)``) loads several;
:func:`decode_record` turns one of their rows back into :class:`~kdfast.SparseTargets`. (The
IPC *file* format, with its footer, is not readable by ``Dataset.from_file``; random access
does not need it: :class:`TeacherCache` maps each stream once, which is zero-copy — every
column is a view of the mapped file — and indexes rows through the offsets.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Dict, List

import numpy as np
import torch

from .durable import sha256_hex
from .format import MANIFEST, SHARD_NAME_RE, rank_manifests, read_manifest, target_columns
from .records import decode_many, decode_row
from .shard import Shard, map_shard


class TeacherCache(torch.utils.data.Dataset):
    """A cache opened for reading: a map-style ``torch.utils.data.Dataset`` of sequences.

    ``cache[i]`` is the sequence with the i-th smallest ``seq_id`` (for a single-process capture
    of n sequences: ``seq_id == i``), a dict with ``seq_id`` (int), ``input_ids`` (LongTensor
    [S]), ``targets`` (:class:`~kdfast.SparseTargets` [S, k_row] on CPU; for their
    alignment see :mod:`kdfast.cache.collation`) and ``prompt_length`` (int). Shards are memory-mapped; an item
    decodes only its own bytes.

    On open, every shard listed in ``manifest.json`` is checked: present, a regular file in the
    cache directory, of the recorded size (else "truncated"), well-formed, and, with ``verify=True`` (the default), of the recorded sha256 (else
    "checksum mismatch"), with the decoding parameters and counts of the manifest (see the
    module docstring); each error names the shard file. A complete cache must list every shard
    file of its directory. A multi-rank cache whose ranks were never merged is refused with an
    explanation. Pickles without its memory maps (DataLoader workers reopen the shards lazily,
    without re-verifying the checksums, but refusing a shard file replaced since the open).
    """

    def __init__(self, path, *, verify: bool = True):
        self.path = os.fspath(path)
        if not os.path.exists(os.path.join(self.path, MANIFEST)):
            ranks = sorted(rank_manifests(self.path).values()) if os.path.isdir(self.path) else []
            if ranks:
                raise ValueError(
                    f"{self.path}: multi-rank cache without a merged manifest.json (found "
                    f"{', '.join(ranks)}): the capture has not finished; resume it, or call "
                    f"kdfast.cache.merge_manifests({self.path!r}) once every rank is complete"
                )
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a kdfast teacher cache")
        self.manifest = read_manifest(self.path)
        entries = self.manifest["shards"]
        if self.manifest["complete"]:
            listed = {entry["file"] for entry in entries}
            extra = sorted(n for n in os.listdir(self.path) if SHARD_NAME_RE.match(n) and n not in listed)
            if extra:
                raise ValueError(f"{os.path.join(self.path, MANIFEST)}: shards lists {len(entries)} shard files, "
                                 f"the directory also holds {', '.join(extra)}; the manifest does not "
                                 f"describe this cache")
        mapped = [map_shard(self.path, entry) for entry in entries]  # present, regular files, whole
        maps = [buffer for buffer, _ in mapped]
        self._identity = [identity for _, identity in mapped]
        if verify:
            for entry, buffer in zip(entries, maps):
                digest = sha256_hex(buffer)
                if digest != entry["sha256"]:
                    raise ValueError(
                        f"{entry['file']}: shard checksum mismatch (sha256 {digest}, manifest records "
                        f"{entry['sha256']}); the file is corrupt (file {os.path.join(self.path, entry['file'])})"
                    )
        self._files = [os.path.join(self.path, entry["file"]) for entry in entries]
        self._shards = [Shard(buffer, file, self.manifest, entry)
                        for buffer, file, entry in zip(maps, self._files, entries)]
        self._pid = os.getpid()
        order = []
        for si, shard in enumerate(self._shards):
            sid = shard.cols["seq_id"]
            order.append(np.stack([sid.astype(np.int64), np.full(shard.rows, si, np.int64),
                                   np.arange(shard.rows, dtype=np.int64)], 1))
        table = np.concatenate(order) if order else np.zeros((0, 3), np.int64)
        table = table[np.argsort(table[:, 0], kind="stable")]
        dup = np.nonzero(np.diff(table[:, 0]) == 0)[0]
        if dup.size:
            sid = int(table[dup[0], 0])
            where = sorted({entries[int(s)]["file"] for s in table[table[:, 0] == sid, 1]})
            raise ValueError(f"{self.path}: sequence {sid} is stored more than once ({', '.join(where)})")
        self._index = table

    def _open(self) -> None:
        """(Re)map the shards in a new process (a DataLoader worker), without re-verifying the
        checksums but refusing a shard file that is not the one opened (rewritten since)."""
        if self._shards is None or self._pid != os.getpid():
            shards = []
            for file, entry, identity in zip(self._files, self.manifest["shards"], self._identity):
                try:
                    buffer, now = map_shard(self.path, entry)
                except ValueError as exc:  # missing, replaced by a link, of another size: changed since
                    raise ValueError(f"{file}: the cache was rewritten after it was opened ({exc}); "
                                     f"reopen TeacherCache") from None
                if now != identity:
                    raise ValueError(f"{file}: the cache was rewritten after it was opened; reopen TeacherCache")
                shards.append(Shard(buffer, file, self.manifest, entry))
            self._shards = shards
            self._pid = os.getpid()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- Dataset

    def __len__(self) -> int:
        return int(self._index.shape[0])

    def __getitem__(self, i: int) -> dict:
        r = self._row(i)
        return decode_row(self.manifest, r["seq_id"], r["input_ids"], r["prompt_length"], r["k"], r["fields"],
                          r["where"])

    def __getitems__(self, indices) -> "CacheBatch":
        """The items ``indices`` (a ``DataLoader`` batch): a sequence of items decoded on access,
        which :class:`~kdfast.cache.Collator` decodes in one call instead (compact records)."""
        return CacheBatch(self, [self._row(i) for i in indices])

    def _row(self, i) -> dict:
        """The columns of item ``i`` (views of the mapped shard)."""
        n = len(self)
        if isinstance(i, torch.Tensor):
            i = int(i)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a cache of {n} sequences")
        self._open()
        sid, si, row = (int(x) for x in self._index[i])
        shard = self._shards[si]
        cols = shard.cols
        names = target_columns(self.manifest["encoding"])
        return {"seq_id": sid, "input_ids": shard.list_slice("input_ids", row),
                "prompt_length": int(cols["prompt_length"][row]), "k": int(cols["k"][row]),
                "fields": {name: shard.list_slice(name, row) for name in names if name in cols},
                "where": self.manifest["shards"][si]["file"]}

    # -- conveniences

    @property
    def seq_ids(self) -> torch.Tensor:
        """The stored ``seq_id``, ascending (``cache[i]`` has ``seq_ids[i]``)."""
        return torch.from_numpy(self._index[:, 0].copy())

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def shard_files(self) -> List[str]:
        return list(self._files)

    def lengths(self) -> List[int]:
        """Sequence lengths in index order (for length-grouped samplers)."""
        self._open()
        out = []
        for _, si, row in self._index:
            offsets, _ = self._shards[si].cols["input_ids"]
            out.append(int(offsets[row + 1] - offsets[row]))
        return out

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TeacherCache({self.path!r}, sequences={len(self)}, tokens={m['num_tokens']}, "
                f"method={m['method']!r}, k={m['k']}, temperature={m['temperature']}, "
                f"teacher={m['teacher_name']!r})")


class CacheBatch(Sequence):
    """Items of a :class:`TeacherCache` fetched together (``DataLoader``'s ``__getitems__``): a
    sequence of item dicts, each decoded when accessed; :class:`~kdfast.cache.Collator` instead
    decodes every compact record of the batch in one call, straight into the padded batch."""

    def __init__(self, cache: TeacherCache, rows: List[dict]):
        self._cache, self._rows = cache, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[x] for x in range(*j.indices(len(self)))]
        r = self._rows[j]
        return decode_row(self._cache.manifest, r["seq_id"], r["input_ids"], r["prompt_length"], r["k"],
                          r["fields"], r["where"])

    def compact_rows(self):
        """The batch for :class:`~kdfast.cache.Collator`'s one-call decoding, or None (not compact)."""
        if self._cache.manifest["encoding"] != "compact":
            return None
        return _CompactRows(self._cache.manifest, self._rows)


class _CompactRows:
    def __init__(self, params: dict, rows: List[dict]):
        self.params = params
        self.rows = [dict(r, record=r["fields"]["targets"]) for r in rows]

    def decode_into(self, s: int, k: int, ids, lps, weights, tails) -> None:
        decode_many(self.params, self.rows, s, k, ids, lps, weights, tails)


def decode_record(record: Dict[str, Any], manifest: dict) -> dict:
    """One row of a shard as loaded by Hugging Face ``datasets`` (a dict of Python values) →
    the item :class:`TeacherCache` returns: ``seq_id``, ``input_ids`` (LongTensor [S]),
    ``targets`` (:class:`~kdfast.SparseTargets` [S, k_row]) and ``prompt_length``."""
    fields = {n: record[n] for n in target_columns(manifest["encoding"]) if n in record}
    return decode_row(manifest, record["seq_id"], np.asarray(record["input_ids"]), record["prompt_length"],
                           record["k"], fields, "record")
