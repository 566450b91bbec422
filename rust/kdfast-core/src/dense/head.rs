//! AKL's head: the teacher's top ids by mass, selected inside the streaming passes.
//!
//! The definition: order the ids by `p` descending, lower id first among equal `p`; the head is
//! every id whose cumulative mass (f64) up to and including itself is `≤ h`, plus always the
//! first id, where `h = head_mass + 2⁻²⁰` ([`HEAD_TOLERANCE`], as every backend: a boundary
//! that holds exactly, e.g. a uniform teacher at `head_mass = k/V`, is not left to the rounding
//! of `p` and of its sums). `h ≥ 1` is the whole row without a search: in exact arithmetic
//! every cumulative mass is `≤ Σ p = 1`, and how far the f32 `p` of a long row sum above 1 must
//! not decide it (`head_mass = 1` is forward KL). As the cumulative mass only grows, the head is
//! a prefix of that order, described by its end: a [`Cut`]. Finding it needs no sort of the row.
//!
//! **Radix selection on the bits of `p`.** For `p ≥ 0` (never NaN) the f32 bit pattern orders
//! like the value, and `p < 2`, so the key has 30 bits: three 10-bit digits. A histogram holds
//! the f64 mass of the candidates per value of the next digit:
//! 1. pass 2 of the kernel fills the histogram of the top digit ([`Head::add_block`], on each
//!    block while it is in L1); walking it from the top finds the bucket where the cumulative
//!    mass first exceeds `h`, and `above`, the mass of the buckets before it (all in the head);
//! 2. one filter pass over the stored `p` row ([`filter`]: a SIMD compare per 16 columns, a
//!    scalar step only for the candidates) collects the bucket's members: when at most
//!    [`GATHER`] of them, as `(p, id)` keys that are sorted (p descending, id ascending) and
//!    walked from `above`, which ends the search; else it histograms their next digit, and the
//!    walk narrows the prefix by one digit;
//! 3. after three digits the candidates share one value `x`: ties, taken in id order. The first
//!    `j` of them are in the head, `j` counted by adding `x` to `above` one tie at a time (the
//!    cumulative sum of the definition, so `j` matches it exactly), and the `(j + 1)`-th tie's id
//!    ends the head (from the gathered ids, or one more pass that stops there).
//!
//! So a row costs 1 to 3 filter passes (1 unless more than [`GATHER`] ids share the crossing
//! bucket, whose values then lie within a factor 1.125 of each other), at most one search for a
//! tie's id, O(V) work in all, and a fixed scratch: a 1024-bucket histogram and [`GATHER`] keys
//! (12 KiB on the stack).
//!
//! **Pruning.** Ids with `p < τ = (1 − h) / (2V)` cannot hold the crossing: they number at most
//! V and so weigh less than `(1 − h) / 2`, leaving more than `h` above them. Pass 2 histograms
//! only `p ≥ τ` (for a peaked teacher most of the row is skipped 16 columns at a time); should
//! that mass not exceed `h` after all (rounding of `Σ p`, `h` near 1), one filter pass adds the
//! rest and the selection starts over. Ids below `τ` that share the crossing bucket are
//! candidates of step 2 like the others (the filter passes read every id).
//!
//! **Exactness.** Every decision is the definition's `c + p > h` with f64 masses of the kernel's
//! f32 `p`; the order inside the crossing bucket is the definition's, ties included. The only
//! difference from a sort and a cumulative sum is the order in which the masses *above* the
//! crossing are added (per bucket, in id order), which can move a decision only where the
//! cumulative mass lies within f64 rounding (≈ V·2⁻⁵³) of `h`, which the tolerance keeps away
//! from every boundary that holds exactly.

use super::BLOCK;
use crate::stats::LANES;

