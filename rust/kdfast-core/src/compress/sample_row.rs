//! Sampling compression of whole rows (the batch driver): [`RowSampler`].
//!
//! It returns exactly what [`SampleStream`] returns — the same f64 `exp` of every entry, summed
//! in the same order, the same uniforms and the same rule — but organised for speed:
//!
//! 1. per block only its max, its total `S_b = c_last` and a checkpoint of the running sum
//!    every [`SEG`] entries are kept; the running sums of [`GROUP`] blocks are accumulated
//!    together (independent chains of additions interleave, where one chain would wait on
//!    every addition's latency), while the next group's logits are prefetched;
//! 2. the over-the-blocks draws say how many draws `n_b` block `b` contributes; only those
//!    `n_b` uniforms are located, each by a binary search of the block's checkpoints and the
//!    re-summation of one segment from its checkpoint, which reproduces the running sum there
//!    bit for bit. A draw's result depends only on its own target, so the order of the
//!    targets (sorted in [`SampleStream`]) does not matter.

use super::sample::{block_counts, write_picked};
use super::*;

/// Entries per checkpoint of the running sums.
pub(super) const SEG: usize = 16;
/// Checkpoints per block.
pub(super) const SEGS: usize = VOCAB_BLOCK / SEG;
/// Blocks whose running sums are accumulated together.
pub(super) const GROUP: usize = 8;

/// A sampler of whole rows, its buffers reused from row to row.
pub(super) struct RowSampler {
    n: usize,
    inv_t: f32,
    seed: u64,
    isa: Isa,
    /// The scaled logits of one group of blocks, each padded to [`VOCAB_BLOCK`] with −inf.
    buf: Vec<f32>,
    /// Per block: max as f64 (+inf for an empty block, whose weights are all 0).
    max: Vec<f64>,
    /// Per block: log-mass `m_b + ln S_b`.
    lse: Vec<f64>,
    /// Per block and segment: the running sum at the segment's end.
    cps: Vec<f64>,
    cum: Vec<f64>,
    order: Vec<(f64, u32)>,
    counts: Vec<u32>,
    picked: Vec<(f32, u32)>,
}

impl RowSampler {
    pub(super) fn new(n: usize, temperature: f32, seed: u64, isa: Isa) -> Result<RowSampler> {
        check_num_samples(n)?;
        check_temperature(temperature)?;
        let mut s = RowSampler {
            n,
            inv_t: 1.0 / temperature,
            seed,
            isa,
            buf: vec![NEG_INF; GROUP * VOCAB_BLOCK],
            max: Vec::new(),
            lse: Vec::new(),
            cps: Vec::new(),
            cum: Vec::new(),
            order: Vec::new(),
            counts: Vec::new(),
            picked: Vec::new(),
        };
        try_reserve(&mut s.order, n, "num_samples")?;
        try_reserve(&mut s.picked, n, "num_samples")?;
        Ok(s)
    }

