"""The sizes of a ``kdfast demo`` run: :class:`Preset`, :data:`PRESETS` and the four students."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything a demo run needs besides the data: model sizes, steps, optimisation, KD."""

    context: int = 128
    batch_size: int = 32
    teacher_layers: int = 2
    teacher_embd: int = 192
    teacher_heads: int = 3
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_layers: int = 2
    student_embd: int = 96
    student_heads: int = 2
    steps: int = 350
    student_lr: float = 3e-3
    soft_weight: float = 0.9  # KD students: 0.9 · KL + 0.1 · cross-entropy
    temperature: float = 1.0
    k: int = 16  # top-k cache
    num_samples: int = 50  # sampled cache: draws per position
    evals: int = 10  # validation points per student curve
    max_train_chunks: Optional[int] = None  # captured/trained chunks (None: all)
    max_val_chunks: Optional[int] = None


PRESETS: Dict[str, Preset] = {
    "default": Preset(),
    "quick": Preset(
        context=64, batch_size=16, teacher_layers=2, teacher_embd=128, teacher_heads=2, teacher_steps=300,
        teacher_lr=3e-3, student_layers=1, student_embd=64, student_heads=2, steps=250, student_lr=4e-3,
        evals=5, max_train_chunks=1200, max_val_chunks=200,
    ),
}

STUDENTS = (
    ("labels", "labels only (cross-entropy)"),
    ("online", "online dense KD (forward KL, live teacher)"),
    ("topk", "offline top-k KD (cache)"),
    ("sample", "offline sampled KD (cache)"),
)
