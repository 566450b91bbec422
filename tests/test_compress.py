"""compress_topk / compress_sample / encode_targets: float64 references, Rust == torch backend,
determinism across threads, statistical unbiasedness of sampling, bad input."""

import math

import kdfast
import pytest
import torch
from conftest import NEG_INF

BACKENDS = ("rust", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")


def hostile_logits(n, v, *, seed=0, scale=20.0, neg_inf=0.3, dtype=torch.float32):
    """randn × scale with a fraction of -inf entries (every row keeps a finite logit)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if neg_inf and v > 1:
        mask = torch.rand(n, v, generator=g) < neg_inf
        mask[torch.arange(n), torch.randint(0, v, (n,), generator=g)] = False
        z = z.masked_fill(mask, NEG_INF)
    return z.to(dtype)


def topk_reference(z, k, temperature):
    """float64: (ids [N, k] with -1 padding, logprobs, tail) of softmax(z / T)."""
    x = z.double() / temperature
    lse = torch.logsumexp(x, -1)
    n = x.shape[0]
    ids = torch.full((n, k), -1, dtype=torch.int64)
    lp = torch.full((n, k), NEG_INF, dtype=torch.float64)
    tail = torch.full((n,), NEG_INF, dtype=torch.float64)
    # Larger first, lower id first among equal values; -inf entries are never listed.
    order_all = torch.sort(x, dim=-1, descending=True, stable=True).indices
    for r in range(n):
        o = order_all[r]
        order = o[x[r, o] > NEG_INF].tolist()
        kept, rest = order[:k], order[k:]
        ids[r, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
        lp[r, : len(kept)] = x[r, kept] - lse[r]
        if rest:
            tail[r] = torch.logsumexp(x[r, rest], 0) - lse[r]
    return ids, lp, tail


def assert_logprobs_close(got, want, scale, what):
    """Equal -inf pattern; finite values within float32 rounding of |z/T| (scale)."""
    got = got.double()
    assert torch.equal(got == NEG_INF, want == NEG_INF), what
    fin = want > NEG_INF
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=2e-6 * scale, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("v,k", [(1, 1), (1, 4), (2, 1), (2, 2), (127, 5), (127, 200), (32000, 16)])
def test_topk_matches_float64_reference(backend, dtype, temperature, v, k):
    n = 3 if v == 32000 else 5
    z = hostile_logits(n, v, seed=v + k, dtype=dtype)
    tg = kdfast.compress_topk(z, k, temperature=temperature, backend=backend)
    assert tg.method == "topk" and tg.temperature == temperature and tg.k == k
    assert tg.indices.dtype == torch.int64 and tg.logprobs.dtype == torch.float32
    assert tg.tail_logprob.dtype == torch.float32 and tg.tail_logprob.shape == (n,)
    ids, lp, tail = topk_reference(z, k, temperature)
    assert torch.equal(tg.indices, ids)
    scale = 1.0 + z[torch.isfinite(z)].abs().max().item() / temperature
    assert_logprobs_close(tg.logprobs, lp, scale, "logprobs")
    assert_logprobs_close(tg.tail_logprob, tail, scale, "tail_logprob")


def test_topk_tail_is_accurate_when_tiny():
    # p_top = 1 − 99·e^-40: the tail (≈ 4e-16·99) is far below float32's resolution of 1 − p.
    z = torch.zeros(1, 100)
    z[0, 7] = 40.0
    tg = kdfast.compress_topk(z, 1)
    want = math.log(99) - 40.0
    assert tg.indices.tolist() == [[7]]
    assert abs(tg.tail_logprob.item() - want) < 1e-5
    z = torch.zeros(1, 100)
    z[0, 3] = 1e4  # spread 1e4: tail log-mass ≈ −1e4, finite
    tg = kdfast.compress_topk(z, 1)
    assert math.isfinite(tg.tail_logprob.item()) and tg.tail_logprob.item() < -9990


def test_topk_ties_and_leading_shape_and_views():
    z = torch.zeros(2, 3, 50)
    z[..., 10] = 1.0
    tg = kdfast.compress_topk(z, 4)
    assert tg.indices.shape == (2, 3, 4) and tg.tail_logprob.shape == (2, 3)
    assert tg.indices[0, 0].tolist() == [10, 0, 1, 2]
    base = hostile_logits(40, 6, seed=3)
    view = base.t()  # [6, 40], non-contiguous
    a = kdfast.compress_topk(view, 5)
    b = kdfast.compress_topk(view.contiguous(), 5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logprobs, b.logprobs)
    empty = kdfast.compress_topk(torch.zeros(0, 9), 3)
    assert empty.indices.shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_topk_rust_equals_torch(dtype):
    z = hostile_logits(7, 5003, seed=11, scale=8.0, dtype=dtype)
    a = kdfast.compress_topk(z, 33, temperature=0.7, backend="rust")
    b = kdfast.compress_topk(z, 33, temperature=0.7, backend="torch")
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.tail_logprob, b.tail_logprob, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("v", [1, 2, 127, 4097, 32000])
def test_sample_identical_on_both_backends(dtype, temperature, v):
    n = 4 if v == 32000 else 6
    z = hostile_logits(n, v, seed=v, scale=6.0, dtype=dtype)
    for seed in (0, 1, 2**63 + 5):
        a = kdfast.compress_sample(z, 24, temperature=temperature, seed=seed, backend="rust")
        b = kdfast.compress_sample(z, 24, temperature=temperature, seed=seed, backend="torch")
        assert torch.equal(a.indices, b.indices), (seed, a.indices, b.indices)
        assert torch.equal(a.weights, b.weights)
        used = a.indices >= 0
        torch.testing.assert_close(a.logprobs[used], b.logprobs[used], rtol=0, atol=1e-5)
        assert (a.logprobs[~used] == NEG_INF).all() and (b.logprobs[~used] == NEG_INF).all()


def test_sample_outputs_are_well_formed():
    n, v, n_s = 50, 300, 40
    z = hostile_logits(n, v, seed=5, scale=3.0, neg_inf=0.5)
    tg = kdfast.compress_sample(z.reshape(5, 10, v), n_s, temperature=1.5, seed=9)
    assert tg.method == "sample" and tg.tail_logprob is None
    assert tg.indices.shape == (5, 10, n_s) and tg.weights.dtype == torch.float32
    ids, w, lp = tg.indices.reshape(n, n_s), tg.weights.reshape(n, n_s), tg.logprobs.reshape(n, n_s)
    ref = torch.log_softmax(z.double() / 1.5, -1)
    for r in range(n):
        used = ids[r] >= 0
        m = int(used.sum())
        assert used[:m].all() and not used[m:].any(), "used slots first"
        assert (w[r, m:] == 0).all() and (lp[r, m:] == NEG_INF).all()
        assert len(set(ids[r, :m].tolist())) == m, "distinct ids"
        assert torch.isfinite(z[r, ids[r, :m]]).all(), "never a zero-probability id"
        counts = w[r, :m] * n_s
        assert torch.equal(counts, counts.round()) and counts.sum().item() == n_s
        torch.testing.assert_close(lp[r, :m].double(), ref[r, ids[r, :m]], rtol=1e-6, atol=1e-5)
        assert (lp[r, :m].diff() <= 0).all(), "most probable first"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_unbiased(backend):
    # Rows with the same logits are independent draws of N = 8 (each row has its own
    # random stream); the mean weight of each id estimates p within a few standard errors.
    v, n_s, rows = 5000, 8, 3000 if backend == "rust" else 1500
    g = torch.Generator().manual_seed(0)
    logits = torch.full((v,), NEG_INF)
    hot = torch.randperm(v, generator=g)[:40]
    logits[hot] = torch.randn(40, generator=g) * 1.5
    p = torch.softmax(logits.double(), -1)
    tg = kdfast.compress_sample(logits.expand(rows, v), n_s, seed=123, backend=backend)
    mean = torch.zeros(v, dtype=torch.float64)
    used = tg.indices >= 0
    mean.index_add_(0, tg.indices[used], tg.weights[used].double() / rows)
    sd = (p * (1 - p) / (n_s * rows)).sqrt()
    z = ((mean - p) / sd.clamp(min=1e-12))[p > 0]
    assert z.abs().max() < 5.0, f"max |z| {z.abs().max()}"
    assert mean[p == 0].sum() == 0
    # The z-scores look standard normal overall.
    assert abs(z.mean().item()) < 0.5 and 0.6 < z.std().item() < 1.4


def test_sampling_seed_determinism_and_thread_independence(monkeypatch):
    z = hostile_logits(33, 5000, seed=2, scale=4.0)
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("KDFAST_NUM_THREADS", threads)
        outs.append(kdfast.compress_sample(z, 16, seed=77))
        outs.append(kdfast.compress_sample(z, 16, seed=77))
    for o in outs[1:]:
        assert torch.equal(o.indices, outs[0].indices) and torch.equal(o.weights, outs[0].weights)
        assert torch.equal(o.logprobs, outs[0].logprobs)
    other = kdfast.compress_sample(z, 16, seed=78)
    assert not torch.equal(other.indices, outs[0].indices)
    # Splitting a batch with row_offset reproduces the whole batch.
    a = kdfast.compress_sample(z[:20], 16, seed=77)
    b = kdfast.compress_sample(z[20:], 16, seed=77, row_offset=20)
    assert torch.equal(torch.cat([a.indices, b.indices]), outs[0].indices)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn,kwargs,exc,words", [
    (kdfast.compress_topk, {"k": 0}, ValueError, "k"),
    (kdfast.compress_topk, {"k": 2.5}, TypeError, "k"),
    (kdfast.compress_topk, {"k": True}, TypeError, "k"),
    (kdfast.compress_topk, {"k": 3, "temperature": 0.0}, ValueError, "temperature"),
    (kdfast.compress_topk, {"k": 3, "temperature": float("nan")}, ValueError, "temperature"),
    (kdfast.compress_topk, {"k": 3, "backend": "cuda"}, ValueError, "backend"),
    (kdfast.compress_sample, {"num_samples": 0}, ValueError, "num_samples"),
    (kdfast.compress_sample, {"num_samples": 4, "seed": -1}, ValueError, "seed"),
    (kdfast.compress_sample, {"num_samples": 4, "seed": 2**64}, ValueError, "seed"),
    (kdfast.compress_sample, {"num_samples": 4, "seed": 1.5}, TypeError, "seed"),
    (kdfast.compress_sample, {"num_samples": 4, "row_offset": -3}, ValueError, "row_offset"),
    (kdfast.compress_sample, {"num_samples": 4, "temperature": -1}, ValueError, "temperature"),
])
def test_bad_arguments(fn, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        fn(torch.randn(2, 10), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,arg", [(kdfast.compress_topk, 3), (kdfast.compress_sample, 3)])
def test_bad_logits(fn, arg, backend):
    with pytest.raises(TypeError, match="teacher_logits"):
        fn(torch.randint(0, 5, (2, 10)), arg, backend=backend)
    with pytest.raises(TypeError, match="teacher_logits"):
        fn([[1.0, 2.0]], arg, backend=backend)
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(torch.zeros(2, 0), arg, backend=backend)
    for bad, words in ((NEG_INF, "is entirely -inf"), (float("nan"), "contains NaN"), (float("inf"), r"contains \+inf")):
        z = torch.randn(3, 5000)
        if bad == NEG_INF:
            z[1] = bad
        else:
            z[1, 4321] = bad
        with pytest.raises(ValueError, match=f"teacher_logits: row 1 {words}"):
            fn(z, arg, backend=backend)


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("v", [1, 2, 127, 32000, 151936])
def test_encode_round_trip_topk(v):
    z = hostile_logits(12, v, seed=v, scale=20.0, neg_inf=0.2)
    tg = kdfast.compress_topk(z.reshape(3, 4, v), 9, temperature=2.0)
    enc = kdfast.encode_targets(tg, v)
    bits = max(1, math.ceil(math.log2(v)))
    assert enc.data.dtype == torch.uint8 and enc.data.shape == (3, 4, math.ceil(9 * bits / 8) + 18 + 4)
    dec = kdfast.decode_targets(enc)
    assert dec.method == "topk" and dec.temperature == 2.0
    assert torch.equal(dec.indices, tg.indices)
    assert torch.equal(dec.tail_logprob, tg.tail_logprob)
    fin = tg.logprobs > -31.99
    err = (dec.logprobs - tg.logprobs)[fin].abs()
    assert err.numel() == 0 or err.max() <= 2.0**-12
    assert (dec.logprobs[tg.logprobs == NEG_INF] == NEG_INF).all()
    assert (dec.logprobs[(tg.logprobs < -32) & (tg.logprobs > NEG_INF)] == -65534 / 2048).all()


def test_encode_round_trip_sample():
    z = hostile_logits(20, 700, seed=1, scale=3.0)
    tg = kdfast.compress_sample(z, 30, seed=4)
    enc = kdfast.encode_targets(tg, 700)
    dec = kdfast.decode_targets(enc)
    assert torch.equal(dec.indices, tg.indices) and torch.equal(dec.weights, tg.weights)
    assert dec.tail_logprob is None and dec.method == "sample"
    used = tg.indices >= 0
    assert (dec.logprobs[used] - tg.logprobs[used]).abs().max() <= 2.0**-12
    # Records are independent: decoding a slice of rows gives those rows.
    part = kdfast.decode_targets(kdfast.EncodedTargets(
        data=enc.data[5:9], vocab_size=700, k=30, method="sample", temperature=1.0, has_tail=False,
        num_samples=30))
    assert torch.equal(part.indices, tg.indices[5:9])


def test_encode_errors():
    tg = kdfast.compress_topk(torch.randn(2, 50), 3)
    with pytest.raises(ValueError, match="targets.indices"):
        kdfast.encode_targets(tg, 10)  # ids up to 49 do not fit a vocabulary of 10
    with pytest.raises(ValueError, match="vocab_size"):
        kdfast.encode_targets(tg, 0)
    with pytest.raises(TypeError, match="targets"):
        kdfast.encode_targets(tg.indices, 50)
    with pytest.raises(ValueError, match="num_samples"):
        kdfast.encode_targets(tg, 50, num_samples=4)
    sm = kdfast.compress_sample(torch.randn(2, 50), 4)
    with pytest.raises(ValueError, match="targets.weights"):
        kdfast.encode_targets(sm, 50, num_samples=3)
    enc = kdfast.encode_targets(tg, 50)
    with pytest.raises(ValueError, match="encoded.data"):
        kdfast.decode_targets(kdfast.EncodedTargets(
            data=enc.data[:, :-1], vocab_size=50, k=3, method="topk", temperature=1.0, has_tail=True))
