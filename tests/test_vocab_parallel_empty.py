"""Vocabulary-parallel ops (api.md §6) where some ranks hold an EMPTY slice of the vocabulary.

Three gloo ranks on loopback, V = 37 split as [17, 0, 20] (an empty slice in the middle) and
[37, 0, 0] (empty slices at the end): every op must make the same collectives on every rank and
return the whole vocabulary's result — losses and their gradients against the unsharded float64
reference (the empty rank's gradient is ``[N, 0]``), ``compress_topk`` with the ids of one pass,
``compress_sample`` bit for bit. A vocabulary empty on *every* rank is a ``ValueError`` raised by
every rank together (a rank raising alone would leave the others waiting in a collective: the
launcher's timeout turns that hang into a failure)."""

import importlib
import math

import pytest
import torch
import torch.distributed as dist
from _gloo import run_ranks

import kdfast
from kdfast import reference as ref

pytestmark = pytest.mark.distributed

V, N, H = 37, 6, 5
SPLITS = ([17, 0, 20], [37, 0, 0])
LOSSES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("skew_forward_kl", 0.1),
          ("skew_reverse_kl", 0.2), ("tvd", None), ("akl", 0.5), ("taid", 0.4)]
PARAM = {"jsd": "beta", "skew_forward_kl": "skew", "skew_reverse_kl": "skew", "akl": "head_mass", "taid": "t"}
LABELS = torch.tensor([3, -100, 4, 0, 2, 1])


def _logits(seed, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    if v == V:
        t[0, 3] = t[1, 30] = float("-inf")  # teacher masses of 0, on both non-empty slices
    return s, t


def _mine(x, rank, split):
    start = sum(split[:rank])
    return x[..., start:start + split[rank]]


def _rows(x, rank, split):
    start = sum(split[:rank])
    return x[start:start + split[rank]]


def _same_everywhere(x, group):
    everyone = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, x.contiguous(), group=group)
    return all(torch.equal(e, x) for e in everyone)


def _check_dense(rank, world, _split, group):
    for split in SPLITS:
        for seed, (name, param) in enumerate(LOSSES):
            s, t = _logits(seed)
            kw = {} if param is None else {PARAM[name]: param}
            s64 = s.clone().requires_grad_(True)
            want = getattr(ref, name)(s64, t, 1.5, *(() if param is None else (param,)))
            want.sum().backward()
            local = _mine(s, rank, split).float().contiguous().requires_grad_(True)
            got = getattr(kdfast, name)(local, _mine(t, rank, split).float(), temperature=1.5, reduction="none",
                                        process_group=group, **kw)
            what = f"{name}({param}) {split}"
            assert _same_everywhere(got.detach(), group), what
            torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-5, msg=what)
            got.sum().backward()
            assert local.grad.shape == (N, split[rank]), what
            torch.testing.assert_close(local.grad.double(), _mine(s64.grad, rank, split), rtol=1e-4, atol=2e-5,
                                       msg=what)
        # labels, a mean, and a global vocab_size whose padding lies on the last (maybe empty) slice
        s, t = _logits(30)
        pad = [torch.cat([x, torch.full((N, 4), 5.0, dtype=x.dtype)], 1) for x in (s, t)]
        psplit = split[:-1] + [split[-1] + 4]
        s64 = s.clone().requires_grad_(True)
        want = kdfast.jsd(s64, t, beta=0.4, labels=LABELS, t2_scale=True, temperature=2.0, backend="torch")
        want.backward()
        local = _mine(pad[0], rank, psplit).float().contiguous().requires_grad_(True)
        got = kdfast.jsd(local, _mine(pad[1], rank, psplit).float(), beta=0.4, labels=LABELS, t2_scale=True,
                         temperature=2.0, vocab_size=V, process_group=group)
        assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-5), split
        got.backward()
        grad = torch.cat([s64.grad, torch.zeros(N, 4, dtype=s64.grad.dtype)], 1)
        torch.testing.assert_close(local.grad.double(), _mine(grad, rank, psplit), rtol=1e-4, atol=1e-6)


