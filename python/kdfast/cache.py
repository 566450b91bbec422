"""Teacher-target caches for offline distillation (api.md §5): Arrow IPC shards and a manifest.

A cache is a directory::

    cache/
      manifest.json              what is in the cache (below); the only file a reader trusts
      shard-00000.arrow          Arrow IPC *stream* files, one record batch each, immutable
      shard-00001.arrow
      ...

Multi-rank captures (``rank``/``world_size``, e.g. under ``torchrun``) name their shards
``shard-r{rank:03d}-{index:05d}.arrow``; each rank keeps its own ``manifest.rank{rank:03d}.json``
(same format) and :func:`merge_manifests`, run once by rank 0 after every rank has finished,
writes the ``manifest.json`` that covers all of them.

**One row per sequence** (schema; ``k_row`` is the row's slot count, see below):

=================  ==========================  =================================================
column             Arrow type                  content
=================  ==========================  =================================================
``seq_id``         int64                       the caller's sequence index (unique in the cache)
``input_ids``      list<uint16 | int32>        the S token ids (uint16 when V ≤ 65536)
``prompt_length``  int32                       tokens of prompt before a generated response
                                               (0 when the whole sequence is given text)
``k``              int32                       ``k_row``: target slots per position in this row
``targets``        binary                      encoding ``"packed"`` (the default): S fixed-size
                                               records of :func:`kdfast.encode_targets` —
                                               ids bit-packed at ``ceil(log2 V)`` bits,
                                               log-probs quantised to 1/2048 nat
                                               (``|error| ≤ 2^-12``), ``tail_logprob`` as f32,
                                               sampled weights as exact counts out of N
``target_ids``     list<int16 | int32>         encoding ``"raw"`` (exact): ``[S, k_row]``
                                               row-major, -1 in unused slots (int16 when
                                               V ≤ 32768)
``target_logprobs``  list<float32>             raw: ``[S, k_row]``, -inf in unused slots
``target_weights``   list<float32>             raw, sampled targets: ``[S, k_row]`` (count / N)
``tail_logprob``     list<float32>             raw, top-k with a tail: ``[S]``
=================  ==========================  =================================================

``k_row`` is the number of leading slots that any position of the sequence uses (unused slots
are trailing; at least 1): always ``k`` for top-k over a vocabulary with ≥ k finite logits, and
typically far fewer than ``num_samples`` for sampled targets (N = 50 draws give about a dozen
distinct ids), which is where most of the space of a sampled cache would otherwise go.

**Alignment.** ``targets[t]`` is the teacher's distribution at position ``t``, i.e. over the
token at position ``t + 1`` (the teacher's logits at ``t``); it is stored for every position,
the last one included. :func:`collate` builds ``labels[t] = input_ids[t + 1]`` with -100 at the
last position and in padding, so the student's logits at position ``t`` line up with
``targets[t]`` and ``labels[t]`` with no further shifting::

    batch = collate([cache[i] for i in idx])
    logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])

**Manifest** (JSON): ``format`` (``"kdfast-teacher-cache"``), ``format_version``, ``method``,
``k``, ``num_samples``, ``temperature``, ``vocab_size``, ``teacher_name``, ``encoding``,
``has_tail``, ``id_bits``, ``dtypes`` (column → Arrow type), ``rank`` / ``world_size``,
``config`` (what produced the targets; compared on resume), ``info`` (free-form),
``complete`` (the writer was closed), ``num_sequences``, ``num_tokens`` and ``shards``: for
each shard ``file``, ``rank``, ``index``, ``rows``, ``tokens``, ``bytes``, ``sha256``,
``min_seq_id``, ``max_seq_id``.

**Durability.** A shard is written to a hidden temporary file, fsync'ed and renamed into place
(``os.replace``); then the manifest is rewritten the same way. A shard not listed in the
manifest does not exist for readers. A writer killed at any point leaves a valid cache holding
every shard it completed; reopening it with the same parameters resumes (see
:class:`CacheWriter`).

**Hugging Face datasets.** Shards are Arrow IPC *stream* files, the format of ``datasets``' own
cache files, so ``datasets.Dataset.from_file(shard)`` memory-maps one and
``load_dataset("arrow", data_files=...)`` (or ``load_dataset(cache_dir)``) loads several;
:func:`decode_record` turns one of their rows back into :class:`~kdfast.SparseTargets`. (The
IPC *file* format, with its footer, is not readable by ``Dataset.from_file``; random access
does not need it: :class:`TeacherCache` reads each stream from ``pa.memory_map`` once, which is
zero-copy — every column is a view of the mapped file — and indexes rows through the offsets.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

try:
    import pyarrow as pa
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kdfast.cache needs pyarrow; install it with: pip install 'kdfast[capture]'"
    ) from exc

from . import _native
from .sparse import EncodedTargets, SparseTargets, decode_targets, encode_targets

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

FORMAT = "kdfast-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODINGS = ("packed", "raw")
METHODS = ("topk", "sample")
DEFAULT_SHARD_SIZE = 1024
DEFAULT_SHARD_BYTES = 256 << 20
MAX_SHARD_BYTES = (1 << 31) - (1 << 20)  # binary/list offsets are int32
IGNORE_INDEX = -100

# Parameters that must agree between a cache on disk and a writer that reopens it.
_IDENTITY = ("format", "format_version", "method", "k", "num_samples", "temperature",
             "vocab_size", "teacher_name", "encoding", "has_tail", "world_size", "config")


# ----------------------------------------------------------------------------- file helpers


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically: temp file, fsync, rename, fsync dir."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)


def _sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _shard_name(rank: int, world_size: int, index: int) -> str:
    if world_size == 1:
        return f"shard-{index:05d}.arrow"
    return f"shard-r{rank:03d}-{index:05d}.arrow"


def _rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


_RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d{3,})\.json$")


def _manifest_name(rank: int, world_size: int) -> str:
    return MANIFEST if world_size == 1 else _rank_manifest_name(rank)


def read_manifest(path: str, name: str = MANIFEST) -> dict:
    """The manifest ``name`` of the cache directory ``path`` (``ValueError`` if unreadable)."""
    file = os.path.join(os.fspath(path), name)
    try:
        with open(file, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not a valid kdfast cache manifest (invalid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a kdfast cache manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{file}: cache format version {version!r} is not supported by this kdfast "
            f"(supported: {FORMAT_VERSION})"
        )
    return manifest


def _id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(max(2, vocab_size))))


def _input_dtype(vocab_size: int):
    return (np.uint16, pa.uint16()) if vocab_size <= 1 << 16 else (np.int32, pa.int32())


def _raw_id_dtype(vocab_size: int):
    return (np.int16, pa.int16()) if vocab_size <= 1 << 15 else (np.int32, pa.int32())


def _schema_for(params: dict) -> "pa.Schema":
    _, in_type = _input_dtype(params["vocab_size"])
    fields = [
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(in_type), nullable=False),
        pa.field("prompt_length", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
    ]
    if params["encoding"] == "packed":
        fields.append(pa.field("targets", pa.binary(), nullable=False))
    else:
        _, id_type = _raw_id_dtype(params["vocab_size"])
        fields.append(pa.field("target_ids", pa.list_(id_type), nullable=False))
        fields.append(pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False))
        if params["method"] == "sample":
            fields.append(pa.field("target_weights", pa.list_(pa.float32()), nullable=False))
        if params["has_tail"]:
            fields.append(pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False))
    meta = {k: params[k] for k in ("format", "format_version", "method", "k", "num_samples",
                                   "temperature", "vocab_size", "encoding", "has_tail")}
    return pa.schema(fields, metadata={"kdfast": json.dumps(meta, sort_keys=True)})


def _dtypes(schema: "pa.Schema") -> Dict[str, str]:
    return {f.name: str(f.type) for f in schema}


def _row_bytes(params: dict, k_row: int) -> int:
    n_s = params["num_samples"] if params["method"] == "sample" else None
    return _native.encoded_row_bytes(k_row, params["vocab_size"], params["has_tail"], n_s)


def _lock(path: str):
    """An exclusive advisory lock on ``path`` (released when the process dies), or None."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RuntimeError(
                f"{path}: another CacheWriter holds this cache (one writer per cache and rank)"
            ) from None
        raise
    return fd


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)


