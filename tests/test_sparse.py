"""sparse_kl and SparseTargets: float64 references, hostile inputs, consistency with forward_kl,
unbiasedness of the sampled gradient, conventions and bad input."""

import math

import kdfast
import pytest
import torch
from conftest import NEG_INF
from hypothesis import given, settings
from hypothesis import strategies as st

BACKENDS = ("rust", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")
MODES = ("bucket", "bucket_no_tail", "renorm", "sampled")


def hostile_pair(n, v, *, seed=0, scale=20.0, neg_inf=0.3):
    """float64 (student, teacher) = randn × scale with -inf at the same places (every row keeps
    a finite logit), so every loss is finite."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    s = 0.5 * t + torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if neg_inf and v > 1:
        mask = torch.rand(n, v, generator=g) < neg_inf
        mask[torch.arange(n), torch.randint(0, v, (n,), generator=g)] = False
        s, t = s.masked_fill(mask, NEG_INF), t.masked_fill(mask, NEG_INF)
    return s, t


def make_targets(mode, teacher, k, temperature, seed=0):
    if mode == "sampled":
        return kdfast.compress_sample(teacher, k, temperature=temperature, seed=seed)
    tg = kdfast.compress_topk(teacher, k, temperature=temperature)
    if mode == "bucket_no_tail":
        tg = kdfast.SparseTargets(indices=tg.indices, logprobs=tg.logprobs, temperature=temperature)
    return tg


def reference(student, tg, temperature, tail):
    """float64 per-row ℓ and ∂ℓ/∂z_s from api.md §2 (closed forms), student at ``temperature``."""
    a = student.double() / temperature
    lq = torch.log_softmax(a, -1)
    q = lq.exp()
    n, v = a.shape
    ids = tg.indices.reshape(n, -1)
    lps = tg.logprobs.reshape(n, -1).double()
    loss = torch.zeros(n, dtype=torch.float64)
    grad = torch.zeros(n, v, dtype=torch.float64)
    for r in range(n):
        valid = ids[r] >= 0
        if tg.method == "sample":
            w = tg.weights.reshape(n, -1)[r].double()
            valid &= w > 0
            i, lp, w = ids[r][valid], lps[r][valid], w[valid]
            loss[r] = (w * (lp - lq[r, i])).sum()
            grad[r] = q[r] * w.sum()
            grad[r].index_add_(0, i, -w)
            continue
        i, lp = ids[r][valid], lps[r][valid]
        p = lp.exp()
        big_p = p.sum()
        live = p > 0
        if tail == "renorm":
            if big_p == 0:
                continue
            pt = p / big_p
            loss[r] = (pt[live] * (pt[live].log() - lq[r, i[live]])).sum()
            grad[r] = q[r]
            grad[r].index_add_(0, i, -pt)
            continue
        listed = torch.zeros(v, dtype=torch.bool)
        listed[i] = True
        if listed.all():
            p_tail = torch.tensor(0.0, dtype=torch.float64)
        elif tg.tail_logprob is not None:
            p_tail = tg.tail_logprob.reshape(n)[r].double().exp()
        else:
            p_tail = (1 - big_p).clamp(min=0)
        q_tail = q[r, ~listed].sum()
        loss[r] = (p[live] * (lp[live] - lq[r, i[live]])).sum()
        grad[r] = q[r] * (big_p + p_tail)
        if p_tail > 0:
            loss[r] += p_tail * (p_tail.log() - q_tail.log())
            grad[r, ~listed] -= p_tail * q[r, ~listed] / q_tail
        grad[r].index_add_(0, i, -p)
    return loss, grad / temperature


def tolerances(dtype, scale, grad_unit, ref_grad):
    """As tests/conftest.py: float32 rounding of |z/T| (scale); half gradients are rounded."""
    if dtype == torch.float32:
        return 1e-5, 1e-6 * scale, 1e-5, 1e-6 * scale * grad_unit
    if dtype == torch.float64:
        return 1e-9, 1e-11 * scale, 1e-9, 1e-11 * scale * grad_unit
    return 1e-4, 1e-5 * scale, 2e-2, 1e-2 * ref_grad.abs().max().item() + 1e-6 * scale * grad_unit


def run(student, tg, **kw):
    leaf = student.detach().clone().requires_grad_(True)
    loss = kdfast.sparse_kl(leaf, tg, **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), leaf.grad


def scale_of(*xs, temperature):
    worst = max((x[torch.isfinite(x)].abs().max().item() for x in xs if torch.isfinite(x).any()), default=0.0)
    return 1.0 + worst / temperature


def labelled_problem():
    """``[4, 5, 301]`` float32 student logits, top-7 targets at T = 2 and labels masking rows
    (0, 0..2) and (2, 4)."""
    s64, t64 = hostile_pair(4 * 5, 301, seed=4, scale=4.0)
    student, teacher = s64.float().reshape(4, 5, 301), t64.float().reshape(4, 5, 301)
    labels = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    labels[2, 4] = -100
    return student, kdfast.compress_topk(teacher, 7, temperature=2.0), labels


def reduced(rows, grad, keep, reduction, nib, lead):
    """Reference rows and gradient rows (masked and scaled) reduced as kdfast does: ``(loss,
    gradient of shape lead + [V])``; ``keep`` the unmasked rows, ``nib`` num_items_in_batch."""
    if reduction == "none":
        return rows.reshape(lead), grad.reshape(*lead, -1)
    d = 1.0 if reduction == "sum" else (nib if nib is not None else keep.sum().item())
    return rows.sum() / d, (grad / d).reshape(*lead, -1)


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v,k,temperature", [
    (v, k, t) for v, k in [(1, 1), (2, 3), (127, 8)] for t in (0.05, 1.0, 10.0)
] + [(32000, 20, 1.0)])
def test_matches_float64_reference(backend, mode, dtype, temperature, v, k):
    check_against_reference(run, backend, mode, dtype, temperature, 3 if v == 32000 else 6, v, k)


def check_against_reference(runner, backend, mode, dtype, temperature, n, v, k):
    """``runner(student, targets, **kwargs) -> (loss, grad)`` against :func:`reference`."""
    s64, t64 = hostile_pair(n, v, seed=v + k)
    student, teacher = s64.to(dtype), t64.to(dtype)
    tg = make_targets(mode, teacher, k, temperature)
    tail = "renorm" if mode == "renorm" else "bucket"
    loss, grad = runner(student, tg, tail=tail, reduction="none", backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert grad.dtype == dtype and grad.shape == student.shape
    ref_loss, ref_grad = reference(student, tg, temperature, tail)
    scale = scale_of(student.double(), teacher.double(), temperature=temperature)
    v_rtol, v_atol, g_rtol, g_atol = tolerances(dtype, scale, 1.0 / temperature, ref_grad)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=v_rtol, atol=v_atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=g_rtol, atol=g_atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("t2_scale", [False, True])
def test_reductions_labels_and_t2(backend, reduction, t2_scale):
    student, tg, labels = labelled_problem()
    for nib in (None, 37):
        loss, grad = run(student, tg, labels=labels, reduction=reduction, t2_scale=t2_scale,
                         num_items_in_batch=nib, backend=backend)
        ref_rows, ref_grad = reference(student.reshape(20, 301), tg, 2.0, "bucket")
        keep = (labels.reshape(20) != -100).double()
        f = 4.0 if t2_scale else 1.0
        ref_rows, ref_grad = ref_rows * keep * f, ref_grad * keep[:, None] * f
        want, want_grad = reduced(ref_rows, ref_grad, keep, reduction, nib, (4, 5))
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-7)
        assert (grad[0, :3] == 0).all()
        if reduction == "none":
            assert (loss[0, :3] == 0).all()


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("v", [1, 2, 127, 3001])
def test_topk_with_k_equal_v_and_bucket_is_forward_kl(backend, dtype, temperature, v):
    s64, t64 = hostile_pair(5, v, seed=v, scale=20.0)
    student, teacher = s64.to(dtype), t64.to(dtype)
    tg = kdfast.compress_topk(teacher, v, temperature=temperature)
    labels = torch.tensor([1, -100, 2, 3, 4])
    kw = dict(labels=labels, reduction="sum", t2_scale=True, backend=backend)
    sl, sg = run(student, tg, **kw)
    leaf = student.detach().clone().requires_grad_(True)
    dl = kdfast.forward_kl(leaf, teacher, temperature=temperature, **kw)
    dl.backward()
    dg = leaf.grad
    scale = scale_of(student.double(), teacher.double(), temperature=temperature)
    t2 = temperature**2
    _, atol, g_rtol, g_atol = tolerances(dtype, scale, t2 / temperature, dg.double())
    torch.testing.assert_close(sl.double(), dl.double(), rtol=1e-5, atol=2 * atol * t2 * 4)
    torch.testing.assert_close(sg.double(), dg.double(), rtol=g_rtol, atol=2 * g_atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_gradient_averages_to_forward_kl(backend):
    # R identical rows draw independently: the mean sampled gradient (and loss) estimates
    # forward KL's, within a few standard errors.
    v, n_s, rows, temp = 60, 16, 4000 if backend == "rust" else 2000, 1.5
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(v, generator=g) * 2
    student = torch.randn(v, generator=g) * 2
    tg = kdfast.compress_sample(teacher.expand(rows, v), n_s, temperature=temp, seed=5, backend=backend)
    loss, grad = run(student.expand(rows, v).contiguous(), tg, reduction="none", backend=backend)
    leaf = student[None].clone().requires_grad_(True)
    dense_loss = kdfast.forward_kl(leaf, teacher[None], temperature=temp, reduction="sum")
    dense_loss.backward()
    dense_grad = leaf.grad[0].double()
    p = torch.softmax(teacher.double() / temp, -1)
    sd = (p * (1 - p) / (n_s * rows)).sqrt() / temp
    zg = (grad.double().mean(0) - dense_grad) / sd
    assert zg.abs().max() < 5.0, f"max |z| of the mean gradient {zg.abs().max()}"
    se = loss.double().std() / math.sqrt(rows)
    assert abs(loss.double().mean() - dense_loss.double()) < 5 * se


def test_temperature_override_uses_stored_logprobs():
    s64, t64 = hostile_pair(4, 50, seed=2, scale=3.0, neg_inf=0)
    tg = kdfast.compress_topk(t64.float(), 6, temperature=2.0)
    a = kdfast.sparse_kl(s64.float(), tg, reduction="none")
    b = kdfast.sparse_kl(s64.float(), tg, temperature=2.0, reduction="none")
    c = kdfast.sparse_kl(s64.float(), tg, temperature=1.0, reduction="none")
    assert torch.equal(a, b)
    ref, _ = reference(s64.float(), tg, 1.0, "bucket")
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c)


def test_leading_shapes_views_and_no_target_gradient():
    s64, t64 = hostile_pair(6, 40, seed=8, scale=3.0)
    base = s64.float().t().contiguous().t()  # [6, 40] with a non-unit column stride
    assert not base.is_contiguous()
    tg = kdfast.compress_topk(t64.float(), 5)
    lp = tg.logprobs.clone().requires_grad_(True)
    tg2 = kdfast.SparseTargets(indices=tg.indices, logprobs=lp, tail_logprob=tg.tail_logprob)
    l1, g1 = run(base, tg2)
    l2, g2 = run(base.contiguous(), tg)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert lp.grad is None
    l3, g3 = run(base.contiguous().reshape(2, 3, 40), tg.reshape(2, 3))
    assert torch.equal(l3, l1) and torch.equal(g3.reshape(6, 40), g1)


@pytest.mark.parametrize("mode", MODES)
def test_thread_count_does_not_change_results(monkeypatch, mode):
    s64, t64 = hostile_pair(64, 3001, seed=3, scale=5.0)
    tg = make_targets(mode, t64.float(), 12, 1.3)
    tail = "renorm" if mode == "renorm" else "bucket"
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("KDFAST_NUM_THREADS", threads)
        outs.append(run(s64.float(), tg, tail=tail, reduction="none"))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.parametrize("mode", MODES)
def test_torch_backend_gradcheck(mode):
    s64, t64 = hostile_pair(3, 9, seed=6, scale=2.0, neg_inf=0.2)
    tg = make_targets(mode, t64, 4, 1.3)
    tail = "renorm" if mode == "renorm" else "bucket"
    fn = (lambda s: kdfast.sparse_kl(s, tg, tail=tail, reduction="sum", backend="torch"))
    leaf = s64.clone().requires_grad_(True)
    assert fn(leaf).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (leaf,))


def check_conventions(runner, backend):
    """A repeated sampled id counts once per slot (like merged weights); with no listed id,
    renorm contributes 0 and so does bucket without a tail (p_tail = q_tail = 1). Returns the
    student and top-k targets with a repeated id."""
    s = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    lp = torch.log(torch.tensor([[0.2, 0.2, 0.1, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    raw = kdfast.SparseTargets(indices=torch.tensor([[4, 4, 9, -1], [3, -1, -1, -1]]), logprobs=lp,
                               weights=torch.tensor([[0.25, 0.25, 0.5, 0.0], [1.0, 0, 0, 0]]), method="sample")
    merged = kdfast.SparseTargets(indices=torch.tensor([[4, 9, -1, -1], [3, -1, -1, -1]]),
                                  logprobs=lp[:, [0, 2, 3, 3]],
                                  weights=torch.tensor([[0.5, 0.5, 0, 0], [1.0, 0, 0, 0]]), method="sample")
    la, ga = runner(s, raw, reduction="none", backend=backend)
    lb, gb = runner(s, merged, reduction="none", backend=backend)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ga, gb)
    none = kdfast.SparseTargets(indices=torch.full((2, 3), -1), logprobs=torch.full((2, 3), NEG_INF))
    for tail in ("renorm", "bucket"):
        loss, grad = runner(s, none, tail=tail, reduction="none", backend=backend)
        assert loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6
    return s, kdfast.SparseTargets(indices=raw.indices, logprobs=lp)


def test_conventions_duplicates_empty_rows_and_empty_batch():
    for backend in BACKENDS:
        s, dup = check_conventions(run, backend)
        # Top-k: a repeated id is an error.
        with pytest.raises(ValueError, match="targets.indices.*twice"):
            kdfast.sparse_kl(s, dup, backend=backend)
    # Empty batch.
    empty = kdfast.compress_topk(torch.zeros(0, 30), 3)
    for backend in BACKENDS:
        for reduction in ("mean", "none"):
            loss, grad = run(torch.zeros(0, 30), empty, reduction=reduction, backend=backend)
            assert loss.numel() == (0 if reduction == "none" else 1) and grad.shape == (0, 30)


# ----------------------------------------------------------------------------- errors


def _tg(**kw):
    base = dict(indices=torch.tensor([[1, 2], [3, -1]]), logprobs=torch.tensor([[-1.0, -2.0], [-0.5, NEG_INF]]))
    base.update(kw)
    return base


@pytest.mark.parametrize("kwargs,exc,words", [
    (_tg(indices=torch.tensor([[1.0, 2.0], [3.0, 4.0]])), TypeError, "indices"),
    (_tg(indices=[[1, 2]]), TypeError, "indices"),
    (_tg(indices=torch.zeros(2, 0, dtype=torch.int64)), ValueError, "indices"),
    (_tg(logprobs=torch.zeros(2, 3)), ValueError, "logprobs"),
    (_tg(logprobs=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "logprobs"),
    (_tg(weights=torch.ones(2, 2)), ValueError, "weights"),
    (_tg(method="sample"), ValueError, "weights"),
    (_tg(method="beam"), ValueError, "method"),
    (_tg(tail_logprob=torch.zeros(3)), ValueError, "tail_logprob"),
    (_tg(weights=torch.ones(2, 2), method="sample", tail_logprob=torch.zeros(2)), ValueError, "tail_logprob"),
    (_tg(temperature=0.0), ValueError, "temperature"),
    (_tg(temperature="hot"), TypeError, "temperature"),
])
def test_sparse_targets_validation(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        kdfast.SparseTargets(**kwargs)


def test_sparse_targets_fields_to_and_positional_rejected():
    tg = kdfast.SparseTargets(**_tg(tail_logprob=torch.tensor([-3.0, -4.0]), temperature=2.0))
    assert tg.shape == (2,) and tg.k == 2 and tg.temperature == 2.0 and tg.method == "topk"
    moved = tg.to("cpu")
    assert torch.equal(moved.indices, tg.indices) and moved.tail_logprob is not None
    assert "topk" in repr(tg)
    with pytest.raises(TypeError):
        kdfast.SparseTargets(torch.tensor([[1]]), torch.tensor([[0.0]]))  # keyword-only


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_naming_them(backend):
    s = torch.randn(2, 10)
    tg = kdfast.SparseTargets(**_tg())
    call = (lambda **kw: kdfast.sparse_kl(kw.pop("student", s), kw.pop("targets", tg), backend=backend, **kw))
    cases = [
        (dict(targets=tg.indices), TypeError, "targets"),
        (dict(tail="drop"), ValueError, "tail"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(student=torch.randn(3, 10)), ValueError, "targets"),
        (dict(student=torch.randint(0, 3, (2, 10))), TypeError, "student_logits"),
        (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
        (dict(labels=torch.zeros(2)), TypeError, "labels"),
        (dict(t2_scale="yes"), TypeError, "t2_scale"),
        (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
        (dict(targets=kdfast.SparseTargets(**_tg(indices=torch.tensor([[1, 10], [3, -1]])))), ValueError, "targets.indices"),
        (dict(targets=kdfast.SparseTargets(**_tg(indices=torch.tensor([[1, -2], [3, -1]])))), ValueError, "targets.indices"),
        (dict(targets=kdfast.SparseTargets(**_tg(logprobs=torch.tensor([[-1.0, float("nan")], [0.0, 0.0]])))), ValueError, "targets.logprobs"),
        (dict(targets=kdfast.SparseTargets(**_tg(tail_logprob=torch.tensor([float("nan"), 0.0])))), ValueError, "targets.tail_logprob"),
        (dict(targets=kdfast.SparseTargets(**_tg(weights=torch.tensor([[0.5, -0.5], [1.0, 0.0]]), method="sample"))), ValueError, "targets.weights"),
        (dict(student=torch.full((2, 10), NEG_INF)), ValueError, "student_logits"),
    ]
    for kw, exc, words in cases:
        with pytest.raises(exc, match=words):
            call(**kw)


def test_backend_choice_errors(monkeypatch):
    tg = kdfast.SparseTargets(**_tg())
    for backend in ("rust", "triton"):
        with pytest.raises(TypeError, match="backend"):
            kdfast.sparse_kl(torch.randn(2, 10, dtype=torch.float64), tg, backend=backend)
    # CPU tensors run the Triton kernels only under its interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend: 'triton'"):
        kdfast.sparse_kl(torch.randn(2, 10), tg, backend="triton")
    with pytest.raises(ValueError, match="backend: 'triton'"):
        kdfast.compress_topk(torch.randn(2, 10), 3, backend="triton")
    monkeypatch.undo()
    # float64 on auto goes to the exact torch path.
    assert kdfast.sparse_kl(torch.randn(2, 10, dtype=torch.float64), tg).dtype == torch.float64


def test_other_index_and_logprob_dtypes():
    s64, t64 = hostile_pair(3, 40, seed=12, scale=3.0, neg_inf=0)
    tg = kdfast.compress_topk(t64.float(), 5)
    other = kdfast.SparseTargets(indices=tg.indices.int(), logprobs=tg.logprobs.double(),
                                 tail_logprob=tg.tail_logprob.half())
    for backend in BACKENDS:
        same = kdfast.SparseTargets(indices=tg.indices, logprobs=tg.logprobs,
                                    tail_logprob=tg.tail_logprob.half().float())
        a = kdfast.sparse_kl(s64.float(), same, backend=backend)
        b = kdfast.sparse_kl(s64.float(), other, backend=backend)
        torch.testing.assert_close(a, b)


def draw_topk_problem(data, v_min=1):
    """Hypothesis: ``(s64, t64, top-k targets, T, scale)``, up to 4 rows of up to 300 columns."""
    n = data.draw(st.integers(1, 4))
    v = data.draw(st.integers(v_min, 300))
    k = data.draw(st.integers(1, 12))
    temperature = data.draw(st.sampled_from([0.05, 0.5, 1.0, 3.0]))
    scale = data.draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
    s64, t64 = hostile_pair(n, v, seed=data.draw(st.integers(0, 10_000)), scale=scale,
                            neg_inf=data.draw(st.sampled_from([0.0, 0.5])))
    return s64, t64, kdfast.compress_topk(t64.float(), k, temperature=temperature), temperature, scale


@settings(max_examples=20)
@given(data=st.data())
def test_bucket_properties(data):
    # KL over k + 1 categories: ≥ 0, and 0 (with a zero gradient) when the student is the teacher.
    s64, t64, tg, temperature, scale = draw_topk_problem(data)
    for backend in BACKENDS:
        loss, _ = run(s64.float(), tg, reduction="none", backend=backend)
        assert (loss >= -1e-5 * (1 + scale / temperature)).all()
        same, grad = run(t64.float(), tg, reduction="none", backend=backend)
        assert same.abs().max() < 1e-5 * (1 + scale / temperature)
        assert grad.abs().max() < 1e-5 * (1 + scale / temperature) / temperature
