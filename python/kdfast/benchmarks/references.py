"""The PyTorch code users write for the dense losses, and the inputs every benchmark shares.

:func:`eager_forward_kl`, :func:`eager_reverse_kl` and :func:`eager_jsd` (TRL's
``generalized_jsd_loss``, copied), and for the other losses :mod:`kdfast.reference`, are the
``eager`` implementation of :mod:`.dense`, :mod:`.fused_linear` and :mod:`.gpu`, and under
``torch.compile`` their ``compile`` one. Everything is computed in float32 (bf16 inputs are
upcast first, as users do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast import reference

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

TEMPERATURE = 1.0
JSD_BETA = 0.5
LOGIT_SCALE = 2.0  # std of the random logits; LLM logits spread over a few units


def eager_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || q_student), batchmean: the usual ``log_softmax`` + ``kl_div``."""
    T = TEMPERATURE
    student_log_probs = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")


def eager_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(q_student || p_teacher), batchmean: ``kl_div`` with the arguments swapped."""
    T = TEMPERATURE
    student_log_probs = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(teacher_log_probs, student_log_probs, log_target=True, reduction="batchmean")


def eager_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Generalized JSD as TRL's ``generalized_jsd_loss`` computes it, batchmean."""
    T, beta = TEMPERATURE, JSD_BETA
    student_log_probs = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack(
            [student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]
        ),
        dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / jsd.size(0)


#: The parameter each benchmarked loss runs with (kdfast's keyword for it).
PARAMS: dict[str, dict] = {
    "jsd": {"beta": JSD_BETA},
    "skew_forward_kl": {"skew": 0.1},
    "skew_reverse_kl": {"skew": 0.1},
    "akl": {"head_mass": 0.5},
    "taid": {"t": 0.5},
}


def _eager_from_reference(name: str):
    """The losses without a one-line PyTorch idiom: :mod:`kdfast.reference`'s PyTorch code (the
    papers' math, AKL's head by a sort), in float32, averaged over rows."""
    fn = getattr(reference, name)

    def eager(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return fn(student_logits.float(), teacher_logits.float(), temperature=TEMPERATURE,
                  **PARAMS.get(name, {})).mean()

    eager.__name__ = f"eager_{name}"
    return eager


EAGER = {"forward_kl": eager_forward_kl, "jsd": eager_jsd, "reverse_kl": eager_reverse_kl,
         **{name: _eager_from_reference(name) for name in ("skew_forward_kl", "skew_reverse_kl", "tvd", "akl", "taid")}}


def kdfast_kwargs(loss: str, **extra) -> dict:
    """The keyword arguments that make ``kdfast.<loss>`` compute what :data:`EAGER` does."""
    return {"temperature": TEMPERATURE, **PARAMS.get(loss, {}), **extra}


def random_logits(n: int, v: int, dtype: torch.dtype, *, device: str = "cpu", seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[n, v]`` (``randn × LOGIT_SCALE``), the same values for every
    implementation; drawn on ``device`` (a generator there), then cast to ``dtype``."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(n, v, generator=g, device=device) * LOGIT_SCALE).to(dtype)
    teacher = (torch.randn(n, v, generator=g, device=device) * LOGIT_SCALE).to(dtype)
    return student, teacher
