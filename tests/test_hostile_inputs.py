"""Hostile inputs: wide logits, -inf entries, masked rows, underflow, extreme T and V, views."""

import pytest
import torch

from conftest import (
    BACKENDS,
    DTYPES,
    LOSSES,
    NEG_INF,
    TEMPERATURES,
    check_against_reference,
    extra_kwargs,
    loss_fn,
    make_labels,
    make_logits,
    run_loss,
)


def assert_all_finite(*tensors):
    for x in tensors:
        assert x is not None
        assert torch.isfinite(x).all(), f"non-finite values: {x}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_wide_logits_all_temperatures(loss_name, backend, dtype, temperature):
    # randn × 20: spreads of ~150 logits; at T = 0.05 that is ~3000 in z/T.
    student, teacher = make_logits((6, 97), seed=21, scale=20.0, dtype=dtype, correlated=False)
    loss, grad = check_against_reference(
        loss_name, student, teacher, backend=backend, temperature=temperature,
        reduction="none", **extra_kwargs(loss_name),
    )
    assert_all_finite(loss, grad)


def _neg_inf_case(mode, seed=0, n=6, v=41, dtype=torch.float32):
    student, teacher = make_logits((n, v), seed=seed, scale=4.0)
    g = torch.Generator().manual_seed(seed + 99)
    base = torch.rand(n, v, generator=g) < 0.4
    other = torch.rand(n, v, generator=g) < 0.4
    keep = torch.randint(0, v, (n,), generator=g)
    rows = torch.arange(n)
    base[rows, keep] = False
    other[rows, keep] = False  # every row keeps a finite logit shared by both
    if mode == "same":
        s_mask, t_mask = base, base
    elif mode == "teacher_extra":  # teacher has -inf wherever the student does, and more
        s_mask, t_mask = base, base | other
    elif mode == "student_extra":
        s_mask, t_mask = base | other, base
    elif mode == "different":
        s_mask, t_mask = base, other
    elif mode == "single_finite":  # each row: exactly one finite logit, same column
        s_mask = torch.ones(n, v, dtype=torch.bool)
        s_mask[rows, keep] = False
        t_mask = s_mask
    else:
        raise KeyError(mode)
    student = student.masked_fill(s_mask, NEG_INF).to(dtype)
    teacher = teacher.masked_fill(t_mask, NEG_INF).to(dtype)
    return student, teacher


# Which -inf placements keep each loss finite (forward KL is +inf where the teacher has mass
# and the student has none; reverse KL mirrors that).
NEG_INF_MODES = {
    "forward_kl": ("same", "teacher_extra", "single_finite"),
    "reverse_kl": ("same", "student_extra", "single_finite"),
    "jsd": ("same", "teacher_extra", "student_extra", "different", "single_finite"),
    "skew_forward_kl": ("same", "teacher_extra", "student_extra", "different", "single_finite"),
    "skew_reverse_kl": ("same", "teacher_extra", "student_extra", "different", "single_finite"),
    "tvd": ("same", "teacher_extra", "student_extra", "different", "single_finite"),
    "akl": ("same", "single_finite"),  # both KLs
    # p_t lives where both logits are finite, inside the student's support: always finite.
    "taid": ("same", "teacher_extra", "student_extra", "different", "single_finite"),
}
NEG_INF_PARAMS = [(name, mode) for name in LOSSES for mode in NEG_INF_MODES[name]]


@pytest.mark.parametrize("name,mode", NEG_INF_PARAMS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0])
def test_negative_infinity_entries(name, mode, backend, dtype, temperature):
    student, teacher = _neg_inf_case(mode, seed=len(mode), dtype=dtype)
    loss, grad = check_against_reference(
        name, student, teacher, backend=backend, temperature=temperature, reduction="none",
        **extra_kwargs(name),
    )
    assert_all_finite(loss, grad)
    assert (grad[torch.isinf(student)] == 0).all(), "-inf student logits must get zero gradient"


@pytest.mark.parametrize(
    "name,param,mode",
    [
        ("jsd", 0.0, "teacher_extra"),  # = forward KL
        ("jsd", 1.0, "student_extra"),  # = reverse KL
        ("skew_forward_kl", 0.0, "teacher_extra"),  # = forward KL
        ("skew_reverse_kl", 0.0, "student_extra"),  # = reverse KL
    ],
)
def test_negative_infinity_at_parameter_edges(name, param, mode, backend):
    student, teacher = _neg_inf_case(mode, seed=3)
    loss, grad = check_against_reference(
        name, student, teacher, backend=backend, reduction="none",
        **extra_kwargs(name, beta=param, skew=param),
    )
    assert_all_finite(loss, grad)


