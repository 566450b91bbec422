"""The Triton kernels of ``akl`` and ``taid`` (kdfast._triton.dense, KIND 6 and 7) against
float64 computations of their definitions (api.md §1), written out here — AKL's head by a
stable sort and a float64 cumulative sum, the very definition the kernel's selection must meet.

``dense_call`` is called directly (per-row losses and the per-row gradient ``grad_scale ·
∂ℓ_r/∂z_s``). Device-generic: on CUDA when present, else on CPU tensors in Triton's
interpreter, so shapes are small.
"""

import math

import pytest
import torch
from conftest import NEG_INF, logit_scale, make_logits, tolerances
from kdfast import _triton
from kdfast.reference import HEAD_TOLERANCE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not _triton.usable(torch.device(DEVICE)):
    pytest.skip("Triton cannot run here (not importable, or no GPU and no interpreter)",
                allow_module_level=True)

from kdfast._triton import dense as tdense  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((3, 1), (4, 37), (2, 1030))  # V = 1, a prime, past AKL's 1024-column block
TEMPERATURES = (0.05, 1.0, 10.0)


def _ids(x):
    return str(x).replace("torch.", "")


# ----------------------------------------------------------------------------- float64 definitions


def _log_probs(z, temperature):
    return torch.log_softmax(z / temperature, -1)


def _kl_rows(lp, lq, infinite):
    """``Σ p (lp − lq)`` per row (0 where p = 0), +inf where ``infinite``."""
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - torch.where(p > 0, lq, 0.0)), 0.0)
    return torch.where(infinite, math.inf, terms.sum(-1))


def akl_head(p, head_mass):
    """The head: ids by p descending (stable: ties by id), cumulative mass (float64) ≤
    head_mass + HEAD_TOLERANCE, plus the first id."""
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    in_head = sorted_p.cumsum(-1) <= head_mass + HEAD_TOLERANCE
    in_head[:, 0] = True
    return torch.zeros_like(in_head).scatter(-1, order, in_head)


def akl_weights(s, t, temperature, head_mass):
    p, q = _log_probs(t, temperature).exp(), _log_probs(s, temperature).exp()
    head = akl_head(p, head_mass)
    gap = (p - q).abs()
    g_h, g_t = (gap * head).sum(-1), (gap * ~head).sum(-1)
    total = g_h + g_t
    some = total > 0
    w_h = torch.where(some, g_h / torch.where(some, total, 1.0), 0.5)
    w_t = torch.where(some, g_t / torch.where(some, total, 1.0), 0.5)
    return w_h, w_t


def akl_reference(s, t, temperature, head_mass):
    """Per-row ℓ and ∂ℓ/∂z_s: ``w_h KL(p‖q) + w_t KL(q‖p)``, gradient
    ``(w_h (q − p) + w_t q (d − S)) / T``; a +inf row gets gradient 0."""
    lq, lp = _log_probs(s, temperature), _log_probs(t, temperature)
    q, p = lq.exp(), lp.exp()
    w_h, w_t = akl_weights(s, t, temperature, head_mass)
    fkl = _kl_rows(lp, lq, ((s == NEG_INF) & (t != NEG_INF)).any(-1))
    rkl = _kl_rows(lq, lp, ((t == NEG_INF) & (s != NEG_INF)).any(-1))
    loss = torch.where(w_h == 0, 0.0, w_h * fkl) + torch.where(w_t == 0, 0.0, w_t * rkl)
    d = torch.where(q > 0, lq - torch.where(q > 0, lp, 0.0), 0.0)
    big_s = (q * d).sum(-1, keepdim=True)
    reverse = w_t[:, None] * q * (d - big_s)  # NaN from inf − inf only in rows made +inf (or w_t = 0)
    grad = w_h[:, None] * (q - p) + torch.where(w_t[:, None] == 0, 0.0, reverse)
    grad = torch.where(torch.isinf(loss)[:, None], 0.0, grad) / temperature
    return loss, grad


def taid_reference(s, t, temperature, t_mix):
    """Per-row ℓ = KL(p_t‖q) and ∂ℓ/∂z_s = (q − p_t)/T; m = z_s at t = 0, z_t at t = 1; a row
    with m all -inf, or p_t alive where the student is -inf, is +inf with gradient 0."""
    m = s if t_mix == 0 else t if t_mix == 1 else (1 - t_mix) * s + t_mix * t
    dead = (m == NEG_INF).all(-1)
    lpt = _log_probs(torch.where(dead[:, None], 0.0, m), temperature)
    lq = _log_probs(s, temperature)
    loss = _kl_rows(lpt, lq, ((s == NEG_INF) & (m != NEG_INF)).any(-1) | dead)
    grad = torch.where(torch.isinf(loss)[:, None], 0.0, lq.exp() - lpt.exp()) / temperature
    return loss, grad


