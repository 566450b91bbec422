//! Offline-distillation targets from teacher logits: top-k and sampled compression.
//!
//! Both compressors read each row once, in fixed *absolute* vocabulary blocks of
//! [`VOCAB_BLOCK`] ids (block `b` holds ids `[4096 b, 4096 (b + 1))`), with O(k) or
//! O(blocks · N) memory per row, never a softmax of the row or a sort of it. Buffers sized by
//! the caller's `k` or `N` are allocated fallibly ([`KdError::Alloc`]): top-k keeps at most
//! `min(k, V) + VOCAB_BLOCK` candidates, however large `k` is, and the batch drivers write
//! straight into the output rows. Let `x = z / T`
//! (each logit converted to f32 and multiplied by the f32 `1 / T`).
//!
//! # Top-k ([`TopKStream`], [`compress_topk`])
//! A candidate buffer with a running threshold `θ` (the k-th best value so far, `-inf` until k
//! candidates exist). Per block, every `x > θ` (with `θ` as it was when the block started)
//! joins the buffer; when the buffer holds more than k entries a linear-time selection keeps the
//! best k and raises `θ`. Everything that is not kept — the block's `x ≤ θ`, found with a
//! SIMD-dispatched sweep, and the entries evicted from the buffer — is accumulated into an
//! online log-sum-exp of the *tail*. At the end
//!
//! ```text
//!     lse_all = logaddexp(lse_topk, lse_tail),   logprob_i = x_i − lse_all,
//!     tail_logprob = lse_tail − lse_all = log(1 − Σ_topk p)
//! ```
//!
//! in f64 (the block sweeps sum in f32 lanes), so the tail log-mass keeps ~1e-6 relative
//! accuracy even when it is 1e-30 or e^-5000 (no `log(1 − Σp)` cancellation). The order is "larger value first, lower id first among
//! equal values". Entries with probability 0 (`-inf` logits) are never listed: when fewer than
//! k entries are finite, the remaining slots are unused (id −1, log-prob −inf), and the
//! tail log-prob is −inf whenever nothing finite is left outside the listed ids.
//!
//! # Sampling ([`SampleStream`], [`compress_sample`])
//! `N` ids are drawn with replacement from `p = softmax(x)`; the distinct ids are returned with
//! `weight = count / N` and their log-probabilities, sorted like top-k, padded to N slots with
//! (id −1, weight 0, log-prob −inf). The draws depend only on `(seed, row, logits)`: every
//! uniform comes from a counter-based generator ([`uniform`], SplitMix64 keyed by
//! `(seed, row, stream)`), so results do not depend on the thread count, on how a row is sliced
//! for streaming, nor on the implementation (the pure-PyTorch reference
//! `kdfast.reference_sparse` replays the same algorithm). Per block `b` (in f64):
//!
//! 1. `w_i = exp(x_i − m_b)` (`m_b` the block max; a vectorised f64 `exp` within 2 ulp, so
//!    a draw could differ from another implementation's only if a uniform fell within ~1e-15
//!    of a boundary), `c_i` their running sum in id order,
//!    `S_b = c_last`, block log-mass `L_b = m_b + ln S_b`;
//! 2. N within-block draws: uniform `u_j` of stream `b`, target `t_j = u_j S_b`, id = the first
//!    `i` with `c_i > t_j` (the targets are walked in sorted order; the draws are stored in
//!    generation order `j = 0..N`).
//!
//! At the end, N draws over the blocks (stream `u64::MAX`, same rule over the running sum of
//! `exp(L_b − max L)`) say how many draws `n_b` each block contributes, and block `b`
//! contributes its first `n_b` draws. Each of the N draws is thus "block ∝ mass, then id ∝ p
//! inside the block", i.e. exactly a draw from `p`, and the draws are independent.
//!
//! # Streaming
//! A row can be fed as several contiguous vocabulary slices (`push(offset, slice)` with
//! `offset` equal to the number of logits already pushed; e.g. a tensor-parallel teacher's
//! shards in rank order). The stream re-blocks the slices into the same absolute blocks, so
//! `finish()` is bit-identical to the one-pass function on the whole row.

