"""The dense losses (api.md §1) over a vocabulary sharded across ranks (api.md §6).

Each loss's row value is a sum over the vocabulary of per-entry terms of the global
log-probabilities ``log p_v = z_t,v / T − lse_t`` and ``log q_v = z_s,v / T − lse_s``
(:mod:`kdfast.reference`'s own term functions, so the math has one place). A rank computes its
slice's terms from the global log-sum-exps (:func:`.collectives.global_lse`) and the ranks add
their partial sums (:func:`.collectives.sum_over_ranks`), with the entries that make a KL
``+inf`` counted alongside. AKL's head, a prefix of the teacher's mass ordering, is found by
:mod:`.akl`. Computed in float32 (float64 for float64 logits) with PyTorch operations on the
local slices, differentiable by autograd; every rank returns the same rows. Every loss but AKL
on CPU float32/bf16/fp16 slices runs the Rust kernels instead (:mod:`.kernels`).
"""

from __future__ import annotations

import math

import torch

from .. import reference as ref
from .akl import akl_rows
from . import kernels
from .collectives import check_lse_rows, global_lse, sum_over_ranks

NEG_INF = float("-inf")


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return (x if x.dtype == torch.float64 else x.float()) / temperature


def _terms(name: str, lq: torch.Tensor, lp: torch.Tensor, param):
    """``(terms, infinite)`` of the row sum of loss ``name`` (``infinite`` None: never +inf)."""
    if name in ("forward_kl", "taid"):
        return ref.plogratio_terms(lp, lq)
    if name == "reverse_kl":
        return ref.plogratio_terms(lq, lp)
    if name == "jsd":
        lm = ref.log_mix(lp, lq, param)
        a, _ = ref.plogratio_terms(lp, lm)
        b, _ = ref.plogratio_terms(lq, lm)
        return param * a + (1 - param) * b, None
    if name == "skew_forward_kl":
        return ref.plogratio_terms(lp, ref.log_mix(lp, lq, param))
    if name == "skew_reverse_kl":
        return ref.plogratio_terms(lq, ref.log_mix(lq, lp, param))
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs(), None
    raise ValueError(f"loss: {name!r} has no vocabulary-parallel form")


def dense_rows(name: str, param, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
               group) -> torch.Tensor:
    """Per-row ℓ ``[N]`` of the dense loss ``name`` between the local vocabulary slices
    ``student`` and ``teacher`` ``[N, V_local]``: the whole vocabulary's value, the same on every
    rank, differentiable w.r.t. the local student slice."""
    if kernels.applies(name, student, teacher):
        return kernels.dense_rows(name, param, student, teacher, temperature, group)
    xs = _scaled(student, temperature)
    xt = _scaled(teacher.detach(), temperature).to(xs.dtype)
    mix = None
    if name == "taid":
        mix = ref.taid_logits(student, teacher, param).to(xs.dtype) / temperature
        lse_s, lse_t, lse_mix = global_lse(group, xs, xt, mix, what="student_logits")
    else:
        lse_s, lse_t = global_lse(group, xs, xt, what="student_logits")
    check_lse_rows(lse_s.detach(), "student_logits")
    check_lse_rows(lse_t, "teacher_logits")
    lq = xs - lse_s[:, None]
    if name == "akl":
        return akl_rows(lq, xt - lse_t[:, None], param, group)
    dead = None
    if mix is not None:  # TAID: a row whose interpolated logits are all -inf is +inf
        dead = lse_mix == NEG_INF
        lp = torch.where(dead[:, None], NEG_INF, mix - torch.where(dead, 0.0, lse_mix)[:, None])
    else:
        lp = xt - lse_t[:, None]
    terms, infinite = _terms(name, lq, lp, param)
    flag = infinite.any(-1).to(terms.dtype) if infinite is not None else terms.new_zeros(terms.shape[0])
    sums = sum_over_ranks(torch.stack([terms.sum(-1), flag], 1), group)
    rows = torch.where(sums[:, 1].detach() > 0, math.inf, sums[:, 0])
    if dead is not None:
        rows = torch.where(dead, math.inf, rows)
        # t = 0: p_t is q itself; exactly 0
        rows = torch.where(torch.as_tensor(param, device=rows.device) == 0, 0.0, rows)
    return rows
