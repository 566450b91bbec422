"""The op layer: the loss registry, the dispatch point, the reduction object, and the argument
defects found by trying to break kdfast (each a regression test)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import kdfast
from kdfast import _dispatch, _registry
from kdfast._reduction import Reduction
from reference64 import LOSSES as REFERENCE_LOSSES
from reference64 import row_losses as ref_rows

DENSE = tuple(kdfast.LOSSES)
KERNEL_BACKENDS = ("rust", "torch") + (("triton",) if kdfast._triton.usable(torch.device("cpu")) else ())


# ----------------------------------------------------------------------------- registry


def test_every_registered_loss_is_public_and_has_an_independent_reference():
    assert set(DENSE) == set(REFERENCE_LOSSES), "a new loss needs its float64 reference in tests/reference64.py"
    for name, spec in kdfast.LOSSES.items():
        fn = getattr(kdfast, name)
        assert fn.__name__ == name and name in kdfast.__all__
        params = inspect.signature(fn).parameters
        if spec.param is not None:
            want = inspect.Parameter.empty if spec.param.required else spec.param.default
            assert params[spec.param.name].default == want
            assert spec.param.name in fn.__doc__
        assert spec.summary.split()[0] in fn.__doc__


@pytest.mark.parametrize("name", [n for n in DENSE if kdfast.LOSSES[n].param is not None])
def test_parameter_range_comes_from_the_registry(name):
    p = kdfast.LOSSES[name].param
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    fn = getattr(kdfast, name)
    bad = p.high if p.high_open else p.high + 0.5
    with pytest.raises(ValueError, match=p.name):
        fn(s, t, **{p.name: bad})
    with pytest.raises(ValueError, match=p.name):
        fn(s, t, **{p.name: p.low - 0.5})
    with pytest.raises(TypeError, match=p.name):
        fn(s, t, **{p.name: None})


@pytest.mark.parametrize("name", DENSE)
def test_unknown_keyword_is_a_type_error(name):
    with pytest.raises(TypeError, match="unexpected keyword"):
        getattr(kdfast, name)(torch.randn(2, 5), torch.randn(2, 5), temprature=2.0)


EDGES = [(name, value, target) for name, spec in kdfast.LOSSES.items() for value, target in spec.edges.items()]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,value,target", EDGES)
def test_parameter_edges_are_the_plain_loss_on_every_backend(name, value, target, backend):
    """jsd at β ∈ {0, 1} and the skews at λ = 0 *are* forward / reverse KL: identical values and
    gradients (they once drifted between backends, and cancelled at T = 10)."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(6, 37, generator=g) * 3
    s0 = (0.9 * t + 0.1 * torch.randn(6, 37, generator=g)).requires_grad_()
    s1 = s0.detach().clone().requires_grad_()
    param = kdfast.LOSSES[name].param.name
    a = getattr(kdfast, name)(s0, t, temperature=10.0, backend=backend, **{param: value})
    b = getattr(kdfast, target)(s1, t, temperature=10.0, backend=backend)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(s0.grad, s1.grad)


def test_registry_lookup_names_the_losses():
    with pytest.raises(ValueError, match="loss: expected one of 'forward_kl'"):
        _registry.get("kl")


# ----------------------------------------------------------------------------- dispatch


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert _dispatch.resolve("auto", cpu, (torch.float32, torch.bfloat16), op="x") == "rust"
    assert _dispatch.resolve("auto", cpu, (torch.float64,), op="x") == "torch"
    assert _dispatch.resolve("auto", cpu, (torch.float32,), op="x", available=("torch",)) == "torch"
    assert _dispatch.resolve("auto", torch.device("meta"), (torch.float32,), op="x") == "torch"


def test_forced_backend_errors_have_one_format():
    cpu = torch.device("cpu")
    with pytest.raises(kdfast.DtypeError, match="backend: 'rust' cannot run op on float64"):
        _dispatch.resolve("rust", cpu, (torch.float64,), op="op")
    with pytest.raises(ValueError, match="backend: 'rust' cannot run op on tensors on meta"):
        _dispatch.resolve("rust", torch.device("meta"), (torch.float32,), op="op")
    with pytest.raises(ValueError, match="backend: 'rust' has no kernel for op"):
        _dispatch.resolve("rust", cpu, (torch.float32,), op="op", available=("torch",))
    with pytest.raises(ValueError, match="backend: expected one of"):
        _dispatch.resolve("cuda", cpu, (torch.float32,), op="op")


# ----------------------------------------------------------------------------- reduction