# ----------------------------------------------------------------------------- shard reading


class _Shard:
    """A memory-mapped shard: zero-copy numpy views of its columns."""

    def __init__(self, file: str):
        self.file = file
        try:
            source = pa.memory_map(file, "r")
            table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise ValueError(f"{file}: unreadable cache shard ({exc})") from None
        if table.num_columns and any(c.num_chunks > 1 for c in table.columns):
            table = table.combine_chunks()  # not written by kdfast (one batch per shard); copies
        self.rows = table.num_rows
        self.cols: Dict[str, Any] = {}
        for name in table.column_names:
            col = table.column(name)
            arr = col.chunk(0) if col.num_chunks else pa.array([], type=col.type)
            if arr.null_count:
                raise ValueError(f"{file}: column {name!r} has null entries; not a kdfast cache shard")
            if pa.types.is_list(arr.type):
                self.cols[name] = (arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False))
            elif pa.types.is_binary(arr.type):
                bufs = arr.buffers()
                offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
                data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
                self.cols[name] = (offsets, data)
            else:
                self.cols[name] = arr.to_numpy(zero_copy_only=False)

    def list_slice(self, name: str, row: int) -> np.ndarray:
        offsets, values = self.cols[name]
        return values[offsets[row]:offsets[row + 1]]


