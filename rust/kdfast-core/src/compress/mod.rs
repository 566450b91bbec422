//! Offline-distillation targets from teacher logits: top-k and sampled compression.
//!
//! Both compressors read each row once, in fixed *absolute* vocabulary blocks of
//! [`VOCAB_BLOCK`] ids (block `b` holds ids `[4096 b, 4096 (b + 1))`), with O(k) or
//! O(blocks · N) memory per row, never a softmax of the row or a sort of it. Buffers sized by
//! the caller's `k` or `N` are allocated fallibly ([`KdError::Alloc`]): top-k keeps at most
//! `2 min(k, V) + 16 + VOCAB_BLOCK` candidates, however large `k` is, and the batch drivers write
//! straight into the output rows. Let `x = z / T`
//! (each logit converted to f32 and multiplied by the f32 `1 / T`).
//!
//! # Top-k ([`TopKStream`], [`compress_topk`])
//! A candidate buffer with a running threshold `θ`, a lower bound of the k-th best value so far
//! (`-inf` until k candidates exist). Per block, every `x > θ` (with `θ` as it was when the
//! block started) joins the buffer; once it holds more than `max(2k, k + 16)` entries (or
//! reaches k for the first time) a linear-time selection keeps the best k and raises `θ` to the
//! k-th of them. The first block of a row starts from a cheap bound instead of `-inf` (the k-th
//! largest of the maxima of 4k strided groups, for k ≤ 256), so that ~2k rather than 4096
//! entries enter the buffer. Everything that is not kept — the block's `x ≤ θ`, found in the
//! same SIMD-dispatched sweep that collects the candidates, and the entries evicted from the
//! buffer — is accumulated into an online log-sum-exp of the *tail*. The sweep of a block
//! prefetches the next block's logits, so that their read overlaps the computation. At the end
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
//! The batch driver ([`compress_sample`]) returns exactly these draws, organised for speed
//! (`sample_row`): whole rows let it keep, per block, only the total and a checkpoint of the
//! running sum every 16 ids, accumulate the running sums of 8 blocks as independent chains
//! (the same additions in the same order), and locate only the `n_b` draws each block
//! contributes — a binary search of the checkpoints and the re-summation of one segment. Its
//! floor is the f64 `exp` of every logit, which the bit-exact draws require.
//!
//! # Streaming
//! A row can be fed as several contiguous vocabulary slices (`push(offset, slice)` with
//! `offset` equal to the number of logits already pushed; e.g. a tensor-parallel teacher's
//! shards in rank order). The stream re-blocks the slices into the same absolute blocks, so
//! `finish()` is bit-identical to the one-pass function on the whole row.

use crate::dense::Rows;
use crate::elem::Elem;
use crate::error::{check_len, check_temperature, try_reserve, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::LANES;
use crate::threads;

/// Ids per absolute vocabulary block (both compressors).
pub const VOCAB_BLOCK: usize = 4096;

/// The stream id of the final over-the-blocks draws of [`SampleStream`].
pub const BLOCK_SELECT_STREAM: u64 = u64::MAX;

const NEG_INF: f32 = f32::NEG_INFINITY;

mod f64math;
mod rng;
mod sample;
mod sample_row;
mod sharded;
mod topk;

use f64math::{exp64, ExpJob, Lse64};
pub use rng::{mix64, stream_key, uniform};
pub use sample::SampleStream;
use sample_row::RowSampler;
pub use sharded::{merge_draws, sharded_draws, sharded_maxima, sharded_sums, VocabSlice};
pub use topk::{compress_topk_slice, TopKStream};

// ----------------------------------------------------------------------- block buffering

/// The memory of the logits of the next block, prefetched while this block is computed (the
/// kernels are compute-bound; this lets the next block's read overlap them).
#[derive(Clone, Copy)]
struct Ahead {
    ptr: *const u8,
    bytes: usize,
}

impl Ahead {
    const NONE: Ahead = Ahead { ptr: std::ptr::null(), bytes: 0 };

    /// The first `len` entries of `next` (or all of them).
    fn of<E>(next: &[E], len: usize) -> Ahead {
        let next = &next[..next.len().min(len)];
        Ahead { ptr: next.as_ptr().cast(), bytes: std::mem::size_of_val(next) }
    }

    /// Prefetch the `i`-th 64-byte line, if the next block has one.
    #[inline(always)]
    fn line(self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        if i * 64 < self.bytes {
            // SAFETY: a prefetch is a hint that never faults; the address is inside `next`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(self.ptr.add(i * 64).cast()) };
        }
    }
}

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

    /// Forget the row (keeping the buffer).
    fn restart(&mut self) {
        self.fill = 0;
        self.seen = 0;
    }

    /// Append `src`, calling `full(block_start, padded block, entries, ahead)` for every
    /// completed block.
    fn push<E: Elem>(&mut self, offset: usize, mut src: &[E], mut full: impl FnMut(usize, &mut [f32], usize, Ahead) -> Result<()>) -> Result<()> {
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
            E::load_scaled(&src[..take], dst, self.inv_t);
            self.fill += take;
            self.seen += take;
            src = &src[take..];
            if self.fill == VOCAB_BLOCK {
                self.fill = 0;
                full(self.seen - VOCAB_BLOCK, &mut self.buf, VOCAB_BLOCK, Ahead::of(src, VOCAB_BLOCK))?;
            }
        }
        Ok(())
    }

    /// Process the partial block, if any.
    fn flush(&mut self, full: &mut impl FnMut(usize, &mut [f32], usize, Ahead) -> Result<()>) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let n = self.fill;
        let padded = n.div_ceil(LANES) * LANES;
        self.buf[n..padded].fill(NEG_INF);
        self.fill = 0;
        full(self.seen - n, &mut self.buf[..padded], n, Ahead::NONE)
    }
}

