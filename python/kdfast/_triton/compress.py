"""Triton kernels for :func:`kdfast.compress_topk` and :func:`kdfast.compress_sample` (api.md §2).

Both follow kdfast-core ``compress.rs`` (the Rust backend), so that every backend lists the
same ids. One program per row (int64 row offsets); ``x = z · (1/T)`` in float32 (the float32
reciprocal of the float32 T, as Rust computes it).

**Top-k.** Each element becomes a packed, sortable uint64 key: the high 32 bits are the
order-preserving bits of ``x`` (sign bit set → all bits flipped, else the sign bit set; so
``-0.0 < +0.0`` like Rust's ``total_cmp``), the low 32 bits the bitwise-not of the id, so the
larger key is "larger x, then lower id" — exactly Rust's order, ties in bf16 input included.
A buffer of the best ``K ≥ k`` keys (``K`` a power of 2) is kept sorted descending. Per block
of ``BLOCK ≥ K`` columns, if the block's best key beats the buffer's worst, the block is sorted
(a bitonic network, as ``tl.sort``), its best K (row 0 of the sorted block reshaped ``[BLOCK/K, K]``) sorted
ascending, and ``max(buffer_i, block_i)`` — the K best of both (bitonic merge) — sorted again.
Everything not kept (the keys below the new buffer's minimum, from the block and from the old
buffer) goes into an online log-sum-exp of the tail; at the end buffer slots ``k..K`` join it
too, and in float64

    lse = logaddexp(lse_topk, lse_tail),  logprob_i = x_i − lse,  tail_logprob = lse_tail − lse

(never ``log(1 − Σp)``). ``-inf`` logits are never listed (id −1, log-prob −inf instead).

**Sampling.** The draws replay the Rust sampler (see ``compress.rs``): SplitMix64 uniforms
keyed by ``(seed, row, stream)`` in uint64 (wrapping multiplies), absolute 4096-id blocks,
float64 weights ``w_i = exp(x_i − m_b)`` by Rust's own ``exp`` polynomial (Cody–Waite + degree
13 Taylor, so the interpreter reproduces it bit for bit; on the GPU the kernels are compiled
without FMA contraction) and float64 running sums (``tl.cumsum``).

1. ``_block_counts_kernel`` (per row): block log-masses ``L_b = m_b + ln S_b``, then the N
   over-the-blocks draws (stream ``u64::MAX``: uniform ``u_j``, block = the number of running
   sums of ``exp(L_b − max L)`` that are ``≤ u_j · total``) give ``n_b``, the number of draws
   block b contributes (its first ``n_b``), and ``lse_all = ln Σ_b e^{L_b}``;
2. ``_block_draws_kernel`` (per row and block with ``n_b > 0``): the block's running sums
   ``c_i`` again and its first ``n_b`` uniforms of stream ``b``: id = the number of ``c_i ≤
   u_j S_b`` (the last positive-weight id if rounding leaves none), written as its top-k key;
3. torch ops (fixed shapes, on the device): the N keys sorted descending, equal keys (the same
   id) merged with ``weight = count / N``, ``logprob = x − lse_all``, padded to N slots.

Without a host sync a kernel cannot raise, so each row reports a status (NaN, +inf, entirely
-inf) and the launcher raises the Rust backend's ``ValueError`` after one sync (compression is
not in a training step's hot path). Bad values are replaced by -inf inside the kernels, which so
stay warning-free under the Triton interpreter.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import reference_sparse as _ref

__all__ = ["compress_topk", "compress_sample", "MAX_K"]

MAX_K = 1024  # larger k: the PyTorch sort (same ids), not a K-wide sort per block in registers
VOCAB_BLOCK = _ref.VOCAB_BLOCK
_NEG_INF = tl.constexpr(float("-inf"))
_SIGN64 = tl.constexpr(1 << 63)
_LOW32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _status_and_clean(x, status):
    """Row status (1 NaN, 2 +inf, kept if already set) and ``x`` with both made -inf."""
    nan = tl.sum((x != x).to(tl.int32), 0) > 0
    pinf = tl.sum((x == float("inf")).to(tl.int32), 0) > 0
    status = tl.where(status != 0, status, tl.where(nan, 1, tl.where(pinf, 2, 0)))
    return tl.where((x == x) & (x < float("inf")), x, _NEG_INF), status


@triton.jit
def _sort_key(x, ids):
    """Packed uint64 key ordering by (x, then lower id): order-preserving f32 bits above,
    ``~id`` below."""
    bits = x.to(tl.uint32, bitcast=True)
    hi = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    return (hi.to(tl.uint64) << 32) | (~ids.to(tl.uint32)).to(tl.uint64)


@triton.jit
def _key_x(key):
    """The ``x`` of a key (-inf for the empty key 0)."""
    hi = (key >> 32).to(tl.uint32)
    bits = tl.where((hi >> 31) != 0, hi & 0x7FFFFFFF, ~hi)
    return tl.where(key == 0, _NEG_INF, bits.to(tl.float32, bitcast=True))


@triton.jit
def _key_id(key):
    return (~(key & 0xFFFFFFFF).to(tl.uint32)).to(tl.int64)


@triton.jit
def _lse_merge(m, s, x, use):
    """Fold the float32 values ``x[use]`` into the float64 log-sum-exp ``(m, s)``."""
    xe = tl.where(use, x, _NEG_INF)
    cm = tl.max(xe, 0)
    csh = tl.where(cm == _NEG_INF, 0.0, cm)
    cs = tl.sum(tl.exp(xe - csh), 0).to(tl.float64)
    nm = tl.maximum(m, cm.to(tl.float64))
    nsh = tl.where(nm == _NEG_INF, 0.0, nm)
    return nm, s * tl.exp(m - nsh) + cs * tl.exp(csh.to(tl.float64) - nsh)


@triton.jit
def _ln(m, s):
    """``m + ln s`` (−inf for the empty sum)."""
    return tl.where(s > 0.0, m + tl.log(tl.where(s > 0.0, s, 1.0)), _NEG_INF)


# ----------------------------------------------------------------------------- top-k


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    """One bitonic compare-and-swap along the i-th innermost axis of the ``[2, 2, ...]`` cube;
    the partner of each element is ``(a + b) − x`` (exact for integers)."""
    y = tl.sum(h, axis=n_dims - 1 - i, keep_dims=True) - h
    return tl.where((h > y) != (flip ^ _indicator(n_dims, i)).to(tl.int1), y, h)


@triton.jit
def _sort(x, LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """Bitonic sort of the integer keys ``x`` (``2^LOG`` of them). The network of ``tl.sort``,
    with the partner found by a sum instead of an xor-reduction: the same work on the GPU,
    and ~20× faster under the Triton interpreter, whose generic reductions are slow."""
    h = tl.reshape(x, [2] * LOG)
    for stage in tl.static_range(1, LOG + 1):
        if stage < LOG:
            flip = _indicator(LOG, stage)
        else:
            flip = DESCENDING
        for i in tl.static_range(stage):
            h = _compare_swap(h, flip, stage - 1 - i, LOG)
    return tl.reshape(h, [2**LOG])


@triton.jit
def _topk_kernel(x_ptr, ids_ptr, lp_ptr, tail_ptr, status_ptr, x_stride, V, k, inv_t,
                 K: tl.constexpr, BLOCK: tl.constexpr, LOG_K: tl.constexpr, LOG_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    offs = tl.arange(0, BLOCK)
    buf = tl.zeros([K], dtype=tl.uint64)  # sorted descending; key 0 = empty
    t_m = tl.full([], float("-inf"), tl.float64)
    t_s = tl.zeros([], tl.float64)
    status = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inb = cols < V
        x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        x, status = _status_and_clean(x, status)
        key = tl.where(inb, _sort_key(x, cols), 0)
        old = buf
        if tl.max(key, 0) > tl.min(buf, 0):
            srt = _sort(key, LOG_B, 1)
            best = _sort(tl.max(tl.reshape(srt, (BLOCK // K, K)), 0), LOG_K, 0)  # the block's K best, ascending
            buf = _sort(tl.maximum(buf, best), LOG_K, 1)
        floor = tl.min(buf, 0)
        t_m, t_s = _lse_merge(t_m, t_s, x, inb & (key < floor))
        t_m, t_s = _lse_merge(t_m, t_s, _key_x(old), (old < floor) & (old != 0))
    pos = tl.arange(0, K)
    xb = _key_x(buf)
    listed = (pos < k) & (xb > float("-inf"))
    t_m, t_s = _lse_merge(t_m, t_s, xb, pos >= k)
    x64 = tl.where(listed, xb, float("-inf")).to(tl.float64)
    top = tl.max(x64, 0)
    status = tl.where((status == 0) & (top == float("-inf")), 3, status)
    top_sh = tl.where(top == float("-inf"), 0.0, top)
    # lse = logaddexp(lse_topk, lse_tail), the top-k sum in float64 as in Rust.
    m = tl.maximum(top_sh, t_m)
    s = tl.sum(tl.exp(x64 - top_sh), 0) * tl.exp(top_sh - m) + t_s * tl.exp(t_m - m)
    lse = m + tl.log(tl.where(s > 0.0, s, 1.0))
    lp = tl.where(listed, (tl.where(listed, x64, 0.0) - lse).to(tl.float32), float("-inf"))
    tl.store(ids_ptr + row * k + pos, tl.where(listed, _key_id(buf), -1), mask=pos < k)
    tl.store(lp_ptr + row * k + pos, lp, mask=pos < k)
    tail = _ln(t_m, t_s)
    tl.store(tail_ptr + row, tl.where(tail > float("-inf"), tl.minimum(tail - lse, 0.0), float("-inf")).to(tl.float32))
    tl.store(status_ptr + row, status)


# ----------------------------------------------------------------------------- sampling


@triton.jit
def _mix64(z):
    """The SplitMix64 finaliser (uint64, wrapping)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _u64(a, b, c):
    """A uint64 passed as three 22-bit integers (every one a plain int32 kernel argument)."""
    return (tl.cast(a, tl.uint64) << 42) | (tl.cast(b, tl.uint64) << 21) | tl.cast(c, tl.uint64)