    /// The draws of `x` (a whole row) for the random streams of row index `row`; `err_row`
    /// names the row in errors; `next` (the next row, if any) is prefetched at the end.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn row<E: Elem>(&mut self, x: &[E], row: u64, err_row: usize, next: &[E], ids: &mut [i64], logprobs: &mut [f32], weights: &mut [f32]) -> Result<()> {
        if x.is_empty() {
            return Err(empty_row());
        }
        if x.len() > u32::MAX as usize {
            return Err(KdError::InvalidArgument {
                name: "teacher_logits",
                expected: format!("a vocabulary of at most {} entries", u32::MAX),
                got: format!("{} entries", x.len()),
            });
        }
        let blocks = x.len().div_ceil(VOCAB_BLOCK);
        self.max.clear();
        self.lse.clear();
        self.cps.clear();
        try_reserve(&mut self.max, blocks, "teacher_logits")?;
        try_reserve(&mut self.lse, blocks, "teacher_logits")?;
        try_reserve(&mut self.cps, blocks * SEGS, "teacher_logits")?;
        self.cps.resize(blocks * SEGS, 0.0);
        for g0 in (0..blocks).step_by(GROUP) {
            let g1 = (g0 + GROUP).min(blocks);
            let mut m = [f64::INFINITY; GROUP];
            for b in g0..g1 {
                let src = &x[b * VOCAB_BLOCK..((b + 1) * VOCAB_BLOCK).min(x.len())];
                let dst = &mut self.buf[(b - g0) * VOCAB_BLOCK..(b - g0 + 1) * VOCAB_BLOCK];
                E::load_scaled(src, &mut dst[..src.len()], self.inv_t);
                dst[src.len()..].fill(NEG_INF);
                let (max, nan) = self.isa.run(MaxJob(dst));
                check_block(max, nan, err_row)?;
                m[b - g0] = if max == NEG_INF { f64::INFINITY } else { max as f64 };
            }
            let rest = &x[(g1 * VOCAB_BLOCK).min(x.len())..];
            let ahead = Ahead::of(if rest.is_empty() { next } else { rest }, GROUP * VOCAB_BLOCK);
            let used = (g1 - g0) * VOCAB_BLOCK;
            let cps = &mut self.cps[g0 * SEGS..g1 * SEGS];
            let mut sums = [0.0f64; GROUP];
            let out = &mut sums;
            match g1 - g0 {
                1 => self.isa.run(ChainJob::<1> { x: &self.buf[..used], m: [m[0]], start: [0.0], cps, ahead, out }),
                2 => self.isa.run(ChainJob::<2> { x: &self.buf[..used], m: [m[0], m[1]], start: [0.0; 2], cps, ahead, out }),
                3 | 4 => self.isa.run(ChainJob::<4> { x: &self.buf[..4 * VOCAB_BLOCK], m: [m[0], m[1], m[2], m[3]], start: [0.0; 4], cps, ahead, out }),
                _ => self.isa.run(ChainJob::<8> { x: &self.buf, m, start: [0.0; 8], cps, ahead, out }),
            }
            for (b, &c) in (g0..g1).zip(&sums) {
                let mb = m[b - g0];
                self.max.push(mb);
                self.lse.push(if mb == f64::INFINITY { f64::NEG_INFINITY } else { mb + c.ln() });
            }
        }
        let n = self.n;
        let key = stream_key(self.seed, row, BLOCK_SELECT_STREAM);
        let lse_all = block_counts(&self.lse, n, key, &mut self.cum, &mut self.order, &mut self.counts).ok_or_else(|| all_neg_inf(err_row))?;
        self.picked.clear();
        for b in 0..blocks {
            let nb = self.counts[b] as usize;
            if nb == 0 {
                continue;
            }
            let src = &x[b * VOCAB_BLOCK..((b + 1) * VOCAB_BLOCK).min(x.len())];
            let cps = &self.cps[b * SEGS..(b + 1) * SEGS];
            let total = cps[SEGS - 1];
            let key = stream_key(self.seed, row, b as u64);
            self.order.clear();
            self.order.extend((0..nb).map(|j| (uniform(key, j as u64) * total, j as u32)));
            self.order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
            let mut seg = Segment::new();
            for &(t, _) in &self.order {
                let i = seg.locate(src, self.inv_t, self.max[b], cps, t, self.isa);
                self.picked.push((seg.x[i % SEG], (b * VOCAB_BLOCK + i) as u32));
            }
        }
        write_picked(&mut self.picked, lse_all, n, ids, logprobs, weights);
        Ok(())
    }
}

/// The running sums of `G` blocks of `x` (each [`VOCAB_BLOCK`] long) with weights
/// `exp64(x − m_g)`: writes the totals to `out` and the checkpoints (of the first
/// `cps.len() / SEGS` blocks) to `cps`, compiled per instruction set.
pub(super) struct ChainJob<'a, const G: usize> {
    pub(super) x: &'a [f32],
    pub(super) m: [f64; G],
    /// Where each running sum starts (0, or a carry from the vocabulary's previous slice).
    pub(super) start: [f64; G],
    pub(super) cps: &'a mut [f64],
    pub(super) ahead: Ahead,
    pub(super) out: &'a mut [f64; GROUP],
}

