"""``fused_linear_distill_loss(..., process_group=)`` (api.md §3, §6) in real gloo process groups.

Each launch forks 2 or 3 ranks (uneven slices of V = 37: [9, 28] and [5, 20, 12]); every rank
builds the same float64 problem, keeps its rows of the heads (or columns of the teacher's
logits) and checks the value and the gradients of the hidden states (complete, the same on
every rank), of its weight rows and of its bias rows against the unsharded float64 fused loss
on the whole heads."""

import math

import pytest
import torch
import torch.distributed as dist
from _gloo import run_ranks

import kdfast

pytestmark = pytest.mark.distributed

V, N, H, HT = 37, 7, 6, 5
SPLITS = {2: [9, 28], 3: [5, 20, 12]}
LOSSES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("skew_forward_kl", 0.1),
          ("skew_reverse_kl", 0.2), ("tvd", None), ("akl", 0.5), ("taid", 0.4)]
PARAM = {"jsd": "beta", "skew_forward_kl": "skew", "skew_reverse_kl": "skew", "akl": "head_mass", "taid": "t"}
LABELS = torch.tensor([3, -100, 4, 0, -100, 2, 1])


def _problem(seed, n=N, pad=0):
    """Student and teacher heads (float64) and hidden states; ``pad`` extra head rows at the end."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    p = dict(h=r(n, H), w=r(V + pad, H, scale=0.9), b=r(V + pad, scale=0.5), th=r(n, HT), tw=r(V + pad, HT),
             tb=r(V + pad, scale=0.5))
    p["tl"] = (p["th"] @ p["tw"][:V].t() + p["tb"][:V]).float().double()  # exact in float32
    return p


def _rows(x, rank, split):
    start = sum(split[:rank])
    return x[start:start + split[rank]]


def _cols(x, rank, split):
    start = sum(split[:rank])
    return x[..., start:start + split[rank]]


def _teacher(p, form, rank, split, dtype, targets=None):
    """``(kwargs of the unsharded reference, kwargs of this rank)`` for the teacher ``form``."""
    if form == "hidden":
        full = dict(teacher_hidden=p["th"], teacher_weight=p["tw"], teacher_bias=p["tb"])
        local = dict(teacher_hidden=p["th"].to(dtype), teacher_weight=_rows(p["tw"], rank, split).to(dtype),
                     teacher_bias=_rows(p["tb"], rank, split).to(dtype))
        return full, local
    if form == "logits":
        return dict(teacher_logits=p["tl"]), dict(teacher_logits=_cols(p["tl"], rank, split).to(dtype))
    return dict(targets=targets), dict(targets=targets)


def _same_everywhere(x, group):
    everyone = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, x.contiguous(), group=group)
    return all(torch.equal(e, x) for e in everyone)


def _check_case(rank, split, group, p, form, kw, *, what, dtype=torch.float32, targets=None, upstream=None,
                tol=(2e-5, 2e-5), gtol=(1e-4, 1e-5), local_split=None):
    """The sharded call on this rank's slices against the unsharded float64 reference."""
    local_split = local_split or split
    rounded = (lambda x: x.to(dtype).double()) if dtype in (torch.bfloat16, torch.float16) else (lambda x: x)
    q = {k: rounded(v) for k, v in p.items()}
    h, w, b = (q[k][:V].clone().requires_grad_(True) if k != "h" else q[k].clone().requires_grad_(True)
               for k in ("h", "w", "b"))
    full, local = _teacher(q, form, rank, local_split, dtype, targets)
    if form == "hidden":  # the reference's teacher head without the padding rows
        full = dict(full, teacher_weight=q["tw"][:V], teacher_bias=q["tb"][:V])
    ref_kw = {k: v for k, v in kw.items() if k != "vocab_size"}
    want = kdfast.fused_linear_distill_loss(h, w, student_bias=b, **full, **ref_kw)
    hl = p["h"].to(dtype).requires_grad_(True)
    wl = _rows(p["w"], rank, local_split).to(dtype).requires_grad_(True)
    bl = _rows(p["b"], rank, local_split).to(dtype).requires_grad_(True)
    got = kdfast.fused_linear_distill_loss(hl, wl, student_bias=bl, **local, process_group=group, **kw)
    assert got.shape == want.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert _same_everywhere(got.detach(), group), what
    torch.testing.assert_close(got.detach().double(), want.detach(), rtol=tol[0], atol=tol[1], msg=what)
    u = torch.ones(()) if upstream is None else upstream
    (want * u.double()).sum().backward()
    (got * u.to(got.dtype)).sum().backward()
    assert hl.grad.dtype == wl.grad.dtype == bl.grad.dtype == dtype, what
    assert _same_everywhere(hl.grad, group), what
    w_grad = torch.cat([w.grad, torch.zeros(p["w"].shape[0] - V, H, dtype=w.grad.dtype)])
    b_grad = torch.cat([b.grad, torch.zeros(p["b"].shape[0] - V, dtype=b.grad.dtype)])
    for name, mine, ref in (("hidden", hl.grad, h.grad), ("weight", wl.grad, _rows(w_grad, rank, local_split)),
                            ("bias", bl.grad, _rows(b_grad, rank, local_split))):
        atol = gtol[1] * (1.0 if dtype == torch.float32 or dtype == torch.float64 else max(1.0, float(ref.abs().max())))
        torch.testing.assert_close(mine.double(), ref, rtol=gtol[0], atol=atol, msg=f"{what}: ∂/∂{name}")