use crate::dense::Rows;
use crate::elem::Elem;
use crate::error::{try_reserve, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::LANES;
use crate::threads;

/// Ids per absolute vocabulary block (both compressors).
pub const VOCAB_BLOCK: usize = 4096;

/// The stream id of the final over-the-blocks draws of [`SampleStream`].
pub const BLOCK_SELECT_STREAM: u64 = u64::MAX;

const NEG_INF: f32 = f32::NEG_INFINITY;

// ------------------------------------------------------------------------------------ RNG

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_SALT: u64 = 0x6B64_6661_7374_2D31; // "kdfast-1"

/// The SplitMix64 finaliser (a bijection of u64).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of the random stream `stream` of row `row` under `seed`:
/// `mix(mix(mix(seed ^ SALT) ^ row) ^ stream)`.
#[inline]
pub fn stream_key(seed: u64, row: u64, stream: u64) -> u64 {
    mix64(mix64(mix64(seed ^ SEED_SALT) ^ row) ^ stream)
}

/// The `j`-th uniform of a stream, in `[0, 1)` with 53 random bits:
/// `(mix(key + (j + 1)·γ) >> 11) · 2^-53` (SplitMix64).
#[inline]
pub fn uniform(key: u64, j: u64) -> f64 {
    let z = mix64(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

// ------------------------------------------------------------------------------ f64 exp

/// `e^x` for `x ≤ 0` in plain f64 arithmetic (vectorisable), within 2 ulp; 0 below −708
/// (there e^x < 1e-307: such an entry is never drawn in practice, exact libm or not).
/// Cody–Waite reduction `x = n ln2 + r`, `|r| ≤ ln2 / 2`, and the degree-13 Taylor polynomial
/// (truncation error < 1e-17 relative).
#[inline(always)]
fn exp64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: LN2_HI has 32 significant bits, so n · LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    let xc = x.max(-708.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let k = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i64;
    let pow2n = f64::from_bits(((k + 1023) as u64) << 52);
    if x < -708.0 {
        0.0
    } else {
        p * pow2n
    }
}

/// `out[i] = exp64(x[i] − m)`, compiled per instruction set.
struct ExpJob<'a> {
    x: &'a [f32],
    m: f64,
    out: &'a mut [f64],
}

impl Kernel for ExpJob<'_> {
    type Output = ();
    #[inline(always)]
    fn run<M: Math>(self) {
        for (o, &v) in self.out.iter_mut().zip(self.x) {
            *o = exp64(v as f64 - self.m);
        }
    }
}

// ------------------------------------------------------------------------- f64 log-sum-exp

/// `ln Σ exp(x_i)` kept as `(max, Σ exp(x_i − max))` in f64; `sum == 0` is the empty set.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lse64 {
    max: f64,
    sum: f64,
}

impl Lse64 {
    const EMPTY: Lse64 = Lse64 { max: f64::NEG_INFINITY, sum: 0.0 };

    fn merge(self, o: Lse64) -> Lse64 {
        if o.sum == 0.0 {
            return self;
        }
        if self.sum == 0.0 {
            return o;
        }
        let max = self.max.max(o.max);
        Lse64 { max, sum: self.sum * (self.max - max).exp() + o.sum * (o.max - max).exp() }
    }

    /// The statistics of finite (or −inf) values.
    fn of(xs: impl Iterator<Item = f32> + Clone) -> Lse64 {
        let max = xs.clone().fold(NEG_INF, f32::max);
        if max == NEG_INF {
            return Lse64::EMPTY;
        }
        let m = max as f64;
        Lse64 { max: m, sum: xs.map(|x| (x as f64 - m).exp()).sum() }
    }

    fn ln(self) -> f64 {
        if self.sum == 0.0 {
            f64::NEG_INFINITY
        } else {
            self.max + self.sum.ln()
        }
    }
}

// ----------------------------------------------------------------------- block buffering

/// Re-blocks a row arriving in contiguous slices into absolute [`VOCAB_BLOCK`] blocks of
/// scaled f32 values.
struct Blocker {
    inv_t: f32,
    buf: Vec<f32>,
    fill: usize,
    seen: usize,
}

impl Blocker {
    fn new(temperature: f32) -> Result<Blocker> {
        check_temperature(temperature)?;
        Ok(Blocker { inv_t: 1.0 / temperature, buf: vec![0.0; VOCAB_BLOCK], fill: 0, seen: 0 })
    }

