"""The Triton dense-loss kernels (kdfast._triton.dense) against the float64 reference.

Device-generic: on CUDA when a GPU is present, else on CPU tensors in Triton's interpreter
(conftest sets ``TRITON_INTERPRET=1``), which is slow — so shapes are tiny and the option
space is covered by representative combinations rather than full products.
"""

import math

import kdfast
import pytest
import torch
from conftest import (DTYPES, NEG_INF, check_against_reference, extra_kwargs, loss_fn, make_labels,
                      make_logits, run_loss)
from kdfast import _triton
from test_dense_losses import CASES, build_case
from test_hostile_inputs import NEG_INF_PARAMS, _neg_inf_case, below_minus_104_case

if not _triton.usable(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
    pytest.skip("Triton cannot run here (not importable, or no GPU and no interpreter)",
                allow_module_level=True)

from kdfast._triton import dense as tdense

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = (torch.bfloat16, torch.float16)
SHAPES = ((3, 1), (5, 37), (4, 4099))  # V = 1, a prime, one past a 4096 block
TEMPERATURES = (0.05, 1.0, 10.0)
REDUCTIONS = ("none", "sum", "mean")


def check(name, student, teacher, **opts):
    """check_against_reference on ``DEVICE`` with ``backend="triton"`` (CPU inputs)."""
    return check_against_reference(name, student, teacher, backend="triton", device=DEVICE, **opts)


def _dtype_id(d):
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- values and grads


@pytest.mark.parametrize("case", CASES)
def test_option_cases_float32(loss_name, case):
    """Every option set of test_dense_losses (labels, ignore_index, reductions, num_items as
    int and tensor, T² scaling, vocab_size padding)."""
    student, teacher, opts, grad_output = build_case(case, torch.float32)
    check(loss_name, student, teacher, grad_output=grad_output, **opts, **extra_kwargs(loss_name))


@pytest.mark.parametrize("dtype", HALF, ids=_dtype_id)
@pytest.mark.parametrize("case", ["default", "none", "vocab_size", "num_items_tensor"])
def test_option_cases_half(loss_name, dtype, case):
    student, teacher, opts, grad_output = build_case(case, dtype, seed=2)
    check(loss_name, student, teacher, grad_output=grad_output, **opts, **extra_kwargs(loss_name))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_shapes_dtypes_temperatures(loss_name, dtype, shape):
    """Odd shapes × dtypes; temperature, reduction and label mask rotate with the shape so that
    every value of each is met on every loss and dtype."""
    i = SHAPES.index(shape) + DTYPES.index(dtype)
    student, teacher = make_logits(shape, seed=i, scale=4.0, dtype=dtype)
    labels = make_labels(shape[:1], seed=i, masked_fraction=0.4)
    labels[0] = 0
    reduction = REDUCTIONS[i % 3]
    grad_output = torch.randn(shape[0], dtype=torch.float64) if reduction == "none" else None
    check(loss_name, student, teacher, temperature=TEMPERATURES[i % 3], labels=labels,
          reduction=reduction, grad_output=grad_output, t2_scale=i % 2 == 0,
          **extra_kwargs(loss_name, beta=0.3, skew=0.2))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_temperatures_reductions(loss_name, temperature, reduction):
    student, teacher = make_logits((4, 23), seed=7, scale=5.0)
    labels = torch.tensor([3, -100, 1, 2])
    go = torch.tensor(2.5, dtype=torch.float64) if reduction != "none" else torch.randn(4, dtype=torch.float64)
    check(loss_name, student, teacher, temperature=temperature, reduction=reduction, labels=labels,
          grad_output=go, num_items_in_batch=6 if reduction == "mean" else None,
          **extra_kwargs(loss_name))


@pytest.mark.parametrize("name,param", [("jsd", b) for b in (0.0, 1e-4, 0.5, 1.0 - 1e-4, 1.0)]
                         + [(n, s) for n in ("skew_forward_kl", "skew_reverse_kl") for s in (0.0, 0.5, 0.999)])
def test_parameter_range(name, param):
    student, teacher = make_logits((5, 29), seed=4)
    check(name, student, teacher, temperature=1.5, **extra_kwargs(name, beta=param, skew=param))


def test_three_dimensional_input(loss_name):
    student, teacher = make_logits((2, 3, 19), seed=9, dtype=torch.bfloat16)
    labels = torch.tensor([[1, -100, 2], [-100, 4, 5]])
    check(loss_name, student, teacher, labels=labels, temperature=0.7, **extra_kwargs(loss_name))


# ----------------------------------------------------------------------------- hostile values


@pytest.mark.parametrize("name,mode", NEG_INF_PARAMS)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_negative_infinity_entries(name, mode, temperature):
    student, teacher = _neg_inf_case(mode, seed=len(mode))
    loss, grad = check(name, student, teacher, temperature=temperature, reduction="none",
                       **extra_kwargs(name))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[torch.isinf(student)] == 0).all(), "-inf student logits must get zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_log_probs_below_minus_104(loss_name, dtype, temperature):
    """Both log-probabilities below −104 (float32 exp underflows): no NaN, right values."""
    student, teacher = below_minus_104_case(dtype)
    for reduction in ("none", "mean"):
        loss, grad = check(loss_name, student, teacher, temperature=temperature, reduction=reduction,
                           **extra_kwargs(loss_name))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_wide_logits_small_temperature(loss_name):
    student, teacher = make_logits((3, 97), seed=21, scale=20.0, correlated=False)
    student[0, 0], teacher[1, 5] = 1e4, -1e4  # spreads up to 1e4 at T = 0.05
    loss, grad = check(loss_name, student, teacher, temperature=0.05, reduction="none",
                       **extra_kwargs(loss_name))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "name,param,student_row,teacher_row",
    [
        ("forward_kl", 0.0, [0.0, NEG_INF, 1.0], [0.0, 0.5, 1.0]),
        ("reverse_kl", 0.0, [0.0, 0.5, 1.0], [0.0, NEG_INF, 1.0]),
        ("jsd", 0.0, [0.0, NEG_INF, 1.0], [0.0, 0.5, 1.0]),
        ("jsd", 1.0, [0.0, 0.5, 1.0], [0.0, NEG_INF, 1.0]),
    ],
)
def test_kl_is_infinite_when_support_is_missing(name, param, student_row, teacher_row):
    student = torch.tensor([student_row, [1.0, 2.0, 3.0]], device=DEVICE)
    teacher = torch.tensor([teacher_row, [3.0, 2.0, 1.0]], device=DEVICE)
    rows = loss_fn(name)(student, teacher, backend="triton", reduction="none",
                         **extra_kwargs(name, beta=param)).cpu()
    assert rows[0].item() == math.inf
    assert torch.isfinite(rows[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_rows_are_never_read(loss_name, reduction):
    """Masked rows give 0 and a zero gradient even when they hold no finite logit."""
    student, teacher = make_logits((3, 11), seed=5)
    student[1] = NEG_INF
    teacher[1] = NEG_INF
    labels = torch.tensor([1, -100, 2])
    _, grad = check(loss_name, student, teacher, labels=labels, reduction=reduction,
                    **extra_kwargs(loss_name))
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_all_rows_masked(loss_name):
    student, teacher = make_logits((2, 3, 10), scale=5.0)
    loss, grad = run_loss(loss_name, student, teacher, labels=torch.full((2, 3), -100), backend="triton",
                          device=DEVICE, **extra_kwargs(loss_name))
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", ["transposed", "row_stride", "broadcast_teacher"])
def test_non_contiguous_inputs(loss_name, layout):
    student, teacher = make_logits((6, 21), seed=8)
    if layout == "transposed":  # unit row stride, column stride 6
        view = lambda x: x.t().contiguous().t()
    elif layout == "row_stride":  # every other row of a taller tensor, first columns of a wider one
        view = lambda x: torch.cat([x, x + 1.0], 1).repeat_interleave(2, 0)[::2, :21]
        teacher = torch.cat([teacher, teacher], 1)[:, :21]
    else:  # one teacher row broadcast over all (row stride 0)
        view = None
        teacher = teacher[:1].expand(6, 21)
    check(loss_name, student, teacher, student_view=view, temperature=1.3, reduction="none",
          **extra_kwargs(loss_name))


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes(loss_name, student_dtype, teacher_dtype):
    student, teacher = make_logits((4, 30), seed=6)
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    # The reference sees exactly the rounded inputs; the half gradient tolerance applies.
    check(loss_name, student, teacher, **extra_kwargs(loss_name))


def _call(loss, s2, t2, *, grad, grad_scale=1.0, labels=None, param=0.3, t=0.8):
    rows = torch.empty(s2.shape[0], dtype=torch.float32, device=s2.device)
    tdense.dense_call(loss, param, s2, t2, labels, -100, t, True, grad_scale, rows, grad)
    return rows


@pytest.mark.parametrize("shape", [(3, 37), (2, 4099)], ids=str)
def test_dense_call_in_place(loss_name, shape):
    """``grad`` may alias ``s2`` (the fused-linear path): same result as a separate buffer,
    with ``grad_scale`` as a float and as a 0-d device tensor."""
    s, t = make_logits(shape, seed=10)
    s, t = s.to(DEVICE), t.to(DEVICE)
    labels = torch.tensor([-100] + [1] * (shape[0] - 1), device=DEVICE)
    grad = torch.empty_like(s)
    rows = _call(loss_name, s, t, grad=grad, grad_scale=0.25, labels=labels)
    z = s.clone()
    rows_inplace = _call(loss_name, z, t, grad=z, grad_scale=torch.tensor(0.25, device=DEVICE), labels=labels)
    torch.testing.assert_close(rows_inplace, rows, rtol=0, atol=0)
    torch.testing.assert_close(z, grad, rtol=0, atol=0)


def test_dense_call_padded_gradient_columns(loss_name):
    """``grad`` wider than the vocabulary: the extra columns are written 0."""
    s, t = make_logits((3, 10), seed=11, dtype=torch.float16)
    s, t = s.to(DEVICE), t.to(DEVICE)
    grad = torch.full((3, 13), float("nan"), dtype=torch.float16, device=DEVICE)
    wide = torch.empty_like(grad)
    _call(loss_name, s, t, grad=grad)
    _call(loss_name, torch.cat([s, s[:, :3]], 1)[:, :10], t, grad=wide)
    assert torch.equal(grad[:, 10:], torch.zeros_like(grad[:, 10:]))
    assert torch.equal(grad, wide)
    rows = _call(loss_name, s, t, grad=None)
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("factor", [1.0, -0.5])
def test_scale_grad(per_row, factor):
    g = torch.randn(5, 7, device=DEVICE).to(torch.bfloat16)
    f = torch.full((5,) if per_row else (), factor, device=DEVICE)
    if per_row:
        f[2] = 3.0
    expected = g.float() * (f.unsqueeze(1) if per_row else f)
    g0 = g.clone()
    assert tdense.scale_grad_(g, f) is g
    # (Triton's interpreter truncates float32 to bfloat16 instead of rounding to nearest.)
    torch.testing.assert_close(g.float(), expected, rtol=2**-7, atol=0)
    ones = (f.expand(5) == 1.0).cpu()
    assert torch.equal(g[ones], g0[ones]), "a factor of 1 leaves the gradient untouched"


# ----------------------------------------------------------------------------- autograd behaviour


def test_teacher_never_gets_gradient_and_dtypes(loss_name):
    student, teacher = make_logits((4, 12), dtype=torch.float16)
    student = student.to(DEVICE).requires_grad_(True)
    teacher = teacher.to(DEVICE).requires_grad_(True)
    loss = loss_fn(loss_name)(student, teacher, backend="triton", **extra_kwargs(loss_name))
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.dtype == torch.float16


def test_no_grad_mode_and_student_without_grad(loss_name):
    student, teacher = make_logits((4, 12))
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    kw = dict(backend="triton", **extra_kwargs(loss_name))
    plain = loss_fn(loss_name)(student, teacher, **kw)
    assert not plain.requires_grad
    with torch.no_grad():
        under_no_grad = loss_fn(loss_name)(student.clone().requires_grad_(), teacher, **kw)
    assert not under_no_grad.requires_grad
    torch.testing.assert_close(plain, under_no_grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_and_double_backward_raise(reduction):
    student, teacher = make_logits((3, 8))
    student = student.to(DEVICE).requires_grad_(True)
    loss = kdfast.reverse_kl(student, teacher.to(DEVICE), backend="triton", reduction=reduction)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.sum().backward()
    loss = kdfast.reverse_kl(student, teacher.to(DEVICE), backend="triton", reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), student, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.pow(2).sum(), student)


# ----------------------------------------------------------------------------- backend selection


def test_backend_resolution(monkeypatch):
    student, teacher = make_logits((2, 5), dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        kdfast.tvd(student.to(DEVICE), teacher.to(DEVICE), backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="triton"):
            kdfast.tvd(student.float(), teacher.float(), backend="triton")


# ----------------------------------------------------------------------------- torch.compile


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 37)

    def forward(self, x, teacher, labels, loss, kwargs):
        return getattr(kdfast, loss)(self.head(x), teacher, labels=labels, **kwargs)


@pytest.mark.parametrize("loss,reduction", [("forward_kl", "mean"), ("jsd", "none"), ("skew_reverse_kl", "sum"),
                                            ("akl", "mean"), ("taid", "none")])
def test_compile_fullgraph_matches_eager(loss, reduction):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _Head().to(DEVICE)
    x = torch.randn(2, 5, 8, device=DEVICE)
    teacher = torch.randn(2, 5, 37, device=DEVICE) * 3
    labels = torch.randint(0, 37, (2, 5), device=DEVICE)
    labels[0, :2] = -100
    kwargs = dict(extra_kwargs(loss, beta=0.3, skew=0.2), temperature=2.0, t2_scale=True,
                  reduction=reduction, backend="triton", num_items_in_batch=torch.tensor(7, device=DEVICE))

    def run(fn):
        model.zero_grad()
        out = fn(x, teacher, labels, loss, kwargs)
        out.sum().backward()
        return out.detach(), model.head.weight.grad.clone()

    eager = run(model)
    compiled = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(DEVICE != "cuda", reason="needs > 2^31 elements")
def test_more_than_2_pow_31_elements():
    """int64 row offsets: the last rows of an [N, V] input with N·V > 2^31."""
    n, v = 16385, 131072  # 2^31 + 2^17 elements; bf16: 4 GiB per tensor
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = torch.empty(n, device="cuda")
    grad = torch.empty_like(s)
    tdense.dense_call("jsd", 0.5, s, t, None, -100, 1.0, False, 1.0, rows, grad)
    del grad
    last = slice(n - 2, n)
    ref_rows = torch.empty(2, device="cuda")
    ref_grad = torch.empty(2, v, device="cuda", dtype=torch.bfloat16)
    tdense.dense_call("jsd", 0.5, s[last].clone(), t[last].clone(), None, -100, 1.0, False, 1.0, ref_rows, ref_grad)
    torch.testing.assert_close(rows[last], ref_rows, rtol=0, atol=0)
    from reference64 import row_losses

    expected, _ = row_losses("jsd", s[last].cpu().double(), t[last].cpu().double(), beta=0.5)
    torch.testing.assert_close(rows[last].cpu().double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only")
def test_backward_makes_no_host_sync():
    student, teacher = make_logits((64, 1000))
    student, teacher = student.cuda().requires_grad_(True), teacher.cuda()
    labels, num_items = make_labels((64,)).cuda(), torch.tensor(50, device="cuda")
    kdfast.jsd(student, teacher, labels=labels, backend="triton").backward()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            loss = kdfast.jsd(student, teacher, labels=labels, backend="triton", reduction=reduction,
                              num_items_in_batch=num_items)
            loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