impl<const G: usize> Kernel for ChainJob<'_, G> {
    type Output = ();
    #[inline(always)]
    fn run<M: Math>(self) {
        let ChainJob { x, m, start, cps, ahead, out } = self;
        let blocks = cps.len() / SEGS;
        let mut c = start;
        let mut w = [[0.0f64; SEG]; G];
        let lines = (G * VOCAB_BLOCK * 4).div_ceil(64 * SEGS);
        for s in 0..SEGS {
            for l in 0..lines {
                ahead.line(s * lines + l);
            }
            for g in 0..G {
                let xs = &x[g * VOCAB_BLOCK + s * SEG..g * VOCAB_BLOCK + (s + 1) * SEG];
                for i in 0..SEG {
                    w[g][i] = exp64(xs[i] as f64 - m[g]);
                }
            }
            // G independent chains: the same additions, in the same order, as one block alone.
            for i in 0..SEG {
                for g in 0..G {
                    c[g] += w[g][i];
                }
            }
            for g in 0..blocks {
                cps[g * SEGS + s] = c[g];
            }
        }
        out[..G].copy_from_slice(&c);
    }
}

/// One re-summed segment of a block: its scaled logits and running sums.
struct Segment {
    index: usize,
    x: [f32; SEG],
    c: [f64; SEG],
}

impl Segment {
    fn new() -> Segment {
        Segment { index: usize::MAX, x: [NEG_INF; SEG], c: [0.0; SEG] }
    }

    /// The id (within the block `src`) of the first running sum `> t`, or the last entry of
    /// positive weight if rounding leaves none (as [`SampleStream`]'s walk).
    fn locate<E: Elem>(&mut self, src: &[E], inv_t: f32, m: f64, cps: &[f64], t: f64, isa: Isa) -> usize {
        let s = cps.partition_point(|&c| c <= t);
        if s == SEGS {
            let last = (0..src.len().div_ceil(SEG)).rev().find_map(|s| {
                self.load(src, inv_t, m, if s == 0 { 0.0 } else { cps[s - 1] }, s, isa);
                (0..SEG).rev().find(|&i| exp64(self.x[i] as f64 - m) > 0.0).map(|i| s * SEG + i)
            });
            return last.unwrap_or(0);
        }
        self.load(src, inv_t, m, if s == 0 { 0.0 } else { cps[s - 1] }, s, isa);
        s * SEG + self.c.iter().position(|&c| c > t).expect("the segment's last running sum is its checkpoint, > t")
    }

    fn load<E: Elem>(&mut self, src: &[E], inv_t: f32, m: f64, start: f64, s: usize, isa: Isa) {
        if self.index == s {
            return;
        }
        self.index = s;
        let part = &src[(s * SEG).min(src.len())..((s + 1) * SEG).min(src.len())];
        E::load_scaled(part, &mut self.x[..part.len()], inv_t);
        self.x[part.len()..].fill(NEG_INF);
        self.c = isa.run(SegJob { x: &self.x, m, start });
    }
}

/// The running sums of one segment from its starting value, compiled per instruction set (the
/// same flush-to-zero mode as [`ChainJob`]).
pub(super) struct SegJob<'a> {
    pub(super) x: &'a [f32; SEG],
    pub(super) m: f64,
    pub(super) start: f64,
}

impl Kernel for SegJob<'_> {
    type Output = [f64; SEG];
    #[inline(always)]
    fn run<M: Math>(self) -> [f64; SEG] {
        let mut w = [0.0f64; SEG];
        for i in 0..SEG {
            w[i] = exp64(self.x[i] as f64 - self.m);
        }
        let mut c = self.start;
        for wi in w.iter_mut() {
            c += *wi;
            *wi = c;
        }
        w
    }
}
