"""One sequence ↔ one shard row: the codec between ``(input_ids, SparseTargets)`` and the columns.

:func:`encode_row` checks what :meth:`kdfast.cache.CacheWriter.append` was given and builds the
row (one variable-length compact record, fixed-size packed records of
:func:`kdfast.encode_targets`, or raw arrays); :func:`build_table` turns
buffered rows into the Arrow table of one shard. :func:`decode_row` is the inverse, used by the
reader and by :func:`kdfast.cache.decode_record`; it checks every length and range against the
manifest before decoding, so a corrupt row is a ``ValueError`` naming the sequence.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch

from .. import _native
from ..targets import EncodedTargets, SparseTargets, decode_targets, encode_targets
from .format import input_dtype, raw_id_dtype


def _num_samples(params: dict) -> Optional[int]:
    return params["num_samples"] if params["method"] == "sample" else None


def codec(params: dict):
    """The compact record codec of a cache with these parameters (kdfast-core ``compact.rs``)."""
    return _native.compact_codec(params["method"], params["vocab_size"], params["has_tail"], _num_samples(params))


def row_bytes(params: dict, k_row: int) -> int:
    """Bytes of one position's packed record with ``k_row`` slots."""
    return _native.encoded_row_bytes(k_row, params["vocab_size"], params["has_tail"], _num_samples(params))


# ----------------------------------------------------------------------------- encoding


def as_ids(input_ids) -> torch.Tensor:
    """``input_ids`` as a 1-D int64 CPU tensor (``TypeError`` / ``ValueError`` otherwise)."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().to("cpu")
    else:
        ids = torch.as_tensor(np.asarray(input_ids))
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected integer token ids, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"input_ids: expected a 1-D sequence [S], got shape {tuple(ids.shape)}")
    return ids.to(torch.int64)


def check_targets(params: dict, targets, s: int) -> SparseTargets:
    """``targets`` on the CPU if they fit a cache with ``params`` and a sequence of ``s`` tokens."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets: expected kdfast.SparseTargets, got {type(targets).__name__}")
    if tuple(targets.shape) != (s,):
        raise ValueError(f"targets: expected leading shape ({s},) (one row per input token), "
                         f"got {tuple(targets.shape)}")
    if targets.method != params["method"]:
        raise ValueError(f"targets: this cache stores method={params['method']!r} targets, got {targets.method!r}")
    if not math.isclose(targets.temperature, params["temperature"], rel_tol=1e-9):
        raise ValueError(f"targets: this cache stores temperature {params['temperature']}, "
                         f"got targets at temperature {targets.temperature}")
    if targets.k > params["k"]:
        what = "k" if params["method"] == "topk" else "num_samples"
        raise ValueError(f"targets: at most {what}={params['k']} slots per position, got {targets.k}")
    if params["has_tail"] and targets.tail_logprob is None:
        raise ValueError("targets: this cache stores tail_logprob (has_tail=True); the targets have none")
    if not params["has_tail"] and targets.tail_logprob is not None:
        raise ValueError("targets: the targets carry tail_logprob but the cache was opened with has_tail=False")
    t = targets.to("cpu")
    ids = t.indices
    if ids.numel() and bool(((ids < -1) | (ids >= params["vocab_size"])).any()):
        bad = ids[(ids < -1) | (ids >= params["vocab_size"])][0].item()
        raise ValueError(f"targets.indices: expected ids in [0, {params['vocab_size']}) or -1, got {bad}")
    if bool(torch.isnan(t.logprobs).any()):
        raise ValueError("targets.logprobs: NaN entries")
    return t


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


def encode_row(params: dict, seq_id: int, ids: torch.Tensor, targets: SparseTargets,
               prompt_length: int) -> tuple:
    """``(row, bytes)``: the columns of one sequence (checked ``ids`` and ``targets``) and the
    bytes they take in a shard."""
    row = {"seq_id": seq_id, "input_ids": ids.numpy().astype(input_dtype(params["vocab_size"])[0]),
           "prompt_length": prompt_length}
    if params["encoding"] == "compact":
        f32 = (lambda x: None if x is None else x.to(torch.float32).contiguous())
        row["targets"], row["k"] = _native.compact_encode(
            codec(params), targets.indices.contiguous(), f32(targets.logprobs), f32(targets.weights),
            f32(targets.tail_logprob))
        return row, len(row["targets"]) + row["input_ids"].nbytes
    row["k"] = k_row = _used_slots(targets.indices)
    t = _trim(targets, k_row)
    if params["encoding"] == "packed":
        enc = encode_targets(t, params["vocab_size"], num_samples=_num_samples(params))
        row["targets"] = enc.data.numpy().tobytes()
        size = len(row["targets"])
    else:
        row["target_ids"] = t.indices.reshape(-1).numpy().astype(raw_id_dtype(params["vocab_size"])[0])
        row["target_logprobs"] = t.logprobs.reshape(-1).numpy().astype(np.float32)
        if params["method"] == "sample":
            row["target_weights"] = t.weights.reshape(-1).numpy().astype(np.float32)
        if params["has_tail"]:
            row["tail_logprob"] = t.tail_logprob.reshape(-1).numpy().astype(np.float32)
        size = sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
    return row, size + row["input_ids"].nbytes


def build_table(schema: pa.Schema, rows: List[dict]) -> pa.Table:
    """The Arrow table of one shard holding ``rows`` (from :func:`encode_row`)."""
    cols = {}
    for f in schema:
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
    return pa.Table.from_pydict(cols, schema=schema)


# ----------------------------------------------------------------------------- decoding