/// Buckets per digit (10 bits).
const BUCKETS: usize = 1 << DIGIT;
const DIGIT: u32 = 10;
/// Shift of the top digit: `p < 2` has `bits < 2³⁰`.
const TOP: u32 = 2 * DIGIT;
/// Added to `head_mass` to give the bound `h` of the cumulative masses (kdfast.reference's
/// `HEAD_TOLERANCE`).
pub const HEAD_TOLERANCE: f64 = 1.0 / (1u64 << 20) as f64;
/// Candidates of a bucket that are sorted directly instead of refined by one more digit.
pub(super) const GATHER: usize = 512;

/// The end of the head: id `i` is in it when `p_i > p` or (`p_i == p` and `i < id`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Cut {
    pub p: f32,
    pub id: u32,
}

/// The selection's state: the histogram of the current digit and the pruning threshold.
pub(super) struct Head {
    hist: [f64; BUCKETS],
    h: f64,
    /// `τ` (see the module docs); 0 disables the pruning.
    floor: f32,
    /// `h ≥ 1`: the head is the whole row.
    whole: bool,
}

/// `(p bits, id)` as one integer that sorts like (p ascending, id descending).
#[inline(always)]
fn key(bits: u32, id: usize) -> u64 {
    ((bits as u64) << 32) | (u32::MAX - id as u32) as u64
}

#[inline(always)]
fn key_id(k: u64) -> u32 {
    u32::MAX - k as u32
}

impl Head {
    pub fn new(head_mass: f32, v: usize) -> Self {
        let h = head_mass as f64 + HEAD_TOLERANCE;
        Head { hist: [0.0; BUCKETS], h, floor: ((1.0 - h).max(0.0) / (2.0 * v as f64)) as f32, whole: h >= 1.0 }
    }

    /// Pass 2: histogram the top digit of one block's `p` (padding entries are 0 and add 0).
    #[inline(always)]
    pub fn add_block(&mut self, p: &[f32]) {
        if self.whole {
            return;
        }
        let floor = self.floor;
        for c in p.chunks_exact(LANES) {
            if !c.iter().fold(false, |any, &x| any | (x >= floor)) {
                continue;
            }
            for &x in c {
                if x >= floor {
                    self.hist[((x.to_bits() >> TOP) as usize).min(BUCKETS - 1)] += x as f64;
                }
            }
        }
    }

    /// The head's end, from the histogram of pass 2 and the row's `p` (column `i` at `p[i]`, `p`
    /// zero from `v` up to a multiple of [`LANES`]).
    pub fn select(mut self, p: &[f32], v: usize) -> Cut {
        let mut buf = [0u64; GATHER];
        let everything = Cut { p: 0.0, id: u32::MAX };
        if self.whole {
            return everything;
        }
        let mut crossing = self.walk(0.0);
        if crossing.is_none() && self.floor > 0.0 {
            filter(p, v, 0, self.floor.to_bits(), Some(TOP), &mut self.hist, &mut buf);
            crossing = self.walk(0.0);
        }
        let Some((mut prefix, mut above)) = crossing else {
            return everything;
        };
        let mut shift = TOP;
        loop {
            let lo = (prefix as u32) << shift;
            let next = shift.checked_sub(DIGIT);
            self.hist.fill(0.0);
            let count = filter(p, v, lo, lo + (1 << shift), next, &mut self.hist, &mut buf);
            if count <= GATHER {
                return self.finish(&mut buf[..count], above, lo);
            }
            let Some(next) = next else {
                return self.ties(p, v, lo, count, &buf, above);
            };
            // None only if the digits' sums round below the bucket's: the whole bucket is in.
            let Some((b, a)) = self.walk(above) else {
                return Cut { p: f32::from_bits(lo), id: u32::MAX };
            };
            (prefix, above, shift) = ((prefix << DIGIT) | b, a, next);
        }
    }