def test_reduction_denominator():
    labels = torch.tensor([1, -100, 2, -100])
    assert Reduction("mean").denominator(4, labels) == 2.0
    assert Reduction("mean", ignore_index=1).denominator(4, labels) == 3.0
    assert Reduction("batchmean", num_items_in_batch=0).denominator(4, labels) == 1.0
    assert Reduction("mean", num_items_in_batch=torch.tensor(7)).denominator(4, labels) == 7.0
    assert Reduction("mean").denominator(0, None) == 1.0
    assert Reduction("sum").weight(4, labels, torch.device("cpu")) is None
    w = Reduction("mean").weight(4, labels, torch.device("cpu"))
    assert w.dtype == torch.float32 and float(w) == 0.5


# ----------------------------------------------------------------------------- argument defects


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(ignore_index=2**70), ValueError, "ignore_index"),
    (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index"),
    (dict(num_items_in_batch=2**2000), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=float("inf")), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch"),
    (dict(temperature=1e-45), ValueError, "temperature"),
    (dict(temperature=1e-39), ValueError, "temperature"),
    (dict(temperature=1e39), ValueError, "temperature"),
    (dict(temperature=2**2000), ValueError, "temperature"),
    (dict(vocab_size=2**70), ValueError, "vocab_size"),
])
def test_out_of_range_numbers_name_the_argument(kwargs, exc, name, backend):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    kwargs = dict(kwargs, labels=torch.tensor([0, 1, 2])) if "ignore_index" in kwargs else kwargs
    for fn in (kdfast.forward_kl, kdfast.jsd):
        with pytest.raises(exc, match=name):
            fn(s, t, backend=backend, **kwargs)
    if "vocab_size" not in kwargs:
        targets = kdfast.compress_topk(t, 2)
        kw = {k: v for k, v in kwargs.items() if k != "labels"}
        with pytest.raises(exc, match=name):
            kdfast.sparse_kl(s, targets, backend=backend, labels=kwargs.get("labels"), **kw)


def test_smallest_allowed_temperature_is_finite():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert math.isfinite(kdfast.forward_kl(s * 1e-37, t * 1e-37, temperature=2.0**-126).item())


@pytest.mark.parametrize("fn,name", [(kdfast.compress_topk, "k"), (kdfast.compress_sample, "num_samples")])
@pytest.mark.parametrize("value", [0, -1, 2**32, 2**62, 2**64, 2**70])
def test_compression_counts_out_of_range_name_the_argument(fn, name, value):
    with pytest.raises(ValueError, match=f"^{name}: "):
        fn(torch.randn(1, 10), value)


@pytest.mark.parametrize("fn", [kdfast.compress_topk, kdfast.compress_sample])
def test_compression_of_meta_tensors_is_a_value_error(fn):
    with pytest.raises(ValueError, match="teacher_logits: .*meta"):
        fn(torch.empty(2, 10, device="meta"), 3)


def test_dense_losses_on_meta_tensors_give_meta_results():
    s = torch.empty(2, 3, 10, device="meta", requires_grad=True)
    out = kdfast.jsd(s, torch.empty(2, 3, 10, device="meta"), labels=torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_kernels_agree_with_the_independent_reference(backend, reduction):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 33, generator=g) * 4, torch.randn(5, 33, generator=g) * 4
    labels = torch.tensor([1, -100, 2, 3, -100])
    for name in DENSE:
        spec = kdfast.LOSSES[name]
        kw = {} if spec.param is None else {spec.param.name: 0.3}
        leaf = s.clone().requires_grad_()
        out = getattr(kdfast, name)(leaf, t, labels=labels, reduction=reduction, temperature=1.5, backend=backend, **kw)
        rows, grad = ref_rows(name, s, t, temperature=1.5, **kw)
        keep = (labels != -100).double()
        rows, grad = rows * keep, grad * keep[:, None]
        want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep.sum()}[reduction]
        out.sum().backward()
        scale = {"none": 1.0, "sum": 1.0, "mean": 1 / keep.sum().item()}[reduction]
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(leaf.grad.double(), grad * scale, rtol=1e-4, atol=1e-6)


def test_readme_documents_every_registered_loss():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, spec in kdfast.LOSSES.items():
        if spec.param is None:
            row = f"| `{name}"
        elif spec.param.required:
            row = f"| `{name}({spec.param.name}=…)`"
        else:
            row = f"| `{name}({spec.param.name}={spec.param.default:g})`"
        assert row in readme, f"README's API table has no row for {name}"
