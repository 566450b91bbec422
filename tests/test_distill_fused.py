"""DistillationLoss.fused (api.md §4): the same total, parts and gradients as ``forward`` on the
materialised logits, for every teacher form, with the cross-entropy part fused too."""

from __future__ import annotations

import pytest
import torch

import kdfast

V, H, HT = 37, 12, 10


def _setup(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.6).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    th, tw = torch.randn(2, 6, HT, generator=g), torch.randn(V, HT, generator=g) * 0.6
    tb = torch.randn(V, generator=g) * 0.3
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return h, w, b, (th, tw, tb), labels


def _logits(h, w, b):
    z = h @ w.T
    return z if b is None else z + b


def _grads(out, params):
    params = [p for p in params if p is not None]
    return torch.autograd.grad(out, params)


def _compare(crit, h, w, b, teacher_fused, teacher_plain, labels, **kw):
    total, soft, hard = crit.fused(h, w, teacher_fused, labels, student_bias=b, return_parts=True, chunk_size=5, **kw)
    want_total, want_soft, want_hard = crit(_logits(h, w, b), teacher_plain, labels, return_parts=True, **kw)
    torch.testing.assert_close(total, want_total, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(soft, want_soft, rtol=2e-5, atol=1e-6)
    if want_hard is None:
        assert hard is None
    else:
        torch.testing.assert_close(hard, want_hard, rtol=2e-5, atol=1e-6)
    s = total if total.dim() == 0 else total.sum()
    ws = want_total if want_total.dim() == 0 else want_total.sum()
    for got, want in zip(_grads(s, (h, w, b)), _grads(ws, (h, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3}), ("reverse_kl", {}),
                                     ("akl", {"head_mass": 0.4}), ("taid", {}), ("tvd", {})])
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
@pytest.mark.parametrize("form", ["hidden", "logits"])
def test_fused_equals_forward_for_dense_teachers(loss, kw, hard_weight, form):
    h, w, b, (th, tw, tb), labels = _setup()
    crit = kdfast.DistillationLoss(loss, hard_weight=hard_weight, temperature=1.7, **kw)
    plain = _logits(th, tw, tb)
    fused_teacher = (th, tw, tb) if form == "hidden" else plain
    _compare(crit, h, w, b, fused_teacher, plain, labels)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_items", [None, 17])
def test_fused_reductions_and_accumulation(reduction, num_items):
    if reduction != "mean" and num_items is not None:
        pytest.skip("num_items_in_batch only matters for mean")
    h, w, b, teacher, labels = _setup(seed=1)
    crit = kdfast.DistillationLoss("forward_kl", hard_weight=0.3, reduction=reduction)
    _compare(crit, h, w, b, teacher, _logits(*teacher), labels, num_items_in_batch=num_items)


@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.2])
def test_fused_equals_forward_for_sparse_targets(method, hard_weight):
    h, w, _, teacher, labels = _setup(seed=2, bias=False)
    z_t = _logits(*teacher)
    targets = (kdfast.compress_topk(z_t, 6, temperature=2.0) if method == "topk"
               else kdfast.compress_sample(z_t, 20, temperature=2.0, seed=3))
    crit = kdfast.DistillationLoss("forward_kl", hard_weight=hard_weight)
    _compare(crit, h, w, None, targets, targets, labels)


def test_fused_with_a_padded_student_vocabulary():
    """vocab_size: the student's padding rows take part in neither part (zero gradient)."""
    h, w, b, (th, tw, tb), labels = _setup(seed=3)
    w_pad = torch.cat([w.detach(), torch.randn(5, H)]).requires_grad_()
    b_pad = torch.cat([b.detach(), torch.zeros(5)]).requires_grad_()
    crit = kdfast.DistillationLoss("jsd", hard_weight=0.5, vocab_size=V)
    _compare(crit, h, w_pad, b_pad, (th, tw, tb), _logits(th, tw, tb), labels)
    total = crit.fused(h, w_pad, (th, tw, tb), labels, student_bias=b_pad)
    gw, gb = torch.autograd.grad(total, (w_pad, b_pad))
    assert not gw[V:].any() and not gb[V:].any()


def test_fused_bf16_student():
    h, w, b, teacher, labels = _setup(seed=4, dtype=torch.bfloat16)
    crit = kdfast.DistillationLoss("forward_kl", hard_weight=0.5)
    total = crit.fused(h, w, teacher, labels, student_bias=b)
    want = crit(_logits(h.float(), w.float(), b.float()), _logits(*teacher), labels)
    torch.testing.assert_close(total, want, rtol=2e-2, atol=2e-3)
    gh, = torch.autograd.grad(total, (h,))
    assert gh.dtype == torch.bfloat16 and torch.isfinite(gh.float()).all()


def test_fused_argument_errors():
    h, w, b, teacher, labels = _setup()
    crit = kdfast.DistillationLoss("forward_kl", hard_weight=0.5)
    with pytest.raises(ValueError, match="labels"):
        crit.fused(h, w, teacher)
    with pytest.raises(TypeError, match="teacher"):
        crit.fused(h, w, "teacher", labels)
    with pytest.raises(TypeError, match="teacher"):
        crit.fused(h, w, None, labels)
    bad = labels.clone()
    bad[1, 1] = V + 3
    with pytest.raises(ValueError, match="labels"):
        crit.fused(h, w, teacher, bad)
    with pytest.raises(ValueError, match="teacher"):
        kdfast.DistillationLoss("sparse_kl").fused(h, w, teacher, labels)
