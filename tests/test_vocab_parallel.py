"""Vocabulary-parallel dense losses (api.md §6) in real gloo process groups on loopback.

Each launch forks 2 or 3 ranks that run every case and report failures; the logits of a case
are generated identically on every rank, which keeps its own (uneven) slice of the vocabulary.
Values and gradients are checked against the unsharded float64 reference."""

import math

import pytest
import torch

import kdfast
from kdfast import reference as ref

from _gloo import run_ranks

pytestmark = pytest.mark.distributed

LOSSES = [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.3), ("jsd", 0.0), ("skew_forward_kl", 0.1),
          ("skew_reverse_kl", 0.2), ("tvd", None), ("akl", 0.5), ("akl", 0.93), ("taid", 0.4), ("taid", 1.0),
          ("taid", 0.0)]
PARAM = {"jsd": "beta", "skew_forward_kl": "skew", "skew_reverse_kl": "skew", "akl": "head_mass", "taid": "t"}
SPLITS = {2: [9, 28], 3: [5, 20, 12]}  # uneven slices of V = 37


def _logits(seed, n=6, v=37, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    if ties:  # equal teacher logits across slices: AKL's ties ranked in id order
        t = torch.randint(0, 3, (n, v), generator=g).double()
    t[0, 3] = t[1, 30] = float("-inf")  # teacher masses of 0
    s[2, 10] = float("-inf")  # student 0 where the teacher has mass: +inf for forward KL
    return s, t


def _reference(name, param, s, t, temperature):
    fn = getattr(ref, name)
    return fn(s, t, temperature) if param is None else fn(s, t, temperature, param)


def _slice(x, rank, split):
    start = sum(split[:rank])
    return x[..., start:start + split[rank]]


def _check_losses(rank, world, split, group):
    for seed, (name, param) in enumerate(LOSSES):
        for temperature in (0.5, 2.0):
            s, t = _logits(seed, ties=name == "akl" and temperature == 2.0)
            s64 = s.clone().requires_grad_(True)
            want = _reference(name, param, s64, t, temperature)
            finite = torch.isfinite(want)
            torch.where(finite, want, 0.0).sum().backward()
            local = _slice(s, rank, split).float().contiguous().requires_grad_(True)
            kw = {} if param is None else {PARAM[name]: param}
            got = getattr(kdfast, name)(local, _slice(t, rank, split).float(), temperature=temperature,
                                        reduction="none", process_group=group, **kw)
            what = f"{name}({param}) T={temperature}"
            assert torch.equal(torch.isinf(got), ~finite), what
            torch.testing.assert_close(got[finite].double(), want[finite], rtol=2e-5, atol=2e-5, msg=what)
            torch.where(torch.isfinite(got), got, 0.0).sum().backward()
            torch.testing.assert_close(local.grad.double(), _slice(s64.grad, rank, split), rtol=1e-4, atol=2e-5,
                                       msg=what)


def _check_options(rank, world, split, group):
    s, t = _logits(99, n=8)
    s[2, 10] = 0.0
    labels = torch.tensor([1, -100, 4, 2, -100, 0, 3, 3])
    for name, param in (("forward_kl", None), ("jsd", 0.5), ("akl", 0.5)):
        kw = {} if param is None else {PARAM[name]: param}
        opts = dict(temperature=1.5, t2_scale=True, labels=labels, reduction="mean", num_items_in_batch=11)
        s64 = s.clone().requires_grad_(True)
        want = getattr(kdfast, name)(s64, t, backend="torch", **opts, **kw)
        want.backward()
        local = _slice(s, rank, split).float().contiguous().requires_grad_(True)
        got = getattr(kdfast, name)(local, _slice(t, rank, split).float(), process_group=group, **opts, **kw)
        got.backward()
        assert got.shape == () and math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-5), name
        torch.testing.assert_close(local.grad.double(), _slice(s64.grad, rank, split), rtol=1e-4, atol=1e-6)
    # bf16 slices: the reference of the rounded logits
    sb, tb = s.to(torch.bfloat16), t.to(torch.bfloat16)
    want = ref.forward_kl(sb.double(), tb.double(), 1.0)
    local = _slice(sb, rank, split).contiguous().requires_grad_(True)
    got = kdfast.forward_kl(local, _slice(tb, rank, split), reduction="none", process_group=group)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert local.grad.dtype == torch.bfloat16
    # a padded vocabulary: vocab_size is global, the last slice holds the padding
    pad = torch.cat([s, torch.full((8, 5), 7.0, dtype=s.dtype)], 1), torch.cat([t, torch.zeros(8, 5, dtype=t.dtype)], 1)
    psplit = split[:-1] + [split[-1] + 5]
    got = kdfast.reverse_kl(_slice(pad[0], rank, psplit).float(), _slice(pad[1], rank, psplit).float(),
                            vocab_size=37, reduction="none", process_group=group)
    torch.testing.assert_close(got.double(), ref.reverse_kl(s, t, 1.0), rtol=2e-5, atol=2e-5)