    /// Append `src`, calling `full(block_start, block)` for every completed block.
    fn push<E: Elem>(&mut self, offset: usize, mut src: &[E], mut full: impl FnMut(usize, &mut [f32], usize) -> Result<()>) -> Result<()> {
        if offset != self.seen {
            return Err(KdError::InvalidArgument {
                name: "offset",
                expected: format!("{} (slices of a row must be contiguous and in increasing order)", self.seen),
                got: offset.to_string(),
            });
        }
        if self.seen.checked_add(src.len()).is_none_or(|n| n > u32::MAX as usize) {
            return Err(KdError::InvalidArgument {
                name: "teacher_logits",
                expected: format!("a vocabulary of at most {} entries", u32::MAX),
                got: format!("{} entries", self.seen as u128 + src.len() as u128),
            });
        }
        while !src.is_empty() {
            let take = (VOCAB_BLOCK - self.fill).min(src.len());
            let dst = &mut self.buf[self.fill..self.fill + take];
            E::load(&src[..take], dst);
            for x in dst.iter_mut() {
                *x *= self.inv_t;
            }
            self.fill += take;
            self.seen += take;
            src = &src[take..];
            if self.fill == VOCAB_BLOCK {
                self.flush(&mut full)?;
            }
        }
        Ok(())
    }

    /// Process the partial block, if any.
    fn flush(&mut self, full: &mut impl FnMut(usize, &mut [f32], usize) -> Result<()>) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let n = self.fill;
        let padded = n.div_ceil(LANES) * LANES;
        self.buf[n..padded].fill(NEG_INF);
        self.fill = 0;
        full(self.seen - n, &mut self.buf[..padded], n)
    }
}

fn check_num_samples(n: usize) -> Result<()> {
    if n == 0 || n > u32::MAX as usize {
        return Err(KdError::InvalidArgument { name: "num_samples", expected: "an integer in [1, 2^32)".into(), got: n.to_string() });
    }
    Ok(())
}

fn check_temperature(t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(KdError::InvalidArgument { name: "temperature", expected: "a finite number > 0".into(), got: format!("{t}") })
    }
}

/// Max and NaN flag of a padded block, and the log-sum-exp of its entries `≤ thr`.
struct BlockScan {
    max: f32,
    nan: bool,
    tail: Lse64,
}

struct ScanJob<'a> {
    x: &'a [f32],
    thr: f32,
}

impl Kernel for ScanJob<'_> {
    type Output = BlockScan;
    #[inline(always)]
    fn run<M: Math>(self) -> BlockScan {
        scan::<M>(self.x, self.thr)
    }
}

#[inline(always)]
fn scan<M: Math>(x: &[f32], thr: f32) -> BlockScan {
    let mut mx = [NEG_INF; LANES];
    let mut tmx = [NEG_INF; LANES];
    let mut nan = [false; LANES];
    for c in x.chunks_exact(LANES) {
        for l in 0..LANES {
            let v = c[l];
            mx[l] = if v > mx[l] { v } else { mx[l] };
            let t = if v <= thr { v } else { NEG_INF };
            tmx[l] = if t > tmx[l] { t } else { tmx[l] };
            nan[l] |= v.is_nan();
        }
    }
    let max = mx.iter().copied().fold(NEG_INF, f32::max);
    let tmax = tmx.iter().copied().fold(NEG_INF, f32::max);
    let nan = nan.iter().any(|&b| b);
    let mut tail = Lse64::EMPTY;
    if tmax > NEG_INF && !nan {
        let mut acc = [0.0f32; LANES];
        for c in x.chunks_exact(LANES) {
            for l in 0..LANES {
                let e = M::exp(c[l] - tmax);
                acc[l] += if c[l] <= thr { e } else { 0.0 };
            }
        }
        tail = Lse64 { max: tmax as f64, sum: acc.iter().map(|&a| a as f64).sum() };
    }
    BlockScan { max, nan, tail }
}

fn check_block(max: f32, nan: bool, row: usize) -> Result<()> {
    let detail = if nan {
        "contains NaN"
    } else if max == f32::INFINITY {
        "contains +inf"
    } else {
        return Ok(());
    };
    Err(KdError::NonFiniteRow { tensor: "teacher_logits", row, detail })
}

fn all_neg_inf(row: usize) -> KdError {
    KdError::NonFiniteRow { tensor: "teacher_logits", row, detail: "is entirely -inf" }
}

fn empty_row() -> KdError {
    KdError::InvalidArgument { name: "teacher_logits", expected: "a row of at least one logit".into(), got: "0 logits".into() }
}

