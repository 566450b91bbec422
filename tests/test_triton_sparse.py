"""The Triton sparse kernel (kdfast._triton.sparse): sparse_kl and sparse_loss against float64
references and the Rust backend, in-place chunk calls, NaN rows instead of errors, and
torch.compile.

Device-generic: on a machine without CUDA every kernel runs on CPU tensors under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small and odd.
"""

import kdfast
import pytest
import torch
from kdfast import _native
from kdfast.sparse import prepare_sparse
from test_sparse import (
    check_against_reference,
    check_conventions,
    hostile_pair,
    make_targets,
    scale_of,
    tolerances,
)
from test_sparse import test_bad_arguments_raise_naming_them as bad_arguments_case
from test_sparse_loss import LOSS_IDS as SPARSE_LOSS_IDS
from test_sparse_loss import LOSSES as SPARSE_LOSSES
from test_sparse_loss import check_case, check_fullgraph_compile, check_infinite_rows, check_zero_mass_conventions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")
MODES = ("bucket", "bucket_no_tail", "renorm", "sampled")


def triton_sparse():
    from kdfast._triton import sparse

    return sparse


def _on_device(fn, student, tg, **kw):
    """``fn`` on DEVICE copies; loss and student gradient back on the CPU."""
    leaf = student.detach().to(DEVICE).requires_grad_(True)
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss = fn(leaf, tg.to(DEVICE), **kw)
    loss.backward(torch.ones_like(loss))
    return loss.detach().cpu(), leaf.grad.cpu()


def run(student, tg, **kw):
    return _on_device(kdfast.sparse_kl, student, tg, **kw)


def run_loss(student, tg, **kw):
    return _on_device(kdfast.sparse_loss, student, tg, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
def test_matches_float64_reference(mode, dtype, temperature):
    check_against_reference(run, "triton", mode, dtype, temperature, 5, 37, 6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("v,k", [(1, 1), (2, 3), (4099, 9), (9000, 24), (127, 127)])
def test_block_edges_and_every_id_listed_match_rust(mode, v, k):
    # V = 4099 and 9000 cross the 4096-column blocks (listed ids on both sides of a boundary);
    # k = V lists every id (empty bucket). Every sparse_loss loss of the mode.
    n = 2 if v > 1000 else 4
    s64, t64 = hostile_pair(n, v, seed=3 * v + k, scale=6.0)
    tg = make_targets(mode, t64.float(), k, 1.3)
    tail = "renorm" if mode == "renorm" else "bucket"
    losses = [("forward_kl", {})]
    if mode != "sampled":
        losses += SPARSE_LOSSES[1:] + [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})]
    for loss, kw in losses:
        opts = dict(loss=loss, tail=tail, reduction="none", **kw)
        want = run_loss(s64.float(), tg, backend="rust", **opts)
        got = run_loss(s64.float(), tg, backend="triton", **opts)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{loss} {kw}: {m}")
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7, msg=lambda m: f"{loss} {kw}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale", [1e4, 0.0])
def test_hostile_spreads_match_rust(mode, scale):
    # Spread 1e4 at T = 0.05 (|z/T| up to 2e5, q_tail and p_tail far below 1e-38), half the
    # entries -inf; and all-equal logits.
    s64, t64 = hostile_pair(4, 300, seed=1, scale=scale, neg_inf=0.5)
    tg = make_targets(mode, t64.float(), 7, 0.05)
    tail = "renorm" if mode == "renorm" else "bucket"
    want = run(s64.float(), tg, tail=tail, reduction="none", backend="rust")
    got = run(s64.float(), tg, tail=tail, reduction="none", backend="triton")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["bucket", "sampled"])