def _check_dtensor(rank, world, split, group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    s, t = _logits(7)
    s[2, 10] = 0.0
    ds = distribute_tensor(s.float(), mesh, [Shard(1)]).requires_grad_(True)
    dt = distribute_tensor(t.float(), mesh, [Shard(1)])
    got = kdfast.jsd(ds, dt, beta=0.4, reduction="sum")
    s64 = s.clone().requires_grad_(True)
    want = ref.jsd(s64, t, 1.0, 0.4).sum()
    want.backward()
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-5)
    got.backward()
    torch.testing.assert_close(ds.grad.full_tensor().double(), s64.grad, rtol=1e-4, atol=1e-6)


def _check_errors(rank, world, split, group):
    s, t = _logits(3)
    s[4] = float("-inf")  # a whole row, on every slice
    with pytest.raises(ValueError, match="student_logits: row 4"):
        kdfast.forward_kl(_slice(s, rank, split).float(), _slice(t, rank, split).float(), process_group=group)
    with pytest.raises(ValueError, match="backend"):
        kdfast.tvd(_slice(t, rank, split).float(), _slice(t, rank, split).float(), backend="rust",
                   process_group=group)
    with pytest.raises(ValueError, match="vocab_size"):
        kdfast.tvd(_slice(t, rank, split).float(), _slice(t, rank, split).float(), vocab_size=38,
                   process_group=group)


def _check_disagreement(rank, world, split, group):
    """A rank whose own arguments are wrong raises its error, and every other rank a ValueError
    naming it, instead of waiting for it in a collective; the group stays usable."""
    s, t = _logits(4)
    sl, tl = _slice(s, rank, split).float(), _slice(t, rank, split).float()
    odd = rank == world - 1
    others = f"process_group: rank {world - 1} of the process group rejected its arguments"
    labels = torch.zeros(5 if odd else 6, dtype=torch.long)  # 6 rows: the last rank's labels are wrong
    with pytest.raises(ValueError, match="labels" if odd else others):
        kdfast.jsd(sl, tl, labels=labels, process_group=group)
    targets = kdfast.compress_topk(t.float(), 4)
    bad = kdfast.compress_topk(t.float()[:5], 4) if odd else targets
    with pytest.raises(ValueError, match="targets" if odd else others):
        kdfast.sparse_kl(sl, bad, process_group=group)
    with pytest.raises(ValueError, match="backend" if odd else others):
        kdfast.compress_topk(tl, 4, backend="triton" if odd else "auto", process_group=group)
    with pytest.raises((ValueError, TypeError), match="teacher_logits" if odd else others):
        kdfast.compress_sample(tl[0, 0] if odd else tl, 4, process_group=group)
    got = kdfast.jsd(sl, tl, reduction="none", process_group=group)  # the group still works
    torch.testing.assert_close(got.double(), ref.jsd(s, t, 1.0, 0.5), rtol=2e-5, atol=2e-5)


BIG = {2: [1100, 1437], 3: [5, 2049, 483]}  # V = 2537: slices across the kernels' 1024-id blocks


def _check_hostile(rank, world, split, group):
    """The Rust slice kernels on wide rows: randn × 20, T = 0.05 and 10, half-precision slices,
    -inf runs across a slice boundary, and a TAID row whose mixture is -inf everywhere."""
    split = BIG[world]
    g = torch.Generator().manual_seed(5)
    s = torch.randn(5, 2537, generator=g, dtype=torch.float64) * 20
    t = torch.randn(5, 2537, generator=g, dtype=torch.float64) * 20
    t[0, 1000:1200] = float("-inf")
    s[1, 2000] = float("-inf")
    s[3, :1300], t[3, 1300:] = float("-inf"), float("-inf")  # no id finite in both
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sd, td = s.to(dtype), t.to(dtype)
        for name, param in LOSSES:
            for temperature in (0.05, 10.0):
                s64 = sd.double().requires_grad_(True)
                want = _reference(name, param, s64, td.double(), temperature)
                finite = torch.isfinite(want)
                torch.where(finite, want, 0.0).sum().backward()
                local = _slice(sd, rank, split).contiguous().requires_grad_(True)
                kw = {} if param is None else {PARAM[name]: param}
                got = getattr(kdfast, name)(local, _slice(td, rank, split), temperature=temperature,
                                            reduction="none", process_group=group, **kw)
                what = f"{name}({param}) T={temperature} {dtype}"
                assert torch.equal(torch.isinf(got), ~finite), (what, got, want)
                torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4, msg=what)
                torch.where(torch.isfinite(got), got, 0.0).sum().backward()
                tol = 1e-4 if dtype == torch.float32 else 1e-2  # half-precision gradients round to ~3 digits
                torch.testing.assert_close(local.grad.double(), _slice(s64.grad, rank, split),
                                           rtol=tol, atol=1e-4 / temperature, msg=what)