fn check_slots(name: &'static str, got: usize, k: usize) -> Result<()> {
    if got != k {
        return Err(KdError::ShapeMismatch { what: format!("{name} has {got} slots for k = {k}") });
    }
    Ok(())
}

/// Larger value first, then lower id.
#[inline]
fn by_rank(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

// ------------------------------------------------------------------------------- top-k

/// Streaming top-k compressor of one row (see the module docs).
///
/// ```
/// use kdfast_core::compress::TopKStream;
/// use kdfast_core::Isa;
/// let row: Vec<f32> = (0..10_000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
/// let mut s = TopKStream::new(5, 1.0, Isa::detect(), 0).unwrap();
/// s.push(0, &row[..3000]).unwrap();
/// s.push(3000, &row[3000..]).unwrap();
/// let (mut ids, mut lp) = (vec![0i64; 5], vec![0f32; 5]);
/// let tail = s.finish(&mut ids, &mut lp).unwrap();
/// assert!(tail < 0.0 && lp[0] >= lp[4]);
/// ```
pub struct TopKStream {
    k: usize,
    isa: Isa,
    row: usize,
    blocks: Blocker,
    cand: Vec<(f32, u32)>,
    thr: f32,
    tail: Lse64,
}

impl TopKStream {
    /// A compressor keeping `k ≥ 1` ids at temperature `T`; `row` only labels errors.
    pub fn new(k: usize, temperature: f32, isa: Isa, row: usize) -> Result<TopKStream> {
        if k == 0 {
            return Err(KdError::InvalidArgument { name: "k", expected: "an integer ≥ 1".into(), got: "0".into() });
        }
        Ok(TopKStream {
            k,
            isa,
            row,
            blocks: Blocker::new(temperature)?,
            // Grown block by block in `topk_block`: at most `min(k, V) + VOCAB_BLOCK` entries.
            cand: Vec::new(),
            thr: NEG_INF,
            tail: Lse64::EMPTY,
        })
    }

    /// Append the logits of ids `offset .. offset + logits.len()`; `offset` must be the number of
    /// logits pushed so far. After an error the stream must be dropped.
    pub fn push<E: Elem>(&mut self, offset: usize, logits: &[E]) -> Result<()> {
        let TopKStream { k, isa, row, blocks, cand, thr, tail } = self;
        blocks.push(offset, logits, |start, x, n| topk_block(*k, *isa, *row, cand, thr, tail, start, x, n))
    }

    /// Logits pushed so far (the vocabulary size once the row is complete).
    pub fn len(&self) -> usize {
        self.blocks.seen
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.seen == 0
    }

    /// Write the k ids (int64, −1 in unused slots) and log-probabilities (−inf in unused slots),
    /// best first, and return `tail_logprob = log(1 − Σ p_topk)` (−inf when nothing is left).
    pub fn finish(mut self, ids: &mut [i64], logprobs: &mut [f32]) -> Result<f32> {
        check_slots("ids", ids.len(), self.k)?;
        check_slots("logprobs", logprobs.len(), self.k)?;
        let TopKStream { k, isa, row, blocks, cand, thr, tail } = &mut self;
        blocks.flush(&mut |start, x, n| topk_block(*k, *isa, *row, cand, thr, tail, start, x, n))?;
        if blocks.seen == 0 {
            return Err(empty_row());
        }
        if cand.is_empty() {
            return Err(all_neg_inf(*row));
        }
        cand.sort_unstable_by(by_rank);
        let top = Lse64 { max: cand[0].0 as f64, sum: cand.iter().map(|&(x, _)| (x as f64 - cand[0].0 as f64).exp()).sum() };
        let lse = top.merge(*tail).ln();
        for (i, (id, lp)) in ids.iter_mut().zip(logprobs.iter_mut()).enumerate() {
            (*id, *lp) = match cand.get(i) {
                Some(&(x, j)) => (j as i64, (x as f64 - lse) as f32),
                None => (-1, NEG_INF),
            };
        }
        Ok((tail.ln() - lse).min(0.0) as f32)
    }
}

#[allow(clippy::too_many_arguments)]
fn topk_block(
    k: usize,
    isa: Isa,
    row: usize,
    cand: &mut Vec<(f32, u32)>,
    thr: &mut f32,
    tail: &mut Lse64,
    start: usize,
    x: &mut [f32],
    n: usize,
) -> Result<()> {
    let t0 = *thr;
    let s = isa.run(ScanJob { x, thr: t0 });
    check_block(s.max, s.nan, row)?;
    *tail = tail.merge(s.tail);
    if s.max > t0 {
        try_reserve(cand, n, "k")?;
        // Most chunks hold no candidate once θ has risen: test a chunk at a time.
        for (c, chunk) in x[..n.div_ceil(LANES) * LANES].chunks_exact(LANES).enumerate() {
            if chunk.iter().fold(false, |any, &v| any | (v > t0)) {
                for (i, &v) in chunk.iter().enumerate() {
                    if v > t0 {
                        cand.push((v, (start + c * LANES + i) as u32));
                    }
                }
            }
        }
    }
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, by_rank);
        *tail = tail.merge(Lse64::of(cand[k..].iter().map(|c| c.0)));
        cand.truncate(k);
        *thr = cand[k - 1].0;
    } else if cand.len() == k && *thr == NEG_INF {
        *thr = cand.iter().map(|c| c.0).fold(f32::INFINITY, f32::min);
    }
    Ok(())
}

