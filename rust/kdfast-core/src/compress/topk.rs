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

