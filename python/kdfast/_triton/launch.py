"""Launch parameters shared by the Triton kernels."""

from __future__ import annotations

import torch
import triton

#: Widest vocabulary block one program loads at a time.
MAX_BLOCK = 4096


def block_and_warps(v: int) -> tuple:
    """``(BLOCK, num_warps)`` for rows of ``v`` columns: the next power of two, capped at
    :data:`MAX_BLOCK`, and one warp per 256 lanes (1 to 16)."""
    block = min(triton.next_power_of_2(v), MAX_BLOCK)
    return block, max(1, min(16, block // 256))


def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """``x`` (2-D) with unit column stride, copying only when it has none."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()
