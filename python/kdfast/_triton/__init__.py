"""Triton kernels (api.md §1–§3 on CUDA; on CPU tensors under ``TRITON_INTERPRET=1``).

One module per op, each holding its kernel(s), launcher and docstring with the math
(style.md item 7):

* :mod:`.dense` — the dense losses, loss and student gradient in one kernel;
* :mod:`.sparse` — ``sparse_kl`` against top-k / sampled targets;
* :mod:`.compress` — ``compress_topk`` and ``compress_sample``.

Triton is imported lazily: ``import kdfast`` never needs it; :func:`kernels` imports a
kernel module on first use. Backend choice lives in :mod:`kdfast._dispatch`.
"""

from __future__ import annotations

import importlib
import os

import torch

_importable = None  # cached answer of importable()


# A constant to torch.compile: Dynamo calls it rather than tracing a cache and an import.
@torch.compiler.assume_constant_result
def importable() -> bool:
    global _importable
    if _importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _importable = True
        except Exception:  # ImportError, or a broken install raising anything else
            _importable = False
    return _importable


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on ``device``."""
    if not importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def kernels(name: str):
    """The kernel module ``kdfast._triton.<name>`` (``dense``, ``sparse`` or ``compress``)."""
    return importlib.import_module(f"{__name__}.{name}")