fn check_num_samples(n: usize) -> Result<()> {
    if n == 0 || n > u32::MAX as usize {
        return Err(KdError::InvalidArgument { name: "num_samples", expected: "an integer in [1, 2^32)".into(), got: n.to_string() });
    }
    Ok(())
}

/// Max and NaN flag of a padded block, and the log-sum-exp of its entries `≤ thr`.
struct BlockScan {
    max: f32,
    nan: bool,
    tail: Lse64,
}

/// `(max, max of the entries ≤ thr, any NaN)` of a padded block, in [`LANES`] lanes.
#[inline(always)]
fn lane_stats(x: &[f32], thr: f32) -> (f32, f32, bool) {
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
    (mx.iter().copied().fold(NEG_INF, f32::max), tmx.iter().copied().fold(NEG_INF, f32::max), nan.iter().any(|&b| b))
}

/// Max and NaN flag of a padded block, compiled per instruction set.
struct MaxJob<'a>(&'a [f32]);

impl Kernel for MaxJob<'_> {
    type Output = (f32, bool);
    #[inline(always)]
    fn run<M: Math>(self) -> (f32, bool) {
        let (max, _, nan) = lane_stats(self.0, NEG_INF);
        (max, nan)
    }
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

// ------------------------------------------------------------------------- batch drivers

/// Rows handed to the thread pool at a time (bounds the per-batch list of row outputs).
const BATCH_ROWS: usize = 1024;

/// Rows of one work item, which share one stream's buffers (a multiple-of-it divides
/// [`BATCH_ROWS`]).
const RUN_ROWS: usize = 16;

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
        let run = RUN_ROWS.saturating_mul(k);
        let mut items: Vec<_> = ids.chunks_mut(run).zip(lp.chunks_mut(run)).zip(tail.chunks_mut(RUN_ROWS)).collect();
        threads::for_each_item(&mut items, num_threads, |i, ((ids, lp), tail)| {
            let r0 = b * BATCH_ROWS + i * RUN_ROWS;
            let mut s = TopKStream::new(k, temperature, isa, r0)?;
            for (j, ((ids, lp), tail)) in ids.chunks_mut(k).zip(lp.chunks_mut(k)).zip(tail.iter_mut()).enumerate() {
                s.restart(r0 + j);
                s.push(0, logits.row(r0 + j))?;
                *tail = s.finish_row(ids, lp)?;
            }
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
        let run = RUN_ROWS.saturating_mul(n);
        let mut items: Vec<_> = ids.chunks_mut(run).zip(lp.chunks_mut(run)).zip(w.chunks_mut(run)).collect();
        threads::for_each_item(&mut items, num_threads, |i, ((ids, lp), w)| {
            let r0 = b * BATCH_ROWS + i * RUN_ROWS;
            let mut s = RowSampler::new(n, temperature, seed, isa)?;
            for (j, ((ids, lp), w)) in ids.chunks_mut(n).zip(lp.chunks_mut(n)).zip(w.chunks_mut(n)).enumerate() {
                let r = r0 + j;
                let next = if r + 1 < rows { logits.row(r + 1) } else { &[] };
                s.row(logits.row(r), row_offset.wrapping_add(r as u64), r, next, ids, lp, w)?;
            }
            Ok(())
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