// ---------------------------------------------------------------------------- sampling

/// Streaming sampling compressor of one row (see the module docs).
pub struct SampleStream {
    n: usize,
    isa: Isa,
    seed: u64,
    row: u64,
    err_row: usize,
    blocks: Blocker,
    state: SampleState,
}

struct SampleState {
    /// Log-mass of each block.
    lse: Vec<f64>,
    /// N draws per block in generation order: (scaled logit, id).
    draws: Vec<(f32, u32)>,
    cum: Vec<f64>,
    w: Vec<f64>,
    order: Vec<(f64, u32)>,
}

impl SampleStream {
    /// A compressor drawing `num_samples ≥ 1` ids at temperature `T` for row `row` (the row
    /// index that keys the random streams) under `seed`. The instruction set only changes the
    /// speed: the results are the same for every `isa`.
    pub fn new(num_samples: usize, temperature: f32, seed: u64, row: u64, isa: Isa) -> Result<SampleStream> {
        check_num_samples(num_samples)?;
        let mut order = Vec::new();
        try_reserve(&mut order, num_samples, "num_samples")?;
        Ok(SampleStream {
            n: num_samples,
            isa,
            seed,
            row,
            err_row: row as usize,
            blocks: Blocker::new(temperature)?,
            state: SampleState {
                lse: Vec::new(),
                draws: Vec::new(),
                cum: vec![0.0; VOCAB_BLOCK],
                w: vec![0.0; VOCAB_BLOCK],
                order,
            },
        })
    }

    /// Append the logits of ids `offset .. offset + logits.len()` (as [`TopKStream::push`]).
    pub fn push<E: Elem>(&mut self, offset: usize, logits: &[E]) -> Result<()> {
        let SampleStream { n, isa, seed, row, err_row, blocks, state } = self;
        blocks.push(offset, logits, |start, x, len| state.block(*n, *isa, *seed, *row, *err_row, start, x, len))
    }

    /// Logits pushed so far.
    pub fn len(&self) -> usize {
        self.blocks.seen
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.seen == 0
    }

    /// Write the distinct sampled ids (−1 in unused slots), their log-probabilities (−inf) and
    /// weights `count / N` (0), best first; each output has `num_samples` slots.
    pub fn finish(mut self, ids: &mut [i64], logprobs: &mut [f32], weights: &mut [f32]) -> Result<()> {
        let n = self.n;
        check_slots("ids", ids.len(), n)?;
        check_slots("logprobs", logprobs.len(), n)?;
        check_slots("weights", weights.len(), n)?;
        let SampleStream { isa, seed, row, err_row, blocks, state, .. } = &mut self;
        blocks.flush(&mut |start, x, len| state.block(n, *isa, *seed, *row, *err_row, start, x, len))?;
        if blocks.seen == 0 {
            return Err(empty_row());
        }
        let lse = &state.lse;
        let top = lse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if top == f64::NEG_INFINITY {
            return Err(all_neg_inf(*err_row));
        }
        // Running sum of the block masses and the N over-the-blocks draws.
        let mut c = 0.0f64;
        let mut last = 0usize;
        state.cum.clear();
        for (b, &l) in lse.iter().enumerate() {
            let w = exp64(l - top);
            c += w;
            if w > 0.0 {
                last = b;
            }
            state.cum.push(c);
        }
        let lse_all = top + c.ln();
        let mut counts = vec![0usize; lse.len()];
        let key = stream_key(*seed, *row, BLOCK_SELECT_STREAM);
        walk(&state.cum, c, last, key, n, &mut state.order, |_, b| counts[b] += 1);
        let mut picked: Vec<(f32, u32)> = Vec::new();
        try_reserve(&mut picked, n, "num_samples")?;
        for (b, &m) in counts.iter().enumerate() {
            picked.extend_from_slice(&state.draws[b * n..b * n + m]);
        }
        picked.sort_unstable_by(by_rank);
        let n_f = n as f32;
        let mut slot = 0;
        let mut i = 0;
        while i < picked.len() {
            let (x, id) = picked[i];
            let mut j = i + 1;
            while j < picked.len() && picked[j].1 == id {
                j += 1;
            }
            ids[slot] = id as i64;
            logprobs[slot] = (x as f64 - lse_all) as f32;
            weights[slot] = (j - i) as f32 / n_f;
            slot += 1;
            i = j;
        }
        ids[slot..].fill(-1);
        logprobs[slot..].fill(NEG_INF);
        weights[slot..].fill(0.0);
        Ok(())
    }
}

