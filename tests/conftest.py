"""Shared fixtures, helpers, tolerances and hypothesis strategies for kdfast's test suite.

Tolerances (what "close to the float64 reference" means; see ``tolerances``):

* float64 (torch backend only): rtol 1e-9, atol 1e-11·scale.
* float32: rtol 1e-5; atol 1e-6·scale, where scale = 1 + max|z|/T over the finite logits
  actually used. float32 inputs fix each log-probability only to about eps32·|z/T|, so a
  loss that is near 0 while |z/T| is large carries an absolute error of that size; 1e-6 is
  ~16·eps32. Gradients use the same atol times the gradient's natural unit (T²/T, the
  reduction weight, |grad_output|).
* bfloat16 / float16 inputs: the inputs are exactly representable and api.md requires float32
  accumulation, so the float32 loss is held to rtol 1e-4 / atol 1e-5·scale (10× float32).
  The gradient is returned in the half dtype, i.e. rounded to 8 (bf16) or 11 (fp16)
  significant bits, and is compared after upcasting with rtol 2e-2 and
  atol 1e-2·max|reference grad| + the float32 atol.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

# Without a GPU, every Triton kernel runs on CPU tensors in Triton's interpreter (style.md
# item 8). It must be set before any kernel is defined, i.e. before kdfast._triton's modules load.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from reference64 import LOSSES, reference  # noqa: E402

BACKENDS = ("rust", "torch")
HALF_DTYPES = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + HALF_DTYPES
TEMPERATURES = (0.05, 0.5, 1.0, 2.0, 10.0)
NEG_INF = float("-inf")

settings.register_profile(
    "kdfast",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("KDFAST_HYPOTHESIS_PROFILE", "kdfast"))


# Markers (registered in pyproject.toml), set here by concern so test files stay plain:
# `python -m pytest -m "not slow"` is the inner loop (about 2 minutes on 2 cores); CI and the
# README's command run everything.
SLOW_FILES = {"test_triton_dense.py", "test_triton_sparse.py", "test_triton_compress.py", "test_demo.py",
              "test_threads_and_fork.py", "test_compile.py", "test_trainer_fused.py",
              "test_trainer_gkd.py"}
HF_FILES = {"test_trainer.py", "test_trainer_fused.py", "test_trainer_gkd.py", "test_trl.py", "test_capture.py", "test_capture_chunked.py", "test_demo.py", "test_training_smoke.py", "test_cache.py"}
SLOW_TESTS = {"test_loss_falls_and_parts_are_logged", "test_fuzz_only_value_or_type_errors",
              "test_huge_outputs_under_an_8_gib_address_space_limit", "test_rust_buffers_are_allocated_fallibly",
              "test_sparse_loss_under_fullgraph_compile",
              # import the peer libraries (TRL alone takes 5-10 s to import)
              "test_peer_agrees_with_kdfast_after_mapping", "test_torchtune_forward_kl_is_the_cross_entropy_form",
              "test_bench_table_and_json_contain_the_installed_peers",
              "test_gpu_benchmark_runs_liger_through_the_peer_adapter"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        base = item.name.split("[")[0]
        params = getattr(item, "callspec", None)
        big_vocab = params is not None and params.params.get("vocab", 0) >= 32000
        if name in SLOW_FILES or base in SLOW_TESTS or big_vocab:
            item.add_marker(pytest.mark.slow)
        if name.startswith("test_triton_") or "triton" in item.name:
            item.add_marker(pytest.mark.triton)
        if name in HF_FILES:
            item.add_marker(pytest.mark.hf)


def pytest_configure(config):
    # style.md item 9: warnings are errors in the test suite.
    config.addinivalue_line("filterwarnings", "error")
    # Third-party noise, not kdfast's: hypothesis imports libcst (-> mypy_extensions) to
    # suggest a patch when a property fails; that deprecation must not abort the session.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


# ----------------------------------------------------------------------------- helpers


#: Losses whose gradient treats part of the student as a constant (AKL's weights, TAID's
#: interpolated teacher): finite differences of the value are not their gradient.
STOP_GRADIENT_LOSSES = frozenset({"akl", "taid"})


def loss_fn(name):
    import kdfast

    return getattr(kdfast, name)


def extra_kwargs(name, beta=0.5, skew=0.1, head_mass=0.5, t=0.6):
    """The loss's own keyword from the registry (beta for jsd, skew for the skew KLs, head_mass
    for akl, t for taid; a new loss's parameter at its default)."""
    import kdfast

    param = kdfast.LOSSES[name].param
    if param is None:
        return {}
    return {param.name: {"beta": beta, "skew": skew, "head_mass": head_mass, "t": t}.get(param.name, param.default)}


