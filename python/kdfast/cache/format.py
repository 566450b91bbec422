"""The on-disk format of a teacher cache: file names, the Arrow schema, the manifest and its checks.

Everything a reader or a writer must agree on lives here, and only here.

**Files.** ``manifest.json`` and ``shard-{index:05d}.arrow``; multi-rank captures name their
shards ``shard-r{rank:03d}-{index:05d}.arrow`` and keep one ``manifest.rank{rank:03d}.json``
per rank until :func:`kdfast.cache.merge_manifests` writes ``manifest.json``. A shard is an
Arrow IPC *stream* file holding one record batch. Writers also keep lock files: ``.lock`` (the
directory) and ``.lock.rank{rank:03d}`` (one per rank; see :mod:`kdfast.cache.writer`).

**One row per sequence** (schema; ``k_row`` is the row's slot count, see below):

=================  ==========================  =================================================
column             Arrow type                  content
=================  ==========================  =================================================
``seq_id``         int64                       the caller's sequence index (unique in the cache)
``input_ids``      list<uint16 | int32>        the S token ids (uint16 when V ≤ 65536)
``prompt_length``  int32                       tokens of prompt before a generated response
                                               (0 when the whole sequence is given text)
``k``              int32                       ``k_row``: target slots per position in this row
``targets``        binary                      encoding ``"compact"`` (the default, format 2):
                                               one variable-length record of the S positions
                                               (kdfast-core's ``compact.rs``):
                                               per-sequence Rice codes; sampled targets as the
                                               distinct ids (gaps) and exact counts plus
                                               ``Σ w log p`` within 2^-17 nat (decoded as that
                                               value in every used slot, so the loss is exact);
                                               top-k log-probs in rank order within 2^-8 nat
                                               (steps of 1/128 nat), ids at ``ceil(log2 V)``
                                               bits, the tail within 2^-8 nat.
                                               Encoding ``"packed"``: S fixed-size
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

**Versions.** Format 2 added the ``"compact"`` encoding and binds ``teacher_name`` and
``world_size`` into the shards too; version-1 caches (``"packed"`` / ``"raw"``) still open.

``k_row`` is the number of leading slots that any position of the sequence uses (unused slots
are trailing; at least 1): always ``k`` for top-k over a vocabulary with ≥ k finite logits, and
typically far fewer than ``num_samples`` for sampled targets (N = 50 draws give about a dozen
distinct ids), which is where most of the space of a sampled cache would otherwise go.

**Manifest** (JSON): ``format`` (``"kdfast-teacher-cache"``), ``format_version``, ``method``,
``k``, ``num_samples``, ``temperature``, ``vocab_size``, ``teacher_name``, ``encoding``,
``has_tail``, ``id_bits``, ``logprob_quantum``, ``dtypes`` (column → Arrow type), ``rank`` (null
once merged) / ``world_size``,
``config`` (what produced the targets; compared on resume), ``info`` (free-form),
``complete`` (the writer was closed), ``num_sequences``, ``num_tokens`` and ``shards``: for
each shard ``file``, ``rank``, ``index``, ``rows``, ``tokens``, ``bytes``, ``sha256``,
``min_seq_id``, ``max_seq_id``.

The decoding parameters (:data:`SCHEMA_PARAMS`: ``format``, ``format_version``, ``method``,
``k``, ``num_samples``, ``temperature``, ``vocab_size``, ``encoding``, ``has_tail``; from
version 2 also ``teacher_name`` and ``world_size``, :func:`bound_params`) are also written into
every shard's Arrow schema metadata (key ``"kdfast"``, JSON; :func:`schema_for`). The other
fields are not: ``rank`` is checked through the shard names, ``config`` and ``info`` only
describe the capture (``config`` is compared when a writer resumes), ``id_bits`` and ``dtypes``
are informative.

**What is checked, and what is guaranteed.** :func:`read_manifest` is the one door through
which a manifest comes in: it must be a regular file (no symbolic link) holding a JSON object
with every field above, each of its type and range (else a ``ValueError`` naming
``manifest.json`` and the field, never a bare ``KeyError``/``TypeError``); a shard ``file`` must
be a bare shard name (no directory part, so nothing outside the cache directory can be named)
equal to the name of its entry's ``rank`` and ``index``, the indices of each rank must run
0, 1, 2, ... in order, and ``num_sequences`` / ``num_tokens`` must be the sums of the entries'
``rows`` / ``tokens``. On open each shard is then checked against its entry
(:class:`kdfast.cache.shard.Shard`): size and sha256, the columns and types of the schema, the
decoding parameters of its schema metadata equal to the manifest's (exact JSON equality), and
``rows`` / ``tokens`` / ``min_seq_id`` / ``max_seq_id`` equal to what the shard holds; the
reader refuses a ``seq_id`` stored twice and, in a complete cache, a shard file the manifest
does not list. So an edit of the manifest that changes what is read (a parameter, a count, a
dropped or renamed shard entry) is refused with an error naming the file and the field.

The sha256 in the manifest detects corruption of a shard, not a malicious writer: someone with
write access to the directory can rewrite a shard *and* the manifest consistently (or delete the
last shard together with its entry), and kdfast cannot tell. What kdfast guarantees is that an
inconsistent cache is refused, and that nothing outside the cache directory is ever read.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict

import numpy as np
import pyarrow as pa

from .durable import read_regular_file

FORMAT = "kdfast-teacher-cache"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # version 1 has no "compact" encoding
MANIFEST = "manifest.json"
ENCODINGS = ("compact", "packed", "raw")
METHODS = ("topk", "sample")
# The unit of a stored log-prob (sampled compact records: of the cross term Σ w log p).
LOGPROB_QUANTUM = {("compact", "topk"): 2.0 ** -7, ("compact", "sample"): 2.0 ** -16,
                   ("packed", "topk"): 2.0 ** -11, ("packed", "sample"): 2.0 ** -11,
                   ("raw", "topk"): None, ("raw", "sample"): None}
DEFAULT_SHARD_SIZE = 1024
DEFAULT_SHARD_BYTES = 256 << 20
MAX_SHARD_BYTES = (1 << 31) - (1 << 20)  # binary/list offsets are int32
MAX_VOCAB_SIZE = 1 << 31
MAX_NUM_SAMPLES = 65535  # stored counts are 16-bit
IGNORE_INDEX = -100

# The parameters that decide how a shard is decoded: written into every shard's schema metadata
# (key "kdfast") and compared with the manifest's on open.
SCHEMA_PARAMS = ("format", "format_version", "method", "k", "num_samples", "temperature", "vocab_size",
                 "encoding", "has_tail")
# Version 2 also binds the teacher and the number of writing ranks into every shard.
SCHEMA_PARAMS_V2 = SCHEMA_PARAMS + ("teacher_name", "world_size")


def bound_params(version: int) -> tuple:
    """The manifest fields a shard of format ``version`` records in its schema metadata."""
    return SCHEMA_PARAMS if version == 1 else SCHEMA_PARAMS_V2

SCHEMA_METADATA_KEY = b"kdfast"

# Parameters that must agree between a cache on disk and a writer that reopens it (or between
# the ranks of one capture).
IDENTITY = ("format", "format_version", "method", "k", "num_samples", "temperature",
            "vocab_size", "teacher_name", "encoding", "has_tail", "world_size", "config")

SHARD_NAME_RE = re.compile(r"^shard-(?:r\d{3,}-)?\d{5,}\.arrow$")
RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d{3,})\.json$")
LOCK_FILE_RE = re.compile(r"^\.lock(?:\.rank(\d+))?$")  # the directory lock and the rank locks
# Every file a cache directory may hold: manifests, shards, writer locks, temporary files.
CACHE_FILE_RE = re.compile(r"^(manifest(\.rank\d+)?\.json|shard-(r\d+-)?\d+\.arrow|\.lock(\.rank\d+)?|\..*\.tmp-\d+)$")
DIR_LOCK = ".lock"  # held while a writer takes its rank's lock, and while a cache is cleared


# ----------------------------------------------------------------------------- names


def shard_name(rank: int, world_size: int, index: int) -> str:
    if world_size == 1:
        return f"shard-{index:05d}.arrow"
    return f"shard-r{rank:03d}-{index:05d}.arrow"


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def manifest_name(rank: int, world_size: int) -> str:
    """The manifest a writer of ``rank`` keeps: ``manifest.json`` alone, else its rank's."""
    return MANIFEST if world_size == 1 else rank_manifest_name(rank)


