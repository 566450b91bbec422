"""The cache writer: sequences in, immutable shards and a manifest out, resumable.

:class:`CacheWriter` buffers appended sequences (encoded by :mod:`kdfast.cache.records`) and
writes each full buffer as one shard, then the manifest, both atomically
(:func:`kdfast.cache.durable.atomic_write`). A shard not listed in the manifest does not exist
for readers, so a writer killed at any point leaves a valid cache holding every shard it
completed; reopening it with the same parameters resumes. :func:`clear_cache` empties a
directory of every rank's cache files (``kdfast capture --overwrite`` of a multi-rank capture).

**Locks.** Each writer holds its rank's lock (``.lock.rank{rank:03d}``) while it is open, taken
under the directory lock (``.lock``). Clearing a cache — :func:`clear_cache`, or
``CacheWriter(overwrite=True)``, which clears *after* taking its own lock — holds the directory
lock and every rank's lock, so it never deletes the files of a writer that is still running: it
raises ``RuntimeError`` ("another capture/CacheWriter is writing") instead. Lock files are never
deleted (deleting a held lock file would let a second writer lock a new one).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import List, Optional

import numpy as np
import pyarrow as pa

from ..targets import SparseTargets
from .durable import WriterLock, atomic_write, fsync_dir, sha256_hex
from .format import (CACHE_FILE_RE, DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SIZE, DIR_LOCK, ENCODINGS, FORMAT,
                     FORMAT_VERSION, IDENTITY, LOCK_FILE_RE, LOGPROB_QUANTUM, MANIFEST, MAX_NUM_SAMPLES,
                     MAX_SHARD_BYTES, MAX_VOCAB_SIZE, METHODS,
                     RANK_MANIFEST_RE, dtypes, id_bits, lock_name, manifest_name, read_manifest, schema_for,
                     shard_name)
from .records import as_ids, build_table, check_targets, encode_row
from .shard import Shard, map_shard


DIR_LOCK_TIMEOUT = 60.0  # seconds; the directory lock is held only to take a lock or clear a cache


def clear_cache(path) -> None:
    """Delete every kdfast cache file (all ranks' manifests, shards, temporary files) in the
    directory ``path``; other files (and the lock files) stay. ``RuntimeError`` naming the
    directory, with nothing deleted, while any writer holds the cache. Nothing happens if
    ``path`` is not a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        with WriterLock(os.path.join(path, DIR_LOCK), timeout=DIR_LOCK_TIMEOUT):
            _clear_locked(path, held=None)


def _clear_locked(path: str, held: Optional[int]) -> None:
    """:func:`clear_cache` for a caller holding the directory lock and the lock of rank ``held``:
    takes every other rank's lock (non-blocking), deletes, releases them."""
    locks = []
    try:
        for name in sorted(os.listdir(path)):
            m = LOCK_FILE_RE.match(name)
            if m and m.group(1) is not None and int(m.group(1)) != held:
                locks.append(WriterLock(os.path.join(path, name)).acquire())
        for name in os.listdir(path):
            if CACHE_FILE_RE.match(name) and not LOCK_FILE_RE.match(name):
                os.remove(os.path.join(path, name))
        fsync_dir(path)
    finally:
        for lock in locks:
            lock.release()


class CacheWriter:
    """Appends ``(input_ids, SparseTargets)`` per sequence to a sharded cache; resumable.

    Args:
        path: the cache directory (created if missing).
        method: ``"topk"`` or ``"sample"``; every appended target must have it.
        temperature: the capture temperature (that of every appended target).
        vocab_size: V of the teacher; ids must lie in ``[0, V)``.
        k: top-k slots (``method="topk"``). num_samples: N draws (``method="sample"``).
        teacher_name: recorded in the manifest (compared on resume).
        shard_size: sequences per shard; a shard is also closed when its encoded targets
            reach ``shard_bytes`` (default 256 MiB; shards are built in memory).
        encoding: ``"compact"`` (the default: variable-length entropy-coded records; top-k
            log-probs within 2^-8 nat, sampled targets as exact ids and counts and the exact
            loss, see :mod:`kdfast.cache.format`), ``"packed"`` (fixed-size records; log-probs
            within 2^-12, the rest exact) or ``"raw"``
            (exact float32 log-probs; ids int16/int32).
        has_tail: store ``tail_logprob`` (default: True for top-k, False for sampling).
        rank, world_size: for multi-process captures: each rank writes its own shards and
            ``manifest.rank{rank:03d}.json``; rank 0 calls :func:`merge_manifests` when all
            ranks are done.
        config: JSON-serialisable description of what produced the targets (data, model
            options...); part of the cache's identity, compared on resume.
        info: free-form JSON-serialisable metadata (not compared).
        overwrite: delete an existing cache at ``path`` instead of resuming — after taking this
            writer's lock; with ``world_size == 1`` every rank's files (holding every rank's lock:
            ``RuntimeError`` while another writer is open), else this rank's files only.

    **Resume.** If ``path`` already holds this rank's manifest, the writer checks that every
    parameter above (and ``config``) matches — a mismatch is a ``ValueError`` listing the
    differences — checks that the listed shards are present and whole, removes leftovers of an
    interrupted write (temporary files, a shard renamed into place but never listed), and
    continues after the last complete shard. :attr:`done` tells which ``seq_id`` are already
    stored; sequences that were only buffered when the previous writer died are not in it and
    must be appended again. One writer per cache and rank at a time (an advisory lock).

    Use as a context manager, or call :meth:`close`: the remaining buffer becomes a last shard
    and the manifest is marked ``complete``. Leaving the ``with`` block by an exception still
    writes the buffered (complete) sequences, but not ``complete``.
    """

    def __init__(self, path, *, method: str, temperature: float, vocab_size: int, k: Optional[int] = None,
                 num_samples: Optional[int] = None, teacher_name: str = "", shard_size: int = DEFAULT_SHARD_SIZE,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, encoding: str = "compact", has_tail: Optional[bool] = None,
                 rank: int = 0, world_size: int = 1, config: Optional[dict] = None, info: Optional[dict] = None,
                 overwrite: bool = False):
        if method not in METHODS:
            raise ValueError(f"method: expected 'topk' or 'sample', got {method!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding: expected one of {', '.join(map(repr, ENCODINGS))}, got {encoding!r}")
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        vocab_size = _positive(vocab_size, "vocab_size")
        if vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size: expected at most 2**31, got {vocab_size}")
        if method == "topk":
            if k is None:
                raise ValueError("k: method='topk' needs k (slots per position), got None")
            k = _positive(k, "k")
            if num_samples is not None:
                raise ValueError("num_samples: only method='sample' takes num_samples; pass k for top-k")
        else:
            if num_samples is None:
                raise ValueError("num_samples: method='sample' needs num_samples (draws per position), got None")
            num_samples = _positive(num_samples, "num_samples")
            if num_samples > MAX_NUM_SAMPLES:
                raise ValueError(f"num_samples: expected at most 65535 (stored counts are 16-bit), got {num_samples}")
            if k is not None and k != num_samples:
                raise ValueError(f"k: sampled targets have num_samples slots; pass k=None (got k={k})")
            k = num_samples
            if has_tail:
                raise ValueError("has_tail: sampled targets have no tail_logprob")
        if has_tail is None:
            has_tail = method == "topk"
        self.shard_size = _positive(shard_size, "shard_size")
        shard_bytes = _positive(shard_bytes, "shard_bytes")
        if shard_bytes > MAX_SHARD_BYTES:
            raise ValueError(f"shard_bytes: expected at most {MAX_SHARD_BYTES} (Arrow's 2 GiB offsets), "
                             f"got {shard_bytes}")
        self.shard_bytes = shard_bytes
        world_size = _positive(world_size, "world_size")
        rank = int(rank)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank}")
        config = json.loads(json.dumps(config or {}, sort_keys=True))  # JSON-normalised
        self.path = os.fspath(path)
        self.rank, self.world_size = rank, world_size
        self._params = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "k": k,
            "num_samples": num_samples, "temperature": temperature, "vocab_size": vocab_size,
            "teacher_name": str(teacher_name), "encoding": encoding, "has_tail": bool(has_tail),
            "world_size": world_size, "config": config,
        }
        self._schema = schema_for(self._params)
        self._info = json.loads(json.dumps(info or {}, sort_keys=True))
        self._manifest_file = os.path.join(self.path, manifest_name(rank, world_size))
        self._buffer: List[dict] = []
        self._buffer_bytes = 0
        self._closed = False
        self._done: set = set()
        self._shards: List[dict] = []
        self._num_tokens = 0

        os.makedirs(self.path, exist_ok=True)
        with WriterLock(os.path.join(self.path, DIR_LOCK), timeout=DIR_LOCK_TIMEOUT):
            self._lock = WriterLock(os.path.join(self.path, lock_name(rank))).acquire()
            try:
                if overwrite and world_size == 1:
                    _clear_locked(self.path, held=rank)  # lock first, then clear
            except BaseException:
                self._lock.release()
                raise
        try:
            self._check_layout()
            if overwrite:
                self._remove_own_files(keep_listed=False)
            if os.path.exists(self._manifest_file):
                self._resume()
            else:
                self._remove_own_files(keep_listed=False)
                self._write_manifest(complete=False)
        except BaseException:
            self._lock.release()
            raise

    # -- public state

    @property
    def done(self) -> frozenset:
        """The ``seq_id`` of every sequence stored (in complete shards or buffered)."""
        return frozenset(self._done)

    @property
    def num_sequences(self) -> int:
        return len(self._done)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def manifest(self) -> dict:
        """This rank's manifest as last written."""
        return self._manifest(complete=self._closed)

    # -- appending

    def append(self, input_ids, targets: SparseTargets, *, seq_id: Optional[int] = None,
               prompt_length: int = 0) -> int:
        """Add one sequence: ``input_ids`` [S] and ``targets`` with leading shape [S]
        (``targets[t]`` is the teacher's distribution over the token at ``t + 1``).

        ``seq_id`` defaults to one more than the largest stored; a ``seq_id`` already stored
        is a ``ValueError``. ``prompt_length`` marks the first tokens as a prompt (generated
        responses). Returns the ``seq_id``.
        """
        if self._closed:
            raise ValueError("append: this CacheWriter is closed")
        p = self._params
        ids = as_ids(input_ids)
        s = ids.shape[0]
        if s and (int(ids.min()) < 0 or int(ids.max()) >= p["vocab_size"]):
            raise ValueError(f"input_ids: expected token ids in [0, {p['vocab_size']}), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        if seq_id is None:
            seq_id = max(self._done) + 1 if self._done else 0
        seq_id = int(seq_id)
        if seq_id < 0:
            raise ValueError(f"seq_id: expected an integer ≥ 0, got {seq_id}")
        if seq_id in self._done:
            raise ValueError(f"seq_id: sequence {seq_id} is already stored in {self.path}")
        prompt_length = int(prompt_length)
        if not 0 <= prompt_length <= s:
            raise ValueError(f"prompt_length: expected an integer in [0, {s}] (the sequence length), "
                             f"got {prompt_length}")
        row, size = encode_row(p, seq_id, ids, check_targets(p, targets, s), prompt_length)
        self._buffer.append(row)
        self._buffer_bytes += size
        self._done.add(seq_id)
        self._num_tokens += s
        if len(self._buffer) >= self.shard_size or self._buffer_bytes >= self.shard_bytes:
            self.flush()
        return seq_id

    def flush(self) -> None:
        """Write the buffered sequences as one shard (nothing if the buffer is empty)."""
        if not self._buffer:
            return
        rows = self._buffer
        table = build_table(self._schema, rows)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self._schema) as w:
            w.write_table(table)
        buf = sink.getvalue()
        index = len(self._shards)
        name = shard_name(self.rank, self.world_size, index)
        atomic_write(os.path.join(self.path, name), memoryview(buf))
        seq_ids = [r["seq_id"] for r in rows]
        self._shards.append({
            "file": name, "rank": self.rank, "index": index, "rows": len(rows),
            "tokens": int(sum(r["input_ids"].shape[0] for r in rows)), "bytes": buf.size,
            "sha256": sha256_hex(buf),
            "min_seq_id": min(seq_ids), "max_seq_id": max(seq_ids),
        })
        self._buffer = []
        self._buffer_bytes = 0
        self._write_manifest(complete=False)

    def close(self) -> None:
        """Flush, mark the manifest ``complete`` and release the cache. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            self._write_manifest(complete=True)
            self._closed = True
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Flush what is buffered (complete sequences) and release the cache, not ``complete``."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return (f"CacheWriter({self.path!r}, method={self._params['method']!r}, k={self._params['k']}, "
                f"sequences={self.num_sequences}, shards={len(self._shards)})")

    # -- internals

    def _manifest(self, complete: bool) -> dict:
        m = dict(self._params)
        m.update({
            "id_bits": id_bits(self._params["vocab_size"]),
            "logprob_quantum": LOGPROB_QUANTUM[self._params["encoding"], self._params["method"]],
            "dtypes": dtypes(self._schema),
            "rank": self.rank,
            "info": self._info,
            "complete": bool(complete),
            "num_sequences": int(sum(s["rows"] for s in self._shards)),
            "num_tokens": int(sum(s["tokens"] for s in self._shards)),
            "shards": list(self._shards),
        })
        return m

    def _write_manifest(self, complete: bool) -> None:
        data = json.dumps(self._manifest(complete), indent=1, sort_keys=True).encode()
        atomic_write(self._manifest_file, data)

    def _check_layout(self) -> None:
        """Refuse to mix single- and multi-rank caches in one directory."""
        ranks = [n for n in os.listdir(self.path) if RANK_MANIFEST_RE.match(n)]
        if self.world_size == 1 and ranks:
            raise ValueError(
                f"{self.path}: holds a multi-rank cache ({', '.join(sorted(ranks))}); "
                f"resume it with the same number of processes, or use another directory"
            )
        main = os.path.join(self.path, MANIFEST)
        if self.world_size > 1 and os.path.exists(main):
            other = read_manifest(self.path).get("world_size", 1)
            if other != self.world_size:
                raise ValueError(
                    f"{self.path}: parameters differ from the cache on disk: world_size: cache has "
                    f"{other}, got {self.world_size}"
                )

    def _own_file_re(self):
        if self.world_size == 1:
            shard = r"shard-(\d{5,})\.arrow"
        else:
            shard = rf"shard-r{self.rank:03d}-(\d{{5,}})\.arrow"
        manifest = re.escape(os.path.basename(self._manifest_file))
        return re.compile(rf"^{shard}$"), re.compile(rf"^\.(?:{shard}|{manifest})\.tmp-\d+$")

    def _remove_own_files(self, keep_listed: bool) -> None:
        shard_re, tmp_re = self._own_file_re()
        listed = {s["file"] for s in self._shards} if keep_listed else set()
        for name in os.listdir(self.path):
            if tmp_re.match(name) or (shard_re.match(name) and name not in listed):
                os.remove(os.path.join(self.path, name))
        if not keep_listed:
            if os.path.exists(self._manifest_file):
                os.remove(self._manifest_file)
            main = os.path.join(self.path, MANIFEST)
            if self.world_size > 1 and self.rank == 0 and os.path.exists(main):
                os.remove(main)  # a merged manifest of a cache being overwritten
            self._shards = []
        fsync_dir(self.path)

    def _resume(self) -> None:
        old = read_manifest(self.path, os.path.basename(self._manifest_file))
        diffs = []
        for key in IDENTITY:
            have, want = old.get(key), self._params[key]
            if key == "temperature" and isinstance(have, (int, float)) and math.isclose(have, want, rel_tol=1e-12):
                continue
            if have != want:
                diffs.append(f"{key}: cache has {have!r}, got {want!r}")
        if self.world_size > 1 and old.get("rank") != self.rank:
            diffs.append(f"rank: cache has {old.get('rank')!r}, got {self.rank!r}")
        if diffs:
            raise ValueError(
                f"{self.path}: cannot resume, parameters differ from the cache on disk "
                f"({'; '.join(diffs)}); use the same parameters, another directory, or overwrite=True"
            )
        shards = old["shards"]
        for index, s in enumerate(shards):
            expected = shard_name(self.rank, self.world_size, index)
            if s["file"] != expected:
                raise ValueError(f"{self._manifest_file}: shard entry {index} is {s['file']!r}, this writer's "
                                 f"shard {index} is {expected!r}; the manifest is not this rank's")
        if self._params["temperature"] != old["temperature"]:  # within 1e-12: keep the cache's exactly
            self._params["temperature"] = old["temperature"]
            self._schema = schema_for(self._params)
        maps = [map_shard(self.path, s)[0] for s in shards]  # present, regular files, whole
        self._shards = [dict(s) for s in shards]
        self._remove_own_files(keep_listed=True)
        for s, buffer in zip(self._shards, maps):
            shard = Shard(buffer, os.path.join(self.path, s["file"]), old, s)
            for sid in shard.cols["seq_id"].tolist():
                if sid in self._done:
                    raise ValueError(f"{s['file']}: sequence {sid} is stored twice in {self.path}")
                self._done.add(sid)
            self._num_tokens += int(s["tokens"])
        self._info = old.get("info", {}) if not self._info else self._info
        self._write_manifest(complete=False)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer ≥ 1, got {value}")
    return int(value)