/// Draw `n` times from the distribution whose running sum is `cum` (total `total`, last
/// positive entry `last`): uniform `u_j` of stream `key`, the first `i` with `cum[i] > u_j ·
/// total` (or `last` if rounding leaves none); `out(j, i)` in sorted-target order.
fn walk(cum: &[f64], total: f64, last: usize, key: u64, n: usize, order: &mut Vec<(f64, u32)>, mut out: impl FnMut(usize, usize)) {
    order.clear();
    order.extend((0..n).map(|j| (uniform(key, j as u64) * total, j as u32)));
    order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut i = 0;
    for &(t, j) in order.iter() {
        while i < cum.len() && cum[i] <= t {
            i += 1;
        }
        out(j as usize, if i < cum.len() { i } else { last });
    }
}

impl SampleState {
    #[allow(clippy::too_many_arguments)]
    fn block(&mut self, n: usize, isa: Isa, seed: u64, row: u64, err_row: usize, start: usize, padded: &[f32], len: usize) -> Result<()> {
        let BlockScan { max, nan, .. } = isa.run(ScanJob { x: padded, thr: NEG_INF });
        check_block(max, nan, err_row)?;
        let x = &padded[..len];
        let b = start / VOCAB_BLOCK;
        let base = self.draws.len();
        try_reserve(&mut self.draws, n, "num_samples")?;
        self.draws.resize(base + n, (NEG_INF, 0));
        if max == NEG_INF {
            self.lse.push(f64::NEG_INFINITY);
            return Ok(());
        }
        let m = max as f64;
        let cum = &mut self.cum[..x.len()];
        let ws = &mut self.w[..x.len()];
        isa.run(ExpJob { x, m, out: ws });
        let mut c = 0.0f64;
        let mut last = 0usize;
        for (i, (&w, ci)) in ws.iter().zip(cum.iter_mut()).enumerate() {
            c += w;
            if w > 0.0 {
                last = i;
            }
            *ci = c;
        }
        self.lse.push(m + c.ln());
        let draws = &mut self.draws[base..];
        walk(cum, c, last, stream_key(seed, row, b as u64), n, &mut self.order, |j, i| draws[j] = (x[i], (start + i) as u32));
        Ok(())
    }
}

// ------------------------------------------------------------------------- batch drivers

/// Rows handed to the thread pool at a time (bounds the per-batch list of row outputs).
const BATCH_ROWS: usize = 1024;