def _check_dense(rank, world, split, group):
    u = torch.linspace(0.5, 2.0, N)  # the upstream gradient of the rows, the same on every rank
    for seed, (name, param) in enumerate(LOSSES):
        p = _problem(seed)
        own = {} if param is None else {PARAM[name]: param}
        cases = [("hidden", dict(temperature=2.0, labels=LABELS, chunk_size=3), None),
                 ("logits", dict(temperature=0.7, reduction="none", chunk_size=2), u),
                 ("hidden", dict(reduction="sum", t2_scale=True, temperature=1.5, chunk_size=4), None)]
        for form, kw, upstream in cases:
            _check_case(rank, split, group, p, form, dict(loss=name, **own, **kw), upstream=upstream,
                        what=f"{name}({param}) {form} {kw.get('reduction', 'mean')}")


def _check_options(rank, world, split, group):
    p = _problem(40)
    labels = torch.tensor([-1, -1, -1, 2, 5, -1, 0])  # the first chunk of 3 entirely masked
    kw = dict(loss="jsd", beta=0.4, labels=labels, ignore_index=-1, num_items_in_batch=11, t2_scale=True,
              temperature=1.3, chunk_size=3)
    _check_case(rank, split, group, p, "hidden", kw, what="options")
    _check_case(rank, split, group, p, "logits", dict(loss="forward_kl", labels=labels, ignore_index=-1,
                                                      reduction="none"), what="default chunk, none, labels",
                upstream=torch.linspace(-1.0, 1.0, N))
    # a padded vocabulary: vocab_size is global, the last rank holds 5 padding rows (gradient 0)
    pp = _problem(41, pad=5)
    psplit = split[:-1] + [split[-1] + 5]
    _check_case(rank, split, group, pp, "hidden", dict(loss="reverse_kl", vocab_size=V, chunk_size=4),
                what="vocab_size", local_split=psplit)
    # float64 slices: float64 arithmetic
    _check_case(rank, split, group, p, "hidden", dict(loss="akl", head_mass=0.6, chunk_size=5), dtype=torch.float64,
                tol=(1e-10, 1e-12), gtol=(1e-9, 1e-11), what="float64")
    # [B, S, H] hidden states; no gradient asked for
    h3 = p["h"][:6].reshape(2, 3, H).float()
    with torch.no_grad():
        got = kdfast.fused_linear_distill_loss(h3, _rows(p["w"], rank, split).float(), reduction="none",
                                               teacher_logits=_cols(p["tl"][:6], rank, split).float().reshape(2, 3, -1),
                                               process_group=group)
    want = kdfast.fused_linear_distill_loss(p["h"][:6], p["w"], teacher_logits=p["tl"][:6], reduction="none")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.reshape(-1).double(), want, rtol=2e-5, atol=2e-5)


