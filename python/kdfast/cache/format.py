"""The on-disk format of a teacher cache: file names, the Arrow schema, the manifest and its checks.

Everything a reader or a writer must agree on lives here, and only here.

**Files.** ``manifest.json`` and ``shard-{index:05d}.arrow``; multi-rank captures name their
shards ``shard-r{rank:03d}-{index:05d}.arrow`` and keep one ``manifest.rank{rank:03d}.json``
per rank until :func:`kdfast.cache.merge_manifests` writes ``manifest.json``. A shard is an
Arrow IPC *stream* file holding one record batch.

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

**Manifest** (JSON): ``format`` (``"kdfast-teacher-cache"``), ``format_version``, ``method``,
``k``, ``num_samples``, ``temperature``, ``vocab_size``, ``teacher_name``, ``encoding``,
``has_tail``, ``id_bits``, ``dtypes`` (column → Arrow type), ``rank`` / ``world_size``,
``config`` (what produced the targets; compared on resume), ``info`` (free-form),
``complete`` (the writer was closed), ``num_sequences``, ``num_tokens`` and ``shards``: for
each shard ``file``, ``rank``, ``index``, ``rows``, ``tokens``, ``bytes``, ``sha256``,
``min_seq_id``, ``max_seq_id``.

:func:`read_manifest` is the one door through which a manifest comes in: besides the format
and its version it checks every field that later decides what is read — a shard ``file`` must
be a bare shard name (no directory part, so nothing outside the cache directory can be named),
sizes and counts non-negative integers, the parameters of the expected types and ranges.
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

# Parameters that must agree between a cache on disk and a writer that reopens it (or between
# the ranks of one capture).
IDENTITY = ("format", "format_version", "method", "k", "num_samples", "temperature",
            "vocab_size", "teacher_name", "encoding", "has_tail", "world_size", "config")

SHARD_NAME_RE = re.compile(r"^shard-(?:r\d{3,}-)?\d{5,}\.arrow$")
RANK_MANIFEST_RE = re.compile(r"^manifest\.rank(\d{3,})\.json$")
# Every file a cache directory may hold: manifests, shards, writer locks, temporary files.
CACHE_FILE_RE = re.compile(r"^(manifest(\.rank\d+)?\.json|shard-(r\d+-)?\d+\.arrow|\.lock\.rank\d+|\..*\.tmp-\d+)$")


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
    meta = {k: params[k] for k in ("format", "format_version", "method", "k", "num_samples",
                                   "temperature", "vocab_size", "encoding", "has_tail")}
    return pa.schema(fields, metadata={"kdfast": json.dumps(meta, sort_keys=True)})


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
    docstring says, so that what it names stays inside ``path``.
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
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{file}: cache format version {version!r} is not supported by this kdfast "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))}); a newer kdfast wrote it"
        )
    if version == 1 and manifest.get("encoding") == "compact":
        raise ValueError(f"{file}: invalid kdfast cache manifest: encoding 'compact' needs format version 2")
    check_manifest(manifest, file)
    return manifest


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: dict, where: str) -> None:
    """``ValueError`` unless the fields that decide what is read are of their types and ranges."""
    def bad(what: str):
        return ValueError(f"{where}: invalid kdfast cache manifest: {what}")

    method, encoding = manifest.get("method"), manifest.get("encoding")
    if method not in METHODS:
        raise bad(f"method {method!r} is not one of {', '.join(METHODS)}")
    if encoding not in ENCODINGS:
        raise bad(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    vocab = manifest.get("vocab_size")
    if not (_is_int(vocab) and 1 <= vocab <= MAX_VOCAB_SIZE):
        raise bad(f"vocab_size {vocab!r} is not an integer in [1, {MAX_VOCAB_SIZE}]")
    k = manifest.get("k")
    if not (_is_int(k) and k >= 1):
        raise bad(f"k {k!r} is not an integer ≥ 1")
    n_s = manifest.get("num_samples")
    if method == "sample" and not (_is_int(n_s) and 1 <= n_s <= MAX_NUM_SAMPLES and n_s == k):
        raise bad(f"num_samples {n_s!r} is not an integer in [1, {MAX_NUM_SAMPLES}] equal to k")
    temperature = manifest.get("temperature")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise bad(f"temperature {temperature!r} is not a finite number > 0")
    if not isinstance(manifest.get("has_tail"), bool) or (method == "sample" and manifest["has_tail"]):
        raise bad(f"has_tail {manifest.get('has_tail')!r} is not a boolean (False for sampled targets)")
    for key in ("num_sequences", "num_tokens"):
        if not (_is_int(manifest.get(key)) and manifest[key] >= 0):
            raise bad(f"{key} {manifest.get(key)!r} is not an integer ≥ 0")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("shards is not a list")
    for n, entry in enumerate(shards):
        check_shard_entry(entry, f"{where}: shard entry {n}")


def check_shard_entry(entry, where: str) -> None:
    """``ValueError`` unless ``entry`` names a shard file in the cache directory itself and
    records non-negative integer counts and a sha256 digest."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
    file = entry.get("file")
    if not isinstance(file, str) or not SHARD_NAME_RE.match(file):
        raise ValueError(
            f"{where}: file {file!r} is not a shard name of this cache (shard-NNNNN.arrow or "
            f"shard-rNNN-NNNNN.arrow, no directory part)"
        )
    for key in ("rows", "tokens", "bytes"):
        if not (_is_int(entry.get(key)) and entry[key] >= 0):
            raise ValueError(f"{where} ({file}): {key} {entry.get(key)!r} is not an integer ≥ 0")
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{where} ({file}): sha256 {digest!r} is not a hex SHA-256 digest")
