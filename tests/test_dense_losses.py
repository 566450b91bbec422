"""Every dense loss × option × backend × dtype against the float64 reference (values and grads)."""

import pytest
import torch

from conftest import (
    BACKENDS,
    DTYPES,
    LOSSES,
    STOP_GRADIENT_LOSSES,
    check_against_reference,
    extra_kwargs,
    loss_fn,
    make_labels,
    make_logits,
    run_loss,
)
from reference64 import reference

N, V = 7, 33


def build_case(case, dtype, seed=0):
    """(student, teacher, options, grad_output) for one named option set."""
    student, teacher = make_logits((N, V), seed=seed, dtype=dtype)
    labels = make_labels((N,), seed=seed)
    labels[0] = 1  # at least one kept row
    labels[1] = -100  # at least one masked row
    grad_output = None
    if case == "default":
        opts = {}
    elif case == "temperature_2_t2_scale":
        opts = dict(temperature=2.0, t2_scale=True)
    elif case == "temperature_0.5_t2_scale":
        opts = dict(temperature=0.5, t2_scale=True)
    elif case == "temperature_3":
        opts = dict(temperature=3.0)
    elif case == "labels_mean":
        opts = dict(labels=labels)
    elif case == "labels_batchmean":
        opts = dict(labels=labels, reduction="batchmean")
    elif case == "custom_ignore_index":
        # -100 is an ordinary label here; rows labelled 7 are masked.
        opts = dict(labels=torch.tensor([7, -100, 3, 7, -100, 0, 7]), ignore_index=7)
    elif case == "sum":
        opts = dict(labels=labels, reduction="sum")
    elif case == "none":
        opts = dict(labels=labels, reduction="none", temperature=1.5)
        g = torch.Generator().manual_seed(seed + 7)
        grad_output = torch.randn(N, generator=g, dtype=torch.float64)
    elif case == "num_items_int":
        opts = dict(labels=labels, num_items_in_batch=11)
    elif case == "num_items_tensor":
        opts = dict(labels=labels, num_items_in_batch=torch.tensor(11))
    elif case == "num_items_tensor_no_labels":
        opts = dict(num_items_in_batch=torch.tensor(3), temperature=2.0, t2_scale=True)
    elif case == "vocab_size":
        wide_s, wide_t = make_logits((N, V + 4), seed=seed + 1, dtype=dtype)
        student = torch.cat([student, wide_s[:, :4]], dim=1)  # student has 4 padded columns
        teacher = torch.cat([teacher, wide_t[:, :2]], dim=1)  # teacher has 2
        opts = dict(vocab_size=V, labels=labels, temperature=1.3)
    else:
        raise KeyError(case)
    return student, teacher, opts, grad_output


CASES = (
    "default",
    "temperature_2_t2_scale",
    "temperature_0.5_t2_scale",
    "temperature_3",
    "labels_mean",
    "labels_batchmean",
    "custom_ignore_index",
    "sum",
    "none",
    "num_items_int",
    "num_items_tensor",
    "num_items_tensor_no_labels",
    "vocab_size",
)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(loss_name, backend, dtype, case):
    student, teacher, opts, grad_output = build_case(case, dtype)
    check_against_reference(
        loss_name, student, teacher, backend=backend, grad_output=grad_output,
        **opts, **extra_kwargs(loss_name),
    )


@pytest.mark.parametrize("beta", [0.0, 1e-4, 0.1, 0.5, 0.9, 1.0 - 1e-4, 1.0])
def test_jsd_beta(backend, dtype, beta):
    student, teacher, _, _ = build_case("default", dtype, seed=3)
    check_against_reference(
        "jsd", student, teacher, backend=backend, beta=beta, temperature=1.5
    )


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_skew(name, backend, dtype, skew):
    student, teacher, _, _ = build_case("default", dtype, seed=4)
    check_against_reference(name, student, teacher, backend=backend, skew=skew, temperature=0.7)


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_float64(loss_name, case):
    student, teacher, opts, grad_output = build_case(case, torch.float64)
    check_against_reference(
        loss_name, student, teacher, backend="torch", grad_output=grad_output,
        **opts, **extra_kwargs(loss_name),
    )


@pytest.mark.parametrize("dtype_", list(DTYPES) + [torch.float64], ids=str)
@pytest.mark.parametrize("case", ["default", "none", "vocab_size"])
def test_auto_backend(loss_name, dtype_, case):
    student, teacher, opts, grad_output = build_case(case, dtype_, seed=5)
    check_against_reference(
        loss_name, student, teacher, backend="auto", grad_output=grad_output,
        **opts, **extra_kwargs(loss_name),
    )
    # backend defaults to "auto"
    loss, _ = run_loss(loss_name, student, teacher, **opts, **extra_kwargs(loss_name))
    loss_auto, _ = run_loss(
        loss_name, student, teacher, backend="auto", **opts, **extra_kwargs(loss_name)
    )
    assert torch.equal(loss, loss_auto)


