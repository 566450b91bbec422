"""The LM head of a Hugging Face causal LM, for the fused loss (api.md §4).

A causal LM computes ``logits = head(hidden)`` and may transform them after the head. The fused
path needs ``logits = hidden @ Wᵀ (+ b)`` exactly, so :func:`find_head` accepts a model only
when its output embeddings are an ``nn.Linear`` and no known transform follows, folds a
constant logit scale into the hidden states (``s·(h Wᵀ) = (s·h) Wᵀ``), and otherwise returns
the reason it cannot fuse — final-logit soft-capping (Gemma 2/3) is not linear, a scale with a
bias does not fold. :func:`head_inputs` runs the model with the head replaced by a capture of
its input: the body runs as usual (wrappers such as DDP, gradient checkpointing, autocast
included), the head's matmul does not, and the model returns empty ``[..., 0]`` logits (in the
autograd graph of the body and the head, so that DDP's search for unused parameters finds them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["Head", "find_head", "head_inputs"]

# Config attributes of a constant scale applied to the head's output, with how each model type
# known to have one applies it. The attribute on another model type is refused: what that model
# does with it is unknown. (Final-logit soft-capping, Gemma 2/3, is not linear: refused.)
_SOFTCAP = "final_logit_softcapping"
_SCALES = {
    "logit_scale": {"cohere": "multiply", "cohere2": "multiply"},
    "lm_head_multiplier": {"falcon_h1": "multiply"},
    "logits_scaling": {"granite": "divide", "granitemoe": "divide", "granitemoeshared": "divide",
                       "granitemoehybrid": "divide", "minicpm3": "divide", "hyperclovax": "multiply"},
}


@dataclass
class Head:
    """A fusable head: ``logits = (scale · hidden) @ weightᵀ + bias``."""

    module: torch.nn.Linear
    scale: float = 1.0

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.module.bias


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel, DataParallel
    return model


def find_head(model: torch.nn.Module) -> Union[Head, str]:
    """The model's fusable :class:`Head`, or why it has none (a sentence)."""
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return f"{type(inner).__name__} has no get_output_embeddings()"
    if type(head) is not torch.nn.Linear:
        return f"its head is a {type(head).__name__}, not a torch.nn.Linear"
    if not isinstance(head.weight, torch.Tensor) or type(head.weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"its head's weight is a {type(head.weight).__name__} (sharded?), not a plain tensor"
    cfg = getattr(inner, "config", None)
    if getattr(cfg, _SOFTCAP, None) is not None:
        return f"config.{_SOFTCAP}={getattr(cfg, _SOFTCAP)}: final-logit soft-capping is not a linear map of the hidden states"
    model_type = getattr(cfg, "model_type", None)
    scale = 1.0
    for name, kinds in _SCALES.items():
        value = getattr(cfg, name, None)
        if value is None or value == 1.0:
            continue
        kind = kinds.get(model_type)
        if kind is None:
            return f"config.{name}={value} on model type {model_type!r}: an unknown transform of the logits"
        if head.bias is not None:
            return f"config.{name}={value} with a head bias: the scale does not fold into the hidden states"
        scale = scale * float(value) if kind == "multiply" else scale / float(value)
    return Head(head, scale)


class _Capture:
    hidden: Optional[torch.Tensor] = None


class _EmptyLogits(torch.autograd.Function):
    """Empty ``[..., 0]`` logits whose autograd node points at ``hidden`` and the head's
    parameters. DistributedDataParallel with ``find_unused_parameters=True`` (the Trainer's
    default) walks the graph from the model's outputs and marks every parameter it does not
    reach as ready at once; disconnected logits made the whole body look unused and the fused
    loss's backward then failed ("marked ready twice"). Its backward never runs (the logits are
    not used), and would pass no gradient."""

    @staticmethod
    def forward(ctx, hidden, *params):
        return hidden.new_empty((*hidden.shape[:-1], 0))

    @staticmethod
    def backward(ctx, grad):
        return (None,) * len(ctx.needs_input_grad)


@contextlib.contextmanager
def head_inputs(model: torch.nn.Module, head: Head):
    """Within the block, ``head.module`` records its input (times ``head.scale``) in the yielded
    object's ``hidden`` and returns empty logits instead of computing them."""
    cap = _Capture()
    module = head.module

    def capture(x: torch.Tensor) -> torch.Tensor:
        cap.hidden = x if head.scale == 1.0 else x * head.scale
        params = [p for p in (module.weight, module.bias) if p is not None]
        return _EmptyLogits.apply(x, *params)

    module.forward = capture
    try:
        yield cap
    finally:
        del module.forward  # back to the class's forward
