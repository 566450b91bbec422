//! Sampling compression of a vocabulary sharded across ranks: the draws of [`compress_sample`]
//! from slices of each row, bit for bit.
//!
//! Each rank holds the ids `[offset, offset + len)` of every row (a [`VocabSlice`]). The
//! sampler's per-block quantities are sequential in id order — the block max `m_b`, the running
//! sum `c_i` of `exp64(x_i − m_b)` from 0 and its total `S_b` — and a block may straddle ranks. A
//! rank's part of block `b` therefore continues the running sum where the previous rank's part
//! stopped (its *carry*): the same additions in the same order as one pass, so every `c_i`, `S_b`
//! and draw is identical. Three steps, with the caller's collectives between them:
//!
//! 1. [`sharded_maxima`]: each rank's part maxima per block (and a NaN flag per row); the caller
//!    takes their maximum over the ranks (`m_b` of every block on every rank).
//! 2. [`sharded_sums`]: the running sums of the rank's parts from the carry it received (0 when
//!    its slice starts a block); the carry it hands on; `S_b` of the blocks that end on this rank
//!    and the last id of positive weight of each part. The caller takes the maximum over the
//!    ranks of both (a sum is only written by the block's last rank, an id only by its owner).
//! 3. [`sharded_draws`]: every rank repeats the over-the-blocks draws on the same `(m_b, S_b)`
//!    and locates, among the within-block targets `t = u S_b`, those its part holds: the first
//!    `c_i > t` lies on the rank with `carry ≤ t < c_end`; a target that rounding puts at
//!    `t ≥ S_b` takes the block's last positive-weight id, on its owner. The caller gathers the
//!    ranks' draws and [`merge_draws`] writes the targets, as [`compress_sample`] would.
//!
//! Blocks, uniforms and error rules are those of the module docs; rows of the same call share the
//! random-stream numbering `row_offset + r`.

use super::sample::{block_counts, write_picked};
use super::sample_row::{ChainJob, SegJob, GROUP, SEG, SEGS};
use super::*;
use std::ops::Range;

/// This rank's contiguous slice `[offset, offset + len)` of a vocabulary of `vocab` ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabSlice {
    pub offset: usize,
    pub len: usize,
    pub vocab: usize,
}