    /// The first bucket (from the top) where the cumulative mass from `above` exceeds `h`, with
    /// the mass before it.
    fn walk(&self, above: f64) -> Option<(usize, f64)> {
        let mut c = above;
        for b in (0..BUCKETS).rev() {
            let m = self.hist[b];
            if m > 0.0 {
                if c + m > self.h {
                    return Some((b, c));
                }
                c += m;
            }
        }
        None
    }

    /// The cut among all candidates of the crossing bucket (`keys`, in id order), whose values
    /// start at the bits `lo`.
    fn finish(&self, keys: &mut [u64], above: f64, lo: u32) -> Cut {
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let mut c = above;
        for (k, &key) in keys.iter().enumerate() {
            let p = f32::from_bits((key >> 32) as u32);
            let next = c + p as f64;
            // `above == 0`: nothing precedes this bucket, so its first id is the row's first.
            if next > self.h && !(k == 0 && above == 0.0) {
                return Cut { p, id: key_id(key) };
            }
            c = next;
        }
        Cut { p: f32::from_bits(lo), id: u32::MAX }
    }

    /// The cut among `count` ties of the value with bits `bits`, the first [`GATHER`] of them
    /// (in id order) in `keys`.
    fn ties(&self, p: &[f32], v: usize, bits: u32, count: usize, keys: &[u64], above: f64) -> Cut {
        let x = f32::from_bits(bits);
        let (mut c, mut j) = (above, 0);
        while j < count && (c + x as f64 <= self.h || (j == 0 && above == 0.0)) {
            c += x as f64;
            j += 1;
        }
        let id = if j == count {
            u32::MAX
        } else if j < GATHER {
            key_id(keys[j])
        } else {
            // The (j + 1)-th tie in id order.
            let col = p[..v].iter().enumerate().filter(|(_, q)| q.to_bits() == bits).nth(j).map_or(v, |(i, _)| i);
            col as u32
        };
        Cut { p: x, id }
    }
}

/// One pass over `p[..v]` for the candidates `lo ≤ bits(p_i) < hi`: histogram their digit at
/// `digit` (when given) and keep the first [`GATHER`] keys in id order; returns their count.
fn filter(p: &[f32], v: usize, lo: u32, hi: u32, digit: Option<u32>, hist: &mut [f64; BUCKETS], keys: &mut [u64; GATHER]) -> usize {
    // For p ≥ 0 comparing values is comparing bits, and vectorises on every ISA.
    let (flo, fhi) = (f32::from_bits(lo), f32::from_bits(hi));
    let mut count = 0;
    for (c, chunk) in p[..v.div_ceil(LANES) * LANES].chunks_exact(LANES).enumerate() {
        if !chunk.iter().fold(false, |any, &x| any | ((x >= flo) & (x < fhi))) {
            continue;
        }
        for (l, &x) in chunk.iter().enumerate() {
            let (bits, i) = (x.to_bits(), c * LANES + l);
            if bits < lo || bits >= hi || i >= v {
                continue;
            }
            if let Some(s) = digit {
                hist[((bits >> s) as usize) & (BUCKETS - 1)] += x as f64;
            }
            if count < GATHER {
                keys[count] = key(bits, i);
            }
            count += 1;
        }
    }
    count
}