def _record_to_item(params: dict, seq_id: int, input_ids: np.ndarray, prompt_length: int, k_row: int,
                    fields: Dict[str, Any], where: str) -> dict:
    """Build the ``__getitem__`` dict from one row's columns (numpy arrays / bytes)."""
    ids = torch.from_numpy(np.array(input_ids, dtype=np.int64))
    s = ids.shape[0]
    method, temperature = params["method"], float(params["temperature"])
    if params["encoding"] == "packed":
        rb = _row_bytes(params, k_row)
        raw = np.frombuffer(fields["targets"], dtype=np.uint8) if isinstance(fields["targets"], (bytes, bytearray)) \
            else np.asarray(fields["targets"], dtype=np.uint8)
        if raw.shape[0] != s * rb:
            raise ValueError(
                f"{where}: sequence {seq_id} has {raw.shape[0]} target bytes, expected {s} positions "
                f"× {rb} bytes (k={k_row}); the cache is corrupt"
            )
        data = torch.from_numpy(raw.copy()).reshape(s, rb)
        n_s = params["num_samples"] if method == "sample" else None
        targets = decode_targets(EncodedTargets(
            data=data, vocab_size=params["vocab_size"], k=k_row, method=method,
            temperature=temperature, has_tail=params["has_tail"], num_samples=n_s))
    else:
        def grid(name, shape, dtype):
            a = np.array(fields[name], dtype=dtype)
            if a.size != math.prod(shape):
                raise ValueError(f"{where}: sequence {seq_id}: column {name!r} has {a.size} values, "
                                 f"expected {math.prod(shape)}; the cache is corrupt")
            return torch.from_numpy(a).reshape(shape)

        targets = SparseTargets(
            indices=grid("target_ids", (s, k_row), np.int64),
            logprobs=grid("target_logprobs", (s, k_row), np.float32),
            weights=grid("target_weights", (s, k_row), np.float32) if method == "sample" else None,
            tail_logprob=grid("tail_logprob", (s,), np.float32) if params["has_tail"] else None,
            temperature=temperature, method=method,
        )
    return {"seq_id": int(seq_id), "input_ids": ids, "targets": targets, "prompt_length": int(prompt_length)}


