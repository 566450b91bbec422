"""Pure-PyTorch implementation of kdfast's losses: the ``backend="torch"`` fallback.

Differentiable with ordinary autograd and exact in float64 (used for ``gradcheck``); other
dtypes are computed in float32. Numerically robust: mixtures are formed in log space with
``logaddexp``, and entries with zero probability (``-inf`` logits) contribute exactly 0 to the
loss and the gradient instead of ``0 · ∞ = NaN``. A KL whose first argument has mass (a
finite log-probability, however small) where the second has none (``-inf``) is ``+inf`` for
its row, with a zero gradient row (``torch.where`` selects the constant there); this is
decided on the log-probabilities, not on probabilities that may have underflowed.

Every function here takes 2-D logits ``[N, V]`` and returns the per-row value ``ℓ`` ``[N]``
(api.md §1), without temperature scaling of the result, masking or reduction.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")

#: AKL's head is the ids whose cumulative teacher mass is ≤ head_mass + this (2⁻²⁰): well above
#: the rounding of float32 probabilities and their float64 sums, far below any meaningful mass.
HEAD_TOLERANCE = 2.0**-20


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(z / T)`` in float32 (float64 for float64 input)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(x / temperature, dim=-1)


def plogratio_terms(la: torch.Tensor, lb: torch.Tensor):
    """``(terms, infinite)``: ``a_i (log a_i − log b_i)`` per entry with ``0 · log 0 = 0`` (and 0
    where infinite), NaN-free in backward, and where ``log a_i > -inf`` meets ``log b_i = -inf``
    (the entries that make the sum ``+inf``)."""
    dead = la == NEG_INF
    infinite = ~dead & (lb == NEG_INF)
    skip = dead | infinite
    la0 = la.masked_fill(skip, 0.0)
    lb0 = lb.masked_fill(skip, 0.0)
    return torch.where(skip, 0.0, la0.exp() * (la0 - lb0)), infinite


def _plogratio(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """``Σ_i a_i (log a_i − log b_i)`` per row with ``0 · log 0 = 0``, NaN-free in backward;
    ``+inf`` (gradient 0) for a row where some ``log a_i > -inf`` meets ``log b_i = -inf``."""
    terms, infinite = plogratio_terms(la, lb)
    return torch.where(infinite.any(-1), math.inf, terms.sum(-1))


def log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w·a + (1−w)·b)``. Where both are zero the inputs are replaced by 0 first, so the
    (finite, unused) result there has a finite backward; those entries are masked out of
    every sum by :func:`_plogratio`."""
    dead = (la == NEG_INF) & (lb == NEG_INF)
    la0 = la.masked_fill(dead, 0.0)
    lb0 = lb.masked_fill(dead, 0.0)
    # Weight 0 or 1 is one side exactly: logaddexp(-inf, -inf) would have a NaN backward.
    if w == 0:
        return lb0
    if w == 1:
        return la0
    lw = math.log(w) if w > 0 else NEG_INF
    l1w = math.log1p(-w) if w < 1 else NEG_INF
    return torch.logaddexp(la0 + lw, lb0 + l1w)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p‖q) = Σ p (log p − log q)``."""
    return _plogratio(log_probs(teacher, temperature), log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(q‖p) = Σ q (log q − log p)``."""
    return _plogratio(log_probs(student, temperature), log_probs(teacher, temperature))


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = βp + (1−β)q``; forward KL at β=0, reverse KL at β=1."""
    if beta == 0.0:
        return forward_kl(student, teacher, temperature)
    if beta == 1.0:
        return reverse_kl(student, teacher, temperature)
    lq, lp = log_probs(student, temperature), log_probs(teacher, temperature)
    lm = log_mix(lp, lq, beta)
    return beta * _plogratio(lp, lm) + (1 - beta) * _plogratio(lq, lm)


def skew_forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """``KL(p ‖ λp + (1−λ)q)``, λ = skew."""
    lq, lp = log_probs(student, temperature), log_probs(teacher, temperature)
    return _plogratio(lp, log_mix(lp, lq, skew))


def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """``KL(q ‖ λq + (1−λ)p)``, λ = skew."""
    lq, lp = log_probs(student, temperature), log_probs(teacher, temperature)
    return _plogratio(lq, log_mix(lq, lp, skew))


def tvd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``½ Σ |p − q|``."""
    q = log_probs(student, temperature).exp()
    p = log_probs(teacher, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def akl_weights(lq: torch.Tensor, lp: torch.Tensor, head_mass: float):
    """AKL's head and tail weights ``(w_h, w_t)`` per row, constants (no gradient).

    The head H is every id whose cumulative teacher mass, in the order of ``p`` descending
    (ties: lower id first; a stable sort), is ≤ ``head_mass`` including itself, plus always
    the first id; ``g_H = Σ_H |p − q|``, ``g_T = Σ_{∉H} |p − q|``, ``w_h = g_H / (g_H + g_T)``,
    ``w_t = g_T / (g_H + g_T)`` (both ½ when both gaps are 0). The cumulative mass is summed
    in float64 and compared with ``head_mass + HEAD_TOLERANCE``, as the kernels do, so that a
    boundary that holds exactly (``head_mass = 1``: every id; a uniform teacher at ``k / V``)
    is not decided by rounding.
    """
    with torch.no_grad():
        p, q = lp.exp(), lq.exp()
        sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
        # HEAD_TOLERANCE: an exact boundary (a uniform teacher at head_mass = k/V, or
        # head_mass = 1) must not be decided by the rounding of p and of its sums.
        in_head = sorted_p.double().cumsum(-1) <= head_mass + HEAD_TOLERANCE
        in_head[..., 0] = True
        head = torch.zeros_like(in_head).scatter(-1, order, in_head)
        gap = (p - q).abs().double()
        g_h = torch.where(head, gap, 0.0).sum(-1)
        g_t = torch.where(head, 0.0, gap).sum(-1)
        total = g_h + g_t
        some = total > 0
        w_h = torch.where(some, g_h / torch.where(some, total, 1.0), 0.5)
        w_t = torch.where(some, g_t / torch.where(some, total, 1.0), 0.5)
        return w_h.to(lq.dtype), w_t.to(lq.dtype)


def akl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, head_mass: float = 0.5) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024): ``w_h KL(p‖q) + w_t KL(q‖p)`` with the weights of
    :func:`akl_weights` (constants for the gradient). A part whose weight is exactly 0
    contributes 0 (never ``0 · ∞``)."""
    lq, lp = log_probs(student, temperature), log_probs(teacher, temperature)
    w_h, w_t = akl_weights(lq, lp, head_mass)
    fkl, rkl = _plogratio(lp, lq), _plogratio(lq, lp)
    return torch.where(w_h == 0, 0.0, w_h * fkl) + torch.where(w_t == 0, 0.0, w_t * rkl)


def taid_logits(student: torch.Tensor, teacher: torch.Tensor, t) -> torch.Tensor:
    """TAID's interpolated teacher logits ``(1 − t)·sg(z_s) + t·z_t`` (detached), exactly
    ``z_s`` at ``t = 0`` and ``z_t`` at ``t = 1`` (no ``0 · (−∞)``); ``t`` is a float or a
    0-d tensor."""
    s = student.detach()
    s = s if s.dtype == torch.float64 else s.float()
    z = teacher.detach().to(s.dtype)
    if not isinstance(t, torch.Tensor):
        if t == 0.0:
            return s
        if t == 1.0:
            return z
    t = torch.as_tensor(t, dtype=s.dtype, device=s.device)
    mix = (1 - t) * s + t * z  # a -inf on either side gives -inf (the other weight is > 0)
    return torch.where(t == 0, s, torch.where(t == 1, z, mix))


def taid(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, t=1.0) -> torch.Tensor:
    """TAID (Shing et al., ICLR 2025): ``KL(p_t‖q)``, ``p_t = softmax(((1 − t)·sg(z_s) +
    t·z_t) / T)``: forward KL at ``t = 1``, 0 at ``t = 0``. A row whose interpolated logits
    are all ``-inf`` (0 < t < 1 and no id finite on both sides) is ``+inf``, gradient 0."""
    mix = taid_logits(student, teacher, t)
    dead = (mix == NEG_INF).all(-1, keepdim=True)
    lpt = log_probs(torch.where(dead, 0.0, mix), temperature)
    loss = _plogratio(lpt, log_probs(student, temperature))
    loss = torch.where(dead.squeeze(-1), math.inf, loss)
    # t = 0: p_t is q itself; exactly 0 (autograd of the two log-softmaxes leaves rounding).
    return torch.where(torch.as_tensor(t, device=loss.device) == 0, 0.0, loss)


def divergence(name: str, lq: torch.Tensor, lp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-row ℓ of ``forward_kl``, ``reverse_kl``, ``jsd`` (with ``beta``) or ``tvd`` between
    given log-probabilities ``lq`` (student) and ``lp`` (teacher) ``[N, C]``, with no softmax:
    the loss of distributions that are not a softmax of logits (e.g. the categories of
    :func:`kdfast.sparse_loss`). ``-inf`` entries have zero mass; the +inf rule is as above, and
    ``jsd`` at β ∈ {0, 1} is exactly forward / reverse KL."""
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name == "forward_kl":
        return _plogratio(lp, lq)
    if name == "reverse_kl":
        return _plogratio(lq, lp)
    if name == "jsd":
        lm = log_mix(lp, lq, beta)
        return beta * _plogratio(lp, lm) + (1 - beta) * _plogratio(lq, lm)
    if name == "tvd":
        return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
    raise ValueError(f"loss: expected 'forward_kl', 'reverse_kl', 'jsd' or 'tvd', got {name!r}")