# ----------------------------------------------------------------------------- harness


def run(loss, param, s, t, *, temperature=1.0, labels=None, t2_scale=False, grad_scale=1.0, extra_cols=0):
    """``dense_call`` on ``DEVICE``: per-row losses and the gradient (CPU)."""
    s, t = s.to(DEVICE), t.to(DEVICE)
    if isinstance(param, torch.Tensor):
        param = param.to(DEVICE)
    if isinstance(grad_scale, torch.Tensor):
        grad_scale = grad_scale.to(DEVICE)
    labels = labels.to(DEVICE) if labels is not None else None
    rows = torch.empty(s.shape[0], dtype=torch.float32, device=DEVICE)
    grad = torch.full((s.shape[0], s.shape[1] + extra_cols), math.nan, dtype=s.dtype, device=DEVICE)
    tdense.dense_call(loss, param, s, t, labels, -100, temperature, t2_scale, grad_scale, rows, grad)
    return rows.cpu(), grad.cpu()


def check(loss, param, s, t, *, temperature=1.0, labels=None, t2_scale=False, grad_scale=1.0):
    """Kernel against the float64 definition on exactly the inputs it saw (conftest's
    per-dtype tolerances); returns the kernel's rows and gradient."""
    rows, grad = run(loss, param, s, t, temperature=temperature, labels=labels, t2_scale=t2_scale,
                     grad_scale=grad_scale)
    value = float(param) if isinstance(param, torch.Tensor) else param
    reference = akl_reference if loss == "akl" else taid_reference
    ref_rows, ref_grad = reference(s.double(), t.double(), temperature, value)
    factor = temperature**2 if t2_scale else 1.0
    gs = float(grad_scale)
    ref_rows, ref_grad = ref_rows * factor, ref_grad * factor * gs
    if labels is not None:
        kept = labels != -100
        ref_rows = torch.where(kept, ref_rows, 0.0)
        ref_grad = torch.where(kept[:, None], ref_grad, 0.0)
    v_rtol, v_atol, g_rtol, g_atol = tolerances(s.dtype, scale=logit_scale(s, t, temperature),
                                                grad_unit=factor / temperature * abs(gs), ref_grad=ref_grad)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=v_rtol, atol=v_atol * factor,
                               msg=lambda m: f"{loss} rows: {m}")
    assert grad.dtype == s.dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=g_rtol, atol=g_atol,
                               msg=lambda m: f"{loss} gradient: {m}")
    return rows, grad


def _rotating_case(i, dtype):
    """Shape, temperature, labels, T² and a tensor grad_scale rotating with ``i``."""
    shape = SHAPES[i % 3]
    s, t = make_logits(shape, seed=i, scale=4.0, dtype=dtype)
    labels = torch.tensor([-100 if r == 1 else r for r in range(shape[0])]) if i % 2 else None
    grad_scale = torch.tensor(0.5) if i % 2 == 0 else 1.0
    return s, t, dict(temperature=TEMPERATURES[(i // 3) % 3], labels=labels, t2_scale=i % 2 == 0,
                      grad_scale=grad_scale)


# ----------------------------------------------------------------------------- the test's definitions


def test_reference_gradient_is_the_derivative_with_constant_weights():
    """The AKL reference's gradient is autograd's of ``w_h KL(p‖q) + w_t KL(q‖p)`` with the
    weights held constant (the definition), so the kernels are checked against the spec."""
    s, t = make_logits((3, 11), seed=1, dtype=torch.float64)
    for mu in (0.0, 0.4, 1.0):
        w_h, w_t = akl_weights(s, t, 0.7, mu)
        leaf = s.clone().requires_grad_(True)
        lq, lp = _log_probs(leaf, 0.7), _log_probs(t, 0.7)
        loss = w_h * (lp.exp() * (lp - lq)).sum(-1) + w_t * (lq.exp() * (lq - lp)).sum(-1)
        loss.sum().backward()
        expected_loss, expected_grad = akl_reference(s, t, 0.7, mu)
        torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_reference_head_follows_the_sort_definition():
    p = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]], dtype=torch.float64)
    assert akl_head(p, 0.0).tolist() == [[False, True, False, False, False]]  # the first id only
    assert akl_head(p, 0.65).tolist() == [[False, True, True, False, False]]  # 0.3 + 0.3
    assert akl_head(p, 0.85).tolist() == [[False, True, True, True, False]]
    assert akl_head(p, 0.95).tolist() == [[True, True, True, True, False]]  # ties: lower id first