def test_reductions_labels_t2_match_rust(reduction, mode):
    s64, t64 = hostile_pair(4 * 3, 301, seed=4, scale=4.0)
    student, teacher = s64.float().reshape(4, 3, 301), t64.float().reshape(4, 3, 301)
    labels = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    labels[0, :2] = -100
    labels[2, 1] = -100
    tg = make_targets(mode, teacher, 7, 2.0)
    for nib in (None, 37, torch.tensor(23)):
        kw = dict(labels=labels, reduction=reduction, t2_scale=True, temperature=1.5, num_items_in_batch=nib)
        want = run(student, tg, backend="rust", **kw)
        got = run(student, tg, backend="triton", **kw)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-8)
        assert (got[1][0, :2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_topk_with_k_equal_v_is_forward_kl(dtype):
    s64, t64 = hostile_pair(4, 50, seed=5, scale=10.0)
    student, teacher = s64.to(dtype), t64.to(dtype)
    tg = kdfast.compress_topk(teacher, 50, temperature=0.5)
    labels = torch.tensor([1, -100, 2, 3])
    sl, sg = run(student, tg, labels=labels, reduction="sum", backend="triton")
    leaf = student.detach().clone().requires_grad_(True)
    kdfast.forward_kl(leaf, teacher, temperature=0.5, labels=labels, reduction="sum", backend="rust").backward()
    dl = kdfast.forward_kl(student, teacher, temperature=0.5, labels=labels, reduction="sum", backend="rust")
    scale = scale_of(student.double(), teacher.double(), temperature=0.5)
    _, atol, g_rtol, g_atol = tolerances(dtype, scale, 2.0, leaf.grad.double())
    torch.testing.assert_close(sl.double(), dl.double(), rtol=1e-5, atol=8 * atol)
    torch.testing.assert_close(sg.double(), leaf.grad.double(), rtol=g_rtol, atol=2 * g_atol)


def test_conventions():
    s, dup = check_conventions(run, "triton")
    # A repeated top-k id: ValueError on CPU tensors, a NaN row from the kernel on CUDA.
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="targets.indices.*twice"):
            kdfast.sparse_kl(s, dup, backend="triton")
    else:
        loss = kdfast.sparse_kl(s.to(DEVICE), dup.to(DEVICE), reduction="none", backend="triton").cpu()
        assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


def test_no_grad_and_empty_batch():
    s64, t64 = hostile_pair(3, 40, seed=2, scale=3.0)
    tg = kdfast.compress_topk(t64.float(), 4).to(DEVICE)
    leaf = s64.float().to(DEVICE).requires_grad_(True)
    with torch.no_grad():
        loss = kdfast.sparse_kl(leaf, tg, backend="triton")
    assert not loss.requires_grad
    empty = kdfast.compress_topk(torch.zeros(0, 30), 3).to(DEVICE)
    loss, grad = run(torch.zeros(0, 30), empty, backend="triton")
    assert loss.numel() == 1 and grad.shape == (0, 30)


def test_bad_arguments_raise_like_rust_on_cpu():
    if DEVICE != "cpu":
        pytest.skip("on CUDA the kernel gives NaN rows instead (no host sync)")
    bad_arguments_case("triton")


# ----------------------------------------------------------------------------- chunk-level calls


def _call_inputs(mode, n=6, v=300, k=8, seed=0):
    s64, t64 = hostile_pair(n, v, seed=seed, scale=5.0)
    tg = make_targets(mode, t64.float(), k, 1.0)
    labels = torch.arange(n) % 4
    labels[2] = -100
    prep = prepare_sparse(tg, (n,), v, torch.device("cpu"), tail="renorm" if mode == "renorm" else "bucket",
                          labels=labels)
    return s64.float(), prep


@pytest.mark.parametrize("mode", ["bucket", "renorm", "sampled"])
def test_sparse_call_in_place_matches_rust(mode):
    s2, prep = _call_inputs(mode)
    n, v = s2.shape
    args = (prep.ids, prep.lp, prep.w, prep.tail, prep.labels, -100, 0.7, True)
    rows_rust = torch.empty(n)
    grad_rust = torch.empty(n, v + 3)  # wider gradient rows: the excess is zero-filled
    _native.sparse_call(prep.mode, s2, *args, 0.25, rows_rust, grad_rust)

    dev = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args]
    z = s2.to(DEVICE).clone()
    rows = torch.empty(n, device=DEVICE)
    gs = torch.tensor([0.25], device=DEVICE)  # read by the kernel
    triton_sparse().sparse_call(prep.mode, z, *dev, gs, rows, z)  # gradient over the logits
    torch.testing.assert_close(rows.cpu(), rows_rust, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.cpu(), grad_rust[:, :v], rtol=1e-5, atol=1e-8)

    wide = torch.full((n, v + 3), 7.0, device=DEVICE)
    triton_sparse().sparse_call(prep.mode, s2.to(DEVICE), *dev, 0.25, rows, wide)
    torch.testing.assert_close(wide.cpu(), grad_rust, rtol=1e-5, atol=1e-8)
    assert (wide[2] == 0).all() and (wide[:, v:] == 0).all()