/// `(g_H, g_T)`: the sums of `|p − q|` over the head and the tail, in f32 lanes per block and
/// f64 across blocks (exactly 0 where every gap is 0).
#[inline(always)]
pub(super) fn gaps(q: &[f32], p: &[f32], v: usize, cut: Cut) -> (f64, f64) {
    let (mut gh, mut gt) = (0.0f64, 0.0f64);
    for start in (0..v).step_by(BLOCK) {
        let n = (v - start).min(BLOCK).div_ceil(LANES) * LANES;
        let mut acc_h = [0.0f32; LANES];
        let mut acc_t = [0.0f32; LANES];
        for (c, (qc, pc)) in q[start..start + n].chunks_exact(LANES).zip(p[start..start + n].chunks_exact(LANES)).enumerate() {
            let base = (start + c * LANES) as u32;
            for l in 0..LANES {
                let gap = (pc[l] - qc[l]).abs();
                let head = (pc[l] > cut.p) | ((pc[l] == cut.p) & (base + (l as u32) < cut.id));
                acc_h[l] += if head { gap } else { 0.0 };
                acc_t[l] += if head { 0.0 } else { gap };
            }
        }
        gh += acc_h.iter().map(|&x| x as f64).sum::<f64>();
        gt += acc_t.iter().map(|&x| x as f64).sum::<f64>();
    }
    (gh, gt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: a stable sort by p descending and an f64 cumulative sum.
    fn by_sort(p: &[f32], head_mass: f32) -> Vec<bool> {
        let h = head_mass as f64 + HEAD_TOLERANCE;
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
        let mut head = vec![false; p.len()];
        let mut c = 0.0f64;
        for (k, &i) in order.iter().enumerate() {
            c += p[i] as f64;
            head[i] = c <= h || k == 0 || h >= 1.0;
        }
        head
    }

    fn by_selection(p: &[f32], h: f32) -> Vec<bool> {
        let v = p.len();
        let mut row = p.to_vec();
        row.resize(v.div_ceil(BLOCK) * BLOCK, 0.0);
        let mut head = Head::new(h, v);
        for block in row.chunks(BLOCK) {
            head.add_block(block);
        }
        let cut = head.select(&row, v);
        (0..v).map(|i| p[i] > cut.p || (p[i] == cut.p && (i as u32) < cut.id)).collect()
    }

    /// Normalised weights from integers (so that masses are exact and ties are real).
    fn probs(w: &[u32]) -> Vec<f32> {
        let s: u64 = w.iter().map(|&x| x as u64).sum();
        w.iter().map(|&x| (x as f64 / s as f64) as f32).collect()
    }

    #[test]
    fn selection_equals_sort_definition() {
        let mut state = 12345u64;
        let mut rnd = |m: u32| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as u32) % m
        };
        let hs = [0.0f32, 1e-3, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0];
        for &v in &[1usize, 2, 3, 17, 1000, 1500, 5000] {
            for kind in 0..6 {
                let w: Vec<u32> = (0..v)
                    .map(|i| match kind {
                        0 => 1,                             // uniform: all ties
                        1 => 1 + (i % 7) as u32,            // few values, many ties
                        2 => 1 + rnd(1 << 20),              // nearly distinct
                        3 => if i % 97 == 3 { 1 << 20 } else { rnd(3) }, // peaked, zeros
                        4 => (1 << 12) + rnd(16),           // one dense bucket: > GATHER candidates
                        _ => if i < 2 { 1 << 22 } else { 1 + (i % 3) as u32 },
                    })
                    .collect();
                let w = if w.iter().all(|&x| x == 0) { vec![1; v] } else { w };
                let p = probs(&w);
                for &h in &hs {
                    assert_eq!(by_selection(&p, h), by_sort(&p, h), "V={v} kind {kind} h={h}");
                }
            }
        }
    }

    #[test]
    fn more_ties_than_gathered() {
        // 3000 equal values cross at h = 0.5 after the 2048th, beyond GATHER (and in the
        // gathered range for h = 0.1); 0.7324 and 0.7325 are either side of the whole row.
        let p = vec![1.0f32 / 4096.0; 3000];
        for h in [0.1f32, 0.5, 0.7324, 0.7325] {
            assert_eq!(by_selection(&p, h), by_sort(&p, h), "h={h}");
        }
        // Exact boundaries: a uniform teacher at k / V keeps k ids, whatever the rounding.
        for (v, k) in [(3000usize, 1500usize), (1000, 300), (7, 3)] {
            let p = vec![(1.0 / v as f64) as f32; v];
            let kept = by_selection(&p, (k as f64 / v as f64) as f32).iter().filter(|&&x| x).count();
            assert_eq!(kept, k, "V={v}");
        }
    }
}
