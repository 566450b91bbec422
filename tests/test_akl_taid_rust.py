"""The Rust kernels of akl and taid (``kdfast._native.dense_call``) against a float64
computation of their definitions (SPEC_akl_taid.md), losses and gradients."""

import pytest
import torch

from kdfast import _native


def _call(loss, param, zs, zt, temperature=1.0, labels=None):
    rows = torch.empty(zs.shape[0], dtype=torch.float32)
    grad = torch.empty_like(zs)
    _native.dense_call(loss, param, zs, zt, labels, -100, temperature, False, 1.0, rows, grad)
    return rows, grad


def _akl64(zs, zt, temperature, head_mass):
    lq = torch.log_softmax(zs.double() / temperature, -1)
    lp = torch.log_softmax(zt.double() / temperature, -1)
    q, p = lq.exp(), lp.exp()
    # The head from the f32 probabilities: stable sort descending, cumulative mass in float64.
    pf = p.float()
    order = torch.sort(pf, dim=-1, descending=True, stable=True).indices
    # Against head_mass + 2^-20 (the spec's tolerance); the whole row from 1 up.
    in_head = torch.gather(pf, -1, order).double().cumsum(-1) <= head_mass + 2.0**-20
    in_head[:, 0] = True
    in_head |= head_mass + 2.0**-20 >= 1
    head = torch.zeros_like(in_head).scatter(-1, order, in_head)
    gap = (p - q).abs()
    gh, gt = (gap * head).sum(-1), (gap * ~head).sum(-1)
    total = gh + gt
    wh = torch.where(total > 0, gh / total, 0.5)
    wt = torch.where(total > 0, gt / total, 0.5)
    fwd = (p * (lp - lq)).sum(-1)
    rev = (q * (lq - lp)).sum(-1)
    grad = wh[:, None] * (q - p) + wt[:, None] * q * ((lq - lp) - rev[:, None])
    return wh * fwd + wt * rev, grad / temperature


def _taid64(zs, zt, temperature, t):
    m = (1 - t) * zs.double() + t * zt.double()
    lq = torch.log_softmax(zs.double() / temperature, -1)
    lpt = torch.log_softmax(m / temperature, -1)
    pt = lpt.exp()
    return (pt * (lpt - lq)).sum(-1), (lq.exp() - pt) / temperature


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss,param", [("akl", 0.5), ("akl", 0.0), ("akl", 0.9), ("akl", 1.0), ("taid", 0.3), ("taid", 0.75)])
def test_matches_float64_definition(loss, param, temperature):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(64, 1000, generator=g) * 3
    zt = torch.randn(64, 1000, generator=g) * 3
    rows, grad = _call(loss, param, zs, zt, temperature)
    ref = _akl64 if loss == "akl" else _taid64
    l64, g64 = ref(zs, zt, temperature, param)
    torch.testing.assert_close(rows.double(), l64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), g64, rtol=1e-4, atol=1e-7)


def test_edges_and_masking():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(8, 300, generator=g) * 2
    zt = torch.randn(8, 300, generator=g) * 2
    fk = _call("forward_kl", 0.0, zs, zt)
    assert all(torch.equal(a, b) for a, b in zip(_call("taid", 1.0, zs, zt), fk))
    rows, grad = _call("taid", 0.0, zs, zt)
    assert torch.equal(rows, torch.zeros(8)) and torch.equal(grad, torch.zeros_like(grad))
    rows, grad = _call("akl", 0.5, zs, zs)  # p == q: weights ½, loss and gradient 0
    assert torch.equal(rows, torch.zeros(8)) and torch.equal(grad, torch.zeros_like(grad))
    labels = torch.tensor([0, -100, 2, 3, -100, 5, 6, 7])
    for loss, param in [("akl", 0.5), ("taid", 0.4)]:
        rows, grad = _call(loss, param, zs, zt, labels=labels)
        full, full_grad = _call(loss, param, zs, zt)
        keep = labels != -100
        assert torch.equal(rows[~keep], torch.zeros(2)) and not grad[~keep].any()
        torch.testing.assert_close(rows[keep], full[keep])
        torch.testing.assert_close(grad[keep], full_grad[keep])


@pytest.mark.parametrize("loss,param,name", [("akl", 1.5, "head_mass"), ("taid", -0.1, "t")])
def test_bad_parameters_name_the_argument(loss, param, name):
    zs = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=f"^{name}:"):
        _call(loss, param, zs, zs)
