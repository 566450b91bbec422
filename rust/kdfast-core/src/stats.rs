//! Per-row softmax statistics: the running maximum and the sum of exponentials below it.
//!
//! `LseStats` of vocabulary slices merge exactly, which is what a vocabulary-sharded
//! (tensor-parallel) loss needs: each rank computes the stats of its slice, the stats are
//! all-reduced with [`LseStats::merge`], and the later passes run per slice with the global
//! log-sum-exp.

use crate::isa::Kernel;
use crate::math::Math;

/// `max = max_i x_i` and `sum = Σ_i exp(x_i − max)`, so `logsumexp(x) = max + ln(sum)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LseStats {
    pub max: f32,
    pub sum: f32,
}

impl Default for LseStats {
    fn default() -> Self {
        LseStats::EMPTY
    }
}

impl LseStats {
    /// The statistics of an empty set (logsumexp = −inf).
    pub const EMPTY: LseStats = LseStats { max: f32::NEG_INFINITY, sum: 0.0 };

    /// Combine the statistics of two disjoint sets.
    #[inline]
    pub fn merge(self, other: LseStats) -> LseStats {
        // An empty side (sum exactly 0) is the identity; a NaN sum must survive the merge.
        if other.max == f32::NEG_INFINITY && other.sum == 0.0 {
            return self;
        }
        if self.max == f32::NEG_INFINITY && self.sum == 0.0 {
            return other;
        }
        let max = self.max.max(other.max);
        LseStats {
            max,
            sum: self.sum * (self.max - max).exp() + other.sum * (other.max - max).exp(),
        }
    }

    /// `ln Σ exp(x_i)`.
    #[inline]
    pub fn logsumexp(self) -> f32 {
        self.max + self.sum.ln()
    }

    /// Statistics of one block of already-scaled values, in two sweeps over the (L1-resident)
    /// block: the max, then the sum of exponentials, so each element costs one `exp`.
    #[inline(always)]
    pub fn of_block<M: Math>(x: &[f32]) -> LseStats {
        let max = lane_max(x);
        if max == f32::NEG_INFINITY {
            // All -inf, or -inf and NaN: keep the NaN visible.
            let nan = x.iter().any(|v| v.is_nan());
            return LseStats { max, sum: if nan { f32::NAN } else { 0.0 } };
        }
        let mut acc = [0.0f32; LANES];
        for c in x.chunks_exact(LANES) {
            for l in 0..LANES {
                acc[l] += M::exp(c[l] - max);
            }
        }
        LseStats { max, sum: acc.iter().sum() }
    }
}

/// [`LseStats::of_block`] of one block padded with −inf to whole [`LANES`], as a kernel compiled
/// per instruction set.
pub struct BlockLse<'a>(pub &'a [f32]);

impl Kernel for BlockLse<'_> {
    type Output = LseStats;
    #[inline(always)]
    fn run<M: Math>(self) -> LseStats {
        LseStats::of_block::<M>(self.0)
    }
}

/// `(max, sum)` statistics `a` kept in f64, merged with `b` (a block's, or a single value's):
/// the vocabulary-sharded kernels' running stats of a row. A NaN or +inf in either is kept.
pub fn merge_wide(a: (f64, f64), b: LseStats) -> (f64, f64) {
    let (bm, bs) = (b.max as f64, b.sum as f64);
    if bs == 0.0 || (!a.0.is_finite() && a.1 != 0.0) {
        return a;
    }
    if a.1 == 0.0 || !bm.is_finite() {
        return if a.1 == 0.0 { (bm, bs) } else { (bm, a.1 + bs) };
    }
    let m = a.0.max(bm);
    (m, a.1 * (a.0 - m).exp() + bs * (bm - m).exp())
}

/// Lanes of the accumulators in the vectorised loops (a multiple of every SIMD width we target).
pub const LANES: usize = 16;

/// Maximum of a block whose length is a multiple of [`LANES`], ignoring NaN (a NaN element
/// still makes the block's sum of exponentials NaN, which the caller detects).
#[inline(always)]
pub fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    for c in x.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::Libm;

    #[test]
    fn merge_equals_whole() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        let whole = LseStats::of_block::<Libm>(&x);
        let parts = LseStats::of_block::<Libm>(&x[..32]).merge(LseStats::of_block::<Libm>(&x[32..]));
        assert!((whole.logsumexp() - parts.logsumexp()).abs() < 1e-6);
        assert_eq!(LseStats::EMPTY.merge(whole), whole);
        let nan = LseStats { max: f32::NEG_INFINITY, sum: f32::NAN };
        assert!(whole.merge(nan).sum.is_nan() && nan.merge(whole).sum.is_nan());
    }
}