/// Top-k of every row of `logits` at temperature `T`: `ids_out`/`logprobs_out` are contiguous
/// `[rows, k]`, `tail_out` `[rows]` (see [`TopKStream::finish`]). Each row is written in place;
/// the only other memory is O(min(k, V)) per worker thread.
#[allow(clippy::too_many_arguments)]
pub fn compress_topk<E: Elem>(
    logits: Rows<E>,
    k: usize,
    temperature: f32,
    ids_out: &mut [i64],
    logprobs_out: &mut [f32],
    tail_out: &mut [f32],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    let rows = logits.rows;
    TopKStream::new(k, temperature, isa, 0)?;
    check_outputs(rows, k, &[("ids", ids_out.len()), ("logprobs", logprobs_out.len())], Some(("tail_logprob", tail_out.len())))?;
    let batch = BATCH_ROWS.saturating_mul(k);
    let batches = ids_out.chunks_mut(batch).zip(logprobs_out.chunks_mut(batch)).zip(tail_out.chunks_mut(BATCH_ROWS));
    for (b, ((ids, lp), tail)) in batches.enumerate() {
        let mut items: Vec<_> = ids.chunks_mut(k).zip(lp.chunks_mut(k)).zip(tail.iter_mut()).collect();
        threads::for_each_item(&mut items, num_threads, |i, ((ids, lp), tail)| {
            let r = b * BATCH_ROWS + i;
            let mut s = TopKStream::new(k, temperature, isa, r)?;
            s.push(0, logits.row(r))?;
            **tail = s.finish(ids, lp)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// `num_samples` draws from every row of `logits` at temperature `T`; row `r` uses the random
/// streams of row index `row_offset + r`. Outputs are contiguous `[rows, num_samples]` (see
/// [`SampleStream::finish`]), written in place; they do not depend on `isa` or `num_threads`.
#[allow(clippy::too_many_arguments)]
pub fn compress_sample<E: Elem>(
    logits: Rows<E>,
    num_samples: usize,
    temperature: f32,
    seed: u64,
    row_offset: u64,
    ids_out: &mut [i64],
    logprobs_out: &mut [f32],
    weights_out: &mut [f32],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    let (rows, n) = (logits.rows, num_samples);
    check_num_samples(n)?;
    check_temperature(temperature)?;
    check_outputs(rows, n, &[("ids", ids_out.len()), ("logprobs", logprobs_out.len()), ("weights", weights_out.len())], None)?;
    let batch = BATCH_ROWS.saturating_mul(n);
    let batches = ids_out.chunks_mut(batch).zip(logprobs_out.chunks_mut(batch)).zip(weights_out.chunks_mut(batch));
    for (b, ((ids, lp), w)) in batches.enumerate() {
        let mut items: Vec<_> = ids.chunks_mut(n).zip(lp.chunks_mut(n)).zip(w.chunks_mut(n)).collect();
        threads::for_each_item(&mut items, num_threads, |i, ((ids, lp), w)| {
            let r = b * BATCH_ROWS + i;
            let mut s = SampleStream::new(n, temperature, seed, row_offset.wrapping_add(r as u64), isa)?;
            s.err_row = r;
            s.push(0, logits.row(r))?;
            s.finish(ids, lp, w)
        })?;
    }
    Ok(())
}

fn check_outputs(rows: usize, k: usize, per_slot: &[(&str, usize)], per_row: Option<(&str, usize)>) -> Result<()> {
    for &(name, len) in per_slot {
        if Some(len) != rows.checked_mul(k) {
            return Err(KdError::ShapeMismatch { what: format!("{name} output has {len} elements for {rows} rows of {k} slots") });
        }
    }
    if let Some((name, len)) = per_row {
        if len != rows {
            return Err(KdError::ShapeMismatch { what: format!("{name} output has {len} elements for {rows} rows") });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_range_and_distinct_streams_differ() {
        let k1 = stream_key(0, 0, 0);
        let k2 = stream_key(0, 1, 0);
        let k3 = stream_key(1, 0, 0);
        assert!(k1 != k2 && k1 != k3 && k2 != k3);
        let mean: f64 = (0..10_000).map(|j| uniform(k1, j)).sum::<f64>() / 1e4;
        assert!((mean - 0.5).abs() < 0.02);
        assert!((0..1000).all(|j| (0.0..1.0).contains(&uniform(k2, j))));
    }

    #[test]
    fn exp64_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 0.0f64;
        while x > -708.0 {
            let (a, b) = (exp64(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x -= 0.001_234_567;
        }
        assert!(worst < 3.0 * f64::EPSILON, "worst relative error {worst}");
        assert_eq!(exp64(0.0), 1.0);
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp64(-1e6), 0.0);
    }

    #[test]
    fn lse64_merge() {
        let a = Lse64::of([1.0f32, 2.0].into_iter());
        let b = Lse64::of([3.0f32].into_iter());
        let want = ((1f64).exp() + (2f64).exp() + (3f64).exp()).ln();
        assert!((a.merge(b).ln() - want).abs() < 1e-12);
        assert_eq!(Lse64::EMPTY.merge(a), a);
        assert_eq!(a.merge(Lse64::EMPTY), a);
        assert_eq!(Lse64::of([NEG_INF].into_iter()), Lse64::EMPTY);
    }
}
