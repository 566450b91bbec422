//! AKL's head over a vocabulary sharded across ranks: the teacher mass at or above thresholds.
//!
//! The caller searches the head's threshold `x*` on the float32 bit patterns of the teacher's
//! probabilities `p` (non-negative, so their patterns order like their values; see
//! `kdfast.parallel.akl`), probing `m` thresholds per row and round. [`mass_at_least`] gives this
//! rank's slice's `Σ_{bits(p_v) ≥ τ_j} p_v` for every probe `τ_j` in one pass over the slice: each
//! block is read once and summed against every probe while it is in L1, in f64 lanes (the head
//! rule compares these sums with `head_mass + 2⁻²⁰`, so they are kept as exact as the reference's).

use super::{Rows, BLOCK};
use crate::error::{check_len, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::threads;

/// Rows of one work item.
const CHUNK: usize = 16;
/// f64 accumulators per probe.
const LANES: usize = 8;

/// Writes `out` (`[rows, m]`, f64): per row and probe `τ_j` of `thresholds` (`[rows, m]`, in
/// `[0, 2³¹)`), the mass `Σ_{bits(p_v) ≥ τ_j} p_v` of the slice `p` (probabilities, ≥ 0).
pub fn mass_at_least(p: Rows<f32>, thresholds: &[i64], m: usize, out: &mut [f64], isa: Isa, num_threads: usize) -> Result<()> {
    check_len("thresholds", thresholds.len(), p.rows * m)?;
    check_len("out", out.len(), p.rows * m)?;
    if let Some(&t) = thresholds.iter().find(|&&t| !(0..=i32::MAX as i64).contains(&t)) {
        return Err(KdError::InvalidArgument { name: "thresholds", expected: "float32 bit patterns in [0, 2^31)".into(), got: t.to_string() });
    }
    if m == 0 {
        return Ok(());
    }
    let mut items: Vec<_> = out.chunks_mut(CHUNK * m).collect();
    threads::for_each_item(&mut items, num_threads, |i, out| {
        for (j, o) in out.chunks_mut(m).enumerate() {
            let r = i * CHUNK + j;
            let probes: Vec<i32> = thresholds[r * m..(r + 1) * m].iter().map(|&t| t as i32).collect();
            o.fill(0.0);
            for block in p.row(r).chunks(BLOCK) {
                isa.run(BlockMass { p: block, probes: &probes, out: o });
            }
        }
        Ok(())
    })
}

/// One block against every probe (the block stays in L1 across them).
struct BlockMass<'a> {
    p: &'a [f32],
    probes: &'a [i32],
    out: &'a mut [f64],
}

impl Kernel for BlockMass<'_> {
    type Output = ();
    #[inline(always)]
    fn run<M: Math>(self) {
        let split = self.p.len() / LANES * LANES;
        let (body, rest) = self.p.split_at(split);
        for (&tau, o) in self.probes.iter().zip(self.out.iter_mut()) {
            let mut acc = [0.0f64; LANES];
            for c in body.chunks_exact(LANES) {
                for l in 0..LANES {
                    // p ≥ 0: its bit pattern as i32 orders like its value.
                    acc[l] += if (c[l].to_bits() as i32) >= tau { c[l] as f64 } else { 0.0 };
                }
            }
            let tail: f64 = rest.iter().filter(|v| (v.to_bits() as i32) >= tau).map(|&v| v as f64).sum();
            *o += acc.iter().sum::<f64>() + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mass_at_or_above_each_probe() {
        let (rows, cols) = (3, 2500);
        let p: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 + 0.5) / 1e6).collect();
        let probes: Vec<f32> = vec![0.0, 1e-4, 5e-4, 1.0];
        let m = probes.len();
        let thresholds: Vec<i64> = (0..rows).flat_map(|_| probes.iter().map(|x| x.to_bits() as i64)).collect();
        let mut out = vec![0.0; rows * m];
        mass_at_least(Rows::new(&p, rows, cols, cols, "p").unwrap(), &thresholds, m, &mut out, Isa::detect(), 2).unwrap();
        for r in 0..rows {
            for (j, &x) in probes.iter().enumerate() {
                let want: f64 = p[r * cols..(r + 1) * cols].iter().filter(|&&v| v >= x).map(|&v| v as f64).sum();
                assert!((out[r * m + j] - want).abs() <= 1e-12 * want.max(1.0), "row {r} probe {x}: {} vs {want}", out[r * m + j]);
            }
        }
        let bad = vec![-1i64; rows * m];
        assert!(mass_at_least(Rows::new(&p, rows, cols, cols, "p").unwrap(), &bad, m, &mut out, Isa::detect(), 1).is_err());
    }
}
