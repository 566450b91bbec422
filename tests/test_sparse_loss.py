"""sparse_loss: every loss × tail × backend × dtype × temperature against a float64 yardstick
built here from the category distributions, gradients (gradcheck on the float64 reference),
hostile inputs, the +inf rule, invariants (k = V equals the dense losses, TVD and JSD bounds,
β edges), every error case, and the layers above (DistillationLoss, the fused head).

The Triton kernel's cases are in test_triton_sparse.py (they reuse ``check_case``)."""

import math

import kdfast
import pytest
import torch
from conftest import NEG_INF
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse import draw_topk_problem, hostile_pair, labelled_problem, reduced, scale_of, tolerances

BACKENDS = ("rust", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")
#: (loss, keywords) of every sparse top-k loss, with β edges.
LOSSES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {})]
LOSS_IDS = ["forward_kl", "reverse_kl", "jsd0.3", "tvd"]
TAILS = ("bucket", "bucket_no_tail", "renorm")


# ----------------------------------------------------------------------------- the yardstick


def _where(cond, x, fill):
    """``x`` where ``cond``, else ``fill``, with ``x`` replaced by 0 first (finite backward)."""
    return torch.where(cond, torch.where(cond, x, torch.zeros_like(x)), torch.full_like(x, fill))


def category_loss(loss, lq, lp, beta=0.5):
    """ℓ of ``loss`` between category log-probabilities (1-D, float64), the +inf rule included."""
    q_alive, p_alive = lq > NEG_INF, lp > NEG_INF
    lq0, lp0 = _where(q_alive, lq, 0.0), _where(p_alive, lp, 0.0)
    kl = (lambda la, lb, a_alive, b_alive: math.inf if bool((a_alive & ~b_alive).any()) else
          torch.where(a_alive & b_alive, la.exp() * (la - lb), torch.zeros_like(la)).sum())
    if loss == "jsd" and beta in (0.0, 1.0):
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    if loss == "forward_kl":
        return kl(lp0, lq0, p_alive, q_alive)
    if loss == "reverse_kl":
        return kl(lq0, lp0, q_alive, p_alive)
    if loss == "tvd":
        return 0.5 * (torch.where(p_alive, lp0.exp(), 0.0) - torch.where(q_alive, lq0.exp(), 0.0)).abs().sum()
    m_alive = q_alive | p_alive
    lm = torch.logaddexp(_where(p_alive, lp0 + math.log(beta), -1e300), _where(q_alive, lq0 + math.log1p(-beta), -1e300))
    lm = _where(m_alive, lm, 0.0)
    return beta * kl(lp0, lm, p_alive, m_alive) + (1 - beta) * kl(lq0, lm, q_alive, m_alive)