CHECKS = [_check_losses, _check_options, _check_dtensor, _check_errors, _check_disagreement, _check_hostile]


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_losses_equal_the_unsharded_reference(tmp_path, world):
    run_ranks(tmp_path, world, CHECKS, SPLITS[world])


def _sparse_options(loss, tail, beta, **kw):
    """``sparse_loss`` keywords of a case (``reduction="none"``)."""
    kw |= {"tail": tail} if tail is not None else {}
    return kw | ({"beta": beta} if beta is not None else {}) | {"loss": loss, "reduction": "none"}


def _check_sparse(rank, world, split, group):
    s, t = _logits(11, n=7)
    s[2, 10] = 0.0
    labels = torch.tensor([3, 1, -100, 0, 2, 2, 5])
    cases = [("topk", 8, "bucket", "forward_kl", None), ("topk", 8, "renorm", "forward_kl", None),
             ("topk", 37, "bucket", "jsd", 0.3), ("topk", 5, "bucket", "reverse_kl", None),
             ("topk", 5, "renorm", "tvd", None), ("topk", 6, "renorm", "jsd", 0.5), ("sample", 20, None, "forward_kl", None)]
    for method, k, tail, loss, beta in cases:
        targets = kdfast.compress_topk(t.float(), k, temperature=1.5) if method == "topk" else \
            kdfast.compress_sample(t.float(), k, temperature=1.5, seed=5)
        kw = _sparse_options(loss, tail, beta, labels=labels)
        s64 = s.clone().requires_grad_(True)
        want = kdfast.sparse_loss(s64, targets, backend="torch", **kw)
        want.sum().backward()
        local = _slice(s, rank, split).float().contiguous().requires_grad_(True)
        got = kdfast.sparse_loss(local, targets, process_group=group, **kw)
        what = f"{method} k={k} {tail} {loss}"
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=2e-5, msg=what)
        got.sum().backward()
        torch.testing.assert_close(local.grad.double(), _slice(s64.grad, rank, split), rtol=1e-4, atol=2e-6,
                                   msg=what)
    # sparse_kl is sparse_loss(loss="forward_kl"), with a mean over unmasked rows
    targets = kdfast.compress_topk(t.float(), 4)
    got = kdfast.sparse_kl(_slice(s, rank, split).float(), targets, labels=labels, process_group=group)
    want = kdfast.sparse_kl(s, targets, labels=labels, backend="torch")
    assert math.isclose(float(got), float(want), rel_tol=1e-5)
    with pytest.raises(ValueError, match="targets.indices"):
        bad = kdfast.SparseTargets(indices=torch.full((7, 1), 37), logprobs=torch.zeros(7, 1), tail_logprob=None)
        kdfast.sparse_kl(_slice(s, rank, split).float(), bad, process_group=group)


CHECKS.append(_check_sparse)