def decode_record(record: Dict[str, Any], manifest: dict) -> dict:
    """One row of a shard as loaded by Hugging Face ``datasets`` (a dict of Python values) →
    the item :class:`TeacherCache` returns: ``seq_id``, ``input_ids`` (LongTensor [S]),
    ``targets`` (:class:`~kdfast.SparseTargets` [S, k_row]) and ``prompt_length``."""
    names = ("targets",) if manifest["encoding"] == "packed" else (
        "target_ids", "target_logprobs", "target_weights", "tail_logprob")
    fields = {n: record[n] for n in names if n in record}
    return _record_to_item(manifest, record["seq_id"], np.asarray(record["input_ids"]), record["prompt_length"],
                           record["k"], fields, "record")


# ----------------------------------------------------------------------------- writer


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
        encoding: ``"packed"`` (compact; log-probs within 2^-12, the rest exact) or ``"raw"``
            (exact float32 log-probs; ids int16/int32).
        has_tail: store ``tail_logprob`` (default: True for top-k, False for sampling).
        rank, world_size: for multi-process captures: each rank writes its own shards and
            ``manifest.rank{rank:03d}.json``; rank 0 calls :func:`merge_manifests` when all
            ranks are done.
        config: JSON-serialisable description of what produced the targets (data, model
            options...); part of the cache's identity, compared on resume.
        info: free-form JSON-serialisable metadata (not compared).
        overwrite: delete an existing cache of this rank at ``path`` instead of resuming.

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
                 shard_bytes: int = DEFAULT_SHARD_BYTES, encoding: str = "packed", has_tail: Optional[bool] = None,
                 rank: int = 0, world_size: int = 1, config: Optional[dict] = None, info: Optional[dict] = None,
                 overwrite: bool = False):
        if method not in METHODS:
            raise ValueError(f"method: expected 'topk' or 'sample', got {method!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding: expected 'packed' or 'raw', got {encoding!r}")
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        vocab_size = _positive(vocab_size, "vocab_size")
        if vocab_size > 1 << 31:
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
            if num_samples > 65535:
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
        self._schema = _schema_for(self._params)
        self._info = json.loads(json.dumps(info or {}, sort_keys=True))
        self._manifest_file = os.path.join(self.path, _manifest_name(rank, world_size))
        self._buffer: List[dict] = []
        self._buffer_bytes = 0
        self._closed = False
        self._done: set = set()
        self._shards: List[dict] = []
        self._num_tokens = 0
        self._lock_fd = None

        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = _lock(os.path.join(self.path, f".lock.rank{rank:03d}"))
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
            _unlock(self._lock_fd)
            self._lock_fd = None
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
        ids = _as_ids(input_ids)
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
        t = self._check_targets(targets, s)
        k_row = _used_slots(t.indices)
        t = _trim(t, k_row)
        row = {"seq_id": seq_id, "input_ids": ids.numpy().astype(_input_dtype(p["vocab_size"])[0]),
               "prompt_length": prompt_length, "k": k_row}
        if p["encoding"] == "packed":
            n_s = p["num_samples"] if p["method"] == "sample" else None
            enc = encode_targets(t, p["vocab_size"], num_samples=n_s)
            row["targets"] = enc.data.numpy().tobytes()
            size = len(row["targets"])
        else:
            row["target_ids"] = t.indices.reshape(-1).numpy().astype(_raw_id_dtype(p["vocab_size"])[0])
            row["target_logprobs"] = t.logprobs.reshape(-1).numpy().astype(np.float32)
            if p["method"] == "sample":
                row["target_weights"] = t.weights.reshape(-1).numpy().astype(np.float32)
            if p["has_tail"]:
                row["tail_logprob"] = t.tail_logprob.reshape(-1).numpy().astype(np.float32)
            size = sum(v.nbytes for k_, v in row.items() if isinstance(v, np.ndarray))
        self._buffer.append(row)
        self._buffer_bytes += size + row["input_ids"].nbytes
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
        table = self._build_table(rows)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self._schema) as w:
            w.write_table(table)
        buf = sink.getvalue()
        index = len(self._shards)
        name = _shard_name(self.rank, self.world_size, index)
        _atomic_write(os.path.join(self.path, name), memoryview(buf))
        seq_ids = [r["seq_id"] for r in rows]
        self._shards.append({
            "file": name, "rank": self.rank, "index": index, "rows": len(rows),
            "tokens": int(sum(r["input_ids"].shape[0] for r in rows)), "bytes": buf.size,
            "sha256": hashlib.sha256(memoryview(buf)).hexdigest(),
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
            _unlock(self._lock_fd)
            self._lock_fd = None

    def abort(self) -> None:
        """Flush what is buffered (complete sequences) and release the cache, not ``complete``."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            _unlock(self._lock_fd)
            self._lock_fd = None

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

    def _check_targets(self, targets, s: int) -> SparseTargets:
        p = self._params
        if not isinstance(targets, SparseTargets):
            raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
        if tuple(targets.shape) != (s,):
            raise ValueError(f"targets: expected leading shape ({s},) (one row per input token), "
                             f"got {tuple(targets.shape)}")
        if targets.method != p["method"]:
            raise ValueError(f"targets: this cache stores method={p['method']!r} targets, got {targets.method!r}")
        if not math.isclose(targets.temperature, p["temperature"], rel_tol=1e-9):
            raise ValueError(f"targets: this cache stores temperature {p['temperature']}, "
                             f"got targets at temperature {targets.temperature}")
        if targets.k > p["k"]:
            what = "k" if p["method"] == "topk" else "num_samples"
            raise ValueError(f"targets: at most {what}={p['k']} slots per position, got {targets.k}")
        if p["has_tail"] and targets.tail_logprob is None:
            raise ValueError("targets: this cache stores tail_logprob (has_tail=True); the targets have none")
        if not p["has_tail"] and targets.tail_logprob is not None:
            raise ValueError("targets: the targets carry tail_logprob but the cache was opened with has_tail=False")
        t = targets.to("cpu")
        ids = t.indices
        if ids.numel() and bool(((ids < -1) | (ids >= p["vocab_size"])).any()):
            bad = ids[(ids < -1) | (ids >= p["vocab_size"])][0].item()
            raise ValueError(f"targets.indices: expected ids in [0, {p['vocab_size']}) or -1, got {bad}")
        if bool(torch.isnan(t.logprobs).any()):
            raise ValueError("targets.logprobs: NaN entries")
        return t

    def _build_table(self, rows: List[dict]) -> "pa.Table":
        cols = {}
        for f in self._schema:
            name = f.name
            vals = [r[name] for r in rows]
            if pa.types.is_list(f.type):
                lengths = np.fromiter((v.shape[0] for v in vals), dtype=np.int64, count=len(vals))
                offsets = np.zeros(len(vals) + 1, dtype=np.int32)
                np.cumsum(lengths, out=offsets[1:])
                flat = np.concatenate(vals) if vals else np.zeros(0, f.type.value_type.to_pandas_dtype())
                cols[name] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                      pa.array(flat, type=f.type.value_type))
            else:
                cols[name] = pa.array(vals, type=f.type)
        return pa.Table.from_pydict(cols, schema=self._schema)

    def _manifest(self, complete: bool) -> dict:
        m = dict(self._params)
        m.update({
            "id_bits": _id_bits(self._params["vocab_size"]),
            "logprob_quantum": 1.0 / 2048 if self._params["encoding"] == "packed" else None,
            "dtypes": _dtypes(self._schema),
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
        _atomic_write(self._manifest_file, data)

    def _check_layout(self) -> None:
        """Refuse to mix single- and multi-rank caches in one directory."""
        ranks = [n for n in os.listdir(self.path) if _RANK_MANIFEST_RE.match(n)]
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
        _fsync_dir(self.path)

    def _resume(self) -> None:
        old = read_manifest(self.path, os.path.basename(self._manifest_file))
        diffs = []
        for key in _IDENTITY:
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
        shards = old.get("shards", [])
        for s in shards:
            file = os.path.join(self.path, s["file"])
            _check_size(file, s)
        self._shards = [dict(s) for s in shards]
        self._remove_own_files(keep_listed=True)
        for s in self._shards:
            shard = _Shard(os.path.join(self.path, s["file"]))
            if shard.rows != s["rows"]:
                raise ValueError(f"{s['file']}: manifest lists {s['rows']} rows, the shard has {shard.rows}")
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


def _as_ids(input_ids) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().to("cpu")
    else:
        ids = torch.as_tensor(np.asarray(input_ids))
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected integer token ids, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"input_ids: expected a 1-D sequence [S], got shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


def _used_slots(indices: torch.Tensor) -> int:
    """1 + the last slot any row uses (at least 1)."""
    used = (indices != -1).any(dim=0) if indices.shape[0] else torch.zeros(indices.shape[-1], dtype=torch.bool)
    nz = used.nonzero()
    return max(1, int(nz.max()) + 1) if nz.numel() else 1


def _trim(t: SparseTargets, k_row: int) -> SparseTargets:
    if k_row == t.k:
        return t
    cut = (lambda x: None if x is None else x[..., :k_row])
    return SparseTargets(indices=cut(t.indices), logprobs=cut(t.logprobs), weights=cut(t.weights),
                         tail_logprob=t.tail_logprob, temperature=t.temperature, method=t.method)


def _check_size(file: str, entry: dict) -> None:
    name = os.path.basename(file)
    if not os.path.exists(file):
        raise ValueError(f"{name}: shard listed in the manifest is missing from {os.path.dirname(file)}")
    size = os.path.getsize(file)
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "larger than recorded"
        raise ValueError(f"{name}: shard is {what}: the manifest records {entry['bytes']} bytes, "
                         f"the file has {size} (file {file})")


# ----------------------------------------------------------------------------- multi-rank


def merge_manifests(path, world_size: Optional[int] = None) -> dict:
    """Write ``manifest.json`` covering the ``manifest.rank*.json`` of every rank (atomic).

    Run once, by one process (rank 0 after a barrier), when every rank's writer is closed.
    Checks that all ranks ``0 .. world_size-1`` are present, complete and have the same
    parameters, and that no ``seq_id`` appears in two ranks. Returns the merged manifest.
    """
    path = os.fspath(path)
    found = {}
    for name in os.listdir(path):
        m = _RANK_MANIFEST_RE.match(name)
        if m:
            found[int(m.group(1))] = read_manifest(path, name)
    if not found:
        raise ValueError(f"{path}: no per-rank manifests (manifest.rank*.json) to merge")
    if world_size is None:
        world_size = next(iter(found.values()))["world_size"]
    missing = [r for r in range(world_size) if r not in found]
    if missing:
        raise ValueError(f"{path}: per-rank manifests missing for ranks {missing} of world_size {world_size}")
    first = found[0]
    for r in range(world_size):
        m = found[r]
        diffs = [k for k in _IDENTITY if m.get(k) != first.get(k)]
        if diffs:
            raise ValueError(f"{path}: rank {r} was written with different parameters ({', '.join(diffs)})")
        if not m.get("complete"):
            raise ValueError(f"{path}: rank {r} has not finished (its manifest is not complete)")
    extra = sorted(r for r in found if r >= world_size)
    if extra:
        raise ValueError(f"{path}: manifests of ranks {extra} do not belong to world_size {world_size}")
    merged = {k: v for k, v in first.items() if k not in ("shards", "rank", "num_sequences", "num_tokens", "complete")}
    shards = [s for r in range(world_size) for s in found[r]["shards"]]
    merged.update({
        "rank": None, "complete": True, "shards": shards,
        "num_sequences": int(sum(s["rows"] for s in shards)),
        "num_tokens": int(sum(s["tokens"] for s in shards)),
        "ranks": [{"rank": r, "num_sequences": found[r]["num_sequences"], "num_tokens": found[r]["num_tokens"],
                   "shards": len(found[r]["shards"])} for r in range(world_size)],
    })
    _atomic_write(os.path.join(path, MANIFEST), json.dumps(merged, indent=1, sort_keys=True).encode())
    return merged


# ----------------------------------------------------------------------------- reader


class TeacherCache(torch.utils.data.Dataset):
    """A cache opened for reading: a map-style ``torch.utils.data.Dataset`` of sequences.

    ``cache[i]`` is the sequence with the i-th smallest ``seq_id`` (for a single-process capture
    of n sequences: ``seq_id == i``), a dict with ``seq_id`` (int), ``input_ids`` (LongTensor
    [S]), ``targets`` (:class:`~kdfast.SparseTargets` [S, k_row] on CPU, see the module
    docstring for alignment) and ``prompt_length`` (int). Shards are memory-mapped; an item
    decodes only its own bytes.

    On open, every shard listed in ``manifest.json`` is checked: present, of the recorded size
    (else "truncated") and, with ``verify=True`` (the default), of the recorded sha256 (else
    "checksum mismatch"); each error names the shard file. A multi-rank cache whose ranks were
    never merged is refused with an explanation. Pickles without its memory maps (DataLoader
    workers reopen the shards lazily, without re-verifying).
    """

    def __init__(self, path, *, verify: bool = True):
        self.path = os.fspath(path)
        if not os.path.exists(os.path.join(self.path, MANIFEST)):
            ranks = sorted(n for n in os.listdir(self.path) if _RANK_MANIFEST_RE.match(n)) \
                if os.path.isdir(self.path) else []
            if ranks:
                raise ValueError(
                    f"{self.path}: multi-rank cache without a merged manifest.json (found "
                    f"{', '.join(ranks)}): the capture has not finished; resume it, or call "
                    f"kdfast.cache.merge_manifests({self.path!r}) once every rank is complete"
                )
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a kdfast teacher cache")
        self.manifest = read_manifest(self.path)
        files = [os.path.join(self.path, s["file"]) for s in self.manifest["shards"]]
        for file, entry in zip(files, self.manifest["shards"]):
            _check_size(file, entry)
            if verify:
                digest = _sha256_file(file)
                if digest != entry["sha256"]:
                    raise ValueError(
                        f"{entry['file']}: shard checksum mismatch (sha256 {digest}, manifest records "
                        f"{entry['sha256']}); the file is corrupt (file {file})"
                    )
        self._files = files
        self._shards: Optional[List[_Shard]] = None
        self._pid = None
        self._open()
        order = []
        for si, shard in enumerate(self._shards):
            entry = self.manifest["shards"][si]
            if shard.rows != entry["rows"]:
                raise ValueError(f"{entry['file']}: manifest lists {entry['rows']} rows, the shard has {shard.rows}")
            sid = shard.cols["seq_id"]
            order.append(np.stack([sid.astype(np.int64), np.full(shard.rows, si, np.int64),
                                   np.arange(shard.rows, dtype=np.int64)], 1))
        table = np.concatenate(order) if order else np.zeros((0, 3), np.int64)
        table = table[np.argsort(table[:, 0], kind="stable")]
        dup = np.nonzero(np.diff(table[:, 0]) == 0)[0]
        if dup.size:
            sid = int(table[dup[0], 0])
            where = sorted({self.manifest["shards"][int(s)]["file"] for s in table[table[:, 0] == sid, 1]})
            raise ValueError(f"{self.path}: sequence {sid} is stored more than once ({', '.join(where)})")
        self._index = table

    def _open(self) -> None:
        if self._shards is None or self._pid != os.getpid():
            self._shards = [_Shard(f) for f in self._files]
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
        names = ("targets",) if self.manifest["encoding"] == "packed" else (
            "target_ids", "target_logprobs", "target_weights", "tail_logprob")
        fields = {name: shard.list_slice(name, row) for name in names if name in cols}
        return _record_to_item(self.manifest, sid, shard.list_slice("input_ids", row),
                               int(cols["prompt_length"][row]), int(cols["k"][row]), fields,
                               self.manifest["shards"][si]["file"])

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


# ----------------------------------------------------------------------------- batching


class Collator:
    """Pads a list of :class:`TeacherCache` items into a training batch.

    Returns ``input_ids`` [B, S] (``pad_id`` in padding), ``attention_mask`` [B, S] (1 on
    tokens), ``labels`` [B, S] (``labels[t] = input_ids[t + 1]``; ``ignore_index`` at each
    sequence's last position and in padding), ``targets`` (:class:`~kdfast.SparseTargets`
    [B, S, K], K the widest item: id -1, log-prob -inf, weight 0 and tail log-prob 0 — all
    mass in the tail — in padded positions and slots), ``response_mask`` [B, S] (True where
    ``labels[t]`` is a response token, i.e. ``t + 1 ≥ prompt_length``; every labelled position
    for given text), ``prompt_length`` and ``seq_id`` [B].

    With ``response_only=True`` the labels are also ``ignore_index`` where the next token is
    part of the prompt, so losses train on generated responses only (sequence-level KD).
    The batch is ready for ``kdfast.sparse_kl(student_logits, batch["targets"],
    labels=batch["labels"])`` with no further shifting.
    """

    def __init__(self, pad_id: int = 0, *, response_only: bool = False, ignore_index: int = IGNORE_INDEX):
        self.pad_id = int(pad_id)
        self.response_only = bool(response_only)
        self.ignore_index = int(ignore_index)

    def __call__(self, batch: Sequence[dict]) -> dict:
        if not batch:
            raise ValueError("collate: empty batch")
        b = len(batch)
        lengths = [int(item["input_ids"].shape[0]) for item in batch]
        s = max(lengths)
        t0 = batch[0]["targets"]
        method, temperature = t0.method, t0.temperature
        k = max(item["targets"].k for item in batch)
        sampled = method == "sample"
        has_tail = t0.tail_logprob is not None
        input_ids = torch.full((b, s), self.pad_id, dtype=torch.int64)
        attention = torch.zeros((b, s), dtype=torch.int64)
        labels = torch.full((b, s), self.ignore_index, dtype=torch.int64)
        response = torch.zeros((b, s), dtype=torch.bool)
        ids = torch.full((b, s, k), -1, dtype=torch.int64)
        lps = torch.full((b, s, k), float("-inf"), dtype=torch.float32)
        weights = torch.zeros((b, s, k), dtype=torch.float32) if sampled else None
        tails = torch.zeros((b, s), dtype=torch.float32) if has_tail else None
        for r, item in enumerate(batch):
            n = lengths[r]
            t = item["targets"]
            if t.method != method or (t.tail_logprob is not None) != has_tail:
                raise ValueError("collate: items mix target methods or tail layouts")
            if not math.isclose(t.temperature, temperature, rel_tol=1e-9):
                raise ValueError("collate: items have targets at different temperatures")
            if tuple(t.shape) != (n,):
                raise ValueError(f"collate: item {r} has {n} tokens but targets of leading shape {tuple(t.shape)}")
            x = item["input_ids"]
            input_ids[r, :n] = x
            attention[r, :n] = 1
            if n > 1:
                labels[r, :n - 1] = x[1:]
                pl = int(item.get("prompt_length", 0))
                first = max(0, pl - 1)  # first position whose next token is a response token
                response[r, first:n - 1] = True
                if self.response_only:
                    labels[r, :first] = self.ignore_index
            kr = t.k
            ids[r, :n, :kr] = t.indices
            lps[r, :n, :kr] = t.logprobs
            if sampled:
                weights[r, :n, :kr] = t.weights
            if has_tail:
                tails[r, :n] = t.tail_logprob
        targets = SparseTargets(indices=ids, logprobs=lps, weights=weights, tail_logprob=tails,
                                temperature=temperature, method=method)
        return {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels, "targets": targets,
            "response_mask": response,
            "prompt_length": torch.tensor([int(item.get("prompt_length", 0)) for item in batch]),
            "seq_id": torch.tensor([int(item.get("seq_id", -1)) for item in batch]),
        }


def collate(batch: Sequence[dict], pad_id: int = 0, *, response_only: bool = False) -> dict:
    """``Collator(pad_id, response_only=response_only)(batch)``; see :class:`Collator`."""
    return Collator(pad_id, response_only=response_only)(batch)
