//! Sampling compression of one row: [`SampleStream`].

use super::*;

// ---------------------------------------------------------------------------- sampling

/// Streaming sampling compressor of one row (see the module docs).
pub struct SampleStream {
    n: usize,
    isa: Isa,
    seed: u64,
    row: u64,
    /// The row number named in errors (the batch driver's, not the stream key's).
    pub(super) err_row: usize,
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
        blocks.push(offset, logits, |start, x, len, _| state.block(*n, *isa, *seed, *row, *err_row, start, x, len))
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
        blocks.flush(&mut |start, x, len, _| state.block(n, *isa, *seed, *row, *err_row, start, x, len))?;
        if blocks.seen == 0 {
            return Err(empty_row());
        }
        let mut counts = Vec::new();
        let lse_all = block_counts(&state.lse, n, stream_key(*seed, *row, BLOCK_SELECT_STREAM), &mut state.cum, &mut state.order, &mut counts)
            .ok_or_else(|| all_neg_inf(*err_row))?;
        let mut picked: Vec<(f32, u32)> = Vec::new();
        try_reserve(&mut picked, n, "num_samples")?;
        for (b, &m) in counts.iter().enumerate() {
            picked.extend_from_slice(&state.draws[b * n..b * n + m as usize]);
        }
        write_picked(&mut picked, lse_all, n, ids, logprobs, weights);
        Ok(())
    }
}

/// The over-the-blocks draws of a row from its block log-masses `lse`: `counts[b]` = the draws
/// block `b` contributes, and the row's log-sum-exp (`None` when every block is empty).
pub(super) fn block_counts(lse: &[f64], n: usize, key: u64, cum: &mut Vec<f64>, order: &mut Vec<(f64, u32)>, counts: &mut Vec<u32>) -> Option<f64> {
    let top = lse.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return None;
    }
    // Running sum of the block masses and the N over-the-blocks draws.
    let mut c = 0.0f64;
    let mut last = 0usize;
    cum.clear();
    for (b, &l) in lse.iter().enumerate() {
        let w = exp64(l - top);
        c += w;
        if w > 0.0 {
            last = b;
        }
        cum.push(c);
    }
    counts.clear();
    counts.resize(lse.len(), 0);
    walk(cum, c, last, key, n, order, |_, b| counts[b] += 1);
    Some(top + c.ln())
}

/// Sort the `picked` draws (scaled logit, id) best first and write the distinct ids with their
/// log-probabilities and weights `count / n`, padding the `n` slots.
pub(super) fn write_picked(picked: &mut [(f32, u32)], lse_all: f64, n: usize, ids: &mut [i64], logprobs: &mut [f32], weights: &mut [f32]) {
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
        let (max, nan) = isa.run(MaxJob(padded));
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

