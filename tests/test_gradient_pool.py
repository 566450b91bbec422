"""The CPU gradient pool: buffers are reused only once every tensor on them is gone."""

import gc
import threading

import pytest
import torch

import kdfast
from kdfast import _buffers

N, V = 64, 8192  # a 2 MiB float32 gradient: above the pool's 1 MiB threshold


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    return s, t


def _grad(loss="forward_kl", seed=0, dtype=torch.float32):
    s, t = _inputs(seed, dtype)
    return torch.autograd.grad(getattr(kdfast, loss)(s, t), s)[0]


@pytest.fixture(autouse=True)
def fresh_pool():
    saved = _buffers._POOL.max_bytes
    kdfast.set_gradient_pool(0)  # drop what earlier tests left
    kdfast.set_gradient_pool(saved)
    yield
    kdfast.set_gradient_pool(saved)


def test_a_freed_gradient_is_reused():
    g = _grad()
    ptr = g.data_ptr()
    del g
    gc.collect()
    assert kdfast.gradient_pool_bytes() >= N * V * 4
    assert _grad(seed=1).data_ptr() == ptr


def test_a_live_gradient_is_never_shared():
    g1 = _grad(seed=0)
    keep = g1.clone()
    g2 = _grad(seed=1)
    assert g1.data_ptr() != g2.data_ptr()
    assert torch.equal(g1, keep)


def test_a_view_keeps_the_buffer_owned():
    g = _grad(seed=0)
    row = g[3]
    keep = row.clone()
    ptr = g.data_ptr()
    del g
    gc.collect()
    g2 = _grad(seed=1)
    assert not (ptr <= g2.data_ptr() < ptr + N * V * 4)
    assert torch.equal(row, keep)


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_values_equal_unpooled(loss, dtype):
    pooled = [_grad(loss, seed, dtype) for seed in range(3)]
    kdfast.set_gradient_pool(0)
    fresh = [_grad(loss, seed, dtype) for seed in range(3)]
    for a, b in zip(pooled, fresh):
        assert torch.equal(a, b)


def test_accumulate_grad_adopts_and_accumulates():
    s, t = _inputs()
    kdfast.forward_kl(s, t).backward()
    first = s.grad.clone()
    kdfast.forward_kl(s, t).backward()  # accumulates into the adopted buffer
    torch.testing.assert_close(s.grad, 2 * first)
    s.grad = None
    gc.collect()
    assert kdfast.gradient_pool_bytes() >= N * V * 4


def test_cap_zero_turns_the_pool_off():
    kdfast.set_gradient_pool(0)
    g = _grad()
    del g
    gc.collect()
    assert kdfast.gradient_pool_bytes() == 0


def test_retention_is_capped():
    grads = [_grad(seed=i) for i in range(4)]  # four live buffers
    del grads
    gc.collect()
    assert kdfast.gradient_pool_bytes() <= _buffers.MAX_FREE * N * V * 4
    kdfast.set_gradient_pool(N * V * 4)
    assert kdfast.gradient_pool_bytes() <= N * V * 4


def test_small_gradients_are_not_pooled():
    s = torch.randn(4, 100, requires_grad=True)
    g = torch.autograd.grad(kdfast.forward_kl(s, torch.randn(4, 100)), s)[0]
    del g
    gc.collect()
    assert kdfast.gradient_pool_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, None])
def test_bad_cap_names_the_argument(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        kdfast.set_gradient_pool(bad)


@pytest.mark.parametrize("raw", ["lots", "-5"])
def test_bad_env_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("KDFAST_GRADIENT_POOL", raw)
    with pytest.raises(ValueError, match="KDFAST_GRADIENT_POOL"):
        _buffers._cap_from_env()


def test_env_sets_the_cap(monkeypatch):
    monkeypatch.setenv("KDFAST_GRADIENT_POOL", "0")
    assert _buffers._cap_from_env() == 0
    monkeypatch.delenv("KDFAST_GRADIENT_POOL")
    assert _buffers._cap_from_env() == _buffers.DEFAULT_MAX_BYTES


def test_threads_get_their_own_buffers():
    expected = {seed: _grad(seed=seed) for seed in range(4)}
    results, errors = {}, []

    def work(seed):
        try:
            for _ in range(5):
                g = _grad(seed=seed)
                if not torch.equal(g, expected[seed]):
                    errors.append(seed)
                del g
            results[seed] = True
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 4


def test_fused_linear_chunk_buffer_comes_back():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 32, generator=g, requires_grad=True)
    w = torch.randn(V, 32, generator=g, requires_grad=True)
    t = torch.randn(256, V, generator=g)
    for _ in range(2):
        kdfast.fused_linear_distill_loss(h, w, teacher_logits=t).backward()
    gc.collect()
    assert kdfast.gradient_pool_bytes() > 0
