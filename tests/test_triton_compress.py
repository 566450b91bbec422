"""The Triton compress_topk / compress_sample kernels (kdfast._triton.compress) against the Rust
backend: the same ids (exactly, ties and -inf entries included), the same sampled ids and
weights for every seed and row offset, log-probs within float32 rounding, the same errors.

Device-generic: without CUDA the kernels run on CPU tensors under the Triton interpreter, which
is slow for the top-k sorts, so the rows are few.
"""

import math

import kdfast
import pytest
import torch
from conftest import NEG_INF
from test_compress import assert_logprobs_close, hostile_logits, topk_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("f32", "bf16", "f16")


def topk_both(z, k, temperature):
    got = kdfast.compress_topk(z.to(DEVICE), k, temperature=temperature, backend="triton").to("cpu")
    want = kdfast.compress_topk(z, k, temperature=temperature, backend="rust")
    return got, want


def assert_topk_equal(got, want, scale):
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    assert_logprobs_close(got.logprobs, want.logprobs.double(), scale, "logprobs")
    assert_logprobs_close(got.tail_logprob, want.tail_logprob.double(), scale, "tail_logprob")


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("v,k", [(1, 1), (1, 4), (2, 2), (127, 5), (127, 200)])
def test_topk_matches_rust_and_float64(dtype, temperature, v, k):
    z = hostile_logits(4, v, seed=v + k, dtype=dtype)
    got, want = topk_both(z, k, temperature)
    assert got.indices.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert got.tail_logprob.shape == (4,) and got.temperature == temperature
    scale = 1.0 + z[torch.isfinite(z)].abs().max().item() / temperature
    assert_topk_equal(got, want, scale)
    ids, lp, tail = topk_reference(z, k, temperature)
    assert torch.equal(got.indices, ids)
    assert_logprobs_close(got.logprobs, lp, scale, "logprobs vs float64")
    assert_logprobs_close(got.tail_logprob, tail, scale, "tail vs float64")


@pytest.mark.parametrize("v,k", [(4099, 16), (9000, 37)])
def test_topk_across_blocks_with_bf16_ties(v, k):
    # Small integers in bf16: many exact ties, ordered by id; -inf entries never listed.
    g = torch.Generator().manual_seed(v)
    z = torch.randint(-6, 7, (2, v), generator=g).to(torch.bfloat16)
    z[0, ::7] = NEG_INF
    z[1, v - 3:] = 9.0  # the best entries in the last, partial block
    got, want = topk_both(z, k, 0.7)
    assert_topk_equal(got, want, 1.0 + 9.0 / 0.7)
    assert got.indices[1, :3].tolist() == [v - 3, v - 2, v - 1]


def test_wide_spread_at_low_temperature():
    # |z/T| up to 2e5: the tail log-mass is about −1e5, finite, with no overflow anywhere.
    z = hostile_logits(2, 3000, seed=6, scale=1e4, neg_inf=0.5)
    got, want = topk_both(z, 8, 0.05)
    assert_topk_equal(got, want, 1.0 + z[torch.isfinite(z)].abs().max().item() / 0.05)
    got, want = sample_both(z, 16, temperature=0.05, seed=11)
    assert_sample_equal(got, want)


def test_topk_fewer_finite_than_k_and_tiny_tail():
    z = torch.full((3, 300), NEG_INF)
    z[0, [5, 17, 250]] = torch.tensor([1.0, 3.0, 2.0])
    z[1, 7] = 40.0
    z[1, 100:199] = 0.0  # 3 listed, tail mass 96·e^-40: far below float32 resolution of 1 − p
    z[2] = torch.linspace(-5, 5, 300)
    got, want = topk_both(z, 4, 1.0)
    assert_topk_equal(got, want, 41.0)
    assert got.indices[0].tolist() == [17, 250, 5, -1] and got.logprobs[0, 3] == NEG_INF
    assert got.tail_logprob[0] == NEG_INF
    assert abs(got.tail_logprob[1].item() - (math.log(96) - 40.0)) < 1e-5