def test_rust_backend_rejects_float64(loss_name):
    student, teacher = make_logits((3, 8), dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        loss_fn(loss_name)(student, teacher, backend="rust", **extra_kwargs(loss_name))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(temperature=2.0, t2_scale=True),
        dict(temperature=0.7, reduction="none"),
        dict(reduction="sum", labels=torch.tensor([1, -100, 2, 3])),
        dict(vocab_size=6, num_items_in_batch=5),
    ],
    ids=["default", "t2", "none", "sum_labels", "vocab_size"],
)
def test_gradcheck_torch_backend(loss_name, options):
    if loss_name in STOP_GRADIENT_LOSSES:
        pytest.skip("its gradient holds part of the student constant (tests/test_akl_taid.py checks it)")
    g = torch.Generator().manual_seed(11)
    student = (torch.randn(4, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(4, 8 if "vocab_size" in options else 7, generator=g,
                          dtype=torch.float64) * 2
    fn = loss_fn(loss_name)
    kw = dict(options, backend="torch", **extra_kwargs(loss_name, beta=0.3, skew=0.2))
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, **kw), (student,))


@pytest.mark.parametrize("backend_", ["rust", "auto"])
def test_double_backward_raises(loss_name, backend_):
    student, teacher = make_logits((3, 8))
    student.requires_grad_(True)
    loss = loss_fn(loss_name)(student, teacher, backend=backend_, **extra_kwargs(loss_name))
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.pow(2).sum(), student)


def test_double_backward_torch_backend_raises_or_is_correct(loss_name):
    """The pure-PyTorch backend may support double backward; if it does, it must be right."""
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(3, 6, generator=g, dtype=torch.float64)
    fn = loss_fn(loss_name)
    kw = dict(backend="torch", temperature=1.7, **extra_kwargs(loss_name, beta=0.3, skew=0.2))
    try:
        ok = torch.autograd.gradgradcheck(lambda s: fn(s, teacher, **kw), (student,))
    except RuntimeError:
        return
    assert ok


@pytest.mark.parametrize("backend_", BACKENDS)
@pytest.mark.parametrize("dtype_", DTYPES, ids=str)
def test_result_dtypes_and_teacher_gets_no_gradient(loss_name, backend_, dtype_):
    student, teacher = make_logits((4, 12), dtype=dtype_)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = loss_fn(loss_name)(student, teacher, backend=backend_, **extra_kwargs(loss_name))
    assert loss.dtype == torch.float32
    assert loss.shape == ()
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.dtype == dtype_


@pytest.mark.parametrize("backend_", BACKENDS)
def test_teacher_module_receives_no_gradient(loss_name, backend_):
    torch.manual_seed(0)
    teacher_head = torch.nn.Linear(5, 9)
    student_head = torch.nn.Linear(5, 9)
    x = torch.randn(6, 5)
    loss = loss_fn(loss_name)(
        student_head(x), teacher_head(x), backend=backend_, **extra_kwargs(loss_name)
    )
    loss.backward()
    assert teacher_head.weight.grad is None and teacher_head.bias.grad is None
    assert student_head.weight.grad is not None
    assert torch.isfinite(student_head.weight.grad).all()


@pytest.mark.parametrize("backend_", BACKENDS)
def test_student_without_grad_and_no_grad_mode(loss_name, backend_):
    student, teacher = make_logits((4, 12))
    fn = loss_fn(loss_name)
    kw = dict(backend=backend_, **extra_kwargs(loss_name))
    plain = fn(student, teacher, **kw)
    assert not plain.requires_grad
    with torch.no_grad():
        under_no_grad = fn(student.clone().requires_grad_(), teacher, **kw)
    assert not under_no_grad.requires_grad
    torch.testing.assert_close(plain, under_no_grad, rtol=1e-6, atol=1e-7)
    ref, _ = reference(loss_name, student, teacher, **extra_kwargs(loss_name))
    torch.testing.assert_close(plain.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend_", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_inputs_are_not_modified(loss_name, backend_, reduction):
    student, teacher = make_logits((5, 17))
    labels = torch.tensor([1, -100, 2, 3, -100])
    s0, t0, l0 = student.clone(), teacher.clone(), labels.clone()
    leaf = student.requires_grad_(True)
    loss = loss_fn(loss_name)(
        leaf, teacher, labels=labels, reduction=reduction, temperature=2.0, backend=backend_,
        **extra_kwargs(loss_name),
    )
    loss.sum().backward()
    assert torch.equal(student.detach(), s0)
    assert torch.equal(teacher, t0)
    assert torch.equal(labels, l0)


@pytest.mark.parametrize("backend_", BACKENDS)
def test_repeated_calls_are_deterministic(loss_name, backend_):
    student, teacher = make_logits((16, 257), scale=5.0)
    kw = dict(backend=backend_, temperature=0.8, **extra_kwargs(loss_name))
    a_loss, a_grad = run_loss(loss_name, student, teacher, **kw)
    b_loss, b_grad = run_loss(loss_name, student, teacher, **kw)
    assert torch.equal(a_loss, b_loss)
    assert torch.equal(a_grad, b_grad)