def test_sparse_call_gives_nan_rows_for_invalid_targets():
    s2, prep = _call_inputs("bucket", n=5, v=50, k=4, seed=3)
    ids = prep.ids.clone()
    ids[0, 1] = 50  # out of range
    ids[1, 2] = -7  # negative, not -1
    ids[3, 0] = ids[3, 1]  # repeated id in top-k targets
    ids[2, 0] = 99  # masked row (label -100): no effect
    labels = torch.tensor([0, 1, -100, 3, 4])
    n, v = s2.shape
    rows = torch.empty(n, device=DEVICE)
    grad = torch.empty(n, v, device=DEVICE)
    triton_sparse().sparse_call("bucket", s2.to(DEVICE), ids.to(DEVICE), prep.lp.to(DEVICE), None,
                                prep.tail.to(DEVICE), labels.to(DEVICE), -100, 1.0, False, 1.0, rows, grad)
    rows, grad = rows.cpu(), grad.cpu()
    assert torch.isnan(rows[[0, 1, 3]]).all() and torch.isnan(grad[[0, 1, 3]]).all()
    assert rows[2] == 0 and (grad[2] == 0).all()
    assert torch.isfinite(rows[4]) and torch.isfinite(grad[4]).all()
    # Sampled: invalid weights (negative, NaN) make the row NaN; weight 0 is an unused slot.
    s2, prep = _call_inputs("sampled", n=3, v=50, k=4, seed=4)
    w = prep.w.clone()
    w[0, 0] = -0.5
    w[1, 0] = float("nan")
    w[2, 0] = 0.0
    rows = torch.empty(3, device=DEVICE)
    triton_sparse().sparse_call("sampled", s2.to(DEVICE), prep.ids.to(DEVICE), prep.lp.to(DEVICE), w.to(DEVICE),
                                None, None, -100, 1.0, False, 1.0, rows, None)
    assert torch.isnan(rows[:2].cpu()).all() and torch.isfinite(rows[2].cpu())


# ----------------------------------------------------------------------------- torch.compile


class Student(torch.nn.Module):
    def __init__(self, hidden=16, vocab=37):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x, targets, labels, kwargs):
        return kdfast.sparse_kl(self.head(x), targets, labels=labels, **kwargs)


def _train_step(model, fn, x, targets, labels, kwargs):
    model.zero_grad()
    out = fn(x, targets, labels, kwargs)
    out.sum().backward()
    return out.detach(), model.head.weight.grad.clone()


@pytest.mark.parametrize("backend", ["rust", "triton", "torch"])
@pytest.mark.parametrize("method", ["topk", "sample"])
def test_fullgraph_compile_matches_eager(backend, method):
    device = "cpu" if backend == "rust" else DEVICE
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Student().to(device)
    x = torch.randn(2, 5, 16, device=device)
    teacher = torch.randn(2, 5, 37) * 3
    tg = (kdfast.compress_topk(teacher, 6, temperature=2.0) if method == "topk"
          else kdfast.compress_sample(teacher, 6, temperature=2.0)).to(device)
    labels = torch.randint(0, 37, (2, 5), device=device)
    labels[0, :2] = -100
    for reduction, nib in (("mean", None), ("mean", torch.tensor(7, device=device)), ("none", None)):
        kwargs = dict(temperature=1.5, t2_scale=True, reduction=reduction, backend=backend,
                      num_items_in_batch=nib)
        eager = _train_step(model, model, x, tg, labels, kwargs)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = _train_step(model, compiled, x, tg, labels, kwargs)
        torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- sparse_loss