@triton.jit
def _uniforms(key, j):
    """Draws ``j`` (int) of the stream ``key``: ``(mix(key + (j + 1)·γ) >> 11) · 2^-53``."""
    z = _mix64(key + (j.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15)
    return (z >> 11).to(tl.float64) * tl.full([], 1.0 / 9007199254740992.0, tl.float64)


@triton.jit
def _c64(v: tl.constexpr):
    return tl.full([], v, tl.float64)


@triton.jit
def _exp64(x):
    """``e^x`` for float64 ``x ≤ 0``, exactly kdfast-core's ``exp64`` (0 below −708)."""
    xc = tl.maximum(x, _c64(-708.0))
    magic = _c64(6755399441055744.0)  # 1.5 · 2^52
    t = xc * _c64(1.4426950408889634) + magic
    n = t - magic
    r = (xc - n * _c64(0.6931471803691238)) - n * _c64(1.9082149292705877e-10)
    p = _c64(1.0 / 6227020800.0)
    p = p * r + _c64(1.0 / 479001600.0)
    p = p * r + _c64(1.0 / 39916800.0)
    p = p * r + _c64(1.0 / 3628800.0)
    p = p * r + _c64(1.0 / 362880.0)
    p = p * r + _c64(1.0 / 40320.0)
    p = p * r + _c64(1.0 / 5040.0)
    p = p * r + _c64(1.0 / 720.0)
    p = p * r + _c64(1.0 / 120.0)
    p = p * r + _c64(1.0 / 24.0)
    p = p * r + _c64(1.0 / 6.0)
    p = p * r + _c64(0.5)
    p = p * r + _c64(1.0)
    p = p * r + _c64(1.0)
    kk = t.to(tl.int64, bitcast=True) - 0x4338000000000000
    pow2n = ((kk + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.where(x < -708.0, _c64(0.0), p * pow2n)


@triton.jit
def _block_weights(x_row, b, V, inv_t, status, VB: tl.constexpr):
    """Block ``b``'s in-vocabulary mask, max of ``x``, weights ``exp(x − max)``, their running
    sums and the row status."""
    cols = b * VB + tl.arange(0, VB)
    inb = cols < V
    x = tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
    x, status = _status_and_clean(x, status)
    m = tl.max(x, 0)
    w = _exp64(x.to(tl.float64) - tl.where(m == float("-inf"), 0.0, m).to(tl.float64))
    return inb, m, w, tl.cumsum(w, 0), status


@triton.jit
def _block_counts_kernel(x_ptr, cnt_ptr, off_ptr, lse_ptr, status_ptr, x_stride, V, nb, n,
                         sk_a, sk_b, sk_c, ro_a, ro_b, ro_c, inv_t,
                         NBP: tl.constexpr, VB: tl.constexpr, JB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    bidx = tl.arange(0, NBP)
    lse_b = tl.full([NBP], float("-inf"), tl.float64)
    status = tl.zeros([], tl.int32)
    for b in range(nb):
        _inb, m, _w, c, status = _block_weights(x_row, b, V, inv_t, status, VB)
        s = tl.max(c, 0)  # the last running sum (all terms ≥ 0)
        lb = tl.where(m == float("-inf"), float("-inf"), m.to(tl.float64) + tl.log(tl.where(s > 0.0, s, 1.0)))
        lse_b = tl.where(bidx == b, lb, lse_b)
    top = tl.max(lse_b, 0)
    status = tl.where((status == 0) & (top == float("-inf")), 3, status)
    top_sh = tl.where(top == float("-inf"), 0.0, top)
    wb = _exp64(lse_b - top_sh)
    cb = tl.cumsum(wb, 0)
    total = tl.max(cb, 0)
    last = tl.max(tl.where(wb > 0.0, bidx, 0), 0)
    tl.store(lse_ptr + row, top_sh + tl.log(tl.where(total > 0.0, total, 1.0)))
    tl.store(status_ptr + row, status)
    # The N over-the-blocks draws (stream u64::MAX): how many draws each block contributes.
    row_key = _mix64(_u64(sk_a, sk_b, sk_c) ^ (_u64(ro_a, ro_b, ro_c) + row.to(tl.uint64)))
    key = _mix64(row_key ^ 0xFFFFFFFFFFFFFFFF)
    counts = tl.zeros([NBP], tl.int32)
    jj = tl.arange(0, JB)
    for j0 in range(0, n, JB):
        j = j0 + jj
        target = _uniforms(key, j) * total
        below = (cb[None, :] <= target[:, None]) & (bidx[None, :] < nb)
        blk = tl.sum(below.to(tl.int32), 1)
        blk = tl.where(blk >= nb, last, blk)
        hit = (blk[:, None] == bidx[None, :]) & (j < n)[:, None]
        counts += tl.sum(hit.to(tl.int32), 0)
    out = row * nb + bidx
    tl.store(cnt_ptr + out, counts, mask=bidx < nb)
    tl.store(off_ptr + out, tl.cumsum(counts, 0) - counts, mask=bidx < nb)


@triton.jit
def _block_draws_kernel(x_ptr, cnt_ptr, off_ptr, key_ptr, x_stride, V, nb, n,
                        sk_a, sk_b, sk_c, ro_a, ro_b, ro_c, inv_t,
                        VB: tl.constexpr, JB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    cnt = tl.load(cnt_ptr + row * nb + b)
    if cnt > 0:
        x_row = x_ptr + row * x_stride
        off = tl.load(off_ptr + row * nb + b)
        inb, _m, w, c, _status = _block_weights(x_row, b, V, inv_t, tl.zeros([], tl.int32), VB)
        s = tl.max(c, 0)
        last = tl.max(tl.where((w > 0.0) & inb, tl.arange(0, VB), 0), 0)
        size = tl.minimum(V - b * VB, VB)
        row_key = _mix64(_u64(sk_a, sk_b, sk_c) ^ (_u64(ro_a, ro_b, ro_c) + row.to(tl.uint64)))
        key = _mix64(row_key ^ b.to(tl.uint64))
        jj = tl.arange(0, JB)
        for j0 in range(0, cnt, JB):
            j = j0 + jj
            target = _uniforms(key, j) * s
            i = tl.sum(((c[None, :] <= target[:, None]) & inb[None, :]).to(tl.int32), 1)
            i = tl.where(i >= size, last, i)
            ids = b * VB + i
            xi = tl.load(x_row + ids, mask=j < cnt, other=0.0).to(tl.float32) * inv_t
            k64 = _sort_key(xi, ids) ^ _SIGN64  # as int64: signed order = unsigned order
            tl.store(key_ptr + row * n + off + j, k64.to(tl.int64, bitcast=True), mask=j < cnt)


# ----------------------------------------------------------------------------- launchers


def _inv_t(temperature: float) -> float:
    return float(np.float32(1.0) / np.float32(temperature))


def _raise_for_status(x2: torch.Tensor, status: torch.Tensor, inv_t: float) -> None:
    """One host sync: the first row whose status is set raises the Rust backend's error."""
    bad = status.nonzero()
    if bad.numel():
        r = int(bad[0, 0])
        _ref.check_rows(x2[r:r + 1].float() * inv_t, rows=torch.tensor([r]))
        raise ValueError(f"teacher_logits: row {r} has no finite maximum")  # not reached


def compress_topk(x2: torch.Tensor, k: int, temperature: float):
    """``(ids int64 [N, k], logprobs float32 [N, k], tail_logprob float32 [N])`` of the
    ``[N, V]`` logits ``x2`` (float32/bf16/fp16, any row stride) on their device."""
    n, v = x2.shape
    if k > MAX_K:
        return _ref.compress_topk(x2, k, temperature)
    if v > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    dev = x2.device
    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    lp = torch.empty((n, k), dtype=torch.float32, device=dev)
    tail = torch.empty(n, dtype=torch.float32, device=dev)
    status = torch.empty(n, dtype=torch.int32, device=dev)
    kb = max(16, triton.next_power_of_2(k))
    block = max(kb, min(1024, triton.next_power_of_2(v)))
    inv_t = _inv_t(temperature)
    # 8 warps for the 1024-wide blocks (every V > 512): with 4, ptxas holds the sorts to 128
    # registers a thread and spills a little (8-40 B) in many variants on sm_90
    # (benches/triton_aot_check.py --full: 15 with Triton 3.6, 23 with 3.9); with 8 (80-124
    # registers, the same warps per SM) in none with 3.6, 3 with 3.9 (k = 1000, 16 B). Speed not
    # yet measured on a GPU.
    _topk_kernel[(n,)](x2, ids, lp, tail, status, x2.stride(0), v, k, inv_t, K=kb, BLOCK=block,
                       LOG_K=kb.bit_length() - 1, LOG_B=block.bit_length() - 1, num_warps=8 if block >= 1024 else 4)
    _raise_for_status(x2, status, inv_t)
    return ids, lp, tail


def _chunks22(value: int) -> tuple:
    return (value >> 42) & 0x3FFFFF, (value >> 21) & 0x1FFFFF, value & 0x1FFFFF


def compress_sample(x2: torch.Tensor, num_samples: int, temperature: float, seed: int, row_offset: int = 0):
    """``(ids int64 [N, n], logprobs float32 [N, n], weights float32 [N, n])``: the Rust
    sampler's draws (see the module docstring); row ``r`` keyed as ``row_offset + r``."""
    n_rows, v = x2.shape
    n = num_samples
    if v > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    dev = x2.device
    nb = triton.cdiv(v, VOCAB_BLOCK)
    inv_t = _inv_t(temperature)
    sk = int(_ref._mix64(np.array([(seed ^ _ref._SEED_SALT) & _ref._MASK64], dtype=np.uint64))[0])
    keys = (*_chunks22(sk), *_chunks22(row_offset))
    counts = torch.empty((n_rows, nb), dtype=torch.int32, device=dev)
    offsets = torch.empty((n_rows, nb), dtype=torch.int32, device=dev)
    lse = torch.empty(n_rows, dtype=torch.float64, device=dev)
    status = torch.empty(n_rows, dtype=torch.int32, device=dev)
    opts = {} if dev.type == "cpu" else {"enable_fp_fusion": False}  # Rust's exp64 has no FMA
    _block_counts_kernel[(n_rows,)](
        x2, counts, offsets, lse, status, x2.stride(0), v, nb, n, *keys, inv_t,
        NBP=max(16, triton.next_power_of_2(nb)), VB=VOCAB_BLOCK, JB=32, num_warps=4, **opts)
    _raise_for_status(x2, status, inv_t)
    draws = torch.empty((n_rows, n), dtype=torch.int64, device=dev)
    _block_draws_kernel[(n_rows, nb)](
        x2, counts, offsets, draws, x2.stride(0), v, nb, n, *keys, inv_t,
        VB=VOCAB_BLOCK, JB=8, num_warps=8, **opts)
    return _merge_draws(draws, lse, n)


def _merge_draws(draws: torch.Tensor, lse: torch.Tensor, n: int):
    """Distinct draws (as sortable int64 keys) with ``weight = count / n``, best first."""
    srt = torch.sort(draws, dim=1, descending=True).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = torch.cumsum(new, dim=1) - 1
    count = torch.zeros_like(srt).scatter_add_(1, group, torch.ones_like(srt))
    gkey = srt.new_full(srt.shape, 0).scatter_(1, group, srt)
    used = count > 0
    unsigned_hi = ((gkey >> 32) & _LOW32) ^ (1 << 31)  # undo the sign flip of the high word
    bits = torch.where(unsigned_hi >= (1 << 31), unsigned_hi - (1 << 31), ~unsigned_hi & _LOW32)
    x = torch.where(bits >= (1 << 31), bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    ids = torch.where(used, ~gkey & _LOW32, -1)
    lp = torch.where(used, x.double() - lse[:, None], float("-inf")).to(torch.float32)
    weights = torch.where(used, count.to(torch.float32) / float(n), 0.0)
    return ids, lp, weights
