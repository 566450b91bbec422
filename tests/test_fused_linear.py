"""``kdfast.fused_linear_distill_loss`` (api.md §3) against float64 materialised logits.

The reference multiplies the same (upcast) hidden states and heads in float64 and runs the
unfused loss on the ``torch`` backend in float64, so it checks both the chunked matmuls and the
loss kernels, with small odd shapes, chunk sizes that do not divide N, bias, padded vocabularies,
labels, every reduction, the three teacher forms and every backend that runs here (Triton under
``TRITON_INTERPRET=1`` on CPU; the same file runs on CUDA when a GPU is present).
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import _triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"] + (["rust"] if DEVICE == "cpu" else [])
DENSE = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.3}, "skew_forward_kl": {"skew": 0.2},
         "skew_reverse_kl": {"skew": 0.2}, "tvd": {}}


def _backend_ok(backend):
    if backend == "triton" and not _triton.usable(torch.device(DEVICE)):
        pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)")


def _problem(n=13, h=16, v=29, th_dim=12, v_t=None, dtype=torch.float32, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v_t = v if v_t is None else v_t
    mk = (lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE))
    p = {
        "h": mk(n, h), "w": mk(v, h) / 2, "b": mk(v) if bias else None,
        "th": mk(n, th_dim), "tw": mk(v_t, th_dim) / 2, "tb": mk(v_t) if bias else None,
    }
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    p["labels"] = labels.to(DEVICE)
    return p


def _leaves(p):
    return [x.detach().clone().requires_grad_(True) if x is not None else None for x in (p["h"], p["w"], p["b"])]


def _grads(out, leaves, go):
    used = [x for x in leaves if x is not None]
    return torch.autograd.grad(out, used, go)


def _reference(p, loss, kwargs, *, teacher="hidden", targets=None, go=None):
    """Loss and (h, W, b) gradients from float64 materialised logits on the torch backend."""
    h, w, b = [None if x is None else x.detach().double().requires_grad_(True) for x in (p["h"], p["w"], p["b"])]
    z = h @ w.t() + (b if b is not None else 0.0)
    kw = dict(kwargs, backend="torch")
    if targets is not None:
        out = kdfast.sparse_kl(z, targets, **kw)
    else:
        t_logits = p["th"].double() @ p["tw"].double().t()
        if p["tb"] is not None:
            t_logits = t_logits + p["tb"].double()
        out = getattr(kdfast, loss)(z, t_logits, **kw)
    go = torch.ones_like(out) if go is None else go.double()
    return out.detach(), _grads(out, [h, w, b], go)


def _assert_close(got, ref, dtype, what):
    got, ref = got.double().cpu(), ref.double().cpu()
    denom = max(ref.abs().max().item(), 1e-12)
    err = (got - ref).abs().max().item() / denom
    bound = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert err <= bound, f"{what}: max error {err:.3g} of max |ref| (bound {bound})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", list(DENSE))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dense_losses_match_materialised_logits(backend, loss, reduction):
    _backend_ok(backend)
    p = _problem(seed=hash((loss, reduction)) % 1000)
    kwargs = dict(DENSE[loss], temperature=1.7, t2_scale=True, labels=p["labels"], reduction=reduction)
    leaves = _leaves(p)
    out = kdfast.fused_linear_distill_loss(
        leaves[0], leaves[1], student_bias=leaves[2], teacher_hidden=p["th"], teacher_weight=p["tw"],
        teacher_bias=p["tb"], loss=loss, chunk_size=5, backend=backend, **kwargs)
    go = torch.rand(out.shape, dtype=torch.float64).to(DEVICE) + 0.5
    ref_out, ref_grads = _reference(p, loss, kwargs, go=go)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    _assert_close(out.detach(), ref_out, torch.float32, "loss")
    for name, g, r in zip("h W b".split(), _grads(out, leaves, go.float()), ref_grads):
        _assert_close(g, r, torch.float32, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["forward_kl", "jsd"])
def test_half_precision_gradients_are_accurate(backend, dtype, loss):
    """Liger's fused-linear bf16 gradients were 4–23 % off (logits rounded to bf16 before the
    softmax); here logits are float32, so only the final rounding to the half dtype remains."""
    _backend_ok(backend)
    p = _problem(n=11, h=32, v=41, dtype=dtype, seed=3, scale=2.0)
    kwargs = dict(DENSE[loss], temperature=0.7, labels=p["labels"])
    leaves = _leaves(p)
    out = kdfast.fused_linear_distill_loss(
        leaves[0], leaves[1], student_bias=leaves[2], teacher_hidden=p["th"], teacher_weight=p["tw"],
        teacher_bias=p["tb"], loss=loss, chunk_size=4, backend=backend, **kwargs)
    ref_out, ref_grads = _reference(p, loss, kwargs)
    _assert_close(out.detach(), ref_out, torch.float32 if backend != "torch" else dtype, "loss")
    for name, g, r, x in zip("h W b".split(), _grads(out, leaves, None), ref_grads, leaves):
        assert g.dtype == x.dtype
        _assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_logits_and_padded_vocabulary(backend):
    _backend_ok(backend)
    p = _problem(n=9, v=31, v_t=27, seed=5)
    t_logits = (p["th"] @ p["tw"].t() + p["tb"]).to(torch.bfloat16)
    p_ref = dict(p, th=t_logits.double(), tw=torch.eye(27, dtype=torch.float64, device=DEVICE), tb=None)
    kwargs = dict(temperature=2.0, vocab_size=25, labels=p["labels"], reduction="sum")
    leaves = _leaves(p)
    out = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], student_bias=leaves[2],
                                           teacher_logits=t_logits, loss="reverse_kl", chunk_size=4,
                                           backend=backend, **kwargs)
    ref_out, ref_grads = _reference(p_ref, "reverse_kl", kwargs)
    _assert_close(out.detach(), ref_out, torch.float32, "loss")
    got = _grads(out, leaves, None)
    for name, g, r in zip("h W b".split(), got, ref_grads):
        _assert_close(g, r, torch.float32, f"grad {name}")
    assert torch.all(got[1][25:] == 0) and torch.all(got[2][25:] == 0)  # padded rows get nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_sparse_targets(backend, method, tail):
    _backend_ok(backend)
    p = _problem(n=10, v=37, seed=7)
    teacher_logits = (p["th"] @ p["tw"].t() + p["tb"]).cpu()
    if method == "topk":
        targets = kdfast.compress_topk(teacher_logits, 5, temperature=1.5, backend="torch")
    else:
        targets = kdfast.compress_sample(teacher_logits, 8, temperature=1.5, seed=3, backend="torch")
    targets = targets.to(DEVICE)
    kwargs = dict(labels=p["labels"], tail=tail, t2_scale=True)
    leaves = _leaves(p)
    out = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], student_bias=leaves[2], targets=targets,
                                           chunk_size=3, backend=backend, **kwargs)
    ref_out, ref_grads = _reference(p, None, kwargs, targets=targets)
    _assert_close(out.detach(), ref_out, torch.float32, "loss")
    for name, g, r in zip("h W b".split(), _grads(out, leaves, None), ref_grads):
        _assert_close(g, r, torch.float32, f"grad {name}")


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    p = _problem(seed=11, bias=False)
    leaves = _leaves(p)
    kw = dict(teacher_hidden=p["th"], teacher_weight=p["tw"], loss="jsd", labels=p["labels"])
    out = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], chunk_size=chunk_size, **kw)
    grads = _grads(out, leaves, None)
    ref_out, ref_grads = _reference(p, "jsd", {"labels": p["labels"]})
    _assert_close(out.detach(), ref_out, torch.float32, "loss")
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r, torch.float32, "grad")


def test_float64_is_exact_on_the_torch_backend():
    p = _problem(dtype=torch.float64, seed=13)
    leaves = _leaves(p)
    kwargs = dict(temperature=0.5, labels=p["labels"])
    out = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], student_bias=leaves[2], teacher_hidden=p["th"],
                                           teacher_weight=p["tw"], teacher_bias=p["tb"], chunk_size=3, **kwargs)
    assert out.dtype == torch.float64
    ref_out, ref_grads = _reference(p, "forward_kl", kwargs)
    torch.testing.assert_close(out.detach(), ref_out, rtol=1e-12, atol=1e-12)
    for g, r in zip(_grads(out, leaves, None), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="float64"):
        kdfast.fused_linear_distill_loss(leaves[0], leaves[1], teacher_logits=p["h"] @ p["w"].t(), backend="rust")


def test_num_items_and_mean_denominator():
    p = _problem(seed=17)
    leaves = _leaves(p)
    kw = dict(teacher_hidden=p["th"], teacher_weight=p["tw"], labels=p["labels"])
    total = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], reduction="sum", **kw)
    kept = int((p["labels"] != -100).sum())
    mean = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], **kw)
    torch.testing.assert_close(mean, total / kept)
    for n_items in (7, torch.tensor(7)):
        got = kdfast.fused_linear_distill_loss(leaves[0], leaves[1], num_items_in_batch=n_items, **kw)
        torch.testing.assert_close(got, total / 7)


def test_teacher_gets_no_gradient_and_no_grad_mode():
    p = _problem(seed=19)
    th, tw = p["th"].clone().requires_grad_(True), p["tw"].clone().requires_grad_(True)
    h, w, _ = _leaves(p)
    out = kdfast.fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    out.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None and w.grad is not None
    with torch.no_grad():
        again = kdfast.fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    assert not again.requires_grad
    torch.testing.assert_close(again, out.detach())


def test_frozen_head_gets_only_a_hidden_gradient():
    p = _problem(seed=23)
    h = p["h"].clone().requires_grad_(True)
    out = kdfast.fused_linear_distill_loss(h, p["w"], teacher_logits=p["h"] @ p["w"].t() * 0.5)
    (gh,) = torch.autograd.grad(out, [h])
    assert gh.shape == h.shape and torch.isfinite(gh).all()


def test_leading_shape_and_extreme_inputs():
    """[B, S, H] input; huge logit spreads and T = 0.05 stay finite."""
    g = torch.Generator().manual_seed(29)
    h = (torch.randn(2, 3, 8, generator=g) * 50).requires_grad_(True)
    w = torch.randn(19, 8, generator=g) * 20
    t_logits = torch.randn(2, 3, 19, generator=g) * 1000
    t_logits[0, 0, :5] = float("-inf")
    out = kdfast.fused_linear_distill_loss(h, w, teacher_logits=t_logits, loss="jsd", temperature=0.05,
                                           reduction="none", chunk_size=4)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_empty_batch():
    h = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    out = kdfast.fused_linear_distill_loss(h, w, teacher_logits=torch.zeros(0, 11))
    assert out.item() == 0.0
    out.backward()
    assert h.grad.shape == h.shape


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w), "exactly one teacher"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, targets=t), "exactly one teacher"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w.t(), teacher_logits=t), "student_weight"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t[:, :5]), "vocab_size"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t[:3]), "teacher_logits"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, loss="nope"), "loss"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, temperature=0), "temperature"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, chunk_size=0), "chunk_size"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, student_bias=torch.zeros(3)), "student_bias"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, labels=torch.zeros(2, dtype=torch.long)), "labels"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_logits=t, beta=0.5), "beta"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h.long(), w, teacher_logits=t), "student_hidden"),
        (lambda h, w, t: kdfast.fused_linear_distill_loss(h, w, teacher_hidden=h), "teacher_hidden and teacher_weight"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    t = torch.randn(6, 11)
    with pytest.raises((ValueError, TypeError), match=match):
        call(h, w, t)


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="temprature"):
        kdfast.fused_linear_distill_loss(torch.randn(2, 4), torch.randn(5, 4), teacher_logits=torch.randn(2, 5),
                                         temprature=2.0)


class _Head(torch.nn.Module):
    def __init__(self, hidden=16, vocab=29):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab)

    def forward(self, x, th, tw, labels, kwargs):
        return kdfast.fused_linear_distill_loss(x, self.lm_head.weight, student_bias=self.lm_head.bias,
                                                teacher_hidden=th, teacher_weight=tw, labels=labels, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_matches_eager(backend, reduction):
    _backend_ok(backend)
    torch.manual_seed(31)
    torch._dynamo.reset()
    model = _Head().to(DEVICE)
    p = _problem(seed=31)
    x = p["h"].reshape(13, 16)
    kwargs = dict(loss="skew_forward_kl", skew=0.2, temperature=2.0, reduction=reduction, chunk_size=4,
                  num_items_in_batch=torch.tensor(6), backend=backend)
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        out = fn(x, p["th"], p["tw"], p["labels"], kwargs)
        out.sum().backward()
        results.append((out.detach(), model.lm_head.weight.grad.clone(), model.lm_head.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