def yardstick(student, tg, temperature, *, loss="forward_kl", beta=0.5, tail="bucket"):
    """float64 per-row ℓ and ∂(Σℓ)/∂z_s from api.md §2: the category distributions built from the
    dense log-softmax by indexing, the loss written out above, the gradient by autograd (zero in
    +inf rows)."""
    s = student.detach().double().reshape(-1, student.shape[-1]).requires_grad_(True)
    n, v = s.shape
    lq_full = torch.log_softmax(s / temperature, -1)
    ids, lps = tg.indices.reshape(n, -1), tg.logprobs.reshape(n, -1).double()
    rows = []
    for r in range(n):
        keep = ids[r] >= 0
        if tg.method == "sample":
            w = tg.weights.reshape(n, -1)[r].double()
            keep &= w > 0
            rows.append((w[keep] * (lps[r][keep] - lq_full[r, ids[r][keep]])).sum())
            continue
        i, lp = ids[r][keep], lps[r][keep]
        p = lp.exp()
        if tail == "renorm":
            if p.sum() == 0:
                rows.append(s[r].sum() * 0.0)
                continue
            lpt = lp - p.sum().log()
            if loss == "forward_kl":  # sparse_kl: the full-vocabulary log q
                rows.append(category_loss("forward_kl", lq_full[r, i], lpt))
                continue
            lq = lq_full[r, i]
            rows.append(category_loss(loss, lq - torch.logsumexp(lq[lq > NEG_INF], 0), lpt, beta))
            continue
        listed = torch.zeros(v, dtype=torch.bool)
        listed[i] = True
        if listed.all():
            lp_tail = torch.tensor(NEG_INF, dtype=torch.float64)
        elif tg.tail_logprob is not None:
            lp_tail = tg.tail_logprob.reshape(n)[r].double()
        else:
            lp_tail = (1 - p.sum()).clamp(min=0).log()
        rest = lq_full[r, ~listed]
        rest = rest[rest > NEG_INF]  # (an all -inf logsumexp has a NaN backward)
        lq_tail = torch.logsumexp(rest, 0) if rest.numel() else torch.tensor(NEG_INF, dtype=torch.float64)
        rows.append(category_loss(loss, torch.cat([lq_full[r, i], lq_tail[None]]), torch.cat([lp, lp_tail[None]]), beta))
    rows = torch.stack([x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64) for x in rows])
    finite = torch.isfinite(rows)
    grad = torch.autograd.grad(rows[finite].sum(), s, allow_unused=True)[0] if finite.any() else None
    grad = torch.zeros_like(s) if grad is None else torch.where(finite[:, None], grad, 0.0)
    return rows.detach(), grad.reshape(student.shape)


# ----------------------------------------------------------------------------- helpers


def make_targets(tail, teacher, k, temperature):
    tg = kdfast.compress_topk(teacher, k, temperature=temperature)
    if tail == "bucket_no_tail":
        tg = kdfast.SparseTargets(indices=tg.indices, logprobs=tg.logprobs, temperature=temperature)
    return tg


def run(student, tg, **kw):
    leaf = student.detach().clone().requires_grad_(True)
    loss = kdfast.sparse_loss(leaf, tg, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), leaf.grad


def check_case(runner, backend, loss, kw, tail, dtype, temperature, n=5, v=37, k=6, seed=0):
    """``runner(student, targets, **kwargs) -> (loss, grad)`` against :func:`yardstick` on hostile
    inputs: randn × 20 with -inf at the same places on both sides, so rows have fewer than k
    finite teacher ids (-1 slots)."""
    s64, t64 = hostile_pair(n, v, seed=seed + v + k, scale=20.0)
    student, teacher = s64.to(dtype), t64.to(dtype)
    tg = make_targets(tail, teacher, k, temperature)
    mode = "renorm" if tail == "renorm" else "bucket"
    got, grad = runner(student, tg, loss=loss, tail=mode, reduction="none", backend=backend, **kw)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert grad.dtype == dtype and grad.shape == student.shape
    want, want_grad = yardstick(student, tg, temperature, loss=loss, tail=mode, **kw)
    if tail == "bucket_no_tail" and loss != "forward_kl":
        # p_tail = 1 − Σp below float64 rounding (T = 0.05) is the sum's rounding noise, which
        # the losses that weigh the student's tail by log p_tail turn into O(1) differences.
        rest = 1 - torch.where(tg.indices >= 0, tg.logprobs.double().exp(), 0.0).sum(-1)
        ok = rest.abs() > 1e-12
        got, grad, want, want_grad = got[ok], grad[ok], want[ok], want_grad[ok]
        if not ok.any():
            return
    scale = scale_of(student.double(), teacher.double(), temperature=temperature)
    v_rtol, v_atol, g_rtol, g_atol = tolerances(dtype, scale, 1.0 / temperature, want_grad)
    # +inf only where the yardstick has it (e.g. reverse KL without a stored tail at T = 0.05,
    # where 1 − Σp rounds to 0 while q_tail > 0), with a zero gradient row.
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not torch.isnan(got).any()
    assert torch.isfinite(grad).all() and (grad[torch.isinf(got)] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=v_rtol, atol=v_atol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=g_rtol, atol=g_atol)