def lock_name(rank: int) -> str:
    return f".lock.rank{rank:03d}"


def rank_manifests(path: str) -> Dict[int, str]:
    """``{rank: file name}`` of the per-rank manifests in the directory ``path``."""
    found = {}
    for name in os.listdir(path):
        m = RANK_MANIFEST_RE.match(name)
        if m:
            found[int(m.group(1))] = name
    return found


# ----------------------------------------------------------------------------- schema


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(max(2, vocab_size))))


def input_dtype(vocab_size: int):
    """(numpy, Arrow) element type of ``input_ids``."""
    return (np.uint16, pa.uint16()) if vocab_size <= 1 << 16 else (np.int32, pa.int32())


def raw_id_dtype(vocab_size: int):
    """(numpy, Arrow) element type of ``target_ids`` (raw encoding)."""
    return (np.int16, pa.int16()) if vocab_size <= 1 << 15 else (np.int32, pa.int32())


def schema_for(params: dict) -> pa.Schema:
    """The Arrow schema of the shards of a cache with these parameters (manifest fields)."""
    _, in_type = input_dtype(params["vocab_size"])
    fields = [
        pa.field("seq_id", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(in_type), nullable=False),
        pa.field("prompt_length", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
    ]
    if params["encoding"] in ("compact", "packed"):
        fields.append(pa.field("targets", pa.binary(), nullable=False))
    else:
        _, id_type = raw_id_dtype(params["vocab_size"])
        fields.append(pa.field("target_ids", pa.list_(id_type), nullable=False))
        fields.append(pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False))
        if params["method"] == "sample":
            fields.append(pa.field("target_weights", pa.list_(pa.float32()), nullable=False))
        if params["has_tail"]:
            fields.append(pa.field("tail_logprob", pa.list_(pa.float32()), nullable=False))
    meta = {k: params[k] for k in bound_params(params["format_version"])}
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: json.dumps(meta, sort_keys=True)})


