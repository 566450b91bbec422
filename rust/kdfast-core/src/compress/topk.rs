//! Top-k compression of one row: [`TopKStream`].

use super::*;

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
    /// Candidates as [`rank_key`]s.
    cand: Vec<u64>,
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
            // Grown block by block in `topk_block`: at most `2 min(k, V) + 16 + VOCAB_BLOCK` entries.
            cand: Vec::new(),
            thr: NEG_INF,
            tail: Lse64::EMPTY,
        })
    }

    /// Append the logits of ids `offset .. offset + logits.len()`; `offset` must be the number of
    /// logits pushed so far. After an error the stream must be dropped.
    pub fn push<E: Elem>(&mut self, offset: usize, logits: &[E]) -> Result<()> {
        let TopKStream { k, isa, row, blocks, cand, thr, tail } = self;
        blocks.push(offset, logits, |start, x, n, ahead| topk_block(*k, *isa, *row, cand, thr, tail, start, x, n, ahead))
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
        self.finish_row(ids, logprobs)
    }

    /// Start row `row` afresh, keeping the buffers (the batch driver's streams serve many rows).
    pub(super) fn restart(&mut self, row: usize) {
        self.row = row;
        self.blocks.restart();
        self.cand.clear();
        self.thr = NEG_INF;
        self.tail = Lse64::EMPTY;
    }

    /// [`TopKStream::finish`] without consuming the stream (call [`TopKStream::restart`] next).
    pub(super) fn finish_row(&mut self, ids: &mut [i64], logprobs: &mut [f32]) -> Result<f32> {
        check_slots("ids", ids.len(), self.k)?;
        check_slots("logprobs", logprobs.len(), self.k)?;
        let TopKStream { k, isa, row, blocks, cand, thr, tail } = self;
        blocks.flush(&mut |start, x, n, ahead| topk_block(*k, *isa, *row, cand, thr, tail, start, x, n, ahead))?;
        if blocks.seen == 0 {
            return Err(empty_row());
        }
        if cand.is_empty() {
            return Err(all_neg_inf(*row));
        }
        select(*k, cand, tail);
        cand.sort_unstable_by(|a, b| b.cmp(a));
        let x0 = key_value(cand[0]) as f64;
        let top = Lse64 { max: x0, sum: cand.iter().map(|&c| exp64(key_value(c) as f64 - x0)).sum() };
        let lse = top.merge(*tail).ln();
        for (i, (id, lp)) in ids.iter_mut().zip(logprobs.iter_mut()).enumerate() {
            (*id, *lp) = match cand.get(i) {
                Some(&c) => (key_id(c) as i64, (key_value(c) as f64 - lse) as f32),
                None => (-1, NEG_INF),
            };
        }
        Ok((tail.ln() - lse).min(0.0) as f32)
    }
}

impl TopKStream {
    /// For a slice of a vocabulary sharded across ranks: write this slice's best `k` ids (plus
    /// `offset`; −1 in unused slots) with their scaled logits `x` (−inf), best first, and return
    /// the log-sum-exp statistics `(max, sum)` of every other entry (`(−inf, 0)` if none). The
    /// ranks' lists and statistics merge into the whole row's top-k and tail. A slice that is
    /// empty or entirely −inf is not an error here (another slice may hold the row's mass).
    pub(super) fn finish_slice(&mut self, offset: usize, ids: &mut [i64], xs: &mut [f32]) -> Result<(f64, f64)> {
        check_slots("ids", ids.len(), self.k)?;
        check_slots("values", xs.len(), self.k)?;
        let TopKStream { k, isa, row, blocks, cand, thr, tail } = self;
        blocks.flush(&mut |start, x, n, ahead| topk_block(*k, *isa, *row, cand, thr, tail, start, x, n, ahead))?;
        select(*k, cand, tail);
        cand.sort_unstable_by(|a, b| b.cmp(a));
        for (i, (id, x)) in ids.iter_mut().zip(xs.iter_mut()).enumerate() {
            (*id, *x) = match cand.get(i) {
                Some(&c) => ((key_id(c) as usize + offset) as i64, key_value(c)),
                None => (-1, NEG_INF),
            };
        }
        Ok((tail.max, tail.sum))
    }
}