# ----------------------------------------------------------------------------- vs the yardstick


def test_yardstick_matches_sparse_kl_reference():
    # The yardstick's forward KL is test_sparse.py's closed-form sparse_kl reference.
    from test_sparse import reference

    s64, t64 = hostile_pair(4, 30, seed=1, scale=5.0)
    for tail in TAILS:
        tg = make_targets(tail, t64.float(), 5, 1.5)
        mode = "renorm" if tail == "renorm" else "bucket"
        a, ga = yardstick(s64, tg, 1.5, tail=mode)
        b, gb = reference(s64, tg, 1.5, mode)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_float64_yardstick(backend, loss, kw, dtype):
    for tail in TAILS:
        for temperature in (0.05, 1.0, 10.0):
            check_case(run, backend, loss, kw, tail, dtype, temperature)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("v,k", [(1, 1), (2, 3), (4099, 9), (300, 300)])
def test_rust_matches_yardstick_at_block_edges_and_k_equal_v(tail, v, k):
    for loss, kw in LOSSES + [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})]:
        check_case(run, "rust", loss, kw, tail, torch.float32, 1.3, n=3, v=v, k=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,kw", LOSSES[1:], ids=LOSS_IDS[1:])
def test_reductions_labels_and_t2(backend, loss, kw):
    student, tg, labels = labelled_problem()
    keep = (labels.reshape(20) != -100).double()
    for tail, reduction in (("bucket", "mean"), ("bucket", "none"), ("renorm", "sum"), ("renorm", "mean")):
        ref_rows, ref_grad = yardstick(student.reshape(20, 301), tg.reshape(20), 1.5, loss=loss, tail=tail, **kw)
        ref_rows, ref_grad = ref_rows * keep * 2.25, ref_grad * keep[:, None] * 2.25
        for nib in (None, 37):
            got, grad = run(student, tg, loss=loss, tail=tail, labels=labels, reduction=reduction, t2_scale=True,
                            temperature=1.5, num_items_in_batch=nib, backend=backend, **kw)
            want, want_grad = reduced(ref_rows, ref_grad, keep, reduction, nib, (4, 5))
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
            assert (grad[0, :3] == 0).all()


@pytest.mark.parametrize("loss,kw", LOSSES + [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})],
                         ids=LOSS_IDS + ["jsd0", "jsd1"])