def make_logits(shape, *, seed=0, scale=3.0, dtype=torch.float32, correlated=True):
    """Student/teacher logits; the student is a noisy copy of the teacher by default."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    noise = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    student = 0.5 * teacher + noise if correlated else noise
    return student.to(dtype), teacher.to(dtype)


def make_labels(lead_shape, *, seed=0, masked_fraction=0.3, ignore_index=-100, vocab=10):
    g = torch.Generator().manual_seed(seed + 12345)
    labels = torch.randint(0, vocab, lead_shape, generator=g)
    masked = torch.rand(lead_shape, generator=g) < masked_fraction
    return torch.where(masked, torch.full_like(labels, ignore_index), labels)


def run_loss(name, student, teacher, *, grad_output=None, student_view=None, device=None, **kwargs):
    """Call the loss on a fresh leaf copy of ``student``; return (loss, student grad or None).

    ``student_view`` maps the leaf to the tensor that is actually passed (to test views);
    the gradient returned is then the leaf's. With ``device``, the loss runs on copies of the
    inputs (and tensor options) on that device; loss and gradient come back on the CPU.
    """
    leaf = student.detach().clone().requires_grad_(True)
    passed = student_view(leaf) if student_view is not None else leaf
    if device is not None:
        passed, teacher = passed.to(device), teacher.to(device)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = loss_fn(name)(passed, teacher, **kwargs)
    grad = None
    if loss.requires_grad:
        go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss)
        loss.backward(go)
        grad = leaf.grad
    return loss.detach().cpu(), grad


def logit_scale(student, teacher, temperature, vocab_size=None):
    """1 + max|z|/T over the finite logits used (both inputs)."""
    worst = 0.0
    for x in (student, teacher):
        x = x.detach().double()
        if vocab_size is not None:
            x = x[..., :vocab_size]
        finite = x[torch.isfinite(x)]
        if finite.numel():
            worst = max(worst, finite.abs().max().item())
    return 1.0 + worst / float(temperature)


def tolerances(dtype, *, scale, grad_unit, ref_grad):
    """(value rtol, value atol, grad rtol, grad atol); see the module docstring."""
    if dtype == torch.float64:
        return 1e-9, 1e-11 * scale, 1e-9, 1e-11 * scale * grad_unit
    if dtype == torch.float32:
        return 1e-5, 1e-6 * scale, 1e-5, 1e-6 * scale * grad_unit
    max_grad = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    return 1e-4, 1e-5 * scale, 2e-2, 1e-2 * max_grad + 1e-6 * scale * grad_unit


def reduction_weights(reduction, labels, lead_shape, ignore_index, num_items_in_batch):
    """(Σ row weights, max row weight) of the reduced loss, for the error bounds."""
    n_rows = math.prod(lead_shape)
    n_kept = n_rows if labels is None else int((labels != ignore_index).sum())
    if reduction == "none":
        return 1.0, 1.0
    if reduction == "sum":
        return float(max(1, n_kept)), 1.0
    denom = float(num_items_in_batch) if num_items_in_batch is not None else max(1, n_kept)
    return max(1.0, n_kept / denom), 1.0 / denom


def check_against_reference(
    name,
    student,
    teacher,
    *,
    backend,
    grad_output=None,
    student_view=None,
    check_grad=True,
    device=None,
    **opts,
):
    """Run kdfast on (student, teacher) and compare value, dtype and gradient with reference64.

    ``student`` is the leaf tensor; ``student_view`` (if given) produces what the loss sees.
    ``device``: run kdfast on copies on that device (the reference stays on the CPU).
    """
    kwargs = dict(opts)
    kwargs.setdefault("temperature", 1.0)
    loss, grad = run_loss(
        name,
        student,
        teacher,
        grad_output=grad_output,
        student_view=student_view,
        backend=backend,
        device=device,
        **kwargs,
    )

    # Reference on exactly the values the loss saw (float64), gradient mapped back to the leaf.
    leaf64 = student.detach().double().requires_grad_(True)
    seen64 = student_view(leaf64) if student_view is not None else leaf64
    ref_opts = {k: v for k, v in kwargs.items()}
    nib = ref_opts.get("num_items_in_batch")
    if isinstance(nib, torch.Tensor):
        ref_opts["num_items_in_batch"] = nib.item()
    ref_loss, ref_grad_seen = reference(
        name, seen64, teacher, grad_output=grad_output, **ref_opts
    )
    if student_view is None:
        ref_grad = ref_grad_seen
    else:
        (ref_grad,) = torch.autograd.grad(seen64, leaf64, ref_grad_seen)

    dtype = student.dtype
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_loss_dtype, f"loss dtype {loss.dtype}"
    assert loss.shape == ref_loss.shape, f"loss shape {tuple(loss.shape)} vs {tuple(ref_loss.shape)}"

    T = float(kwargs["temperature"])
    labels = kwargs.get("labels")
    lead = seen64.shape[:-1]
    total_w, max_w = reduction_weights(
        kwargs.get("reduction", "mean"), labels, lead, kwargs.get("ignore_index", -100),
        ref_opts.get("num_items_in_batch"),
    )
    t2 = T * T if kwargs.get("t2_scale") else 1.0
    go_max = 1.0 if grad_output is None else max(1.0, grad_output.abs().max().item())
    scale = logit_scale(seen64, teacher, T, kwargs.get("vocab_size"))
    grad_unit = t2 / T * max_w * go_max
    v_rtol, v_atol, g_rtol, g_atol = tolerances(
        dtype, scale=scale, grad_unit=grad_unit, ref_grad=ref_grad
    )
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=v_rtol, atol=v_atol * t2 * total_w,
        msg=lambda m: f"{name} loss vs float64 reference: {m}",
    )
    if not check_grad:
        return loss, grad
    assert grad is not None, "student gradient missing"
    assert grad.dtype == dtype, f"grad dtype {grad.dtype} != student dtype {dtype}"
    assert grad.shape == student.shape
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=g_rtol, atol=g_atol,
        msg=lambda m: f"{name} student gradient vs float64 reference: {m}",
    )
    return loss, grad


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(params=LOSSES)
def loss_name(request):
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# ----------------------------------------------------------------------------- strategies


@st.composite
def logit_pairs(draw, *, max_rows=5, max_vocab=40, neg_inf=True, dtype=torch.float32):
    """(student, teacher) of shape [N, V] with wide, varied scales.

    ``-inf`` entries (when drawn) sit at the same positions in both inputs, every row keeps
    at least one finite logit, so all six losses are finite.
    """
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    s_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 4.0, 20.0]))
    t_scale = draw(st.sampled_from([0.0, 0.1, 1.0, 4.0, 20.0]))
    offset = draw(st.sampled_from([0.0, -30.0, 50.0]))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * s_scale + offset
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * t_scale
    if neg_inf and v > 1 and draw(st.booleans()):
        frac = draw(st.sampled_from([0.2, 0.5, 0.9]))
        mask = torch.rand(n, v, generator=g) < frac
        keep = torch.randint(0, v, (n,), generator=g)
        mask[torch.arange(n), keep] = False
        s = s.masked_fill(mask, NEG_INF)
        t = t.masked_fill(mask, NEG_INF)
    return s.to(dtype), t.to(dtype)


temperatures = st.sampled_from(TEMPERATURES) | st.floats(0.05, 10.0)
reductions = st.sampled_from(["mean", "batchmean", "sum", "none"])
loss_names = st.sampled_from(LOSSES)
