"""One shard file opened for reading: a checked, zero-copy view of its columns.

Used by the reader (:class:`kdfast.cache.TeacherCache`) and by a writer that resumes. A shard
is memory-mapped once (:func:`map_shard`: a regular file of the size the manifest records,
inside the cache directory) and parsed once (:class:`Shard`); every column is then a numpy view
of the mapped file. Parsing checks what indexing will rely on — the columns and types of the
manifest's schema, no nulls, the recorded number of rows, and list/binary offsets that are
non-decreasing and end inside their values — so a damaged or hostile shard is a ``ValueError``
naming the file, never a read past the end of a column. It also checks the shard against its
manifest: the decoding parameters of its schema metadata (:func:`kdfast.cache.format.bound_params`)
must equal the manifest's exactly, and the entry's ``rows``, ``tokens``, ``min_seq_id`` and
``max_seq_id`` must be what the shard holds — so a manifest edited to decode a shard otherwise, or
to count it otherwise, is refused on open, naming the shard and the fields.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np
import pyarrow as pa

from .durable import map_regular_file
from .format import bound_params, schema_for, schema_params


def map_shard(folder: str, entry: dict):
    """``(map, identity)``: the memory map of the shard ``entry`` (a checked manifest entry) of the
    cache ``folder`` and the identity of the file mapped (:func:`kdfast.cache.durable.file_identity`)."""
    return map_regular_file(os.path.join(folder, entry["file"]), "shard", entry["bytes"])


class Shard:
    """A parsed shard: ``rows`` and ``cols`` (name → numpy array, or ``(offsets, values)`` for
    list and binary columns), all views of ``buffer``, checked against the manifest ``params``
    and its ``entry`` for this shard."""

    def __init__(self, buffer, file: str, params: dict, entry: dict):
        self.file = file
        rows = entry["rows"]
        try:
            table = pa.ipc.open_stream(pa.py_buffer(buffer)).read_all()
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise ValueError(f"{file}: unreadable cache shard ({exc})") from None
        self._check_schema(table.schema, params)
        if table.num_rows != rows:
            raise ValueError(f"{os.path.basename(file)}: manifest lists {rows} rows, the shard has {table.num_rows}")
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
                if arr.values.null_count:
                    raise ValueError(f"{file}: column {name!r} has null entries; not a kdfast cache shard")
                self.cols[name] = self._checked(name, arr.offsets.to_numpy(),
                                                arr.values.to_numpy(zero_copy_only=False))
            elif pa.types.is_binary(arr.type):
                bufs = arr.buffers()
                try:
                    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
                except ValueError:
                    raise ValueError(f"{file}: column {name!r} has a short offsets buffer; the shard is corrupt") \
                        from None
                data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
                self.cols[name] = self._checked(name, offsets, data)
            else:
                self.cols[name] = arr.to_numpy(zero_copy_only=False)
        self._check_entry(entry)

    def _check_schema(self, schema: pa.Schema, params: dict) -> None:
        meta = schema_params(schema)
        if meta is None:
            raise ValueError(f"{self.file}: no kdfast parameters in the schema metadata; not a kdfast cache shard")
        same = (lambda key: json.dumps(params[key]) == json.dumps(meta.get(key)))
        diffs = [f"{key}: manifest {params[key]!r}, shard {meta.get(key)!r}" for key in bound_params(params["format_version"])
                 if not same(key)]
        if diffs:
            raise ValueError(f"{self.file}: the manifest's parameters differ from the shard's schema metadata "
                             f"({'; '.join(diffs)}); the manifest does not describe this shard")
        for field in schema_for(params):
            i = schema.get_field_index(field.name)
            if i < 0:
                raise ValueError(f"{self.file}: no column {field.name!r}; not a shard of this cache")
            if schema.field(i).type != field.type:
                raise ValueError(f"{self.file}: column {field.name!r} is {schema.field(i).type}, the manifest "
                                 f"expects {field.type}; not a shard of this cache")

    def _check_entry(self, entry: dict) -> None:
        """``ValueError`` unless the entry's counts and seq_id range are those of the shard."""
        offsets, _ = self.cols["input_ids"]
        sid = self.cols["seq_id"]
        actual = {"tokens": int(offsets[-1] - offsets[0]) if self.rows else 0,
                  "min_seq_id": int(sid.min()) if self.rows else None,
                  "max_seq_id": int(sid.max()) if self.rows else None}
        diffs = [f"{key}: manifest {entry[key]!r}, shard {value!r}" for key, value in actual.items()
                 if entry[key] != value]
        if diffs:
            raise ValueError(f"{self.file}: the manifest's shard entry does not match the shard "
                             f"({'; '.join(diffs)})")

    def _checked(self, name: str, offsets: np.ndarray, values: np.ndarray):
        """``(offsets, values)`` if row ``r`` of column ``name`` is ``values[offsets[r]:offsets[r + 1]]``
        with ``0 ≤ offsets[r] ≤ offsets[r + 1] ≤ len(values)``, else ``ValueError``."""
        if self.rows == 0:
            return offsets, values  # nothing will be sliced
        ok = offsets.shape[0] == self.rows + 1 and (
            offsets[0] >= 0 and offsets[-1] <= values.shape[0] and not bool((np.diff(offsets) < 0).any()))
        if not ok:
            raise ValueError(f"{self.file}: column {name!r} has offsets outside its values; the shard is corrupt")
        return offsets, values

    def list_slice(self, name: str, row: int) -> np.ndarray:
        offsets, values = self.cols[name]
        return values[offsets[row]:offsets[row + 1]]
