"""Checks of the float64 yardstick itself (tests/reference64.py); no kdfast needed."""

import math

import pytest
import torch

from reference64 import LOSSES, reference, row_losses


def _naive_rows(name, s, t, T, beta, skew):
    """Textbook formulas on probabilities (finite inputs only), differentiable by autograd."""
    q = torch.softmax(s / T, -1)
    p = torch.softmax(t / T, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":  # weights from a detached student, head by a stable descending sort
        with torch.no_grad():
            sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
            head = sp.cumsum(-1) <= beta + 2.0**-20
            head[:, 0] = True
            head = torch.zeros_like(head).scatter(-1, order, head)
            gap = (p - q).abs()
            g_h, g_t = (gap * head).sum(-1), (gap * ~head).sum(-1)
        return g_h / (g_h + g_t) * kl(p, q) + g_t / (g_h + g_t) * kl(q, p)
    if name == "taid":
        pt = torch.softmax(((1 - beta) * s.detach() + beta * t) / T, -1)
        return kl(pt, q)
    raise KeyError(name)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("param", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_closed_form_gradient_matches_autograd(name, temperature, param):
    if name.startswith("skew") and param == 1.0:
        pytest.skip("skew must be < 1")
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(5, 11, generator=g, dtype=torch.float64) * 2
    naive = _naive_rows(name, s, t, temperature, param, param)
    (auto_grad,) = torch.autograd.grad(naive.sum(), s)
    rows, grad = row_losses(name, s, t, temperature=temperature, beta=param, skew=param, head_mass=param, t=param)
    torch.testing.assert_close(rows, naive.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, auto_grad, rtol=1e-10, atol=1e-13)


def test_known_values():
    # Two categories: p = (0.5, 0.5) and q = (0.25, 0.75).
    t = torch.zeros(1, 2, dtype=torch.float64)
    s = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    p, q = [0.5, 0.5], [0.25, 0.75]
    fkl = sum(a * math.log(a / b) for a, b in zip(p, q))
    rkl = sum(b * math.log(b / a) for a, b in zip(p, q))
    m = [0.5 * a + 0.5 * b for a, b in zip(p, q)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m)
    )
    expect = {"forward_kl": fkl, "reverse_kl": rkl, "jsd": jsd, "tvd": 0.25}
    for name, value in expect.items():
        rows, _ = row_losses(name, s, t)
        assert rows.item() == pytest.approx(value, rel=1e-14)
    assert jsd <= math.log(2)


def test_negative_infinity_and_underflow_are_finite():
    s = torch.tensor([[0.0, float("-inf"), -150.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, float("-inf"), -900.0, 2.0]], dtype=torch.float64)
    for name in LOSSES:
        rows, grad = row_losses(name, s, t, temperature=0.5)
        assert torch.isfinite(rows).all(), name
        assert torch.isfinite(grad).all(), name
        assert grad[0, 1] == 0, name


def test_forward_kl_is_infinite_when_student_excludes_teacher_mass():
    s = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    rows, _ = row_losses("forward_kl", s, t)
    assert rows.item() == math.inf


def test_reduction_masking_and_vocab_size():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g)
    t = torch.randn(2, 3, 6, generator=g)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    rows, _ = reference("forward_kl", s, t, reduction="none", labels=labels, vocab_size=6)
    assert rows.shape == (2, 3)
    assert (rows[labels == -100] == 0).all()
    mean, grad = reference("forward_kl", s, t, labels=labels, vocab_size=6)
    assert mean.item() == pytest.approx(rows.sum().item() / 3)
    assert (grad[..., 6] == 0).all()
    assert (grad[labels == -100] == 0).all()
    total, _ = reference(
        "forward_kl", s, t, labels=labels, vocab_size=6, num_items_in_batch=10,
        temperature=2.0, t2_scale=True,
    )
    rows2, _ = reference("forward_kl", s, t, labels=labels, vocab_size=6, temperature=2.0,
                         reduction="none")
    assert total.item() == pytest.approx(4.0 * rows2.sum().item() / 10)
