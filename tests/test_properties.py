"""Hypothesis invariants: KL ≥ 0, loss(x, x) = 0, JSD symmetry and edges, backends agree."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    BACKENDS,
    extra_kwargs,
    logit_pairs,
    logit_scale,
    loss_fn,
    loss_names,
    reductions,
    run_loss,
    temperatures,
    tolerances,
)

backends = st.sampled_from(BACKENDS)


def per_row(name, student, teacher, backend, **kw):
    return loss_fn(name)(student, teacher, backend=backend, reduction="none", **kw)


@given(pair=logit_pairs(), temperature=temperatures, name=loss_names, backend=backends,
       param=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_losses_are_nonnegative_and_bounded(pair, temperature, name, backend, param):
    student, teacher = pair
    rows = per_row(name, student, teacher, backend, temperature=temperature,
                   **extra_kwargs(name, beta=param, skew=param))
    tol = 1e-6 * logit_scale(student, teacher, temperature)
    assert torch.isfinite(rows).all()
    assert (rows >= -tol).all(), rows
    if name == "tvd":
        assert (rows <= 1 + tol).all(), rows
    if name == "jsd" and 0 < param < 1:
        # β KL(p‖m) + (1−β) KL(q‖m) ≤ H(β) ≤ log 2
        bound = -param * math.log(param) - (1 - param) * math.log(1 - param)
        assert (rows <= bound + tol).all(), rows


@given(pair=logit_pairs(), temperature=temperatures, name=loss_names, backend=backends,
       reduction=reductions, t2_scale=st.booleans())
def test_loss_of_identical_inputs_is_zero(pair, temperature, name, backend, reduction, t2_scale):
    student, _ = pair
    loss, grad = run_loss(name, student, student.clone(), backend=backend,
                          temperature=temperature, reduction=reduction, t2_scale=t2_scale,
                          **extra_kwargs(name))
    t2 = temperature**2 if t2_scale else 1.0
    tol = 1e-6 * logit_scale(student, student, temperature) * t2
    assert torch.isfinite(loss).all()
    assert loss.abs().max().item() <= tol, loss
    if name != "tvd":  # TVD is not differentiable at p = q (any subgradient is fine)
        assert torch.isfinite(grad).all()
        assert grad.abs().max().item() <= tol / temperature, grad


@given(pair=logit_pairs(), temperature=temperatures, backend=backends)
def test_jsd_is_symmetric_at_half(pair, temperature, backend):
    student, teacher = pair
    a = per_row("jsd", student, teacher, backend, temperature=temperature, beta=0.5)
    b = per_row("jsd", teacher, student, backend, temperature=temperature, beta=0.5)
    tol = 1e-6 * logit_scale(student, teacher, temperature)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)


@given(pair=logit_pairs(), temperature=temperatures, backend=backends, reduction=reductions,
       edge=st.sampled_from([("jsd", "beta", 0.0, "forward_kl"),
                             ("jsd", "beta", 1.0, "reverse_kl"),
                             ("skew_forward_kl", "skew", 0.0, "forward_kl"),
                             ("skew_reverse_kl", "skew", 0.0, "reverse_kl")]))
def test_parameter_edges_are_plain_kl(pair, temperature, backend, reduction, edge):
    name, key, value, plain = edge
    student, teacher = pair
    got, got_grad = run_loss(name, student, teacher, backend=backend, temperature=temperature,
                             reduction=reduction, **{key: value})
    want, want_grad = run_loss(plain, student, teacher, backend=backend,
                               temperature=temperature, reduction=reduction)
    scale = logit_scale(student, teacher, temperature)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=2e-6 * scale / temperature)


@given(pair=logit_pairs(), temperature=temperatures, name=loss_names, backend=backends,
       shift=st.sampled_from([-40.0, 7.5, 100.0]))
def test_invariant_to_per_row_shifts(pair, temperature, name, backend, shift):
    student, teacher = pair
    base, base_grad = run_loss(name, student, teacher, backend=backend,
                               temperature=temperature, reduction="none", **extra_kwargs(name))
    shifted, shifted_grad = run_loss(name, student + shift, teacher - 0.5 * shift,
                                     backend=backend, temperature=temperature,
                                     reduction="none", **extra_kwargs(name))
    scale = logit_scale(student + shift, teacher - 0.5 * shift, temperature)
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=2e-6 * scale)
    if name != "tvd" or (base.abs() > 0).all():
        torch.testing.assert_close(shifted_grad, base_grad, rtol=1e-5,
                                   atol=2e-6 * scale / temperature)


@st.composite
def loss_options(draw, n_rows, vocab):
    opts = {"temperature": draw(temperatures), "reduction": draw(reductions),
            "t2_scale": draw(st.booleans())}
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        labels = torch.randint(0, 5, (n_rows,), generator=g)
        labels[torch.rand(n_rows, generator=g) < 0.4] = -100
        opts["labels"] = labels
    if opts["reduction"] == "mean" and draw(st.booleans()):
        opts["num_items_in_batch"] = draw(st.integers(1, 50) | st.integers(1, 50).map(torch.tensor))
    if vocab > 1 and draw(st.booleans()):
        opts["vocab_size"] = draw(st.integers(1, vocab))
    return opts


@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       name=loss_names, param=st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]))
def test_rust_backend_equals_torch_backend(data, dtype, name, param):
    student, teacher = data.draw(logit_pairs(dtype=dtype))
    opts = data.draw(loss_options(student.shape[0], student.shape[1]))
    if "vocab_size" in opts:  # keep a finite logit in every row of the used columns
        dead = torch.isinf(student[:, : opts["vocab_size"]]).all(-1)
        student[dead, 0] = 0.0
        teacher[dead, 0] = 0.0
    if name.startswith("skew") and param == 1.0:
        param = 0.99
    opts.update(extra_kwargs(name, beta=param, skew=param))
    rust_loss, rust_grad = run_loss(name, student, teacher, backend="rust", **opts)
    torch_loss, torch_grad = run_loss(name, student, teacher, backend="torch", **opts)
    assert rust_loss.dtype == torch_loss.dtype == torch.float32
    assert rust_grad.dtype == torch_grad.dtype == dtype
    T = opts["temperature"]
    t2 = T * T if opts["t2_scale"] else 1.0
    scale = logit_scale(student, teacher, T, opts.get("vocab_size"))
    v_weight = student.shape[0]  # bound on Σ row weights (sum, or mean with a small D)
    v_rtol, v_atol, g_rtol, g_atol = tolerances(
        dtype, scale=scale, grad_unit=t2 / T, ref_grad=torch_grad.double()
    )
    # Each backend is within tolerance of the truth, so allow twice the reference tolerance.
    torch.testing.assert_close(rust_loss, torch_loss, rtol=2 * v_rtol,
                               atol=2 * v_atol * t2 * v_weight)
    torch.testing.assert_close(rust_grad.double(), torch_grad.double(), rtol=2 * g_rtol,
                               atol=2 * g_atol)


@given(pair=logit_pairs(), temperature=temperatures, name=loss_names, backend=backends,
       param=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_gradient_rows_sum_to_zero(pair, temperature, name, backend, param):
    """Every loss is invariant to adding a constant to a row of student logits, so each row of
    the gradient sums to 0 (up to float32 rounding of the row's terms)."""
    student, teacher = pair
    rows, grad = run_loss(name, student, teacher, backend=backend, temperature=temperature,
                          reduction="sum", **extra_kwargs(name, beta=param, skew=param))
    assert torch.isfinite(grad).all()
    bound = 1e-6 * logit_scale(student, teacher, temperature) / temperature
    row_sums = grad.double().sum(-1).abs()
    assert (row_sums <= bound).all(), (row_sums, bound)