@pytest.mark.parametrize(
    "name,student_row,teacher_row",
    [
        ("forward_kl", [0.0, NEG_INF, 1.0], [0.0, 0.5, 1.0]),
        ("reverse_kl", [0.0, 0.5, 1.0], [0.0, NEG_INF, 1.0]),
        ("jsd_beta0", [0.0, NEG_INF, 1.0], [0.0, 0.5, 1.0]),
        ("jsd_beta1", [0.0, 0.5, 1.0], [0.0, NEG_INF, 1.0]),
    ],
)
def test_kl_is_infinite_when_support_is_missing(name, student_row, teacher_row, backend):
    """KL(a‖b) = +inf when b has no mass where a has some (not NaN, not a large number)."""
    kw = {}
    if name.startswith("jsd"):
        kw["beta"] = 0.0 if name.endswith("0") else 1.0
        name = "jsd"
    student = torch.tensor([student_row, [1.0, 2.0, 3.0]])
    teacher = torch.tensor([teacher_row, [3.0, 2.0, 1.0]])
    rows = loss_fn(name)(student, teacher, backend=backend, reduction="none", **kw)
    assert rows[0].item() == float("inf")
    assert torch.isfinite(rows[1])


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("num_items_in_batch", [None, 4])
def test_all_rows_masked(loss_name, backend, dtype, reduction, num_items_in_batch):
    student, teacher = make_logits((2, 3, 10), dtype=dtype, scale=5.0)
    labels = torch.full((2, 3), -100)
    kw = dict(labels=labels, reduction=reduction, backend=backend, **extra_kwargs(loss_name))
    if reduction in ("mean", "batchmean"):
        kw["num_items_in_batch"] = num_items_in_batch
    elif num_items_in_batch is not None:
        pytest.skip("num_items_in_batch only matters for mean")
    loss, grad = run_loss(loss_name, student, teacher, **kw)
    assert loss.shape == ((2, 3) if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss)), loss
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), grad


def below_minus_104_case(dtype):
    """Logits whose log-probabilities are below −104 in both inputs in most columns."""
    student = torch.tensor(
        [
            [0.0, -150.0, -160.0, -200.0, 2.0, -120.0],
            [5.0, -110.0, -400.0, -108.0, -105.0, 0.0],
            [0.0, -1000.0, -1200.0, -2000.0, -3000.0, -106.0],
            [-120.0, -200.0, -300.0, -130.0, 1.0, -140.0],
        ]
    )
    teacher = torch.tensor(
        [
            [1.0, -155.0, -140.0, -300.0, 0.0, -110.0],
            [4.0, -400.0, -110.0, -120.0, -130.0, 1.0],
            [0.5, -1100.0, -1000.0, -1500.0, -3500.0, -110.0],
            [-130.0, -190.0, -320.0, -150.0, 0.0, -105.0],
        ]
    )
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 2.0])
def test_log_probs_below_minus_104(loss_name, backend, dtype, temperature):
    """Entries whose log-probabilities are below −104 in *both* inputs, where float32 exp
    underflows (the Liger JSD NaN): no NaN/inf in loss or gradient, and the right values."""
    student, teacher = below_minus_104_case(dtype)
    for reduction in ("none", "mean"):
        loss, grad = check_against_reference(
            loss_name, student, teacher, backend=backend, temperature=temperature,
            reduction=reduction, **extra_kwargs(loss_name),
        )
        assert_all_finite(loss, grad)


@pytest.mark.parametrize(
    "name,param,underflowing",
    [
        ("forward_kl", 0.0, "student"),
        ("jsd", 0.0, "student"),  # = forward KL
        ("skew_forward_kl", 0.0, "student"),  # = forward KL
        ("reverse_kl", 0.0, "teacher"),
        ("jsd", 1.0, "teacher"),  # = reverse KL
        ("skew_reverse_kl", 0.0, "teacher"),  # = reverse KL
    ],
)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_plain_kl_where_one_side_underflows(name, param, underflowing, temperature, backend,
                                            dtype):
    """Finite logits where the second distribution of the KL underflows float32 (log-prob
    below −104) where the first has mass: the KL is large but finite, and so is its gradient
    (for forward KL simply (q − p)/T); the parameter edges must agree with the plain KLs."""
    low = torch.tensor([[6.0, -1.0, 0.0, -150.0], [0.0, -130.0, -140.0, 2.0]])
    high = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, -2.0, 0.5]])
    student, teacher = (low, high) if underflowing == "student" else (high, low)
    loss, grad = check_against_reference(
        name, student.to(dtype), teacher.to(dtype), backend=backend, temperature=temperature,
        reduction="none", **extra_kwargs(name, beta=param, skew=param),
    )
    assert_all_finite(loss, grad)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_large_divergence_gradient_accuracy(loss_name, backend, temperature):
    """Rows whose divergence is ~100–200 nats while the student is nearly one-hot: reverse-KL
    style gradients q (log q − log p − ℓ) / T cancel to O(1e-3), so ℓ must be accurate to a
    few float32 ulps for the gradient to be right (found by hypothesis)."""
    student = torch.tensor(
        [[-24.799, -4.0033, 8.0002, -26.957, 52.968, -24.012, 9.162, -8.3843],
         [13.572, -18.746, -9.9678, -17.707, 18.867, -0.050859, -6.9769, -14.673]]
    )
    teacher = torch.tensor(
        [[1.9188, -7.1228, -17.84, -34.9085, 1.319, -17.9223, -4.8585, -5.452],
         [-3.6866, -15.066, -6.431, -32.4025, -63.4563, 26.6001, -1.1959, -23.3669]]
    )
    for s, t in ((student, teacher), (teacher, student)):
        check_against_reference(
            loss_name, s, t, backend=backend, temperature=temperature, reduction="none",
            **extra_kwargs(loss_name),
        )