impl VocabSlice {
    /// A slice inside a vocabulary of 1 to `u32::MAX` ids.
    pub fn new(offset: usize, len: usize, vocab: usize) -> Result<VocabSlice> {
        if vocab == 0 {
            return Err(empty_row());
        }
        if vocab > u32::MAX as usize {
            return Err(KdError::InvalidArgument {
                name: "teacher_logits",
                expected: format!("a vocabulary of at most {} entries", u32::MAX),
                got: format!("{vocab} entries"),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > vocab) {
            return Err(KdError::InvalidArgument {
                name: "teacher_logits",
                expected: format!("a slice inside a vocabulary of {vocab} ids"),
                got: format!("ids {offset}..{}", offset as u128 + len as u128),
            });
        }
        Ok(VocabSlice { offset, len, vocab })
    }

    /// Blocks of the whole vocabulary.
    pub fn blocks(&self) -> usize {
        self.vocab.div_ceil(VOCAB_BLOCK)
    }

    fn end(&self) -> usize {
        self.offset + self.len
    }

    /// The blocks this slice has a part of.
    fn local_blocks(&self) -> Range<usize> {
        if self.len == 0 {
            return 0..0;
        }
        self.offset / VOCAB_BLOCK..self.end().div_ceil(VOCAB_BLOCK)
    }

    /// The local columns of block `b`'s part.
    fn part(&self, b: usize) -> Range<usize> {
        let lo = (b * VOCAB_BLOCK).max(self.offset);
        let hi = ((b + 1) * VOCAB_BLOCK).min(self.end());
        lo - self.offset..hi - self.offset
    }

    /// Whether block `b` starts on an earlier rank (its running sum starts from the carry).
    fn continues(&self, b: usize) -> bool {
        b * VOCAB_BLOCK < self.offset
    }

    /// Whether block `b` ends on this rank (which then knows its total).
    fn completes(&self, b: usize) -> bool {
        ((b + 1) * VOCAB_BLOCK).min(self.vocab) <= self.end()
    }

    /// Whether this rank receives a carry from the previous one.
    pub fn receives_carry(&self) -> bool {
        !self.offset.is_multiple_of(VOCAB_BLOCK) && self.offset < self.vocab
    }

    /// Whether this rank hands a carry to the next one.
    pub fn sends_carry(&self) -> bool {
        !self.end().is_multiple_of(VOCAB_BLOCK) && self.end() < self.vocab
    }
}

/// Rows of one work item.
const CHUNK: usize = 16;

fn check_slice<E>(logits: &Rows<E>, slice: &VocabSlice) -> Result<()> {
    if logits.cols != slice.len {
        return Err(KdError::ShapeMismatch { what: format!("teacher_logits has {} columns for a slice of {} ids", logits.cols, slice.len) });
    }
    Ok(())
}

/// `buf` (`[rows, per_row]`) cut into the work items' rows: one chunk per [`CHUNK`] rows, also
/// when `per_row` is 0 (a rank without a part of the vocabulary).
fn row_chunks<T>(mut buf: &mut [T], per_row: usize, rows: usize) -> Vec<&mut [T]> {
    let mut out = Vec::with_capacity(rows.div_ceil(CHUNK));
    for r0 in (0..rows).step_by(CHUNK) {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(CHUNK.min(rows - r0) * per_row);
        out.push(head);
        buf = rest;
    }
    out
}

/// Scaled logits of block `b`'s part of `row`, padded with −inf to a whole block.
fn load_part<E: Elem>(row: &[E], slice: &VocabSlice, b: usize, inv_t: f32, buf: &mut [f32; VOCAB_BLOCK]) -> usize {
    let src = &row[slice.part(b)];
    E::load_scaled(src, &mut buf[..src.len()], inv_t);
    buf[src.len()..].fill(NEG_INF);
    src.len()
}

/// Step 1: `maxima` (`[rows, blocks + 1]`) gets each block's part maximum of `x = z / T` (−inf
/// for blocks without a part here) and, in the last column, 1.0 for a row holding a NaN here.
pub fn sharded_maxima<E: Elem>(logits: Rows<E>, slice: VocabSlice, temperature: f32, maxima: &mut [f32], isa: Isa, num_threads: usize) -> Result<()> {
    check_temperature(temperature)?;
    check_slice(&logits, &slice)?;
    let width = slice.blocks() + 1;
    check_len("maxima", maxima.len(), logits.rows * width)?;
    let inv_t = 1.0 / temperature;
    let mut items: Vec<_> = maxima.chunks_mut(CHUNK * width).collect();
    threads::for_each_item(&mut items, num_threads, |i, out| {
        let mut buf = [NEG_INF; VOCAB_BLOCK];
        for (j, m) in out.chunks_mut(width).enumerate() {
            let row = logits.row(i * CHUNK + j);
            m.fill(NEG_INF);
            m[width - 1] = 0.0;
            for b in slice.local_blocks() {
                load_part(row, &slice, b, inv_t, &mut buf);
                let (max, nan) = isa.run(MaxJob(&buf));
                m[b] = max;
                if nan {
                    m[width - 1] = 1.0;
                }
            }
        }
        Ok(())
    })
}

/// Row `r`'s error, if the maxima over all ranks show a NaN or a +inf in it.
fn check_maxima(m: &[f32], r: usize) -> Result<()> {
    let (blocks, nan) = m.split_at(m.len() - 1);
    check_block(blocks.iter().copied().fold(NEG_INF, f32::max), nan[0] != 0.0, r)
}

/// `max` as the block's shift: +inf for a block of −inf only (its weights are then all 0).
fn shift(max: f32) -> f64 {
    if max == NEG_INF {
        f64::INFINITY
    } else {
        max as f64
    }
}

/// Step 2. `maxima`: step 1's, reduced over the ranks; `carry_in` (`[rows]`): the running sum
/// the previous rank handed on (ignored unless [`VocabSlice::receives_carry`]). Writes `sums`
/// (`[rows, 2 · blocks]`): `S_b` of the blocks ending here (else 0), then the last local id of
/// positive weight of each part as a global id (else −1); `carry_out` (`[rows]`); and
/// `checkpoints` (`[rows, checkpoint_len]`): the running sums every [`SEG`] entries of each part,
/// for step 3.
#[allow(clippy::too_many_arguments)]
pub fn sharded_sums<E: Elem>(
    logits: Rows<E>,
    slice: VocabSlice,
    temperature: f32,
    maxima: &[f32],
    carry_in: &[f64],
    sums: &mut [f64],
    carry_out: &mut [f64],
    checkpoints: &mut [f64],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    check_temperature(temperature)?;
    check_slice(&logits, &slice)?;
    let (rows, nb, ncp) = (logits.rows, slice.blocks(), slice.checkpoint_len());
    check_len("maxima", maxima.len(), rows * (nb + 1))?;
    check_len("carry_in", carry_in.len(), rows)?;
    check_len("sums", sums.len(), rows * 2 * nb)?;
    check_len("carry_out", carry_out.len(), rows)?;
    check_len("checkpoints", checkpoints.len(), rows * ncp)?;
    for r in 0..rows {
        check_maxima(&maxima[r * (nb + 1)..(r + 1) * (nb + 1)], r)?;
    }
    let inv_t = 1.0 / temperature;
    let blocks: Vec<usize> = slice.local_blocks().collect();
    let mut items: Vec<_> = row_chunks(sums, 2 * nb, rows).into_iter().zip(row_chunks(carry_out, 1, rows)).zip(row_chunks(checkpoints, ncp, rows)).collect();
    threads::for_each_item(&mut items, num_threads, |i, ((sums, carry_out), cps)| {
        let mut buf = vec![NEG_INF; GROUP * VOCAB_BLOCK];
        for (j, (s, out)) in sums.chunks_mut(2 * nb).zip(carry_out.iter_mut()).enumerate() {
            let r = i * CHUNK + j;
            let (row, m) = (logits.row(r), &maxima[r * (nb + 1)..]);
            let cps = &mut cps[j * ncp..(j + 1) * ncp];
            s[..nb].fill(0.0);
            s[nb..].fill(-1.0);
            *out = carry_in[r];
            for (g0, group) in blocks.chunks(GROUP).enumerate().map(|(k, g)| (k * GROUP, g)) {
                let mut ms = [f64::INFINITY; GROUP];
                let mut starts = [0.0; GROUP];
                for (g, &b) in group.iter().enumerate() {
                    let part: &mut [f32; VOCAB_BLOCK] = (&mut buf[g * VOCAB_BLOCK..(g + 1) * VOCAB_BLOCK]).try_into().expect("one block");
                    load_part(row, &slice, b, inv_t, part);
                    ms[g] = shift(m[b]);
                    starts[g] = if slice.continues(b) { carry_in[r] } else { 0.0 };
                }
                let cps = &mut cps[g0 * SEGS..(g0 + group.len()) * SEGS];
                let mut c = [0.0; GROUP];
                let (totals, ahead) = (&mut c, Ahead::NONE);
                match group.len() {
                    1 => isa.run(ChainJob::<1> { x: &buf, m: [ms[0]], start: [starts[0]], cps, ahead, out: totals }),
                    2 => isa.run(ChainJob::<2> { x: &buf, m: [ms[0], ms[1]], start: [starts[0], starts[1]], cps, ahead, out: totals }),
                    3 | 4 => isa.run(ChainJob::<4> { x: &buf, m: first(&ms), start: first(&starts), cps, ahead, out: totals }),
                    _ => isa.run(ChainJob::<GROUP> { x: &buf, m: ms, start: starts, cps, ahead, out: totals }),
                }
                for (g, &b) in group.iter().enumerate() {
                    let part = &buf[g * VOCAB_BLOCK..g * VOCAB_BLOCK + slice.part(b).len()];
                    if let Some(i) = last_positive(part, ms[g]) {
                        s[nb + b] = (slice.offset + slice.part(b).start + i) as f64;
                    }
                    if slice.completes(b) {
                        s[b] = c[g];
                    } else {
                        *out = c[g];
                    }
                }
            }
        }
        Ok(())
    })
}

impl VocabSlice {
    /// Checkpoints per row that step 2 writes and step 3 reads.
    pub fn checkpoint_len(&self) -> usize {
        self.local_blocks().len() * SEGS
    }
}

fn first<const G: usize>(a: &[f64; GROUP]) -> [f64; G] {
    std::array::from_fn(|g| a[g])
}

/// The last index of positive weight `exp64(x_i − m) > 0` of a part, i.e. `x_i − m ≥ −708`
/// (where [`exp64`] stops flushing to 0; its results there are normal numbers).
fn last_positive(x: &[f32], m: f64) -> Option<usize> {
    x.iter().rposition(|&v| v as f64 - m >= -708.0)
}

/// Step 3. `maxima`, `sums`: steps 1 and 2's, reduced over the ranks; `carry_in` as for step 2;
/// `checkpoints`: step 2's. A target is located by a binary search of its part's checkpoints and
/// the re-summation of one segment, which reproduces the running sums there bit for bit.
/// Writes the draws this rank holds into `picked` (`[rows, n, 2]`: scaled logit and global id,
/// id −1 in unused slots) and each row's log-sum-exp into `lse` (`[rows]`).
#[allow(clippy::too_many_arguments)]
pub fn sharded_draws<E: Elem>(
    logits: Rows<E>,
    slice: VocabSlice,
    num_samples: usize,
    temperature: f32,
    seed: u64,
    row_offset: u64,
    maxima: &[f32],
    sums: &[f64],
    carry_in: &[f64],
    checkpoints: &[f64],
    picked: &mut [f64],
    lse: &mut [f64],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    check_num_samples(num_samples)?;
    check_temperature(temperature)?;
    check_slice(&logits, &slice)?;
    let (rows, nb, n) = (logits.rows, slice.blocks(), num_samples);
    check_len("maxima", maxima.len(), rows * (nb + 1))?;
    check_len("sums", sums.len(), rows * 2 * nb)?;
    check_len("carry_in", carry_in.len(), rows)?;
    let ncp = slice.checkpoint_len();
    check_len("checkpoints", checkpoints.len(), rows * ncp)?;
    check_len("picked", picked.len(), rows * n * 2)?;
    check_len("lse", lse.len(), rows)?;
    let inv_t = 1.0 / temperature;
    let mut items: Vec<_> = picked.chunks_mut(CHUNK * n * 2).zip(lse.chunks_mut(CHUNK)).collect();
    threads::for_each_item(&mut items, num_threads, |i, (picked, lse)| {
        let mut seg = [NEG_INF; SEG];
        let (mut block_lse, mut cum, mut order, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut targets = Vec::new();
        try_reserve(&mut block_lse, nb, "teacher_logits")?;
        try_reserve(&mut order, n, "num_samples")?;
        try_reserve(&mut targets, n, "num_samples")?;
        for (j, (out, lse)) in picked.chunks_mut(n * 2).zip(lse.iter_mut()).enumerate() {
            let r = i * CHUNK + j;
            let (row, m, s) = (logits.row(r), &maxima[r * (nb + 1)..(r + 1) * (nb + 1)], &sums[r * 2 * nb..(r + 1) * 2 * nb]);
            let cps_row = &checkpoints[r * ncp..(r + 1) * ncp];
            let stream_row = row_offset.wrapping_add(r as u64);
            block_lse.clear();
            block_lse.extend((0..nb).map(|b| if m[b] == NEG_INF { f64::NEG_INFINITY } else { m[b] as f64 + s[b].ln() }));
            *lse = block_counts(&block_lse, n, stream_key(seed, stream_row, BLOCK_SELECT_STREAM), &mut cum, &mut order, &mut counts)
                .ok_or_else(|| all_neg_inf(r))?;
            let mut slot = 0;
            let mut put = |x: f32, id: usize| {
                out[2 * slot] = x as f64;
                out[2 * slot + 1] = id as f64;
                slot += 1;
            };
            for (jb, b) in slice.local_blocks().enumerate() {
                let nb_draws = counts[b] as usize;
                if nb_draws == 0 {
                    continue;
                }
                let (total, last, mb) = (s[b], s[nb + b], shift(m[b]));
                let part = slice.part(b);
                let (part0, len) = (slice.offset + part.start, part.len());
                let src = &row[part];
                let cps = &cps_row[jb * SEGS..jb * SEGS + len.div_ceil(SEG)];
                let start = if slice.continues(b) { carry_in[r] } else { 0.0 };
                let key = stream_key(seed, stream_row, b as u64);
                targets.clear();
                targets.extend((0..nb_draws).map(|j| uniform(key, j as u64) * total));
                for &t in &targets {
                    if t >= total {
                        // Rounding put the target at S_b, past every running sum: the block's
                        // last positive-weight id takes it, on the rank that holds it.
                        if last >= part0 as f64 && last < (part0 + len) as f64 {
                            let i = last as usize - part0;
                            E::load_scaled(&src[i..i + 1], &mut seg[..1], inv_t);
                            put(seg[0], last as usize);
                        }
                        continue;
                    }
                    let k = cps.partition_point(|&c| c <= t);
                    if t < start || k == cps.len() {
                        continue; // an earlier or a later rank's part holds it
                    }
                    let xs = &src[k * SEG..((k + 1) * SEG).min(len)];
                    E::load_scaled(xs, &mut seg[..xs.len()], inv_t);
                    seg[xs.len()..].fill(NEG_INF);
                    let from = if k == 0 { start } else { cps[k - 1] };
                    let c = isa.run(SegJob { x: &seg, m: mb, start: from });
                    let i = c.iter().position(|&c| c > t).expect("the segment's last running sum is its checkpoint, > t");
                    put(seg[i], part0 + k * SEG + i);
                }
            }
            out[2 * slot..].chunks_mut(2).for_each(|p| {
                p[0] = f64::NEG_INFINITY;
                p[1] = -1.0;
            });
        }
        Ok(())
    })
}

/// The targets of every row from the draws of all ranks (`picked`, `[rows, m, 2]` as
/// [`sharded_draws`] writes them, concatenated over the ranks, `num_samples` used slots per row)
/// and step 3's `lse`: outputs as [`compress_sample`]'s, `[rows, num_samples]`.
pub fn merge_draws(picked: &[f64], lse: &[f64], num_samples: usize, ids_out: &mut [i64], logprobs_out: &mut [f32], weights_out: &mut [f32]) -> Result<()> {
    check_num_samples(num_samples)?;
    let (rows, n) = (lse.len(), num_samples);
    check_outputs(rows, n, &[("ids", ids_out.len()), ("logprobs", logprobs_out.len()), ("weights", weights_out.len())], None)?;
    if rows == 0 {
        return Ok(());
    }
    let width = picked.len() / rows;
    if width * rows != picked.len() || !width.is_multiple_of(2) {
        return Err(KdError::ShapeMismatch { what: format!("picked has {} elements for {rows} rows of (value, id) pairs", picked.len()) });
    }
    let mut draws: Vec<(f32, u32)> = Vec::new();
    try_reserve(&mut draws, width / 2, "picked")?;
    for r in 0..rows {
        draws.clear();
        for p in picked[r * width..(r + 1) * width].chunks_exact(2) {
            if p[1] >= 0.0 {
                draws.push((p[0] as f32, p[1] as u32));
            }
        }
        if draws.len() != n {
            return Err(KdError::InvalidArgument {
                name: "picked",
                expected: format!("{n} draws in row {r} over the ranks"),
                got: draws.len().to_string(),
            });
        }
        let range = r * n..(r + 1) * n;
        write_picked(&mut draws, lse[r], n, &mut ids_out[range.clone()], &mut logprobs_out[range.clone()], &mut weights_out[range]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The draws of `x` split at `cuts`, every step run per rank with the reductions between.
    fn sharded(x: &[f32], v: usize, rows: usize, cuts: &[usize], n: usize, t: f32, seed: u64) -> Result<(Vec<i64>, Vec<f32>, Vec<f32>)> {
        let isa = Isa::detect();
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(v);
        let slices: Vec<VocabSlice> = bounds.windows(2).map(|w| VocabSlice::new(w[0], w[1] - w[0], v).unwrap()).collect();
        let local: Vec<Vec<f32>> = slices.iter().map(|s| (0..rows).flat_map(|r| x[r * v + s.offset..r * v + s.end()].to_vec()).collect()).collect();
        let rows_of = |k: usize| Rows::new(&local[k], rows, slices[k].len, slices[k].len, "teacher_logits").unwrap();
        let nb = slices[0].blocks();
        let mut maxima = vec![NEG_INF; rows * (nb + 1)];
        for k in 0..slices.len() {
            let mut mine = vec![0.0; rows * (nb + 1)];
            sharded_maxima(rows_of(k), slices[k], t, &mut mine, isa, 2)?;
            maxima.iter_mut().zip(&mine).for_each(|(a, &b)| *a = a.max(b));
        }
        let mut sums = vec![f64::NEG_INFINITY; rows * 2 * nb];
        let mut carries = vec![vec![0.0; rows]];
        let mut cps: Vec<Vec<f64>> = Vec::new();
        for k in 0..slices.len() {
            let (mut mine, mut out) = (vec![0.0; rows * 2 * nb], vec![0.0; rows]);
            cps.push(vec![0.0; rows * slices[k].checkpoint_len()]);
            sharded_sums(rows_of(k), slices[k], t, &maxima, &carries[k], &mut mine, &mut out, &mut cps[k], isa, 2)?;
            sums.iter_mut().zip(&mine).for_each(|(a, &b)| *a = a.max(b));
            carries.push(if slices.get(k + 1).is_some_and(|s| s.receives_carry()) { out } else { vec![0.0; rows] });
        }
        let mut picked = vec![0.0; rows * slices.len() * n * 2];
        let mut lse = vec![0.0; rows];
        for k in 0..slices.len() {
            let mut mine = vec![0.0; rows * n * 2];
            sharded_draws(rows_of(k), slices[k], n, t, seed, 7, &maxima, &sums, &carries[k], &cps[k], &mut mine, &mut lse, isa, 2)?;
            for r in 0..rows {
                let w = slices.len() * n * 2;
                picked[r * w + k * n * 2..r * w + (k + 1) * n * 2].copy_from_slice(&mine[r * n * 2..(r + 1) * n * 2]);
            }
        }
        let (mut ids, mut lp, mut w) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
        merge_draws(&picked, &lse, n, &mut ids, &mut lp, &mut w)?;
        Ok((ids, lp, w))
    }

    fn one_pass(x: &[f32], v: usize, rows: usize, n: usize, t: f32, seed: u64) -> Result<(Vec<i64>, Vec<f32>, Vec<f32>)> {
        let (mut ids, mut lp, mut w) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
        compress_sample(Rows::new(x, rows, v, v, "teacher_logits").unwrap(), n, t, seed, 7, &mut ids, &mut lp, &mut w, Isa::detect(), 1)?;
        Ok((ids, lp, w))
    }

    fn logits(rows: usize, v: usize, seed: u64) -> Vec<f32> {
        (0..rows * v).map(|i| ((uniform(seed, i as u64) - 0.5) * 24.0) as f32).collect()
    }

    #[test]
    fn slices_give_the_one_pass_draws() {
        for (v, cuts) in [(10_000, vec![4096]), (10_000, vec![1000, 5000, 5001]), (9000, vec![3]), (300, vec![100, 100, 250]), (13_000, vec![12_999])] {
            let mut x = logits(5, v, v as u64);
            x[3] = NEG_INF;
            x[v..2 * v].fill(NEG_INF); // row 1: one finite logit, on the last rank
            x[2 * v - 1] = 2.0;
            x[2 * v..2 * v + if v > 4096 { 4096 } else { v / 2 }].fill(NEG_INF); // row 2: an empty first block
            for (n, t) in [(1, 1.0), (50, 0.7), (300, 3.0)] {
                assert_eq!(sharded(&x, v, 5, &cuts, n, t, 11).unwrap(), one_pass(&x, v, 5, n, t, 11).unwrap(), "v={v} cuts={cuts:?} n={n}");
            }
        }
    }

    #[test]
    fn last_positive_is_the_last_positive_weight() {
        for m in [0.0f64, 3.5, -20.25, 700.0] {
            let mut d = -708.0f64 - 1e-9;
            while d < -707.999_999 {
                let v = (d + m) as f32;
                let w = exp64(v as f64 - m);
                assert_eq!(last_positive(&[v], m).is_some(), w > 0.0, "m={m} v={v}");
                d += 1.3e-11;
            }
        }
        assert_eq!(last_positive(&[1.0, NEG_INF, -800.0], 0.0), Some(0));
        assert_eq!(last_positive(&[1.0], f64::INFINITY), None);
    }

    #[test]
    fn bad_rows_fail_as_one_pass() {
        let v = 5000;
        let mut x = logits(3, v, 1);
        x[v + 4500] = f32::NAN;
        assert_eq!(sharded(&x, v, 3, &[4200], 4, 1.0, 0).unwrap_err(), one_pass(&x, v, 3, 4, 1.0, 0).unwrap_err());
        let mut x = logits(3, v, 1);
        x[2 * v..].fill(NEG_INF);
        assert_eq!(sharded(&x, v, 3, &[10], 4, 1.0, 0).unwrap_err(), one_pass(&x, v, 3, 4, 1.0, 0).unwrap_err());
        assert!(VocabSlice::new(10, 5, 12).is_err());
        assert!(VocabSlice::new(0, 0, 0).is_err());
    }
}