def _check_sparse(rank, world, split, group):
    p = _problem(50)
    t32 = p["tl"].float()
    cases = [("topk", 8, "bucket", "forward_kl", None), ("topk", 8, "renorm", "forward_kl", None),
             ("topk", 5, "bucket", "reverse_kl", None), ("topk", 6, "renorm", "jsd", 0.5),
             ("topk", 5, "bucket", "tvd", None), ("topk", 37, "bucket", "jsd", 0.3),
             ("sample", 20, None, "forward_kl", None)]
    for i, (method, k, tail, loss, beta) in enumerate(cases):
        targets = kdfast.compress_topk(t32, k, temperature=1.5) if method == "topk" else \
            kdfast.compress_sample(t32, k, temperature=1.5, seed=5)
        kw = dict(loss=loss, labels=LABELS, chunk_size=3, reduction=("mean", "none", "sum")[i % 3])
        if tail is not None:
            kw["tail"] = tail
        if beta is not None:
            kw["beta"] = beta
        if i == 2:
            kw["temperature"] = 2.0  # the student at another T than the stored targets
        _check_case(rank, split, group, p, "targets", kw, targets=targets, what=f"{method} k={k} {tail} {loss}",
                    upstream=torch.linspace(0.5, 1.5, N) if kw["reduction"] == "none" else None)


def _check_half(rank, world, split, group):
    p = _problem(60)
    tol, gtol = (1e-4, 1e-5), (2e-2, 1e-2)
    for name, own in (("forward_kl", {}), ("jsd", {"beta": 0.5})):
        _check_case(rank, split, group, p, "hidden", dict(loss=name, chunk_size=3, **own), dtype=torch.bfloat16,
                    tol=tol, gtol=gtol, what=f"bf16 {name}")
    targets = kdfast.compress_topk(p["tl"].float(), 6)
    _check_case(rank, split, group, p, "targets", dict(loss="forward_kl", chunk_size=4), targets=targets,
                dtype=torch.bfloat16, tol=tol, gtol=gtol, what="bf16 targets")


def _check_errors(rank, world, split, group):
    p = _problem(70)
    hl, wl = p["h"].float(), _rows(p["w"], rank, split).float()
    tl = _cols(p["tl"], rank, split).float()
    for backend in ("rust", "triton"):
        with pytest.raises(ValueError, match="backend"):
            kdfast.fused_linear_distill_loss(hl, wl, teacher_logits=tl, backend=backend, process_group=group)
    with pytest.raises(ValueError, match="process_group"):  # a teacher slice of another size
        kdfast.fused_linear_distill_loss(hl, wl, teacher_logits=tl[:, :-1], process_group=group)
    with pytest.raises(ValueError, match="vocab_size"):
        kdfast.fused_linear_distill_loss(hl, wl, teacher_logits=tl, vocab_size=V + 1, process_group=group)
    bad = kdfast.SparseTargets(indices=torch.full((N, 1), V), logprobs=torch.zeros(N, 1), tail_logprob=None)
    with pytest.raises(ValueError, match="targets.indices"):
        kdfast.fused_linear_distill_loss(hl, wl, targets=bad, process_group=group)
    # ids of the other ranks' slices are fine: the ids are global
    far = kdfast.SparseTargets(indices=torch.full((N, 1), V - 1), logprobs=torch.full((N, 1), -0.5),
                               tail_logprob=torch.full((N,), math.log1p(-math.exp(-0.5))))
    assert torch.isfinite(kdfast.fused_linear_distill_loss(hl, wl, targets=far, process_group=group))


CHECKS = [_check_dense, _check_options, _check_sparse, _check_half, _check_errors]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_fused_loss_equals_the_unsharded_reference(tmp_path, world):
    run_ranks(tmp_path, world, CHECKS, SPLITS[world])