@pytest.mark.parametrize("offsets", [(-40.0, 20.0), (300.0, -300.0), (0.0, 1000.0)], ids=str)
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_large_common_offsets(loss_name, backend, offsets, temperature):
    """Softmax is shift-invariant, and a row offset must not cost more accuracy than float32
    rounding of the shifted logits themselves (found by hypothesis: a uniform student at −40
    against a teacher at +20, T = 0.05)."""
    student, teacher = make_logits((4, 8), seed=17, scale=3.0)
    student[0] = 0.0
    teacher[0] = torch.tensor([-2.877, -1.6134, -2.3865, 0.7281, -3.4267, 4.4024, -4.2847, 0.4908])
    check_against_reference(
        loss_name, student + offsets[0], teacher + offsets[1], backend=backend,
        temperature=temperature, reduction="none", **extra_kwargs(loss_name),
    )


@pytest.mark.parametrize("offsets", [(0.0, 1000.0), (-40.0, 20.0)], ids=str)
def test_offsets_across_blocks(loss_name, backend, offsets):
    """The same across many 1024-column blocks with different block maxima: the closed-form
    kernels (forward and reverse KL) take each block's shift apart from the row's, and a
    teacher equal to the student up to an offset must give ~0, not the rounding of the offset."""
    if loss_name == "tvd":
        pytest.skip("TVD's gradient ½ sign(q − p) is the rounding's sign where p = q")
    student, _ = make_logits((3, 5000), seed=23, scale=3.0)
    student[:, 1024:2048] -= 30.0  # a block far below the row maximum
    teacher = student.clone()
    teacher[1] += 0.01 * torch.randn(5000, generator=torch.Generator().manual_seed(1))
    check_against_reference(
        loss_name, student + offsets[0], teacher + offsets[1], backend=backend,
        temperature=1.0, reduction="none", **extra_kwargs(loss_name),
    )


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_mixture_underflow_two_columns(backend, beta):
    # V = 2: the second column has log p ≈ −150, log q ≈ −200 at T = 1 and far lower at T = 0.1.
    student = torch.tensor([[0.0, -200.0], [0.0, -150.0]])
    teacher = torch.tensor([[0.0, -150.0], [0.0, -200.0]])
    for temperature in (1.0, 0.1):
        loss, grad = check_against_reference(
            "jsd", student, teacher, backend=backend, beta=beta, temperature=temperature,
            reduction="none",
        )
        assert_all_finite(loss, grad)


@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_spread_of_1e4(loss_name, backend, temperature):
    g = torch.Generator().manual_seed(5)
    base = torch.linspace(-5000.0, 5000.0, 64)
    student = torch.stack([base[torch.randperm(64, generator=g)] for _ in range(3)])
    teacher = torch.stack([base[torch.randperm(64, generator=g)] for _ in range(3)])
    loss, grad = check_against_reference(
        loss_name, student, teacher, backend=backend, temperature=temperature,
        reduction="none", **extra_kwargs(loss_name),
    )
    assert_all_finite(loss, grad)


@pytest.mark.parametrize(
    "vocab",
    [1, 2, 127, 32000, 65537, 100003],
)
def test_vocabulary_sizes(loss_name, backend, dtype, vocab):
    if vocab > 32000 and dtype != torch.float32 and loss_name not in ("forward_kl", "jsd"):
        pytest.skip("big half-precision vocabularies: forward_kl and jsd are enough")
    rows = 2 if vocab > 1000 else 5
    student, teacher = make_logits((rows, vocab), seed=vocab, scale=4.0, dtype=dtype)
    loss, grad = check_against_reference(
        loss_name, student, teacher, backend=backend, temperature=1.3, reduction="none",
        **extra_kwargs(loss_name),
    )
    assert_all_finite(loss, grad)
    if vocab == 1:  # one category: p = q = 1
        assert loss.abs().max().item() <= 1e-6
        assert grad.abs().max().item() <= 1e-6


