"""Ranks of a multi-process capture under ``torchrun``: identity, barrier, sums.

Rank r of a capture takes the sequences with ``i % world_size == r``; this module only tells a
process which rank it is and lets the ranks meet (:meth:`Ranks.barrier`) and add up counts
(:meth:`Ranks.sum`). ``torch.distributed`` is imported only when there is more than one rank.

With ``tensor_parallel = P`` the ranks form groups of P consecutive ranks that hold one teacher
between them, each rank a slice of its vocabulary: the *data-parallel* rank is the group's
index (``rank // P``, of ``world // P``), which takes the sequences as above, and only the
group's first rank writes them (:attr:`Ranks.writes`); :meth:`Ranks.share` hands its list of
sequences to the others.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence


class Ranks:
    """This process's place in a ``torchrun`` job (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``).

    With ``WORLD_SIZE`` > 1 it joins the default process group (gloo, unless one already
    exists; it then destroys only a group it created, in :meth:`close`).
    """

    def __init__(self, tensor_parallel: int = 1):
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise ValueError(f"tensor_parallel: expected an integer ≥ 1, got {tensor_parallel!r}")
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)) or 0)
        if self.world % tensor_parallel:
            raise ValueError(f"tensor_parallel: {tensor_parallel} does not divide the {self.world} ranks of "
                             f"this job (WORLD_SIZE)")
        self.created = False
        self.tp, self.tp_group = tensor_parallel, None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self.created = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.tp > 1:  # every rank creates every group, in the same order
                for g in range(self.world // self.tp):
                    group = dist.new_group(list(range(g * self.tp, (g + 1) * self.tp)))
                    if g == self.rank // self.tp:
                        self.tp_group = group
        self.tp_rank = self.rank % self.tp
        self.dp_rank, self.dp_world = self.rank // self.tp, self.world // self.tp

    @property
    def writes(self) -> bool:
        """Whether this rank writes its group's sequences (the first rank of the group)."""
        return self.tp_rank == 0

    def share(self, values: Optional[Sequence[int]]) -> List[int]:
        """The writer's ``values`` on every rank of its tensor-parallel group. The writer passes
        None when it failed (it then raises its own error): every rank raises together."""
        if self.tp == 1:
            return [] if values is None else list(values)
        import torch
        import torch.distributed as dist

        src = dist.get_global_rank(self.tp_group, 0)
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        n = torch.tensor([-1 if values is None else len(values)], dtype=torch.int64, device=dev)
        dist.broadcast(n, src=src, group=self.tp_group)
        if int(n) < 0:
            raise RuntimeError(f"rank {src}, the writer of this rank's tensor-parallel group, failed to open the cache")
        t = torch.tensor(list(values) if self.writes else [0] * int(n), dtype=torch.int64, device=dev)
        dist.broadcast(t, src=src, group=self.tp_group)
        return [int(x) for x in t.cpu().tolist()]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[int]) -> List[int]:
        """Element-wise sums of ``values`` over all ranks."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64)
        if dist.get_backend() == "nccl":  # pragma: no cover - GPU clusters
            t = t.cuda()
        dist.all_reduce(t)
        return [int(x) for x in t.cpu().tolist()]

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
