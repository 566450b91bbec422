"""AKL and TAID (api.md §1): invariants, the stop-gradient in their gradients, TAID's tensor
``t`` and its schedule, and the training objects that carry them.

Values and gradients against the float64 yardstick on every backend, hostile inputs and
argument errors come from the suites parametrised over every loss (test_dense_losses,
test_hostile_inputs, test_errors, test_op_layer); this file holds what is particular to them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast
from conftest import logit_pairs, make_logits
from reference64 import row_losses as ref_rows

BACKENDS = ("rust", "torch") + (("triton",) if kdfast._triton.usable(torch.device("cpu")) else ())


def _backends(name):
    return [b for b in BACKENDS if b in kdfast.LOSSES[name].backends]


# ----------------------------------------------------------------------------- AKL


@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(neg_inf=False), head_mass=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]),
       temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_akl_lies_between_forward_and_reverse_kl(pair, head_mass, temperature):
    s, t = (x.double() for x in pair)
    kw = dict(temperature=temperature, reduction="none", backend="torch")
    a = kdfast.akl(s, t, head_mass=head_mass, **kw)
    f, r = kdfast.forward_kl(s, t, **kw), kdfast.reverse_kl(s, t, **kw)
    lo, hi = torch.minimum(f, r), torch.maximum(f, r)
    assert (a >= lo - 1e-12).all() and (a <= hi + 1e-12).all()


@pytest.mark.parametrize("backend", _backends("akl"))
def test_akl_head_edges(backend):
    """head_mass = 1 puts every id in the head (AKL = forward KL); p = q gives ½ each (0)."""
    s, t = make_logits((6, 50), seed=4)
    f = kdfast.forward_kl(s, t, reduction="none", backend=backend)
    a = kdfast.akl(s, t, head_mass=1.0, reduction="none", backend=backend)
    torch.testing.assert_close(a, f, rtol=2e-5, atol=1e-6)
    same = kdfast.akl(t.clone().requires_grad_(), t, reduction="none", backend=backend)
    assert torch.equal(same, torch.zeros(6))


@pytest.mark.parametrize("backend", _backends("akl"))
@pytest.mark.parametrize("head_mass", [0.0, 0.25, 0.5, 0.51, 1.0])
def test_akl_ties_take_the_lower_id_first(backend, head_mass):
    """Uniform and repeated teacher rows: the head is decided by id among equal probabilities."""
    v = 8
    teacher = torch.zeros(3, v)
    teacher[1, :4] = 2.0  # four tied leaders
    teacher[2] = torch.tensor([1.0, 3.0, 1.0, 3.0, 0.0, 3.0, 1.0, 0.0])
    student = torch.randn(3, v, generator=torch.Generator().manual_seed(2)) * 2
    leaf = student.clone().requires_grad_()
    out = kdfast.akl(leaf, teacher, head_mass=head_mass, reduction="sum", backend=backend)
    out.backward()
    rows, grad = ref_rows("akl", student, teacher, head_mass=head_mass)
    torch.testing.assert_close(out.double(), rows.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), grad, rtol=1e-4, atol=1e-6)


def test_akl_weights_are_constants_for_the_gradient():
    """∂AKL/∂z_s = w_h ∂FKL + w_t ∂RKL with the weights held fixed (api.md)."""
    s, t = (x.double() for x in make_logits((5, 17), seed=7))
    leaf = s.clone().requires_grad_()
    kdfast.akl(leaf, t, head_mass=0.4, reduction="sum", backend="torch").backward()
    lq = torch.log_softmax(s, -1)
    lp = torch.log_softmax(t, -1)
    w_h, w_t = kdfast.reference.akl_weights(lq, lp, 0.4)
    x = s.clone().requires_grad_()
    f = kdfast.forward_kl(x, t, reduction="none", backend="torch")
    r = kdfast.reverse_kl(x, t, reduction="none", backend="torch")
    (w_h * f + w_t * r).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- TAID


@pytest.mark.parametrize("backend", _backends("taid"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taid_edges(backend, dtype):
    """t = 1 is forward KL exactly; t = 0 is 0 with a zero gradient (also as tensors)."""
    s, t = make_logits((4, 33), seed=1, dtype=dtype)
    for t1 in (1.0, torch.tensor(1.0)):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        x = kdfast.taid(a, t, t=t1, temperature=2.0, backend=backend)
        y = kdfast.forward_kl(b, t, temperature=2.0, backend=backend)
        x.backward()
        y.backward()
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    for t0 in (0.0, torch.tensor(0.0)):
        a = s.clone().requires_grad_()
        x = kdfast.taid(a, t, t=t0, backend=backend)
        x.backward()
        assert x.item() == 0.0 and not a.grad.any()


@pytest.mark.parametrize("backend", _backends("taid"))
def test_taid_tensor_t_equals_float_t(backend):
    s, t = make_logits((4, 21), seed=3)
    for value in (0.1, 0.37, 0.9):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        x = kdfast.taid(a, t, t=value, backend=backend, reduction="none")
        y = kdfast.taid(b, t, t=torch.tensor(value), backend=backend, reduction="none")
        x.sum().backward()
        y.sum().backward()
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)


def test_taid_interpolated_teacher_is_detached():
    """∂TAID/∂z_s = (q − p_t)/T: the student inside p_t is a constant."""
    s, t = (x.double() for x in make_logits((3, 11), seed=9))
    leaf = s.clone().requires_grad_()
    kdfast.taid(leaf, t, t=0.3, temperature=1.5, reduction="sum", backend="torch").backward()
    pt = torch.softmax((0.7 * s + 0.3 * t) / 1.5, -1)
    q = torch.softmax(s / 1.5, -1)
    torch.testing.assert_close(leaf.grad, (q - pt) / 1.5, rtol=1e-12, atol=1e-14)


def test_taid_without_t_is_a_type_error():
    with pytest.raises(TypeError, match="'t'"):
        kdfast.taid(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(TypeError, match="t"):
        kdfast.taid(torch.randn(2, 5), torch.randn(2, 5), t=torch.ones(2))
    with pytest.raises(TypeError, match="needs t="):
        kdfast.fused_linear_distill_loss(torch.randn(2, 4), torch.randn(5, 4), teacher_logits=torch.randn(2, 5),
                                         loss="taid")


def test_taid_disjoint_support_is_infinite_not_nan():
    s = torch.tensor([[0.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([[float("-inf"), 0.0]])
    for backend in _backends("taid"):
        out = kdfast.taid(s, t, t=0.5, backend=backend, reduction="sum")
        out.backward()
        assert out.item() == math.inf and not s.grad.any()
        s.grad = None


@pytest.mark.parametrize("backend", _backends("taid"))
def test_taid_tensor_t_compiles_once(backend):
    """A tensor t changes without recompiling (fullgraph)."""
    torch._dynamo.reset()
    s, t = make_logits((4, 16), seed=5)
    fn = torch.compile(lambda a, b, tt: kdfast.taid(a, b, t=tt, backend=backend), fullgraph=True)
    for value in (0.2, 0.5, 0.8):
        leaf = s.clone().requires_grad_()
        out = fn(leaf, t, torch.tensor(value))
        out.backward()
        want = kdfast.taid(s, t, t=value, backend="torch")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- TAIDSchedule


def _rule(t, m, prev, loss, progress, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    if prev is not None:
        m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
    t = min(t_end, max(t_start + (t_end - t_start) * progress, t + alpha / (1 + math.exp(-m)) * (1 - t)))
    return t, m


def test_schedule_follows_the_paper_rule():
    sched = kdfast.TAIDSchedule()
    assert sched.t == 0.4
    t, m, prev = 0.4, 0.0, None
    losses = [3.0, 2.5, 2.6, 1.0, 0.9, 0.95]
    for i, loss in enumerate(losses):
        progress = i / 100
        t, m = _rule(t, m, prev, loss, progress)
        prev = loss
        assert sched.update(loss, progress) == pytest.approx(t, rel=1e-15)
        assert sched.momentum == pytest.approx(m, rel=1e-12, abs=1e-18)
    assert sched.update(1.0, 1.0) == 1.0  # the floor reaches t_end; the cap holds it there
    assert sched.update(0.5, 1.0) == 1.0


def test_schedule_tensor_losses_match_float_losses_without_syncing():
    a, b = kdfast.TAIDSchedule(0.2, 0.9, alpha=0.05, beta=0.5), kdfast.TAIDSchedule(0.2, 0.9, alpha=0.05, beta=0.5)
    for i, loss in enumerate([4.0, 3.0, float("nan"), 2.0, 2.5, 1.0]):
        ta = a.update(loss, i / 10)
        tb = b.update(torch.tensor(loss, dtype=torch.float32), i / 10)
        assert isinstance(tb, torch.Tensor) and tb.dim() == 0
        assert float(tb) == pytest.approx(ta, rel=1e-6)
    assert b.state_dict() == pytest.approx(a.state_dict(), rel=1e-6)


def test_schedule_skips_non_finite_losses():
    sched = kdfast.TAIDSchedule(alpha=0.1)
    sched.update(2.0, 0.0)
    m = sched.momentum
    sched.update(float("inf"), 0.0)
    assert sched.momentum == m and sched.prev_loss == 2.0 and math.isfinite(sched.t)


def test_schedule_state_round_trip():
    sched = kdfast.TAIDSchedule(0.3, 0.8, alpha=0.01, beta=0.9)
    for i, loss in enumerate([3.0, 2.0, 1.5]):
        sched.update(loss, i / 10)
    state = json.loads(json.dumps(sched.state_dict()))
    other = kdfast.TAIDSchedule()
    other.load_state_dict(state)
    assert other.state_dict() == sched.state_dict()
    assert other.update(1.2, 0.5) == sched.update(1.2, 0.5)


@pytest.mark.parametrize("kwargs,word", [
    (dict(t_start=-0.1), "t_start"), (dict(t_start=0.5, t_end=0.4), "t_end"), (dict(t_end=1.5), "t_end"),
    (dict(alpha=-1.0), "alpha"), (dict(beta=1.5), "beta"), (dict(alpha=float("nan")), "alpha"),
])
def test_schedule_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        kdfast.TAIDSchedule(**kwargs)


def test_schedule_bad_update_arguments():
    sched = kdfast.TAIDSchedule()
    with pytest.raises(ValueError, match="progress"):
        sched.update(1.0, 1.5)
    with pytest.raises(TypeError, match="loss"):
        sched.update("1.0", 0.5)
    with pytest.raises(ValueError, match="loss"):
        sched.update(torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({"t": 0.5})


# ----------------------------------------------------------------------------- training objects


def test_distillation_loss_uses_its_schedule_and_checkpoints_it():
    crit = kdfast.DistillationLoss("taid", temperature=2.0)
    assert isinstance(crit.schedule, kdfast.TAIDSchedule)
    s, t = make_logits((2, 5, 13), seed=2)
    total, soft, _ = crit(s, t, return_parts=True)
    torch.testing.assert_close(soft, kdfast.taid(s, t, t=0.4, temperature=2.0))
    crit.schedule.update(soft, 0.5)
    torch.testing.assert_close(crit(s, t), kdfast.taid(s, t, t=float(crit.schedule.t), temperature=2.0))
    other = kdfast.DistillationLoss("taid", temperature=2.0)
    other.load_state_dict(crit.state_dict())
    assert float(other.schedule.t) == float(crit.schedule.t)
    fixed = kdfast.DistillationLoss("taid", t=0.25)
    assert fixed.schedule is None
    torch.testing.assert_close(fixed(s, t), kdfast.taid(s, t, t=0.25))


@pytest.mark.parametrize("name,kw", [("akl", dict(head_mass=0.3)), ("taid", dict(t=0.6)),
                                     ("taid", dict(t=torch.tensor(0.6)))])
def test_fused_linear_equals_the_unfused_loss(name, kw):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g).requires_grad_()
    w = (torch.randn(29, 16, generator=g) * 0.5).requires_grad_()
    th, tw = torch.randn(2, 7, 12, generator=g), torch.randn(29, 12, generator=g)
    labels = torch.randint(0, 29, (2, 7), generator=g)
    labels[0, :3] = -100
    fused = kdfast.fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw, loss=name, labels=labels,
                                             temperature=1.5, chunk_size=5, **kw)
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = getattr(kdfast, name)(h @ w.T, th @ tw.T, labels=labels, temperature=1.5, **kw)
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
