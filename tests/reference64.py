"""An independent float64 reference for kdfast's dense losses, written from docs/api.md §1.

It deliberately does not import ``kdfast`` (nor ``kdfast.reference``): it is the yardstick
the library is measured against. Values are computed in float64 in log space; gradients
with respect to the student logits are closed forms (validated against ``torch.autograd`` in
``test_reference64.py``), which stay well defined with ``-inf`` logits and underflowing
probabilities.

Notation (api.md): ``q = softmax(z_s / T)`` (student), ``p = softmax(z_t / T)`` (teacher).
For a per-row loss ``f(q)`` with ``g = ∂f/∂q`` the student-logit gradient is
``∂f/∂z_s = q ⊙ (g − <q, g>) / T``.
"""

from __future__ import annotations

import math

import torch

LOSSES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "akl",
    "taid",
)

_NEG_INF = float("-inf")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else _NEG_INF


def _kl_terms(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """Entry-wise ``a (log a − log b)`` with ``0 log 0 = 0``, and ``+inf`` where ``log a > -inf``
    and ``log b = -inf`` (decided on the logs: ``a`` itself may underflow to 0 in float64)."""
    alive = loga > _NEG_INF
    inf = torch.full_like(loga, math.inf)
    term = torch.where(alive, loga.exp() * (loga - logb.masked_fill(~alive, 0.0)), torch.zeros_like(loga))
    return torch.where(alive & (logb == _NEG_INF), inf, term)


def _log_mix(w: float, loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """``log(w·a + (1−w)·b)`` computed in log space (no underflow)."""
    return torch.logaddexp(_log(w) + loga, _log(1.0 - w) + logb)


def _project(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h − q·Σh`` where ``h = q ⊙ g`` (the softmax Jacobian-vector product)."""
    return h - q * h.sum(-1, keepdim=True)


def row_losses(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    head_mass: float = 0.5,
    t: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ℓ and ∂ℓ/∂z_s for ``[N, V]`` logits, in float64, without T² or masking."""
    T = float(temperature)
    if name == "taid":
        return _taid_rows(student.double(), teacher.double(), T, float(t))
    logq = torch.log_softmax(student.double() / T, dim=-1)
    logp = torch.log_softmax(teacher.double() / T, dim=-1)
    q, p = logq.exp(), logp.exp()
    zero = torch.zeros_like(q)

    if name == "jsd" and beta == 0.0:
        name = "forward_kl"
    elif name == "jsd" and beta == 1.0:
        name = "reverse_kl"

    if name == "forward_kl":  # KL(p‖q); g = −p/q
        loss = _kl_terms(logp, logq).sum(-1)
        grad = q - p
    elif name == "reverse_kl":  # KL(q‖p); g = log q − log p + 1
        loss = _kl_terms(logq, logp).sum(-1)
        grad = torch.where(q > 0, q * (logq - logp - loss[:, None]), zero)
    elif name == "jsd":  # β KL(p‖m) + (1−β) KL(q‖m); g = (1−β)(log q − log m)
        b = float(beta)
        logm = _log_mix(b, logp, logq)
        kl_qm = _kl_terms(logq, logm).sum(-1)
        loss = b * _kl_terms(logp, logm).sum(-1) + (1.0 - b) * kl_qm
        grad = (1.0 - b) * torch.where(q > 0, q * (logq - logm - kl_qm[:, None]), zero)
    elif name == "skew_forward_kl":  # KL(p‖r), r = λp + (1−λ)q; g = −(1−λ) p/r
        lam = float(skew)
        logr = _log_mix(lam, logp, logq)
        loss = _kl_terms(logp, logr).sum(-1)
        both = torch.isfinite(logp) & torch.isfinite(logq)
        pq_over_r = torch.where(both, (logp + logq - logr).exp(), zero)
        grad = (1.0 - lam) * (q * pq_over_r.sum(-1, keepdim=True) - pq_over_r)
    elif name == "skew_reverse_kl":  # KL(q‖r), r = λq + (1−λ)p; g = log q − log r + 1 − λ q/r
        lam = float(skew)
        logr = _log_mix(lam, logq, logp)
        loss = _kl_terms(logq, logr).sum(-1)
        lam_q_over_r = (_log(lam) + logq - logr).exp()  # λq/r ≤ 1, exactly 0 at λ = 0
        h = torch.where(q > 0, q * (logq - logr - lam_q_over_r), zero)
        grad = _project(q, h)
    elif name == "tvd":  # ½ Σ|p − q|; g = ½ sign(q − p)
        loss = 0.5 * (p - q).abs().sum(-1)
        grad = _project(q, 0.5 * q * torch.sign(q - p))
    elif name == "akl":  # w_h KL(p‖q) + w_t KL(q‖p), weights constant
        w_h, w_t = _akl_weights(p, q, float(head_mass))
        fkl = _kl_terms(logp, logq).sum(-1)
        rkl = _kl_terms(logq, logp).sum(-1)
        zero_row = torch.zeros_like(fkl)
        loss = torch.where(w_h == 0, zero_row, w_h * fkl) + torch.where(w_t == 0, zero_row, w_t * rkl)
        grad_r = torch.where(q > 0, q * (logq - logp - rkl[:, None]), zero)
        grad = w_h[:, None] * (q - p) + w_t[:, None] * grad_r
    else:
        raise KeyError(name)
    # api.md: a +inf row (forward/reverse KL with mass against a -inf) has a zero gradient.
    grad = torch.where(torch.isinf(loss)[:, None], zero, grad)
    return loss, grad / T


def _akl_weights(p: torch.Tensor, q: torch.Tensor, head_mass: float):
    """AKL's weights per api.md: the head in the order of p descending, ties by lower id (a
    lexicographic sort, row by row in plain Python), cumulative mass ≤ head_mass, first id
    always in."""
    w_h, w_t = [], []
    for prow, qrow in zip(p.tolist(), q.tolist()):
        order = sorted(range(len(prow)), key=lambda i: (-prow[i], i))
        cum, head = 0.0, set()
        for rank, i in enumerate(order):
            cum += prow[i]
            if rank == 0 or cum <= head_mass + 2.0**-20:  # api.md's ≤, robust to rounding (README)
                head.add(i)
        g_h = sum(abs(prow[i] - qrow[i]) for i in head)
        g_t = sum(abs(prow[i] - qrow[i]) for i in range(len(prow)) if i not in head)
        total = g_h + g_t
        w_h.append(g_h / total if total > 0 else 0.5)
        w_t.append(g_t / total if total > 0 else 0.5)
    return torch.tensor(w_h, dtype=torch.float64), torch.tensor(w_t, dtype=torch.float64)


def _taid_rows(s: torch.Tensor, z: torch.Tensor, T: float, t: float):
    """TAID: KL(p_t‖q), p_t = softmax(((1−t) z_s + t z_t)/T) (student detached); ∂/∂z_s = (q − p_t)/T."""
    if t == 0.0:
        mix = s
    elif t == 1.0:
        mix = z
    else:
        mix = (1.0 - t) * s + t * z
    dead = (mix == _NEG_INF).all(-1)
    mix = torch.where(dead[:, None], torch.zeros_like(mix), mix)
    logq = torch.log_softmax(s / T, dim=-1)
    logpt = torch.log_softmax(mix / T, dim=-1)
    loss = _kl_terms(logpt, logq).sum(-1)
    loss = torch.where(dead, torch.full_like(loss, math.inf), loss)
    grad = logq.exp() - logpt.exp()
    grad = torch.where(torch.isinf(loss)[:, None], torch.zeros_like(grad), grad)
    return loss, grad / T


def reference(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    t2_scale: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    vocab_size: int | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    head_mass: float = 0.5,
    t: float = 1.0,
    grad_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss (float64) and the float64 gradient of ``Σ loss ⊙ grad_output`` w.r.t. the student.

    ``grad_output`` defaults to ones of the loss's shape. The gradient has the student's full
    shape (zero in columns beyond ``vocab_size`` and in masked rows).
    """
    taid_t = float(t)
    s = student.detach().double()
    t = teacher.detach().double()
    if vocab_size is not None:
        s_used, t_used = s[..., :vocab_size], t[..., :vocab_size]
    else:
        assert s.shape[-1] == t.shape[-1], "reference needs equal vocabularies or vocab_size"
        s_used, t_used = s, t
    lead = s.shape[:-1]
    assert t.shape[:-1] == lead
    v = s_used.shape[-1]

    rows, grad_rows = row_losses(
        name,
        s_used.reshape(-1, v),
        t_used.reshape(-1, v),
        temperature=temperature,
        beta=beta,
        skew=skew,
        head_mass=head_mass,
        t=taid_t,
    )
    if labels is None:
        keep = torch.ones(rows.shape, dtype=torch.bool)
    else:
        keep = (labels.reshape(-1) != ignore_index).cpu()
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    grad_rows = torch.where(keep[:, None], grad_rows, torch.zeros_like(grad_rows))

    factor = float(temperature) ** 2 if t2_scale else 1.0
    if reduction == "none":
        loss = factor * rows.reshape(lead)
        go = torch.ones(lead, dtype=torch.float64) if grad_output is None else grad_output
        weights = factor * go.double().reshape(-1, 1)
    elif reduction == "sum":
        loss = factor * rows.sum()
        go = 1.0 if grad_output is None else float(grad_output)
        weights = factor * go
    elif reduction in ("mean", "batchmean"):
        if num_items_in_batch is None:
            denom = float(max(1, int(keep.sum())))
        else:
            denom = float(num_items_in_batch)
        loss = factor * rows.sum() / denom
        go = 1.0 if grad_output is None else float(grad_output)
        weights = factor * go / denom
    else:
        raise KeyError(reduction)

    grad = torch.zeros_like(s)
    grad[..., :v] = (grad_rows * weights).reshape(*lead, v)
    return loss, grad


def row_weight_bound(
    reduction: str, n_rows: int, n_kept: int, num_items_in_batch=None
) -> float:
    """Σ over rows of each row's weight in the reduced loss (for error bounds)."""
    if reduction == "none":
        return 1.0
    if reduction == "sum":
        return float(max(1, n_kept))
    denom = float(num_items_in_batch) if num_items_in_batch is not None else max(1, n_kept)
    return max(1.0, n_kept / denom)