@pytest.mark.parametrize("tail", TAILS)
def test_torch_backend_gradcheck(loss, kw, tail):
    s64, t64 = hostile_pair(3, 9, seed=6, scale=2.0, neg_inf=0.2)
    tg = make_targets(tail, t64, 4, 1.3)
    mode = "renorm" if tail == "renorm" else "bucket"
    fn = (lambda s: kdfast.sparse_loss(s, tg, loss=loss, tail=mode, reduction="sum", backend="torch", **kw))
    leaf = s64.clone().requires_grad_(True)
    assert fn(leaf).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (leaf,))
    want, want_grad = yardstick(s64, tg, 1.3, loss=loss, tail=mode, **kw)
    got, grad = run(s64, tg, loss=loss, tail=mode, reduction="none", backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- hostile inputs


def check_infinite_rows(runner, backend):
    """The +inf rule: reverse KL with an empty teacher tail (tail_logprob = -inf) while the
    student has mass outside the listed ids is +inf with a zero gradient row; JSD and TVD stay
    finite; forward KL (and jsd at β = 0) with teacher mass at an id the student excludes is +inf."""
    s = torch.randn(3, 20, generator=torch.Generator().manual_seed(0)) * 3
    s[2, 2] = NEG_INF
    tg = kdfast.SparseTargets(indices=torch.tensor([[2, 5], [2, 5], [2, 5]]),
                              logprobs=torch.tensor([[0.75, 0.25]] * 3).log(),
                              tail_logprob=torch.tensor([NEG_INF, -1.0, -1.0]))
    for loss, kw in (("reverse_kl", {}), ("jsd", {"beta": 1.0})):
        got, grad = runner(s, tg, loss=loss, reduction="none", backend=backend, **kw)
        assert got[0] == math.inf and (grad[0] == 0).all(), loss
        assert torch.isfinite(got[1:]).all() and torch.isfinite(grad).all()
    for loss, kw in (("jsd", {"beta": 0.5}), ("jsd", {"beta": 1e-6}), ("tvd", {})):
        got, grad = runner(s, tg, loss=loss, reduction="none", backend=backend, **kw)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all() and (got[0] > 0), loss
    for loss, kw, tail in (("forward_kl", {}, "bucket"), ("forward_kl", {}, "renorm"), ("jsd", {"beta": 0.0}, "renorm")):
        got, grad = runner(s, tg, loss=loss, tail=tail, reduction="none", backend=backend, **kw)
        assert got[2] == math.inf and (grad[2] == 0).all() and torch.isfinite(got[:2]).all(), (loss, tail)
    # Mixed in a mean: the +inf row leaves the other rows' gradient finite.
    got, grad = runner(s, tg, loss="reverse_kl", backend=backend)
    assert got == math.inf and torch.isfinite(grad).all() and (grad[1] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_rows_have_zero_gradients(backend):
    check_infinite_rows(run, backend)


def check_zero_mass_conventions(runner, backend):
    """Rows with no listed id: renorm gives 0 (no teacher mass), bucket without a tail compares
    p_tail = 1 with q_tail = 1 (0); a listed id with teacher log-prob -inf is a category with
    P = 0 (reverse KL +inf there, TVD counts its Q)."""
    s = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    none = kdfast.SparseTargets(indices=torch.full((2, 3), -1), logprobs=torch.full((2, 3), NEG_INF))
    for loss, kw in LOSSES:
        for tail in ("renorm", "bucket"):
            got, grad = runner(s, none, loss=loss, tail=tail, reduction="none", backend=backend, **kw)
            assert got.abs().max() < 1e-6 and grad.abs().max() < 1e-6, (loss, tail)
    dead = kdfast.SparseTargets(indices=torch.tensor([[3, 4], [3, -1]]),
                                logprobs=torch.tensor([[-0.1, NEG_INF], [-0.1, NEG_INF]]))
    got, _ = runner(s, dead, loss="reverse_kl", tail="renorm", reduction="none", backend=backend)
    assert got[0] == math.inf and abs(got[1]) < 1e-6
    got, _ = runner(s, dead, loss="tvd", tail="renorm", reduction="none", backend=backend)
    q = torch.softmax(s[0, [3, 4]].double(), 0)
    torch.testing.assert_close(got[0].double(), 0.5 * ((1 - q[0]) + q[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_mass_conventions(backend):
    check_zero_mass_conventions(run, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,kw", LOSSES[1:], ids=LOSS_IDS[1:])
def test_extreme_spreads_stay_finite(backend, loss, kw):
    # Spread 1e4 at T = 0.05 (|z/T| up to 2e5: q_tail and p_tail far below 1e-38), half the
    # entries -inf; and all-equal logits.
    for scale in (1e4, 0.0):
        if scale == 0.0 and loss == "tvd":
            continue  # P = Q up to rounding: TVD's subgradient is the sign of that rounding
        s64, t64 = hostile_pair(4, 300, seed=1, scale=scale, neg_inf=0.5)
        for tail in ("bucket", "renorm"):
            tg = kdfast.compress_topk(t64.float(), 7, temperature=0.05)
            got, grad = run(s64.float(), tg, loss=loss, tail=tail, reduction="none", backend=backend, **kw)
            assert torch.isfinite(got).all() and torch.isfinite(grad).all()
            want, want_grad = yardstick(s64.float(), tg, 0.05, loss=loss, tail=tail, **kw)
            # JSD and TVD are bounded: their values to float32 precision whatever |d| (regression:
            # the Rust JSD's log p − log m once lost ulp(d), 1 % at |d| ~ 1e5).
            atol = 1e-6 if loss != "reverse_kl" else 1e-6 * (1 + scale / 0.05)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol)
            torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6 * (1 + scale / 0.05) / 0.05)


# ----------------------------------------------------------------------------- invariants


@settings(max_examples=15)
@given(data=st.data())
def test_k_equal_v_bucket_is_the_dense_loss(data):
    n = data.draw(st.integers(1, 3))
    v = data.draw(st.integers(1, 60))
    temperature = data.draw(st.sampled_from([0.05, 0.5, 1.0, 3.0]))
    scale = data.draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    loss, kw = data.draw(st.sampled_from([("reverse_kl", {}), ("tvd", {}), ("jsd", {"beta": 0.5}),
                                          ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})]))
    s64, t64 = hostile_pair(n, v, seed=data.draw(st.integers(0, 10_000)), scale=scale,
                            neg_inf=data.draw(st.sampled_from([0.0, 0.4])))
    # Rust in float32 (within float32 rounding of |z/T|); the torch backend in float64, up to the
    # float32 rounding of the stored teacher log-probs.
    unit = 1 + scale / temperature
    for backend, dt, tol in (("rust", torch.float32, 2e-6 * unit), ("torch", torch.float64, 2e-7 * unit)):
        tg = kdfast.compress_topk(t64.to(dt), v, temperature=temperature, backend=backend)
        got, grad = run(s64.to(dt), tg, loss=loss, reduction="none", backend=backend, **kw)
        want, want_grad = _dense(loss, kw, s64.to(dt), t64.to(dt), temperature, backend)
        rtol = 1e-5 if dt == torch.float32 else 1e-6
        torch.testing.assert_close(got, want, rtol=rtol, atol=tol)
        torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=tol / temperature)


def _dense(loss, kw, student, teacher, temperature, backend):
    leaf = student.detach().clone().requires_grad_(True)
    out = getattr(kdfast, loss)(leaf, teacher, temperature=temperature, reduction="none", backend=backend, **kw)
    out.sum().backward()
    return out.detach(), leaf.grad


@settings(max_examples=15)
@given(data=st.data())
def test_bounds_and_beta_edges(data):
    # TVD ∈ [0, 1]; JSD_β ∈ [0, H(β)], H(β) = −β ln β − (1−β) ln(1−β); reverse KL ≥ 0; β = 0 / 1
    # are forward / reverse KL over the same categories (renorm: KL(P̃‖Q̃), not sparse_kl's).
    s64, t64, tg, temperature, scale = draw_topk_problem(data, v_min=2)
    beta = data.draw(st.sampled_from([0.01, 0.3, 0.5, 0.9]))
    s = s64.float()
    eps = 1e-5 * (1 + scale / temperature)
    for backend in BACKENDS:
        for tail in ("bucket", "renorm"):
            f = (lambda loss, **kw: kdfast.sparse_loss(s, tg, loss=loss, tail=tail, reduction="none",
                                                       backend=backend, **kw))
            tvd = f("tvd")
            assert (tvd >= -1e-6).all() and (tvd <= 1 + 1e-6).all()
            h = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
            jsd = f("jsd", beta=beta)
            assert (jsd >= -eps).all() and (jsd <= h + eps).all()
            assert (f("reverse_kl") >= -eps).all()
            torch.testing.assert_close(f("jsd", beta=1.0), f("reverse_kl"), rtol=0, atol=0)
            if tail == "bucket":
                torch.testing.assert_close(f("jsd", beta=0.0), f("forward_kl"), rtol=0, atol=0)
            # The student equal to the teacher: every category matches, the loss is 0.
            same = kdfast.sparse_loss(t64.float(), tg, loss="tvd", tail=tail, reduction="none", backend=backend)
            assert same.abs().max() < eps


def test_renorm_jsd_at_beta_0_is_kl_of_renormalised_distributions():
    s64, t64 = hostile_pair(4, 50, seed=3, scale=4.0, neg_inf=0)
    tg = kdfast.compress_topk(t64.float(), 5)
    for backend in BACKENDS:
        got = kdfast.sparse_loss(s64.float(), tg, loss="jsd", beta=0.0, tail="renorm", reduction="none", backend=backend)
        full = kdfast.sparse_kl(s64.float(), tg, tail="renorm", reduction="none", backend=backend)
        q = torch.log_softmax(s64.gather(1, tg.indices), -1)
        p = torch.log_softmax(tg.logprobs.double(), -1)
        torch.testing.assert_close(got.double(), (p.exp() * (p - q)).sum(-1), rtol=1e-5, atol=1e-6)
        assert (full > got + 1e-3).all()  # the full-vocabulary q puts mass outside the ids
        # Renormalised losses give no gradient to unlisted logits.
        _, grad = run(s64.float(), tg, loss="jsd", beta=0.0, tail="renorm", backend=backend)
        unlisted = torch.ones_like(grad, dtype=torch.bool).scatter_(1, tg.indices, False)
        assert (grad[unlisted] == 0).all() and (grad[~unlisted] != 0).any()


def test_unused_slots_do_not_unlist_id_0():
    # Regression (the torch reference's listed-id mask): an unused slot (-1) next to a listed
    # id 0, and k > V.
    s = torch.tensor([[0.3, -0.2, 1.0], [0.1, 0.2, 0.3]])
    tg = kdfast.SparseTargets(indices=torch.tensor([[0, -1, -1, -1], [2, 0, 1, -1]]),
                              logprobs=torch.tensor([[-0.5, NEG_INF, NEG_INF, NEG_INF], [-1.0, -1.2, -1.1, NEG_INF]]),
                              tail_logprob=torch.tensor([-1.0, NEG_INF]))
    for loss, kw in LOSSES:
        want, want_grad = yardstick(s, tg, 1.0, loss=loss, **kw)
        for backend in BACKENDS:
            got, grad = run(s, tg, loss=loss, reduction="none", backend=backend, **kw)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


def test_sparse_kl_is_sparse_loss_forward_kl():
    s64, t64 = hostile_pair(6, 40, seed=8, scale=3.0)
    for tg, tail in ((kdfast.compress_topk(t64.float(), 5), "bucket"), (kdfast.compress_topk(t64.float(), 5), "renorm"),
                     (kdfast.compress_sample(t64.float(), 5), "bucket")):
        for backend in BACKENDS:
            a = run(s64.float(), tg, tail=tail, backend=backend)
            leaf = s64.float().clone().requires_grad_(True)
            kdfast.sparse_kl(leaf, tg, tail=tail, backend=backend).backward()
            b = kdfast.sparse_kl(s64.float(), tg, tail=tail, backend=backend)
            assert torch.equal(a[0], b) and torch.equal(a[1], leaf.grad)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_naming_them(backend):
    s = torch.randn(2, 10)
    tg = kdfast.compress_topk(torch.randn(2, 10), 3)
    sampled = kdfast.compress_sample(torch.randn(2, 10), 3)
    call = (lambda targets=tg, **kw: kdfast.sparse_loss(s, targets, backend=backend, **kw))
    cases = [
        (dict(loss="kl"), ValueError, r"loss: expected one of 'forward_kl', 'reverse_kl', 'jsd', 'tvd'.*'kl'"),
        (dict(loss="skew_forward_kl"), ValueError, "loss: expected one of"),
        (dict(loss=None), ValueError, "loss: expected one of"),
        (dict(loss="jsd", beta=1.5), ValueError, r"beta: expected a finite number in \[0.0, 1.0\]"),
        (dict(loss="jsd", beta=float("nan")), ValueError, "beta"),
        (dict(loss="jsd", beta="half"), TypeError, "beta"),
        (dict(loss="tvd", beta=0.5), TypeError, "'beta' does not apply to loss='tvd'"),
        (dict(beta=0.3), TypeError, "'beta' does not apply to loss='forward_kl'"),
        (dict(loss="reverse_kl", targets=sampled), ValueError, "loss: sampled targets .* unbiased"),
        (dict(loss="jsd", beta=0.0, targets=sampled), ValueError, "loss: sampled targets"),
        (dict(loss="tvd", tail="drop"), ValueError, "tail"),
        (dict(loss="tvd", temperature=0.0), ValueError, "temperature"),
        (dict(loss="tvd", reduction="avg"), ValueError, "reduction"),
        (dict(loss="tvd", targets=tg.indices), TypeError, "targets"),
        (dict(loss="tvd", surprise=1), TypeError, "surprise"),
    ]
    for kw, exc, words in cases:
        with pytest.raises(exc, match=words):
            call(**kw)
    # Student -inf at every listed id: the renormalised student is undefined.
    bad = s.clone()
    bad[1, tg.indices[1]] = NEG_INF
    for loss in ("reverse_kl", "tvd"):
        with pytest.raises(ValueError, match="student_logits: .*-inf at every listed id of row 1"):
            kdfast.sparse_loss(bad, tg, loss=loss, tail="renorm", backend=backend)
    # ... unless that row is masked, or the loss keeps the full-vocabulary student.
    kdfast.sparse_loss(bad, tg, loss="tvd", tail="renorm", labels=torch.tensor([0, -100]), backend=backend)
    assert kdfast.sparse_loss(bad, tg, tail="renorm", reduction="none", backend=backend)[1] == math.inf


def test_signature_and_export():
    import inspect

    assert "sparse_loss" in kdfast.__all__
    sig = inspect.signature(kdfast.sparse_loss)
    assert sig.parameters["loss"].default == "forward_kl" and sig.parameters["beta"].default == 0.5
    assert list(sig.parameters)[:2] == ["student_logits", "targets"]
    # An explicit beta=0.5 with jsd is the default value.
    s, tg = torch.randn(3, 9), kdfast.compress_topk(torch.randn(3, 9), 2)
    assert torch.equal(kdfast.sparse_loss(s, tg, loss="jsd"), kdfast.sparse_loss(s, tg, loss="jsd", beta=0.5))


# ----------------------------------------------------------------------------- the layers above


@pytest.mark.parametrize("loss,kw", LOSSES[1:], ids=LOSS_IDS[1:])
def test_distillation_loss_with_sparse_teacher(loss, kw):
    s64, t64 = hostile_pair(6, 30, seed=2, scale=3.0, neg_inf=0)  # (the cross-entropy part needs finite logits)
    student, tg = s64.float().reshape(2, 3, 30), kdfast.compress_topk(t64.float().reshape(2, 3, 30), 4, temperature=2.0)
    labels = torch.tensor([[1, -100, 3], [4, 5, -100]])
    mod = kdfast.DistillationLoss(loss, hard_weight=0.5, tail="renorm", **kw)
    total, soft, hard = mod(student, tg, labels, return_parts=True)
    want = kdfast.sparse_loss(student, tg, loss=loss, tail="renorm", labels=labels, **kw)
    torch.testing.assert_close(soft, want)
    torch.testing.assert_close(total, soft + 0.5 * hard)
    with pytest.raises(ValueError, match="sampled targets"):
        mod(student, kdfast.compress_sample(t64.float().reshape(2, 3, 30), 4), labels)


@pytest.mark.parametrize("loss,kw", LOSSES[1:], ids=LOSS_IDS[1:])
def test_distillation_loss_fused_with_sparse_teacher(loss, kw):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(37, 8, generator=g)
    tg = kdfast.compress_topk(torch.randn(2, 5, 37, generator=g) * 3, 4, temperature=1.5)
    labels = torch.tensor([[1, -100, 3, 4, 5], [6, 7, -100, 9, 0]])
    mod = kdfast.DistillationLoss(loss, hard_weight=0.3, tail="renorm", **kw)
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    total, soft, hard = mod.fused(*leaves, tg, labels, return_parts=True)
    total.backward()
    ref = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    want, want_soft, want_hard = mod(ref[0] @ ref[1].t(), tg, labels, return_parts=True)
    want.backward()
    torch.testing.assert_close((total, soft, hard), (want, want_soft, want_hard), rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,kw", [("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("sparse_kl", {})])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_fused_linear_with_sparse_targets(backend, loss, kw, tail):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(10, 8, generator=g)
    w = torch.randn(37, 8, generator=g)
    tg = kdfast.compress_topk(torch.randn(10, 37, generator=g) * 3, 5, temperature=1.5)
    labels = torch.tensor([1, -100, 3, 4, 5, 6, -100, 8, 9, 0])
    leaves = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    out = kdfast.fused_linear_distill_loss(*leaves, targets=tg, loss=loss, tail=tail, labels=labels, chunk_size=3,
                                           t2_scale=True, backend=backend, **kw)
    out.backward()
    ref = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    want = kdfast.sparse_loss(ref[0] @ ref[1].t(), tg, loss="forward_kl" if loss == "sparse_kl" else loss, tail=tail,
                              labels=labels, t2_scale=True, backend=backend, **kw)
    want.backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="'beta' does not apply"):
        kdfast.fused_linear_distill_loss(h, w, targets=tg, loss="tvd", beta=0.2, backend=backend)
    with pytest.raises(TypeError, match="'skew' does not apply"):
        kdfast.fused_linear_distill_loss(h, w, targets=tg, loss="jsd", skew=0.2, backend=backend)
    with pytest.raises(ValueError, match="loss: sampled targets"):
        kdfast.fused_linear_distill_loss(h, w, targets=kdfast.compress_sample(torch.randn(10, 37), 3), loss="jsd",
                                         backend=backend)


