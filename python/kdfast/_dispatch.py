"""The one dispatch point: which backend runs an op, with one capability check and one error.

Backends:

* ``"rust"`` — the kernels of ``kdfast-core`` (through :mod:`kdfast._native`): CPU tensors;
* ``"triton"`` — :mod:`kdfast._triton`: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
* ``"torch"`` — the pure-PyTorch reference (:mod:`kdfast.reference`): any device, and the only
  backend for float64 (exact there).

``"auto"`` picks Rust for CPU tensors and Triton for CUDA tensors when their dtypes are
float32/bfloat16/float16, and the reference otherwise. A forced backend that cannot run the
inputs raises here, with the one message format ``backend: '<b>' cannot run <op> on ...``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from . import _triton
from ._errors import DtypeError
from ._validate import KERNEL_DTYPES

BACKENDS = ("auto", "rust", "triton", "torch")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def _device_problem(backend: str, device: torch.device):
    """Why ``backend`` cannot run tensors on ``device`` (None when it can)."""
    if backend == "rust" and device.type != "cpu":
        return f"tensors on {device} (it runs on CPU tensors)"
    if backend == "triton":
        if not _triton.importable():
            return "this machine: the triton package is not importable"
        if not _triton.usable(device):
            return f"tensors on {device} (it runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1)"
    return None


def resolve(backend, device: torch.device, dtypes: Iterable[torch.dtype], *, op: str,
            available: Iterable[str] = ("rust", "triton", "torch")) -> str:
    """The backend (``"rust"``, ``"triton"`` or ``"torch"``) that runs ``op`` for inputs of
    ``dtypes`` on ``device``; ``backend`` is the user's choice (``"auto"`` or a forced one) and
    ``available`` the backends that have a kernel for ``op`` (the registry's ``backends``)."""
    backend = check_backend(backend)
    dtypes = tuple(dtypes)
    kernel_dtypes = all(d in KERNEL_DTYPES for d in dtypes)
    if backend == "auto":
        if not kernel_dtypes:
            return "torch"
        if device.type == "cpu" and "rust" in available:
            return "rust"
        if device.type == "cuda" and "triton" in available and _triton.importable():
            return "triton"
        return "torch"
    if backend == "torch":
        return backend
    if backend not in available:
        raise ValueError(f"backend: {backend!r} has no kernel for {op} (available: "
                         f"{', '.join(map(repr, available))}); use backend='auto'")
    problem = _device_problem(backend, device)
    if problem is not None:
        raise ValueError(f"backend: {backend!r} cannot run {op} on {problem}; use backend='auto' or 'torch'")
    if not kernel_dtypes:
        got = ", ".join(sorted({str(d).replace('torch.', '') for d in dtypes}))
        raise DtypeError(f"backend: {backend!r} cannot run {op} on {got} inputs (it computes in float32 from "
                         f"float32, bfloat16 or float16); use backend='torch' or 'auto' for float64")
    return backend


def host_reads_allowed(device: torch.device) -> bool:
    """Whether value checks may read tensors on ``device`` on the host: not while compiling,
    not during CUDA-graph capture, not for meta tensors (they have no values)."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