def _check_sparse_wide(rank, world, split, group):
    """The Rust sharded student on wide rows: listed ids in several of the kernels' blocks and on
    every rank, randn × 20, T = 0.05 and 10, half-precision slices, -inf runs, every id listed."""
    split = BIG[world]
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4, 2537, generator=g, dtype=torch.float64) * 20
    t = (torch.randn(4, 2537, generator=g) * 20).float()
    s[0, 1000:1200] = float("-inf")
    cases = [("topk", 64, "bucket", "forward_kl", None), ("topk", 64, "renorm", "jsd", 0.4),
             ("topk", 2537, "bucket", "reverse_kl", None), ("topk", 40, "bucket", "tvd", None),
             ("sample", 50, None, "forward_kl", None)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sd = s.to(dtype)
        for temperature in (0.05, 10.0):
            for method, k, tail, loss, beta in cases:
                targets = kdfast.compress_topk(t, k, temperature=temperature) if method == "topk" else \
                    kdfast.compress_sample(t, k, temperature=temperature, seed=5)
                kw = _sparse_options(loss, tail, beta, temperature=temperature)
                s64 = sd.double().requires_grad_(True)
                want = kdfast.sparse_loss(s64, targets, backend="torch", **kw)
                finite = torch.isfinite(want)
                torch.where(finite, want, 0.0).sum().backward()
                local = _slice(sd, rank, split).contiguous().requires_grad_(True)
                got = kdfast.sparse_loss(local, targets, process_group=group, **kw)
                what = f"{method} k={k} {tail} {loss} T={temperature} {dtype}"
                assert torch.equal(torch.isinf(got), ~finite), what
                torch.testing.assert_close(got[finite].double(), want[finite].detach(), rtol=1e-4, atol=1e-4, msg=what)
                torch.where(torch.isfinite(got), got, 0.0).sum().backward()
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(local.grad.double(), _slice(s64.grad, rank, split), rtol=tol,
                                           atol=1e-4 / temperature, msg=what)


CHECKS.append(_check_sparse_wide)


def _check_compress(rank, world, split, group):
    for seed, (k, ties, temperature) in enumerate([(4, False, 1.0), (8, True, 0.7), (30, False, 2.0),
                                                   (37, True, 1.0), (50, False, 1.0)]):
        # float32 and bf16: the Rust top-k of each slice; float64: PyTorch operations (as on CUDA)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            _, t = _logits(20 + seed, n=5, ties=ties)
            t = t.to(dtype)
            t[3, :] = float("-inf")
            t[3, 33] = 2.0  # one finite logit, on the last slice
            t[4, sum(split[:1]):] = float("-inf")  # every slice but the first is -inf
            want = kdfast.compress_topk(t, k, temperature=temperature)
            for backend in ("auto", "torch"):
                got = kdfast.compress_topk(_slice(t, rank, split).contiguous(), k, temperature=temperature,
                                           process_group=group, backend=backend)
                assert torch.equal(got.indices, want.indices), (k, ties, dtype, backend)
                torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-6)
                torch.testing.assert_close(got.tail_logprob, want.tail_logprob, rtol=1e-5, atol=2e-6)
    for dtype in (torch.float32, torch.float64):
        with pytest.raises(ValueError, match="teacher_logits: row 1 is entirely -inf"):
            bad = torch.zeros(2, 37, dtype=dtype)
            bad[1] = float("-inf")
            kdfast.compress_topk(_slice(bad, rank, split).contiguous(), 3, process_group=group)
        bad = torch.zeros(3, 37, dtype=dtype)
        bad[2, 36] = float("nan")  # on the last slice only: every rank raises
        bad[1, 0] = float("inf")
        with pytest.raises(ValueError, match="teacher_logits: row 1 contains \\+inf"):
            kdfast.compress_topk(_slice(bad, rank, split).contiguous(), 3, process_group=group)
        bad[1, 0] = 0.0
        with pytest.raises(ValueError, match="teacher_logits: row 2 contains NaN"):
            kdfast.compress_topk(_slice(bad, rank, split).contiguous(), 3, process_group=group)
    x = _slice(torch.zeros(2, 37, dtype=torch.float64), rank, split).contiguous()
    with pytest.raises(ValueError, match="backend: 'rust' reads CPU float32/bfloat16/float16 slices"):
        kdfast.compress_topk(x, 3, process_group=group, backend="rust")
    with pytest.raises(ValueError, match="backend: .*'auto' or 'rust' or 'torch', got 'triton'"):
        kdfast.compress_topk(x, 3, process_group=group, backend="triton")


CHECKS.append(_check_compress)


def test_benchmark_counts_the_collectives(capsys):
    from kdfast.benchmarks import parallel

    assert parallel.main(["--n", "16", "--v", "300", "--ranks", "2", "--dtypes", "fp32", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    # the dense losses on CPU slices (the Rust kernels): the ranks' agreement on their argument
    # checks (one int64 flag per rank), the slices' 4 softmax statistics in one all-gather (with
    # one extra row: the slice's width), the rows' 2 partial sums in one all-reduce, nothing in
    # backward: 48 bytes per row + 48 per call (51 at N = 16); TAID's mixture adds 2 statistics (68)
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if "| fp32 | 2 |" in line}
    for loss, sent in (("forward_kl", 51), ("reverse_kl", 51), ("jsd", 51), ("tvd", 51), ("taid", 68)):
        assert lines[loss].endswith(f"| 3 | {sent} | 1200 |"), lines[loss]
