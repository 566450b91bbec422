"""TAID's schedule of the interpolation weight ``t`` (Shing et al., ICLR 2025), api.md §1.

:func:`kdfast.taid` distils towards ``p_t = softmax(((1 − t)·sg(z_s) + t·z_t) / T)``; ``t``
starts near the student (``t_start``) and moves to the teacher (``t_end``). Each training step,
:meth:`TAIDSchedule.update` applies the paper's rule to the step's loss ``L``::

    m ← β·m + (1 − β)·(L_prev − L) / (L_prev + 1e-15)
    t ← min(t_end, max(t_start + (t_end − t_start)·progress, t + α·sigmoid(m)·(1 − t)))

so ``t`` follows a linear floor in the training progress and runs ahead of it while the loss
falls quickly (``m > 0``). Conventions where the paper's formula is silent: the first update
has no previous loss and leaves ``m`` as it is; a non-finite loss leaves ``m`` and the previous
loss as they are (the floor still applies), so one bad batch does not poison the schedule.

Given a tensor loss, the update is tensor arithmetic on its device (no host sync) and ``t``
becomes a 0-d tensor, which :func:`kdfast.taid` reads on the device; given a float, everything
is a float.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from ._validate import check_real

__all__ = ["TAIDSchedule"]

Number = Union[float, torch.Tensor]


class TAIDSchedule:
    """The state of TAID's ``t``: ``t``, the momentum ``m`` and the previous loss.

    Args:
        t_start: the first ``t`` and the start of the linear floor, in [0, 1].
        t_end: the last ``t`` and the cap, in [t_start, 1].
        alpha: the step size of the adaptive part, ≥ 0.
        beta: the momentum coefficient, in [0, 1].
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99):
        self.t_start = check_real(t_start, "t_start", low=0.0, high=1.0)
        self.t_end = check_real(t_end, "t_end", low=self.t_start, high=1.0)
        self.alpha = check_real(alpha, "alpha", low=0.0, high=math.inf, high_open=True)
        self.beta = check_real(beta, "beta", low=0.0, high=1.0)
        self.t: Number = self.t_start
        self.momentum: Number = 0.0
        self.prev_loss: Optional[Number] = None

    def update(self, loss: Number, progress: float) -> Number:
        """Advance ``t`` after a step whose loss is ``loss`` (a float or a 0-d tensor) at
        ``progress`` ∈ [0, 1] (e.g. ``step / total_steps``); returns the new ``t``."""
        progress = check_real(progress, "progress", low=0.0, high=1.0)
        # t_start + (t_end − t_start)·progress, written to be exact at both ends
        floor = self.t_start * (1 - progress) + self.t_end * progress
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1 or not loss.dtype.is_floating_point:
                raise ValueError(f"loss: expected a one-element floating tensor, got {loss.dtype} of shape {tuple(loss.shape)}")
            self._update_tensor(loss.detach().reshape(()).to(torch.float64), floor)
        elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"loss: expected a real number or a 0-d tensor, got {type(loss).__name__}")
        else:
            self._update_float(float(loss), floor)
        return self.t

    def _update_float(self, loss: float, floor: float) -> None:
        prev, t, m = self.prev_loss, self.t, self.momentum
        if any(isinstance(x, torch.Tensor) for x in (prev, t, m)):  # once tensors, stay tensors
            return self._update_tensor(torch.tensor(loss, dtype=torch.float64), floor)
        if math.isfinite(loss):
            if prev is not None:
                m = self.beta * m + (1 - self.beta) * (prev - loss) / (prev + 1e-15)
            self.prev_loss = loss
        self.momentum = m
        step = self.alpha * (1 / (1 + math.exp(-m))) * (1 - t)
        self.t = min(self.t_end, max(floor, t + step))

    def _update_tensor(self, loss: torch.Tensor, floor: float) -> None:
        dev = loss.device
        as_t = (lambda x: torch.as_tensor(x, dtype=torch.float64, device=dev))
        t, m = as_t(self.t), as_t(self.momentum)
        ok = torch.isfinite(loss)
        if self.prev_loss is None:
            prev = torch.where(ok, loss, torch.nan)
        else:
            prev = as_t(self.prev_loss)
            has_prev = ~torch.isnan(prev)
            change = (prev - loss) / (prev + 1e-15)
            m = torch.where(ok & has_prev, self.beta * m + (1 - self.beta) * change, m)
            prev = torch.where(ok, loss, prev)
        step = self.alpha * torch.sigmoid(m) * (1 - t)
        self.t = torch.clamp(torch.maximum(as_t(floor), t + step), max=self.t_end)
        self.momentum, self.prev_loss = m, prev

    def state_dict(self) -> dict:
        """Everything needed to resume (plain floats; ``prev_loss`` None before the first step)."""
        prev = self.prev_loss
        prev = None if prev is None else float(prev)
        return {"t_start": self.t_start, "t_end": self.t_end, "alpha": self.alpha, "beta": self.beta,
                "t": float(self.t), "momentum": float(self.momentum),
                "prev_loss": None if prev is None or math.isnan(prev) else prev}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (hyper-parameters included)."""
        missing = {"t_start", "t_end", "alpha", "beta", "t", "momentum", "prev_loss"} - set(state)
        if missing:
            raise ValueError(f"state: missing {', '.join(sorted(missing))}")
        self.__init__(state["t_start"], state["t_end"], state["alpha"], state["beta"])
        self.t = check_real(state["t"], "state['t']", low=0.0, high=1.0)
        self.momentum = check_real(state["momentum"], "state['momentum']", low=-math.inf, high=math.inf)
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else check_real(prev, "state['prev_loss']", low=-math.inf, high=math.inf)

    def __repr__(self) -> str:
        return (f"TAIDSchedule(t={float(self.t):.6g}, t_start={self.t_start}, t_end={self.t_end}, "
                f"alpha={self.alpha}, beta={self.beta})")