def _check_dtensor(rank, world, _split, group):
    """V = 2 over 3 ranks: ``Shard(-1)`` leaves the last rank's shard empty."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    s, t = _logits(8, v=2)
    ds = distribute_tensor(s.float(), mesh, [Shard(1)]).requires_grad_(True)
    assert ds.to_local().shape == (N, 0 if rank == 2 else 1)
    rows = kdfast.reverse_kl(ds, distribute_tensor(t.float(), mesh, [Shard(1)]), reduction="none")
    s64 = s.clone().requires_grad_(True)
    (ref.reverse_kl(s64, t, 1.0) * torch.arange(1.0, N + 1)).sum().backward()
    torch.testing.assert_close(rows.detach().double(), ref.reverse_kl(s, t, 1.0), rtol=1e-5, atol=1e-6)
    (rows * torch.arange(1.0, N + 1)).sum().backward()  # an upstream gradient that differs by row
    torch.testing.assert_close(ds.grad.full_tensor().double(), s64.grad, rtol=1e-4, atol=1e-6)


def _check_sparse(rank, world, _split, group):
    s, t = _logits(11)
    cases = [("topk", 8, "bucket", "forward_kl", None), ("topk", 8, "renorm", "forward_kl", None),
             ("topk", 5, "bucket", "reverse_kl", None), ("topk", 6, "renorm", "jsd", 0.5),
             ("topk", 5, "renorm", "tvd", None), ("topk", 37, "bucket", "jsd", 0.3),
             ("sample", 20, None, "forward_kl", None)]
    for split in SPLITS:
        for method, k, tail, loss, beta in cases:
            targets = kdfast.compress_topk(t.float(), k, temperature=1.5) if method == "topk" else \
                kdfast.compress_sample(t.float(), k, temperature=1.5, seed=5)
            kw = dict(loss=loss, labels=LABELS, reduction="none", **({} if tail is None else {"tail": tail}),
                      **({} if beta is None else {"beta": beta}))
            s64 = s.clone().requires_grad_(True)
            want = kdfast.sparse_loss(s64, targets, backend="torch", **kw)
            want.sum().backward()
            local = _mine(s, rank, split).float().contiguous().requires_grad_(True)
            got = kdfast.sparse_loss(local, targets, process_group=group, **kw)
            what = f"{method} k={k} {tail} {loss} {split}"
            torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-5, msg=what)
            got.sum().backward()
            assert local.grad.shape == (N, split[rank]), what
            torch.testing.assert_close(local.grad.double(), _mine(s64.grad, rank, split), rtol=1e-4, atol=2e-6,
                                       msg=what)
        targets = kdfast.compress_topk(t.float(), 4)
        got = kdfast.sparse_kl(_mine(s, rank, split).float(), targets, process_group=group)
        assert math.isclose(float(got), float(kdfast.sparse_kl(s, targets, backend="torch")), rel_tol=1e-5)


def _check_compress(rank, world, _split, group):
    for split in SPLITS:
        for seed, k in enumerate((4, 17, 37, 50)):
            _, t = _logits(20 + seed, n=5)
            t = t.float()
            t[3, :] = float("-inf")
            t[3, 33] = 2.0  # one finite logit, on the last non-empty slice
            t[4, 17:] = float("-inf")
            want = kdfast.compress_topk(t, k, temperature=0.8)
            got = kdfast.compress_topk(_mine(t, rank, split).contiguous(), k, temperature=0.8, process_group=group)
            assert torch.equal(got.indices, want.indices), (split, k)
            torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.tail_logprob, want.tail_logprob, rtol=0, atol=1e-6)
        for dtype in (torch.float32, torch.bfloat16):
            for n_s, seed in ((1, 0), (64, 3), (300, 2**64 - 1)):
                x = (torch.randn(7, V, generator=torch.Generator().manual_seed(n_s)) * 5).to(dtype)
                x[1, :] = float("-inf")
                x[1, -1] = 2.0
                want = kdfast.compress_sample(x, n_s, temperature=0.7, seed=seed, row_offset=9)
                got = kdfast.compress_sample(_mine(x, rank, split), n_s, temperature=0.7, seed=seed, row_offset=9,
                                             process_group=group)
                for name in ("indices", "logprobs", "weights"):
                    assert torch.equal(getattr(got, name), getattr(want, name)), (split, dtype, n_s, name)
    # blocks of 4096 ids that straddle the empty rank: the carry passes through it
    big = [5000, 0, 3000]
    x = torch.randn(3, 8000, generator=torch.Generator().manual_seed(1)) * 4
    got = kdfast.compress_sample(_mine(x, rank, big), 50, seed=4, process_group=group)
    assert torch.equal(got.indices, kdfast.compress_sample(x, 50, seed=4).indices)


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    r = (lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64))
    p = dict(h=r(N, H), w=r(V, H), b=r(V) * 0.5, th=r(N, H), tw=r(V, H), tb=r(V) * 0.5)
    p["tl"] = p["th"] @ p["tw"].t() + p["tb"]
    return p


def _check_fused(rank, world, _split, group):
    p = _problem(3)
    t32 = p["tl"].float()
    cases = [("hidden", dict(loss="forward_kl", temperature=2.0, labels=LABELS, chunk_size=4)),
             ("logits", dict(loss="akl", head_mass=0.6, reduction="sum")),
             ("logits", dict(loss="taid", t=0.3, chunk_size=2)),
             ("targets", dict(loss="jsd", beta=0.4, tail="renorm", chunk_size=3)),
             ("targets", dict(loss="reverse_kl", labels=LABELS))]
    for split in SPLITS:
        for i, (form, kw) in enumerate(cases):
            targets = kdfast.compress_topk(t32, 6)
            full = {"hidden": dict(teacher_hidden=p["th"], teacher_weight=p["tw"], teacher_bias=p["tb"]),
                    "logits": dict(teacher_logits=p["tl"]), "targets": dict(targets=targets)}[form]
            local = {"hidden": dict(teacher_hidden=p["th"].float(), teacher_weight=_rows(p["tw"], rank, split).float(),
                                    teacher_bias=_rows(p["tb"], rank, split).float()),
                     "logits": dict(teacher_logits=_mine(p["tl"], rank, split).float()),
                     "targets": dict(targets=targets)}[form]
            h, w, b = (p[k].clone().requires_grad_(True) for k in ("h", "w", "b"))
            want = kdfast.fused_linear_distill_loss(h, w, student_bias=b, **full, **kw)
            want.backward()
            hl = p["h"].float().requires_grad_(True)
            wl = _rows(p["w"], rank, split).float().requires_grad_(True)
            bl = _rows(p["b"], rank, split).float().requires_grad_(True)
            got = kdfast.fused_linear_distill_loss(hl, wl, student_bias=bl, **local, process_group=group, **kw)
            what = f"{form} {kw['loss']} {split}"
            assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=2e-5, abs_tol=2e-5), what
            got.backward()
            assert wl.grad.shape == (split[rank], H) and bl.grad.shape == (split[rank],), what
            assert _same_everywhere(hl.grad, group), what
            for mine, full_grad in ((hl.grad, h.grad), (wl.grad, _rows(w.grad, rank, split)),
                                    (bl.grad, _rows(b.grad, rank, split))):
                torch.testing.assert_close(mine.double(), full_grad, rtol=1e-4, atol=1e-5, msg=what)
    # the default chunk follows the widest slice, so every rank runs the same chunks (with chunks
    # of 40 elements, 2 rows on a slice of 20 ids; from its own slice, the empty rank would run 1)
    fused = importlib.import_module("kdfast.fused_linear")
    saved, fused._CHUNK_ELEMS = fused._CHUNK_ELEMS, {"cpu": 40}
    try:
        split = SPLITS[0]
        got = kdfast.fused_linear_distill_loss(p["h"].float(), _rows(p["w"], rank, split).float(),
                                               teacher_logits=_mine(p["tl"], rank, split).float(), process_group=group)
    finally:
        fused._CHUNK_ELEMS = saved
    want = kdfast.fused_linear_distill_loss(p["h"], p["w"], teacher_logits=p["tl"])
    assert math.isclose(float(got), float(want), rel_tol=2e-5)


def _check_empty_vocabulary(rank, world, _split, group):
    """Every rank's slice empty: the same ValueError on every rank, and the group still in step."""
    s, z = torch.zeros(N, 0), torch.zeros(N, 0)
    targets = kdfast.compress_topk(torch.zeros(N, 3), 2)
    calls = [lambda: kdfast.forward_kl(s, z, process_group=group),
             lambda: kdfast.akl(s, z, process_group=group),
             lambda: kdfast.tvd(s[:0], z[:0], process_group=group),  # no rows either
             lambda: kdfast.reverse_kl(s, z, vocab_size=1, process_group=group),
             lambda: kdfast.sparse_kl(s, kdfast.compress_topk(torch.zeros(N, 3), 2), process_group=group),
             lambda: kdfast.compress_topk(z, 2, process_group=group),
             lambda: kdfast.compress_sample(z, 4, process_group=group),
             lambda: kdfast.fused_linear_distill_loss(torch.zeros(N, H), torch.zeros(0, H), teacher_logits=z,
                                                      process_group=group),
             lambda: kdfast.fused_linear_distill_loss(torch.zeros(N, H), torch.zeros(0, H), targets=targets,
                                                      process_group=group)]
    for i, call in enumerate(calls):
        with pytest.raises(ValueError, match="empty vocabulary"):
            call()
    # a teacher slice of another size on one rank only: every rank raises, naming it
    p = _problem(5)
    split = SPLITS[0]
    tl = _mine(p["tl"], rank, split).float()
    if rank == 1:
        tl = torch.zeros(N, 1)
    with pytest.raises(ValueError, match="rank 1 holds 0 student head rows and 1 of the teacher"):
        kdfast.fused_linear_distill_loss(p["h"].float(), _rows(p["w"], rank, split).float(), teacher_logits=tl,
                                         process_group=group)
    got = kdfast.forward_kl(_mine(p["tl"], rank, split).float(), _mine(p["tl"], rank, split).float(),
                            process_group=group)
    assert float(got) == 0.0  # the group is still in step


def test_empty_slices_give_the_whole_vocabulary_result(tmp_path):
    run_ranks(tmp_path, 3, [_check_dense, _check_dtensor, _check_sparse, _check_compress, _check_fused,
                            _check_empty_vocabulary], split=None, timeout=120)