# ----------------------------------------------------------------------------- torch.compile


class Student(torch.nn.Module):
    def __init__(self, hidden=16, vocab=37):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x, targets, labels, kwargs):
        return kdfast.sparse_loss(self.head(x), targets, labels=labels, **kwargs)


def check_fullgraph_compile(backend, device, loss, kw):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Student().to(device)
    x = torch.randn(2, 5, 16, device=device)
    tg = kdfast.compress_topk(torch.randn(2, 5, 37) * 3, 6, temperature=2.0).to(device)
    labels = torch.randint(0, 37, (2, 5), device=device)
    labels[0, :2] = -100
    for reduction in ("mean", "none"):
        kwargs = dict(kw, loss=loss, tail="renorm", temperature=1.5, reduction=reduction, backend=backend)
        results = []
        for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
            model.zero_grad()
            out = fn(x, tg, labels, kwargs)
            out.sum().backward()
            results.append((out.detach(), model.head.weight.grad.clone()))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,loss,kw", [("rust", "jsd", {"beta": 0.3}), ("torch", "reverse_kl", {}),
                                              ("rust", "tvd", {})])
def test_sparse_loss_under_fullgraph_compile(backend, loss, kw):
    check_fullgraph_compile(backend, "cpu", loss, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_jsd_keeps_precision_at_huge_deviations(backend):
    # The dense loss that sparse_loss reuses: |d| ~ 1e5 (disjoint supports), JSD = H(β).
    s64, t64 = hostile_pair(4, 300, seed=1, scale=1e4, neg_inf=0.5)
    for beta in (0.3, 0.9):
        got = kdfast.jsd(s64.float(), t64.float(), beta=beta, temperature=0.05, reduction="none", backend=backend)
        h = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
        torch.testing.assert_close(got.double(), torch.full((4,), h, dtype=torch.float64), rtol=1e-5, atol=1e-6)