def schema_params(schema: pa.Schema):
    """The decoding parameters recorded in a shard's schema metadata (a dict), or None."""
    raw = (schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    try:
        meta = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def dtypes(schema: pa.Schema) -> Dict[str, str]:
    """The manifest's ``dtypes``: column name → Arrow type."""
    return {f.name: str(f.type) for f in schema}


def target_columns(encoding: str) -> tuple:
    """The columns that hold a row's targets under ``encoding`` (those present are used)."""
    if encoding in ("compact", "packed"):
        return ("targets",)
    return ("target_ids", "target_logprobs", "target_weights", "tail_logprob")


# ----------------------------------------------------------------------------- manifest


def read_manifest(path: str, name: str = MANIFEST) -> dict:
    """The manifest ``name`` of the cache directory ``path`` (``ValueError`` if unreadable).

    The file must be a regular file (not a symbolic link); its content is checked as the module
    docstring says, so that what it names stays inside ``path`` and agrees with itself.
    """
    file = os.path.join(os.fspath(path), name)
    data = read_regular_file(file, "cache manifest")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a valid kdfast cache manifest (invalid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a kdfast cache manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not (_is_int(version) and version in SUPPORTED_VERSIONS):
        raise ValueError(
            f"{file}: cache format version (format_version) {version!r} is not supported by this "
            f"kdfast (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    if version == 1 and manifest.get("encoding") == "compact":
        raise ValueError(f"{file}: invalid kdfast cache manifest: encoding 'compact' needs format version 2")
    check_manifest(manifest, file)
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Every field of a manifest (a merged one also has "ranks"): the check of its value, and what it
# must be. The fields that depend on others (num_samples, has_tail, rank) are checked below.
_FIELDS = {
    "format": (lambda v: v == FORMAT, f"{FORMAT!r}"),
    "format_version": (lambda v: _is_int(v) and v in SUPPORTED_VERSIONS, f"one of {SUPPORTED_VERSIONS}"),
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "encoding": (lambda v: v in ENCODINGS, f"one of {', '.join(ENCODINGS)}"),
    "vocab_size": (lambda v: _is_int(v) and 1 <= v <= MAX_VOCAB_SIZE, f"an integer in [1, {MAX_VOCAB_SIZE}]"),
    "k": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "num_samples": (lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_NUM_SAMPLES),
                    f"null (top-k) or an integer in [1, {MAX_NUM_SAMPLES}] equal to k (sampling)"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "has_tail": (lambda v: isinstance(v, bool), "a boolean (false for sampled targets)"),
    "teacher_name": (lambda v: isinstance(v, str), "a string"),
    "id_bits": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1 (informative: ceil(log2(vocab_size)))"),
    "logprob_quantum": (lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0"),
    "dtypes": (lambda v: isinstance(v, dict) and all(isinstance(t, str) for t in v.values()),
               "an object of column name → Arrow type"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "rank": (lambda v: v is None or _is_int(v), "null (merged) or an integer in [0, world_size)"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "info": (lambda v: isinstance(v, dict), "an object"),
    "complete": (lambda v: isinstance(v, bool), "a boolean"),
    "num_sequences": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0 (the sum of the shards' rows)"),
    "num_tokens": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0 (the sum of the shards' tokens)"),
    "shards": (lambda v: isinstance(v, list), "a list of shard entries"),
}
_ENTRY_FIELDS = ("rank", "index", "rows", "tokens", "bytes", "min_seq_id", "max_seq_id")


def check_manifest(manifest: dict, where: str) -> None:
    """``ValueError`` naming ``where`` and the field unless every field is present, of its type
    and range, and the fields agree with each other (counts = sums, names = rank and index)."""
    def bad(key: str, what: str):
        return ValueError(f"{where}: invalid kdfast cache manifest: {key} {what}")

    for key, (ok, want) in _FIELDS.items():
        if key not in manifest:
            raise bad(key, f"is missing (expected {want})")
        if not ok(manifest[key]):
            raise bad(key, f"{manifest[key]!r} is not {want}")
    m = manifest
    sample = m["method"] == "sample"
    if (m["num_samples"] != m["k"]) if sample else (m["num_samples"] is not None):
        raise bad("num_samples", f"{m['num_samples']!r} is not {_FIELDS['num_samples'][1]}")
    if sample and m["has_tail"]:
        raise bad("has_tail", "is true; sampled targets have no tail_logprob")
    if m["rank"] is not None and not 0 <= m["rank"] < m["world_size"]:
        raise bad("rank", f"{m['rank']!r} is not in [0, world_size = {m['world_size']})")
    if "ranks" in m and not isinstance(m["ranks"], list):
        raise bad("ranks", f"{m['ranks']!r} is not a list")
    next_index: Dict[int, int] = {}
    for n, entry in enumerate(m["shards"]):
        at = f"{where}: shard entry {n}"
        check_shard_entry(entry, at)
        rank, index = entry["rank"], entry["index"]
        expected = shard_name(rank, m["world_size"], index) if rank < m["world_size"] else None
        if entry["file"] != expected or (m["rank"] is not None and rank != m["rank"]):
            raise ValueError(f"{at} ({entry['file']}): file, rank {rank} and index {index} do not agree "
                             f"with each other and with the manifest's rank {m['rank']!r} / world_size "
                             f"{m['world_size']} (expected the file {expected!r})")
        if index != next_index.get(rank, 0):
            raise ValueError(f"{at} ({entry['file']}): index {index} out of order: the shards of rank "
                             f"{rank} are listed 0, 1, 2, ... (expected index {next_index.get(rank, 0)})")
        next_index[rank] = index + 1
    for key, field in (("num_sequences", "rows"), ("num_tokens", "tokens")):
        total = sum(entry[field] for entry in m["shards"])
        if m[key] != total:
            raise bad(key, f"{m[key]} is not the sum of the shards' {field} ({total})")


def check_shard_entry(entry, where: str) -> None:
    """``ValueError`` unless ``entry`` names a shard file in the cache directory itself and
    records non-negative integer counts and a sha256 digest."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object in shards, got {type(entry).__name__}")
    file = entry.get("file")
    if not isinstance(file, str) or not SHARD_NAME_RE.match(file):
        raise ValueError(
            f"{where}: file {file!r} is not a shard name of this cache (shard-NNNNN.arrow or "
            f"shard-rNNN-NNNNN.arrow, no directory part)"
        )
    for key in _ENTRY_FIELDS:
        least = 1 if key == "rows" else 0
        if not (_is_int(entry.get(key)) and entry[key] >= least):
            what = "is missing, expected" if key not in entry else f"{entry[key]!r} is not"
            raise ValueError(f"{where} ({file}): {key} {what} an integer ≥ {least}")
    if entry["min_seq_id"] > entry["max_seq_id"]:
        raise ValueError(f"{where} ({file}): min_seq_id {entry['min_seq_id']} > max_seq_id {entry['max_seq_id']}")
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{where} ({file}): sha256 {digest!r} is not a hex SHA-256 digest")