def check_row(params: dict, seq_id: int, input_ids: np.ndarray, prompt_length: int, k_row: int, where: str) -> None:
    """``ValueError`` unless a row's token ids, slot count and prompt length are in range."""
    s = len(input_ids)
    if s and (int(input_ids.min()) < 0 or int(input_ids.max()) >= params["vocab_size"]):
        raise ValueError(f"{where}: sequence {seq_id} has token ids outside [0, {params['vocab_size']}); "
                         f"the cache is corrupt")
    if not 1 <= k_row <= params["k"]:
        raise ValueError(f"{where}: sequence {seq_id} has k={k_row} slots, expected 1..{params['k']}; "
                         f"the cache is corrupt")
    if not 0 <= prompt_length <= s:
        raise ValueError(f"{where}: sequence {seq_id} has prompt_length {prompt_length} outside [0, {s}]; "
                         f"the cache is corrupt")


def decode_many(params: dict, rows: List[dict], width_rows: int, width: int, ids, lps, weights, tails) -> None:
    """Decode the compact records of ``rows`` (dicts with ``seq_id``, ``input_ids``,
    ``prompt_length``, ``k``, ``record``, ``where``) into padded batch tensors ``[B, S, K]`` (``S
    = width_rows``, ``K = width``; tails ``[B, S]``) in one call, every slot written."""
    for r in rows:
        check_row(params, r["seq_id"], r["input_ids"], r["prompt_length"], r["k"], r["where"])
    records = [np.asarray(r["record"], dtype=np.uint8) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in records], out=offsets[1:])
    data = _byte_tensor(np.concatenate(records) if records else np.zeros(0, np.uint8))
    flat = (lambda x: None if x is None else x.view(-1, width))
    counts = torch.tensor([[len(r["input_ids"]), r["k"]] for r in rows], dtype=torch.int64)
    try:
        codec(params).decode_many(data, torch.from_numpy(offsets), counts[:, 0].contiguous(),
                                  counts[:, 1].contiguous(), width_rows, width,
                                  (flat(ids), flat(lps), flat(weights), None if tails is None else tails.view(-1)))
    except ValueError:
        for r in rows:  # the damaged record, named as item by item
            _decode_compact(params, r["record"], len(r["input_ids"]), r["k"], params["method"],
                            float(params["temperature"]), f"{r['where']}: sequence {r['seq_id']}")
        raise


def decode_row(params: dict, seq_id: int, input_ids: np.ndarray, prompt_length: int, k_row: int,
               fields: Dict[str, Any], where: str) -> dict:
    """The item of one row (``seq_id``, ``input_ids``, ``targets``, ``prompt_length``) from its
    columns (numpy arrays / bytes) and the manifest ``params``."""
    ids = torch.from_numpy(np.array(input_ids, dtype=np.int64))
    s = ids.shape[0]
    method, temperature = params["method"], float(params["temperature"])
    check_row(params, seq_id, input_ids, prompt_length, k_row, where)
    if params["encoding"] == "compact":
        targets = _decode_compact(params, fields["targets"], s, k_row, method, temperature, f"{where}: sequence {seq_id}")
    elif params["encoding"] == "packed":
        rb = row_bytes(params, k_row)
        raw = np.frombuffer(fields["targets"], dtype=np.uint8) if isinstance(fields["targets"], (bytes, bytearray)) \
            else np.asarray(fields["targets"], dtype=np.uint8)
        if raw.shape[0] != s * rb:
            raise ValueError(
                f"{where}: sequence {seq_id} has {raw.shape[0]} target bytes, expected {s} positions "
                f"× {rb} bytes (k={k_row}); the cache is corrupt"
            )
        data = torch.from_numpy(raw.copy()).reshape(s, rb)
        targets = decode_targets(EncodedTargets(
            data=data, vocab_size=params["vocab_size"], k=k_row, method=method,
            temperature=temperature, has_tail=params["has_tail"], num_samples=_num_samples(params)))
    else:
        def grid(name, shape, dtype):
            a = np.array(fields[name], dtype=dtype)
            if a.size != math.prod(shape):
                raise ValueError(f"{where}: sequence {seq_id}: column {name!r} has {a.size} values, "
                                 f"expected {math.prod(shape)}; the cache is corrupt")
            return torch.from_numpy(a).reshape(shape)

        indices = grid("target_ids", (s, k_row), np.int64)
        if indices.numel() and bool(((indices < -1) | (indices >= params["vocab_size"])).any()):
            raise ValueError(f"{where}: sequence {seq_id} has target ids outside [0, {params['vocab_size']}) "
                             f"and -1; the cache is corrupt")
        targets = SparseTargets(
            indices=indices,
            logprobs=grid("target_logprobs", (s, k_row), np.float32),
            weights=grid("target_weights", (s, k_row), np.float32) if method == "sample" else None,
            tail_logprob=grid("tail_logprob", (s,), np.float32) if params["has_tail"] else None,
            temperature=temperature, method=method,
        )
    return {"seq_id": int(seq_id), "input_ids": ids, "targets": targets, "prompt_length": int(prompt_length)}


def _byte_tensor(record) -> torch.Tensor:
    """``record`` (bytes of a mapped shard, read-only) as a uint8 tensor, without a copy: it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(record, dtype=np.uint8))


def _decode_compact(params: dict, record, s: int, k_row: int, method: str, temperature: float,
                    where: str) -> SparseTargets:
    data = _byte_tensor(np.frombuffer(record, dtype=np.uint8) if isinstance(record, (bytes, bytearray)) else record)
    try:
        ids, lp, w, tail = _native.compact_decode(codec(params), data, s, k_row, method == "sample",
                                                  params["has_tail"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}; the cache is corrupt") from None
    return SparseTargets(indices=ids, logprobs=lp, weights=w, tail_logprob=tail, temperature=temperature,
                         method=method)