# Views: (leaf shape, function from leaf to the [.., V] tensor the loss sees)
VIEWS = {
    "transposed": ((19, 6), lambda x: x.t()),
    "column_strided": ((6, 38), lambda x: x[:, ::2]),
    "sliced": ((9, 25), lambda x: x[2:8, 3:22]),
    "last_dim_strided": ((6, 19, 3), lambda x: x[..., 1]),
    "permuted_3d": ((4, 3, 19), lambda x: x.permute(1, 0, 2)),
    "expanded_rows": ((1, 19), lambda x: x.expand(6, 19)),
}


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("teacher_view", ["contiguous", "same_view"])
def test_non_contiguous_inputs(loss_name, backend, dtype, view, teacher_view):
    shape, fn = VIEWS[view]
    student_leaf, teacher_base = make_logits(shape, seed=8, scale=3.0, dtype=dtype)
    teacher = fn(teacher_base)
    if teacher_view == "contiguous":
        teacher = teacher.contiguous()
    lead = fn(student_leaf).shape[:-1]
    labels = make_labels(lead, seed=2)
    labels.view(-1)[0] = 0
    check_against_reference(
        loss_name, student_leaf, teacher, backend=backend, student_view=fn, labels=labels,
        temperature=0.9, **extra_kwargs(loss_name),
    )


@pytest.mark.parametrize("shape", [(23,), (7, 23), (2, 3, 23), (2, 2, 2, 23)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_leading_shapes(loss_name, backend, dtype, shape, reduction):
    student, teacher = make_logits(shape, seed=len(shape), dtype=dtype)
    lead = shape[:-1]
    labels = make_labels(lead, seed=1) if lead else torch.tensor(4)
    grad_output = None
    if reduction == "none":
        grad_output = torch.randn(lead, generator=torch.Generator().manual_seed(3),
                                  dtype=torch.float64)
    loss, _ = check_against_reference(
        loss_name, student, teacher, backend=backend, labels=labels, reduction=reduction,
        grad_output=grad_output, **extra_kwargs(loss_name),
    )
    assert loss.shape == (lead if reduction == "none" else ())


@pytest.mark.parametrize("garbage", ["random", "nan", "huge"])
def test_vocab_size_slicing(loss_name, backend, dtype, garbage):
    """Student 152 columns, teacher 150, vocab_size=150: the padding is never read."""
    student, teacher = make_logits((5, 152), seed=6, dtype=dtype)
    teacher = teacher[:, :150].contiguous()
    fill = {"random": None, "nan": float("nan"), "huge": 1e4}[garbage]
    if fill is not None:
        student[:, 150:] = fill
    labels = torch.tensor([1, -100, 2, 3, 4])
    loss, grad = check_against_reference(
        loss_name, student, teacher, backend=backend, vocab_size=150, labels=labels,
        temperature=1.5, **extra_kwargs(loss_name),
    )
    assert torch.equal(grad[:, 150:], torch.zeros_like(grad[:, 150:]))
    assert_all_finite(loss, grad)


def test_vocab_size_smaller_than_both(loss_name, backend):
    student, teacher = make_logits((4, 160), seed=7)
    teacher = teacher[:, :152].contiguous()
    loss, grad = check_against_reference(
        loss_name, student, teacher, backend=backend, vocab_size=150, reduction="sum",
        **extra_kwargs(loss_name),
    )
    assert torch.equal(grad[:, 150:], torch.zeros_like(grad[:, 150:]))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(loss_name, backend, dtype, lead, reduction):
    student, teacher = make_logits(lead + (11,), dtype=dtype)
    loss, grad = run_loss(
        loss_name, student, teacher, backend=backend, reduction=reduction,
        **extra_kwargs(loss_name),
    )
    assert loss.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == lead
    else:
        assert loss.shape == () and loss.item() == 0.0
    assert grad is not None and grad.shape == student.shape and grad.dtype == dtype


@pytest.mark.parametrize("backend_", BACKENDS)
@pytest.mark.parametrize("dtype_", DTYPES, ids=str)
def test_reverse_kl_padding_gives_finite_gradient(backend_, dtype_):
    """TRL's reverse-KL NaN: -inf padding in both inputs must not produce NaN gradients."""
    student, teacher = make_logits((4, 64), seed=4, dtype=dtype_)
    student[:, 50:] = NEG_INF
    teacher[:, 50:] = NEG_INF
    loss, grad = run_loss("reverse_kl", student, teacher, backend=backend_)
    assert_all_finite(loss, grad)
    assert torch.equal(grad[:, 50:], torch.zeros_like(grad[:, 50:]))
