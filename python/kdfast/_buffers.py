"""CPU gradient buffers whose memory pages survive the tensor that used them.

A fresh ``[N, V]`` gradient from ``torch.empty`` is a new anonymous mapping (glibc serves
allocations this large with ``mmap``), so the kernel that writes it pays one page fault per 4 KiB:
at 2048 × 32000 float32 that is ~64 k faults, 2–5× the time of the loss itself on a VM. kdfast
instead hands out views of mappings it keeps: a buffer returns to the pool only when the tensor
built on it, and every view of it, has been freed (a ``weakref.finalize`` on the exporting
``memoryview``, which torch holds for as long as the storage lives), so a pooled buffer is never
visible to two owners. ``AccumulateGrad`` can still adopt the tensor as ``.grad`` (the pool holds
no reference to it), in which case the mapping stays with ``.grad`` until that is freed.

Retained memory is capped: at most :data:`MAX_FREE` free buffers of at most ``max_bytes`` in all
(default :data:`DEFAULT_MAX_BYTES`, or ``KDFAST_GRADIENT_POOL`` bytes; 0 turns the pool off).
:func:`set_gradient_pool` changes the cap at run time and releases what exceeds it.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref

import torch

from ._validate import env_int

#: Default cap on retained free buffers: 4 GiB (a 2048 × 128256 float32 gradient is 1 GiB).
DEFAULT_MAX_BYTES = 4 << 30
#: Free buffers kept at most (a loss call needs one; gradient accumulation reuses it).
MAX_FREE = 2
#: Smaller gradients come from torch's allocator: glibc serves them from its heap, no faults.
MIN_BYTES = 1 << 20


def _cap_from_env() -> int:
    return env_int("KDFAST_GRADIENT_POOL", DEFAULT_MAX_BYTES, minimum=0, what="a number of bytes ≥ 0 (0 = off)")


class _Pool:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free: list[mmap.mmap] = []  # oldest first
        # Re-entrant: a garbage collection inside the locked section may run a finalizer here.
        self._lock = threading.RLock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes < MIN_BYTES or nbytes > self.max_bytes:
            return torch.empty(shape, dtype=dtype)
        block = self._take(nbytes) or mmap.mmap(-1, nbytes)
        view = memoryview(block)[:nbytes]
        weakref.finalize(view, self._give, block)
        return torch.frombuffer(view, dtype=dtype, count=numel).view(shape)

    def _take(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            # The smallest free buffer that fits, unless it would waste more than half of itself.
            fits = [b for b in self._free if nbytes <= len(b) <= 2 * nbytes]
            if not fits:
                return None
            block = min(fits, key=len)
            self._free.remove(block)
            return block

    def _give(self, block: mmap.mmap) -> None:
        with self._lock:
            self._free.append(block)
            self._trim()

    def _trim(self) -> None:
        while self._free and (len(self._free) > MAX_FREE or sum(map(len, self._free)) > self.max_bytes):
            self._free.pop(0).close()

    def retained_bytes(self) -> int:
        with self._lock:
            return sum(map(len, self._free))

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._trim()


_POOL = _Pool(_cap_from_env())


def gradient(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised gradient tensor: pooled pages on the CPU, ``torch.empty`` elsewhere."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return _POOL.empty(tuple(shape), dtype)


def set_gradient_pool(max_bytes: int) -> None:
    """Cap the memory kdfast keeps in freed CPU gradient buffers (bytes; 0 turns the pool off).

    kdfast's CPU losses write their ``[N, V]`` gradient into buffers it reuses once the
    previous gradient has been freed, so a training step does not pay a new gradient's page
    faults (often more than the loss itself). At most two free buffers, ``max_bytes`` in all,
    stay resident between calls; the default is 4 GiB, or ``KDFAST_GRADIENT_POOL`` bytes."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes: expected an int ≥ 0 (0 = off), got {max_bytes!r}")
    _POOL.resize(max_bytes)


def gradient_pool_bytes() -> int:
    """Bytes held now in free pooled gradient buffers."""
    return _POOL.retained_bytes()