/// [`TopKStream::finish_slice`] for every row of `logits`, this rank's columns
/// `offset .. offset + cols` of the vocabulary: `ids_out`/`values_out` `[rows, k]`, and
/// `stats_out` `[rows, 3]`: the tail's `(max, sum)` and a status, 0, or 1 for a row holding
/// +inf and 2 for NaN (reported, not raised, so that every rank can raise together).
#[allow(clippy::too_many_arguments)]
pub fn compress_topk_slice<E: Elem>(
    logits: Rows<E>,
    k: usize,
    temperature: f32,
    offset: usize,
    ids_out: &mut [i64],
    values_out: &mut [f32],
    stats_out: &mut [f64],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    let rows = logits.rows;
    TopKStream::new(k, temperature, isa, 0)?;
    check_outputs(rows, k, &[("ids", ids_out.len()), ("values", values_out.len())], None)?;
    check_outputs(rows, 3, &[("stats", stats_out.len())], None)?;
    let run = RUN_ROWS.saturating_mul(k);
    let mut items: Vec<_> = ids_out.chunks_mut(run).zip(values_out.chunks_mut(run)).zip(stats_out.chunks_mut(3 * RUN_ROWS)).collect();
    threads::for_each_item(&mut items, num_threads, |i, ((ids, xs), stats)| {
        let r0 = i * RUN_ROWS;
        let mut s = TopKStream::new(k, temperature, isa, r0)?;
        for (j, ((ids, xs), st)) in ids.chunks_mut(k).zip(xs.chunks_mut(k)).zip(stats.chunks_mut(3)).enumerate() {
            s.restart(r0 + j);
            let done = s.push(0, logits.row(r0 + j)).and_then(|()| s.finish_slice(offset, ids, xs));
            match done {
                Ok((max, sum)) => st.copy_from_slice(&[max, sum, 0.0]),
                Err(KdError::NonFiniteRow { detail, .. }) => {
                    ids.fill(-1);
                    xs.fill(NEG_INF);
                    st.copy_from_slice(&[f64::NEG_INFINITY, 0.0, if detail.contains("NaN") { 2.0 } else { 1.0 }]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// The candidate `(x, id)` as one integer whose order is the rank order ([`by_rank`]: larger
/// `x` first, then lower id): `x`'s bits mapped monotonically (as `f32::total_cmp` orders them)
/// above `!id`. Selections compare single integers.
#[inline(always)]
fn rank_key(x: f32, id: u32) -> u64 {
    let b = x.to_bits();
    let o = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    ((o as u64) << 32) | (!id) as u64
}

#[inline]
fn key_value(key: u64) -> f32 {
    let o = (key >> 32) as u32;
    f32::from_bits(if o >> 31 == 1 { o & 0x7FFF_FFFF } else { !o })
}

#[inline]
fn key_id(key: u64) -> u32 {
    !(key as u32)
}

/// Candidates kept before a selection: a selection runs once `k` more than `k` have gathered
/// (amortised O(1) per candidate), raising `θ` to the k-th best.
#[inline]
fn select_at(k: usize) -> usize {
    k.saturating_mul(2).max(k + 16)
}

/// Keep the best `k` of `cand` (if it holds more) and add the others to the tail.
fn select(k: usize, cand: &mut Vec<u64>, tail: &mut Lse64) {
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        *tail = tail.merge(Lse64::of(cand[k..].iter().map(|&c| key_value(c))));
        cand.truncate(k);
    }
}

/// A lower bound of the k-th largest of `x` (`k ≤ 256`), as the threshold "`x > θ` may be in
/// the top k" of a row's first block: the k-th largest of the maxima of the `4k` groups
/// `{j, j + 4k, j + 8k, …}` of at least 4 entries each (k distinct entries are ≥ it), moved one
/// float down so that entries equal to it stay candidates. `-inf` (no bound) when fewer than k
/// groups have a finite max, or the bound is not a normal float (the kernels compare with
/// denormals flushed to zero). On LLM-like rows ~2k entries of a block pass it.
fn first_bound(x: &[f32], k: usize) -> f32 {
    let g = 4 * k;
    let rows = x.len() / g.max(1);
    if rows < 4 || k > 256 {
        return NEG_INF;
    }
    let mut gm = [NEG_INF; 1024];
    let gm = &mut gm[..g];
    for r in x[..rows * g].chunks_exact(g) {
        for (m, &v) in gm.iter_mut().zip(r) {
            *m = if v > *m { v } else { *m };
        }
    }
    let (_, &mut b, _) = gm.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    if b.is_finite() && b.abs() >= 1e-30 {
        b.next_down()
    } else {
        NEG_INF
    }
}

/// One block of the top-k sweep, compiled per instruction set: pass 1 finds the block's max,
/// NaN flag and the max of the entries `≤ θ`; pass 2 sums `exp(x − tail max)` of the entries
/// `≤ θ` in f32 lanes and appends the entries `> θ` to `cand` (whose capacity the caller
/// reserved), while prefetching the next block.
struct TopkJob<'a> {
    x: &'a [f32],
    start: usize,
    thr: f32,
    cand: &'a mut Vec<u64>,
    ahead: Ahead,
}

impl Kernel for TopkJob<'_> {
    type Output = BlockScan;
    #[inline(always)]
    fn run<M: Math>(self) -> BlockScan {
        let TopkJob { x, start, thr, cand, ahead } = self;
        let (max, tmax, nan) = lane_stats(x, thr);
        if nan || max == f32::INFINITY {
            return BlockScan { max, nan, tail: Lse64::EMPTY };
        }
        let tail = match (tmax > NEG_INF, max > thr) {
            (true, false) => sweep::<M, true, false>(x, start, thr, tmax, cand, ahead),
            (true, true) => sweep::<M, true, true>(x, start, thr, tmax, cand, ahead),
            (false, true) => sweep::<M, false, true>(x, start, thr, tmax, cand, ahead),
            (false, false) => Lse64::EMPTY,
        };
        BlockScan { max, nan, tail }
    }
}

/// Pass 2 of [`TopkJob`]: the tail sum (`TAIL`) and the candidates (`CAND`).
#[inline(always)]
fn sweep<M: Math, const TAIL: bool, const CAND: bool>(x: &[f32], start: usize, thr: f32, tmax: f32, cand: &mut Vec<u64>, ahead: Ahead) -> Lse64 {
    let mut acc = [0.0f32; LANES];
    for (ci, c) in x.chunks_exact(LANES).enumerate() {
        ahead.line(ci);
        if TAIL {
            for l in 0..LANES {
                // ≤ 1 where it counts (x ≤ θ); the clamp's e^-87 for −inf entries is far
                // below the f32 rounding of the lane sums, whose largest term is 1.
                let e = M::exp_clamped(c[l] - tmax);
                acc[l] += if c[l] <= thr { e } else { 0.0 };
            }
        }
        if CAND {
            // Most chunks hold no candidate once θ has risen: test a chunk at a time.
            if c.iter().fold(false, |any, &v| any | (v > thr)) {
                push_candidates(cand, c, start + ci * LANES, thr);
            }
        }
    }
    if TAIL {
        Lse64 { max: tmax as f64, sum: acc.iter().map(|&a| a as f64).sum() }
    } else {
        Lse64::EMPTY
    }
}

/// Append the entries `> thr` of a chunk (outside the vectorised loop, which it would spill).
#[cold]
#[inline(never)]
fn push_candidates(cand: &mut Vec<u64>, chunk: &[f32], first: usize, thr: f32) {
    let mut mask = chunk.iter().enumerate().fold(0u32, |m, (l, &v)| m | (((v > thr) as u32) << l));
    while mask != 0 {
        let l = mask.trailing_zeros() as usize;
        cand.push(rank_key(chunk[l], (first + l) as u32));
        mask &= mask - 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn topk_block(
    k: usize,
    isa: Isa,
    row: usize,
    cand: &mut Vec<u64>,
    thr: &mut f32,
    tail: &mut Lse64,
    start: usize,
    x: &mut [f32],
    n: usize,
    ahead: Ahead,
) -> Result<()> {
    if *thr == NEG_INF && cand.is_empty() {
        *thr = first_bound(&x[..n], k);
    }
    let before = cand.len();
    try_reserve(cand, n, "k")?;
    let s = isa.run(TopkJob { x, start, thr: *thr, cand, ahead });
    check_block(s.max, s.nan, row)?;
    *tail = tail.merge(s.tail);
    if cand.len() > select_at(k) || (cand.len() >= k && (before < k || *thr == NEG_INF)) {
        select(k, cand, tail);
        *thr = cand.iter().map(|&c| key_value(c)).fold(f32::INFINITY, f32::min);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_keys_order_as_by_rank() {
        let xs = [NEG_INF, -1e30, -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, 3.0, 7e30, f32::INFINITY];
        let mut pairs: Vec<(f32, u32)> = Vec::new();
        for (i, &x) in xs.iter().enumerate() {
            for id in [0u32, 1, 77, u32::MAX - 1] {
                pairs.push((x, id.wrapping_add(i as u32)));
            }
        }
        for a in &pairs {
            assert_eq!(key_value(rank_key(a.0, a.1)).to_bits(), a.0.to_bits());
            assert_eq!(key_id(rank_key(a.0, a.1)), a.1);
            for b in &pairs {
                assert_eq!(rank_key(b.0, b.1).cmp(&rank_key(a.0, a.1)), by_rank(a, b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn first_bound_is_below_the_kth_largest() {
        let x: Vec<f32> = (0..4096).map(|i| ((i as u64 * 2_654_435_761) % 10_007) as f32 * 0.01 - 40.0).collect();
        for k in [1usize, 5, 64, 256, 1000] {
            let b = first_bound(&x, k);
            let mut s = x.clone();
            s.sort_by(|a, b| b.total_cmp(a));
            assert!(b < s[k - 1], "k {k}: bound {b} vs k-th {}", s[k - 1]);
            assert_eq!(b == NEG_INF, k > 256);
        }
        let mut y = vec![NEG_INF; 64];
        y[3] = 1.0;
        assert_eq!(first_bound(&y, 2), NEG_INF);
        y[9] = 2.0;
        assert_eq!(first_bound(&y, 2), 1.0f32.next_down());
    }
}