def test_topk_large_k_falls_back_to_the_same_ids():
    z = hostile_logits(2, 1500, seed=9, scale=5.0)
    got, want = topk_both(z, 1200, 1.0)
    assert_topk_equal(got, want, 1.0 + z[torch.isfinite(z)].abs().max().item())


def test_topk_views_and_leading_shape():
    base = hostile_logits(40, 6, seed=3)
    view = base.to(DEVICE).t()  # [6, 40], non-contiguous
    a = kdfast.compress_topk(view, 5, backend="triton")
    b = kdfast.compress_topk(base.t().contiguous(), 5, backend="rust")
    assert torch.equal(a.indices.cpu(), b.indices)
    c = kdfast.compress_topk(view.reshape(2, 3, 40), 5, backend="triton")
    assert c.indices.shape == (2, 3, 5) and torch.equal(c.indices.reshape(6, 5), a.indices)


@pytest.mark.parametrize("fn,arg", [(kdfast.compress_topk, 3), (kdfast.compress_sample, 3)])
def test_bad_logits_raise_like_rust(fn, arg):
    for bad, words in ((NEG_INF, "is entirely -inf"), (float("nan"), "contains NaN"),
                       (float("inf"), r"contains \+inf")):
        z = torch.randn(3, 2100)
        if bad == NEG_INF:
            z[1] = bad
        else:
            z[1, 2050] = bad  # in a later block
        with pytest.raises(ValueError, match=f"teacher_logits: row 1 {words}"):
            fn(z.to(DEVICE), arg, backend="triton")
    with pytest.raises(TypeError, match="backend"):
        fn(torch.randn(2, 10, dtype=torch.float64, device=DEVICE), arg, backend="triton")


# ----------------------------------------------------------------------------- sampling


def sample_both(z, n, **kw):
    got = kdfast.compress_sample(z.to(DEVICE), n, backend="triton", **kw).to("cpu")
    want = kdfast.compress_sample(z, n, backend="rust", **kw)
    return got, want


def assert_sample_equal(got, want):
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    assert torch.equal(got.weights, want.weights)
    used = want.indices >= 0
    torch.testing.assert_close(got.logprobs[used], want.logprobs[used], rtol=0, atol=1e-5)
    assert (got.logprobs[~used] == NEG_INF).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("v", [1, 2, 127, 4097])
def test_sample_identical_to_rust(dtype, temperature, v):
    z = hostile_logits(3, v, seed=v, scale=6.0, dtype=dtype)
    for seed, row_offset in ((0, 0), (1, 5), (2**63 + 5, 2**64 - 2)):
        got, want = sample_both(z, 24, temperature=temperature, seed=seed, row_offset=row_offset)
        assert got.method == "sample" and got.weights.dtype == torch.float32
        assert_sample_equal(got, want)


def test_sample_many_blocks_and_concentrated_mass():
    # 9000 ids (3 blocks, the last partial); one row with its mass in a single far block.
    z = hostile_logits(3, 9000, seed=4, scale=3.0)
    z[2] = NEG_INF
    z[2, 8990:] = torch.arange(10.0)
    for seed in (3, 77):
        got, want = sample_both(z, 40, temperature=1.3, seed=seed)
        assert_sample_equal(got, want)
    assert (got.indices[2][got.indices[2] >= 0] >= 8990).all()


def test_sample_batches_split_by_row_offset():
    z = hostile_logits(6, 300, seed=2, scale=4.0)
    whole = kdfast.compress_sample(z.to(DEVICE), 16, seed=77, backend="triton")
    a = kdfast.compress_sample(z[:4].to(DEVICE), 16, seed=77, backend="triton")
    b = kdfast.compress_sample(z[4:].to(DEVICE), 16, seed=77, row_offset=4, backend="triton")
    assert torch.equal(torch.cat([a.indices, b.indices]), whole.indices)
    assert torch.equal(torch.cat([a.weights, b.weights]), whole.weights)
    other = kdfast.compress_sample(z.to(DEVICE), 16, seed=78, backend="triton")
    assert not torch.equal(other.indices, whole.indices)