@pytest.mark.parametrize("loss,kw", SPARSE_LOSSES, ids=SPARSE_LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sparse_loss_matches_float64_yardstick(loss, kw, dtype):
    for tail in ("bucket", "bucket_no_tail", "renorm"):
        for temperature in (0.05, 1.0, 10.0):
            check_case(run_loss, "triton", loss, kw, tail, dtype, temperature)


@pytest.mark.parametrize("loss,kw", SPARSE_LOSSES[1:], ids=SPARSE_LOSS_IDS[1:])
def test_sparse_loss_hostile_spreads_and_labels_match_rust(loss, kw):
    for scale in (1e4, 0.0):
        if scale == 0.0 and loss == "tvd":
            continue  # P = Q up to rounding: TVD's subgradient is the sign of that rounding
        s64, t64 = hostile_pair(4, 300, seed=1, scale=scale, neg_inf=0.5)
        tg = kdfast.compress_topk(t64.float(), 7, temperature=0.05)
        labels = torch.tensor([1, -100, 2, 3])
        for tail in ("bucket", "renorm"):
            opts = dict(loss=loss, tail=tail, labels=labels, t2_scale=True, reduction="none", **kw)
            want = run_loss(s64.float(), tg, backend="rust", **opts)
            got = run_loss(s64.float(), tg, backend="triton", **opts)
            assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
            assert (got[1][1] == 0).all()


def test_sparse_loss_conventions_and_infinite_rows():
    check_infinite_rows(run_loss, "triton")
    check_zero_mass_conventions(run_loss, "triton")
    s = torch.randn(2, 10)
    tg = kdfast.compress_topk(torch.randn(2, 10), 3)
    s[1, tg.indices[1]] = float("-inf")
    if DEVICE == "cpu":  # checked on the host first, with Rust's message
        with pytest.raises(ValueError, match="-inf at every listed id of row 1"):
            kdfast.sparse_loss(s, tg, loss="tvd", tail="renorm", backend="triton")
    else:  # the kernel cannot raise: a NaN row
        out = kdfast.sparse_loss(s.to(DEVICE), tg.to(DEVICE), loss="tvd", tail="renorm", reduction="none",
                                 backend="triton").cpu()
        assert torch.isnan(out[1]) and torch.isfinite(out[0])


@pytest.mark.parametrize("mode,loss,param", [("bucket", "reverse_kl", 0.0), ("renorm", "jsd", 0.3),
                                             ("bucket", "tvd", 0.0), ("renorm", "jsd", 0.0)])
def test_sparse_loss_call_in_place_matches_rust(mode, loss, param):
    s2, prep = _call_inputs(mode)
    n, v = s2.shape
    args = (prep.ids, prep.lp, prep.w, prep.tail, prep.labels, -100, 0.7, True)
    rows_rust = torch.empty(n)
    grad_rust = torch.empty(n, v + 3)
    _native.sparse_call(prep.mode, s2, *args, 0.25, rows_rust, grad_rust, loss=loss, param=param)
    dev = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in args]
    z = s2.to(DEVICE).clone()
    rows = torch.empty(n, device=DEVICE)
    triton_sparse().sparse_call(prep.mode, z, *dev, torch.tensor([0.25], device=DEVICE), rows, z, loss=loss, param=param)
    torch.testing.assert_close(rows.cpu(), rows_rust, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.cpu(), grad_rust[:, :v], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="loss: sampled targets"):
        triton_sparse().sparse_call("sampled", z, *dev, 1.0, rows, None, loss=loss, param=param)


@pytest.mark.parametrize("backend", ["triton"])
def test_sparse_loss_fullgraph_compile_matches_eager(backend):
    check_fullgraph_compile(backend, DEVICE, "jsd", {"beta": 0.3})
