"""Ranks of a multi-process capture under ``torchrun``: identity, barrier, sums.

Rank r of a capture takes the sequences with ``i % world_size == r``; this module only tells a
process which rank it is and lets the ranks meet (:meth:`Ranks.barrier`) and add up counts
(:meth:`Ranks.sum`). ``torch.distributed`` is imported only when there is more than one rank.
"""

from __future__ import annotations

import os
from typing import List, Sequence


class Ranks:
    """This process's place in a ``torchrun`` job (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``).

    With ``WORLD_SIZE`` > 1 it joins the default process group (gloo, unless one already
    exists; it then destroys only a group it created, in :meth:`close`).
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)) or 0)
        self.created = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
                self.created = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

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
