"""Vocabulary-parallel ``compress_sample`` (api.md §6) in real gloo process groups on loopback:
the targets of every rank must be bit for bit those of one pass of the Rust sampler over the
whole row, for slices that cut the sampler's 4096-id blocks anywhere."""

import random

import pytest
import torch

import kdfast

from _gloo import run_ranks

pytestmark = pytest.mark.distributed

# (V, split) per world size: boundaries inside blocks, on block edges, a block over 3 ranks.
CASES = {
    2: [(37, [9, 28]), (10000, [4096, 5904]), (10000, [4100, 5900]), (9000, [3, 8997])],
    3: [(37, [5, 20, 12]), (10000, [1000, 4000, 5000]), (13000, [4095, 2, 8903]), (9000, [4500, 4500 - 7, 7])],
}


def _logits(seed, n, v, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 5
    x[0, :: 3] = float("-inf")
    x[1, :] = float("-inf")
    x[1, -1] = 2.0  # one finite logit, on the last rank
    x[2, : min(v - 1, 4096)] = float("-inf")  # an empty first block
    x[3, 5] = 40.0  # one dominant id
    return x.to(dtype)


def _mine(x, rank, split):
    start = sum(split[:rank])
    return x[..., start:start + split[rank]]


def _same(a, b, what):
    for name in ("indices", "logprobs", "weights"):
        u, w = getattr(a, name), getattr(b, name)
        assert u.dtype == w.dtype and u.shape == w.shape, (what, name)
        assert torch.equal(u, w), (what, name, (u != w).nonzero()[:4])
    assert a.temperature == b.temperature and a.method == b.method == "sample"


def _check_draws(rank, world, _split, group):
    for case, (v, split) in enumerate(CASES[world]):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for n, t, seed, offset in ((1, 1.0, 0, 0), (50, 0.5, 3, 12345), (300, 2.0, 2**64 - 1, 7)):
                x = _logits(case, 7, v, dtype)
                want = kdfast.compress_sample(x, n, temperature=t, seed=seed, row_offset=offset)
                got = kdfast.compress_sample(_mine(x, rank, split), n, temperature=t, seed=seed, row_offset=offset,
                                             process_group=group)
                _same(got, want, (v, split, dtype, n, t))


def _check_random_splits(rank, world, _split, group):
    rng = random.Random(world)  # the same splits on every rank
    for trial in range(12):
        v = rng.choice([5, 4096, 4097, 8192 + 13, 20000])
        cuts = sorted(rng.randint(1, v - 1) if v > world else 1 for _ in range(world - 1))
        if v <= world or len(set(cuts)) < world - 1:
            continue
        split = [b - a for a, b in zip([0] + cuts, cuts + [v])]
        x = torch.randn(4, v, generator=torch.Generator().manual_seed(trial)) * rng.choice([1.0, 20.0])
        want = kdfast.compress_sample(x, 64, seed=trial)
        got = kdfast.compress_sample(_mine(x, rank, split), 64, seed=trial, process_group=group)
        _same(got, want, (v, split))


def _check_shapes_and_dtensor(rank, world, _split, group):
    v, split = CASES[world][1]
    x = _logits(5, 6, v).reshape(2, 3, v)
    want = kdfast.compress_sample(x, 20, seed=9)
    got = kdfast.compress_sample(_mine(x, rank, split), 20, seed=9, process_group=group)
    assert got.indices.shape == (2, 3, 20)
    _same(got, want, "3-D")
    empty = kdfast.compress_sample(_mine(x[:0], rank, split), 20, process_group=group)
    assert empty.indices.shape == (0, 3, 20)
    # A DTensor sharded on the vocabulary (even slices) needs no process_group.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    even = _logits(6, 5, 12 * world)
    dt = distribute_tensor(even, mesh, [Shard(-1)])
    _same(kdfast.compress_sample(dt, 30, seed=4), kdfast.compress_sample(even, 30, seed=4), "DTensor")


def _check_errors(rank, world, _split, group):
    v, split = CASES[world][1]
    x = _logits(1, 5, v)
    bad = x.clone()
    bad[3, v - 1] = float("nan")  # only the last rank holds it: every rank must raise
    with pytest.raises(ValueError, match="teacher_logits: row 3 contains NaN"):
        kdfast.compress_sample(_mine(bad, rank, split), 8, process_group=group)
    bad = x.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="teacher_logits: row 2 contains \\+inf"):
        kdfast.compress_sample(_mine(bad, rank, split), 8, process_group=group)
    bad = x.clone()
    bad[4] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits: row 4 is entirely -inf"):
        kdfast.compress_sample(_mine(bad, rank, split), 8, process_group=group)
    with pytest.raises(ValueError, match="backend: .*'auto' or 'rust', got 'torch'"):
        kdfast.compress_sample(_mine(x, rank, split), 8, backend="torch", process_group=group)
    with pytest.raises(kdfast.DtypeError, match="teacher_logits: .*got torch.float64"):
        kdfast.compress_sample(_mine(x, rank, split).double(), 8, process_group=group)
    with pytest.raises(ValueError, match="num_samples"):
        kdfast.compress_sample(_mine(x, rank, split), 0, process_group=group)
    # The group still works after the errors: every rank raised at the same point.
    _same(kdfast.compress_sample(_mine(x, rank, split), 8, process_group=group), kdfast.compress_sample(x, 8), "after")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sampling_is_the_one_pass_sampling(tmp_path, world):
    run_ranks(tmp_path, world, [_check_draws, _check_random_splits, _check_shapes_and_dtensor, _check_errors],
              split=None)
