"""Multi-rank captures: one manifest per rank, merged into ``manifest.json`` at the end.

Under ``torchrun`` each rank's :class:`~kdfast.cache.CacheWriter` writes
``shard-r{rank:03d}-*.arrow`` and ``manifest.rank{rank:03d}.json``; :func:`merge_manifests`,
run once by rank 0 after every rank has finished, writes the ``manifest.json`` that readers open.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .durable import atomic_write
from .format import IDENTITY, MANIFEST, rank_manifests, read_manifest


def merge_manifests(path, world_size: Optional[int] = None) -> dict:
    """Write ``manifest.json`` covering the ``manifest.rank*.json`` of every rank (atomic).

    Run once, by one process (rank 0 after a barrier), when every rank's writer is closed.
    Checks that all ranks ``0 .. world_size-1`` are present, complete and have the same
    parameters, and that no ``seq_id`` appears in two ranks. Returns the merged manifest.
    """
    path = os.fspath(path)
    found = {rank: read_manifest(path, name) for rank, name in rank_manifests(path).items()}
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
        diffs = [k for k in IDENTITY if m.get(k) != first.get(k)]
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
    atomic_write(os.path.join(path, MANIFEST), json.dumps(merged, indent=1, sort_keys=True).encode())
    return merged