# ----------------------------------------------------------------------------- AKL


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("head_mass", [0.0, 0.3, 0.5, 0.9])
def test_akl_values_and_gradients(head_mass, dtype):
    i = int(head_mass * 10) + DTYPES.index(dtype)
    s, t, opts = _rotating_case(i, dtype)
    check("akl", head_mass, s, t, **opts)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_akl_head_mass_one_is_forward_kl(shape):
    """head_mass = 1: the whole row is the head (g_T = 0, w_t = 0), i.e. exactly forward KL —
    not left to how far the float32 p sum above 1."""
    s, t = make_logits(shape, seed=3, scale=4.0)
    rows, grad = check("akl", 1.0, s, t, temperature=1.5)
    fkl_rows, fkl_grad = run("forward_kl", 0.0, s, t, temperature=1.5)
    torch.testing.assert_close(rows, fkl_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, fkl_grad, rtol=1e-5, atol=1e-7)


def _tied_teacher(v, values, seed):
    """A teacher row of repeated values (every value many times, shuffled)."""
    g = torch.Generator().manual_seed(seed)
    row = torch.tensor(values, dtype=torch.float32).repeat(v // len(values) + 1)[:v]
    return row[torch.randperm(v, generator=g)]


@pytest.mark.parametrize("head_mass", [0.0, 0.25, 0.6, 0.97])
def test_akl_ties_in_id_order(head_mass):
    """Uniform rows and rows of few repeated values: the boundary falls inside a tie group,
    whose lower ids enter first. The student's gaps differ per id, so another choice of tied
    ids changes the weights."""
    v = 23
    teacher = torch.stack([torch.zeros(v), _tied_teacher(v, [2.0, 1.0, 0.0], 1), _tied_teacher(v, [0.5, 0.0], 2)])
    student = torch.randn(3, v, generator=torch.Generator().manual_seed(4)) * 3.0
    check("akl", head_mass, student, teacher)
    w_h, _ = akl_weights(student.double(), teacher.double(), 1.0, head_mass)
    assert ((w_h > 0.02) & (w_h < 0.98)).any() or head_mass == 0.0


def test_akl_exact_boundaries_in_a_uniform_row():
    """A uniform teacher at head_mass = k/V: the k-th cumulative mass equals head_mass exactly,
    and HEAD_TOLERANCE keeps exactly the first k ids, whatever the rounding of p (at V = 13
    the kernel's float32 p is 1/13 rounded up: without the tolerance the k-th id would drop)."""
    v = 13
    student = torch.randn(2, v, generator=torch.Generator().manual_seed(3)) * 3.0
    teacher = torch.zeros(2, v)
    teacher[1] = 2.5
    for k in (2, 5, 12):
        check("akl", k / v, student, teacher)


def test_akl_ties_across_blocks():
    """One tie group over two of the kernel's blocks (V = 1280 > 1024): the running tie count
    carries from block to block (the cut falls in the second block; at 0.9 = 1152/1280 on an
    exact boundary in the uniform row)."""
    v = 1280
    teacher = torch.zeros(2, v)
    teacher[1, ::7] = 0.3
    student = torch.randn(2, v, generator=torch.Generator().manual_seed(5)) * 2.0
    for mu in (0.9, 0.999):
        check("akl", mu, student, teacher)


def test_akl_zero_gaps():
    """p = q everywhere: both gaps are 0, so w_h = w_t = ½, and the loss and gradient are 0."""
    s, _ = make_logits((3, 37), seed=6)
    s[1, 4:9] = NEG_INF
    for mu in (0.0, 0.5):
        rows, grad = check("akl", mu, s, s.clone())
        assert torch.equal(rows, torch.zeros(3)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_akl_negative_infinity(side, temperature):
    """-inf logits on one side make the KL with mass there +inf: the row is +inf (gradient 0)
    unless that part's weight is exactly 0; -inf on both sides in the same columns is finite."""
    s, t = make_logits((4, 29), seed=7, scale=3.0)
    cols = slice(3, 12)
    if side in ("teacher", "both"):
        t[:2, cols] = NEG_INF
    if side in ("student", "both"):
        s[:2, cols] = NEG_INF
    for mu in (0.0, 0.5, 1.0):
        rows, grad = check("akl", mu, s, t, temperature=temperature)
        assert torch.isfinite(grad).all()
        assert (grad[:2, cols] == 0).all() or side == "teacher"
        if side == "both":
            assert torch.isfinite(rows).all()
        if side == "teacher" and mu == 1.0:  # w_t = 0: KL(q‖p) = +inf takes no part
            assert torch.isfinite(rows).all()
        if side == "student":  # KL(p‖q) = +inf with w_h > 0
            assert torch.isinf(rows[:2]).all() and (grad[:2] == 0).all()


def test_akl_zero_head_weight_drops_an_infinite_forward_kl():
    """w_h = 0 exactly (the head's one id has p = q = 1 in float32) while the teacher is alive
    where the student is -inf: KL(p‖q) = +inf gets weight 0, the loss is w_t·KL(q‖p), finite."""
    s = torch.tensor([[0.0, NEG_INF, -20.0]])  # q = (1, 0, 2e-9) in float32
    t = torch.tensor([[0.0, -120.0, -130.0]])  # p = (1, 0, 0) in float32 (underflow)
    rows, grad = run("akl", 0.0, s, t)
    assert 0.0 <= rows.item() < 1e-6  # KL(q‖p) = 2e-9 · 110
    assert torch.isfinite(grad).all()


def test_akl_single_column_and_one_finite_logit():
    """V = 1, and rows with one finite logit: p = q = 1, loss 0, gradient 0."""
    s, t = make_logits((2, 1), seed=8)
    rows, grad = check("akl", 0.5, s, t)
    assert torch.equal(rows, torch.zeros(2)) and torch.equal(grad, torch.zeros_like(grad))
    s, t = make_logits((2, 9), seed=8)
    s[:, 1:] = NEG_INF
    t[:, 1:] = NEG_INF
    rows, grad = check("akl", 0.3, s, t)
    assert torch.equal(rows, torch.zeros(2))


def test_akl_param_as_tensor_and_padded_gradient():
    s, t = make_logits((3, 37), seed=9, dtype=torch.float16)
    rows, grad = run("akl", 0.4, s, t, extra_cols=5)
    rows_t, grad_t = run("akl", torch.tensor(0.4, dtype=torch.float64), s, t, extra_cols=5)
    assert torch.equal(rows, rows_t) and torch.equal(grad, grad_t)
    assert torch.equal(grad[:, 37:], torch.zeros(3, 5, dtype=torch.float16))


# ----------------------------------------------------------------------------- TAID


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("t_mix", [0.3, 0.8, "tensor"])
def test_taid_values_and_gradients(t_mix, dtype):
    i = {0.3: 0, 0.8: 1, "tensor": 2}[t_mix] + DTYPES.index(dtype)
    s, t, opts = _rotating_case(i, dtype)
    param = torch.tensor(0.65, device=DEVICE) if t_mix == "tensor" else t_mix
    check("taid", param, s, t, **opts)


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_taid_edges_are_exact(as_tensor):
    """t = 0: ℓ = 0 and gradient 0 exactly; t = 1: forward KL bit for bit (the float runs the
    registry's edge, forward KL itself; the tensor is the kernel's own edge)."""
    s, t = make_logits((4, 37), seed=10, scale=5.0)
    s[0, :5] = NEG_INF
    t[1, :5] = NEG_INF

    def param(x):
        return torch.tensor(x) if as_tensor else x

    rows, grad = run("taid", param(0.0), s, t, temperature=0.7)
    assert torch.equal(rows, torch.zeros(4)) and torch.equal(grad, torch.zeros_like(grad))
    rows, grad = run("taid", param(1.0), s, t, temperature=0.7)
    fkl_rows, fkl_grad = run("forward_kl", 0.0, s, t, temperature=0.7)
    assert torch.equal(rows, fkl_rows) and torch.equal(grad, fkl_grad)
    check("taid", param(1.0), s, t, temperature=0.7)


@pytest.mark.parametrize("side", ["teacher", "student", "different"])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_taid_negative_infinity(side, temperature):
    """-inf on either side is -inf in the mixture (0 < t < 1): finite loss, zero gradient
    where the student is -inf; at t = 1 the forward KL +inf rule holds."""
    s, t = make_logits((4, 29), seed=11, scale=3.0)
    if side in ("teacher", "different"):
        t[:, 3:10] = NEG_INF
    if side in ("student", "different"):
        s[:, 8:15] = NEG_INF
    for t_mix in (0.3, 1.0):
        rows, grad = check("taid", torch.tensor(t_mix), s, t, temperature=temperature)
        assert torch.isfinite(grad).all() and (grad[torch.isinf(s)] == 0).all()
        if side != "teacher" and t_mix == 1.0:  # the teacher alive where the student is -inf
            assert torch.isinf(rows).all() and (grad == 0).all()
        else:
            assert torch.isfinite(rows).all()


def test_taid_row_without_a_shared_finite_id():
    """0 < t < 1 and no id finite on both sides: the mixture is -inf everywhere, so the row is
    +inf with a zero gradient; the other rows are untouched."""
    s, t = make_logits((3, 12), seed=12)
    s[0, :6] = NEG_INF
    t[0, 6:] = NEG_INF
    rows, grad = check("taid", 0.5, s, t)
    assert rows[0].item() == math.inf and torch.equal(grad[0], torch.zeros(12))
    assert torch.isfinite(rows[1:]).all()


def test_taid_single_column():
    s, t = make_logits((3, 1), seed=13)
    rows, grad = check("taid", torch.tensor(0.4), s, t, temperature=0.05)
    assert torch.equal(rows, torch.zeros(3)) and torch.equal(grad, torch.zeros_like(grad))
