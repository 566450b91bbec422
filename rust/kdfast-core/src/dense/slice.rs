//! The dense losses over a vocabulary sharded across ranks: this rank's slice of each row, in
//! up to three steps with the caller's collectives between them.
//!
//! On the slice let `a = s / T` and `b` the loss's teacher logits over T (`t / T`; TAID: the
//! mixture `(1 − t)·a + t·(t / T)`, formed block by block as it is loaded, as in the unsharded
//! kernel). The whole row's maxima `M_a`, `M_b` and sums `Z_a = Σ e^(a − M_a)`, `Z_b` give
//!
//! ```text
//!     log q = (a − M_a) − ln Z_a,   log p = (b − M_b) − ln Z_b,
//!     d = log q − log p = ((a − M_a) − (b − M_b)) − (ln Z_a − ln Z_b)
//! ```
//!
//! (`d` from the shifted logits, as in [`super::pointwise`]), so every term [`Div::terms`] of
//! the loss is known on the slice, and the row's `ℓ = Σ t_i` and `S = Σ q_i h_i` are sums over
//! the ranks' slices. The steps ([`SliceStep`]):
//!
//! 1. **Stats**: per row the slice's `(max, Σ e^(· − max))` of `a`, of `t / T` and of `b`
//!    (the kernels' [`crate::stats::LseStats`] of each block, merged in f64), which the caller merges over the
//!    ranks into `M`, `ln Z` (and checks: the teacher's own stats name its defects, TAID's
//!    mixture can hide them);
//! 2. **Sums**: the slice's `(Σ t_i, Σ q_i h_i)`, which the caller adds over the ranks. Forward
//!    KL and TAID (`∂ℓ/∂a = q − p`, closed form) write the gradient here too;
//! 3. **Gradient**: for the other losses `(q h − q S) · g` from the whole row's `S`, recomputing
//!    the terms from the inputs; for every loss a zero row where the whole row's loss is `+inf`.
//!
//! AKL is not here: its weights need the teacher's head, which the caller finds by a search
//! over the ranks (`kdfast.parallel.akl`).

use super::pointwise::{load_pair, load_scaled, log_ratio};
use super::{Rows, BLOCK};
use crate::divergence::{Closed, Div, Divergence, ForwardKl};
use crate::elem::Elem;
use crate::error::{check_len, check_temperature, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{merge_wide as merge, BlockLse, LANES};
use crate::threads;

/// Rows of one work item.
const CHUNK: usize = 16;
/// f64 per row of [`SliceStep::Stats`]: `(max, sum)` of `a`, `t / T`, `b`.
pub const STATS: usize = 6;

/// One step of a sharded dense loss, with its buffers (row-major, `rows` rows each).
pub enum SliceStep<'a, S> {
    /// Writes `stats` (`[rows, 6]`): the slice's `(max, sum)` of `a`, of `t / T` and of `b`
    /// (`(−inf, 0)` for an all −inf or empty slice; NaN or +inf make them non-finite).
    Stats { stats: &'a mut [f64] },
    /// Reads `softmax` (`[rows, 4]`: the whole rows' `M_a, ln Z_a, M_b, ln Z_b`); writes `sums`
    /// (`[rows, 2]`: the slice's `Σ t_i`, `Σ q_i h_i`) and, for forward KL and TAID, `grad`.
    Sums { softmax: &'a [f64], sums: &'a mut [f64], grad: Option<&'a mut [S]> },
    /// Reads `softmax` and the whole rows' `sums`; writes `grad` (forward KL and TAID, whose
    /// gradient step 2 wrote: only the zero rows where the whole row's loss is `+inf`).
    Gradient { softmax: &'a [f64], sums: &'a [f64], grad: &'a mut [S] },
}

/// Run one step of the dense loss `divergence` on this rank's slices `s`, `t` (`[rows, cols]`
/// each). Gradients are `grad_scale · ∂ℓ/∂s` (so `∂ℓ/∂a / T`), in the student's element type.
#[allow(clippy::too_many_arguments)]
pub fn slice_dense<S: Elem, T: Elem>(s: Rows<S>, t: Rows<T>, divergence: Divergence, temperature: f32, grad_scale: f32, step: SliceStep<S>, isa: Isa, num_threads: usize) -> Result<()> {
    divergence.validate()?;
    check_temperature(temperature)?;
    if s.rows != t.rows || s.cols != t.cols {
        return Err(KdError::ShapeMismatch {
            what: format!("student slice [{}, {}], teacher slice [{}, {}]", s.rows, s.cols, t.rows, t.cols),
        });
    }
    let (rows, cols) = (s.rows, s.cols);
    match &step {
        SliceStep::Stats { stats } => check_len("stats", stats.len(), rows * STATS)?,
        SliceStep::Sums { softmax, sums, grad } => {
            check_len("softmax", softmax.len(), rows * 4)?;
            check_len("sums", sums.len(), rows * 2)?;
            if let Some(g) = grad {
                check_len("grad", g.len(), rows * cols)?;
            }
        }
        SliceStep::Gradient { softmax, sums, grad } => {
            check_len("softmax", softmax.len(), rows * 4)?;
            check_len("sums", sums.len(), rows * 2)?;
            check_len("grad", grad.len(), rows * cols)?;
        }
    }
    let call = Call { s, t, inv_t: 1.0 / temperature, g: grad_scale / temperature, isa, num_threads };
    with_divergence!(divergence,
        d => call.step(d, step),
        zero => call.unmoved(step),
        akl(_h) => Err(KdError::InvalidArgument {
            name: "loss",
            expected: "a loss other than akl (its head is found by the caller over the ranks)".into(),
            got: "akl".into(),
        }),
    )
}

/// The inputs of one call.
struct Call<'a, S, T> {
    s: Rows<'a, S>,
    t: Rows<'a, T>,
    inv_t: f32,
    /// The gradient's factor: `grad_scale / T`.
    g: f32,
    isa: Isa,
    num_threads: usize,
}

impl<S: Elem, T: Elem> Call<'_, S, T> {
    fn step<D: Div>(&self, div: D, step: SliceStep<S>) -> Result<()> {
        let closed = D::CLOSED == Closed::Forward;
        match step {
            SliceStep::Stats { stats } => self.stats(&div, stats),
            SliceStep::Sums { softmax, sums, grad } => match grad {
                Some(grad) if closed => self.sweep::<D, WRITE_CLOSED>(&div, softmax, None, sums, Some(grad)),
                _ => self.sweep::<D, WRITE_NONE>(&div, softmax, None, sums, None),
            },
            SliceStep::Gradient { sums, grad, .. } if closed => {
                // Step 2 wrote the gradient; a row whose whole loss is +inf gets a zero row.
                let cols = self.s.cols.max(1);
                for (g, row) in grad.chunks_mut(cols).zip(sums.chunks(2)) {
                    if row[0] == f64::INFINITY {
                        g.fill(S::zero());
                    }
                }
                Ok(())
            }
            SliceStep::Gradient { softmax, sums, grad } => self.sweep::<D, WRITE_DEVIATION>(&div, softmax, Some(sums), &mut [], Some(grad)),
        }
    }

    /// TAID at `t = 0`: the rows are checked (step 1, the teacher as itself), `ℓ = 0`, and the
    /// gradient is 0.
    fn unmoved(&self, step: SliceStep<S>) -> Result<()> {
        match step {
            SliceStep::Stats { stats } => self.stats(&ForwardKl, stats),
            SliceStep::Sums { sums, grad, .. } => {
                sums.fill(0.0);
                grad.into_iter().for_each(|g| g.fill(S::zero()));
                Ok(())
            }
            SliceStep::Gradient { grad, .. } => {
                grad.fill(S::zero());
                Ok(())
            }
        }
    }

    fn stats<D: Div>(&self, div: &D, stats: &mut [f64]) -> Result<()> {
        let (s, t, inv_t, isa) = (&self.s, &self.t, self.inv_t, self.isa);
        each_row::<S>(s.rows, s.cols, stats, STATS, None, self.num_threads, |r, out, _| {
            let (mut a, mut b) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
            let mut acc = [(f64::NEG_INFINITY, 0.0); 3];
            for c0 in (0..s.cols).step_by(BLOCK) {
                let c1 = s.cols.min(c0 + BLOCK);
                let n = load_scaled(&s.row(r)[c0..c1], &mut a, inv_t);
                load_scaled(&t.row(r)[c0..c1], &mut b, inv_t);
                acc[0] = merge(acc[0], isa.run(BlockLse(&a[..n])));
                acc[1] = merge(acc[1], isa.run(BlockLse(&b[..n])));
                if D::MIXED_TEACHER {
                    // The same operations as `load_pair`, so steps 2 and 3 see this mixture.
                    for (x, y) in a[..n].iter().zip(b[..n].iter_mut()) {
                        *y = div.teacher(*x, *y);
                    }
                    acc[2] = merge(acc[2], isa.run(BlockLse(&b[..n])));
                }
            }
            if !D::MIXED_TEACHER {
                acc[2] = acc[1];
            }
            for (k, (m, z)) in acc.into_iter().enumerate() {
                (out[2 * k], out[2 * k + 1]) = (m, z);
            }
            Ok(())
        })
    }

    /// Steps 2 and 3: every row's blocks through [`Sweep`]; `sums_out` gets the row's sums (step
    /// 2), `grad` what `W` writes.
    fn sweep<D: Div, const W: u8>(&self, div: &D, softmax: &[f64], sums_in: Option<&[f64]>, sums_out: &mut [f64], grad: Option<&mut [S]>) -> Result<()> {
        let (s, t, inv_t, g, isa) = (&self.s, &self.t, self.inv_t, self.g, self.isa);
        let width = if sums_in.is_some() { 0 } else { 2 };
        each_row(s.rows, s.cols, sums_out, width, grad, self.num_threads, |r, out, mut grad| {
            let total = sums_in.map(|x| (x[2 * r], x[2 * r + 1]));
            if total.is_some_and(|(loss, _)| loss == f64::INFINITY) {
                // No finite descent direction: a zero row, as in the kernels.
                grad.into_iter().for_each(|g| g.fill(S::zero()));
                return Ok(());
            }
            let whole = Whole::of(&softmax[4 * r..4 * r + 4]);
            let big_s = total.map_or(0.0, |(_, x)| x as f32);
            let (mut a, mut b, mut gb) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
            let (mut loss, mut qh) = (0.0f64, 0.0f64);
            for c0 in (0..s.cols).step_by(BLOCK) {
                let c1 = s.cols.min(c0 + BLOCK);
                let n = load_pair(div, &s.row(r)[c0..c1], &t.row(r)[c0..c1], &mut a, &mut b, inv_t);
                let (l, q) = isa.run(Sweep::<D, W> { div, a: &a[..n], b: &b[..n], whole, g, big_s, out: &mut gb[..n] });
                (loss, qh) = (loss + l, qh + q);
                if let Some(gr) = grad.as_deref_mut() {
                    S::store(&gb[..c1 - c0], &mut gr[c0..c1]);
                }
            }
            if width == 2 {
                (out[0], out[1]) = (loss, qh);
            }
            Ok(())
        })
    }
}

/// Call `body(row, out_row, grad_row)` for every row on `num_threads` threads, [`CHUNK`] rows per
/// work item: `out_row` the row's `width` floats of `out`, `grad_row` its row of `grad`.
fn each_row<S: Elem>(
    rows: usize,
    cols: usize,
    out: &mut [f64],
    width: usize,
    grad: Option<&mut [S]>,
    num_threads: usize,
    body: impl Fn(usize, &mut [f64], Option<&mut [S]>) -> Result<()> + Sync,
) -> Result<()> {
    let n = rows.div_ceil(CHUNK);
    let outs: Vec<&mut [f64]> = if width == 0 { (0..n).map(|_| Default::default()).collect() } else { out.chunks_mut(CHUNK * width).collect() };
    let grads: Vec<Option<&mut [S]>> = match grad {
        Some(g) if cols > 0 => g.chunks_mut(CHUNK * cols).map(Some).collect(),
        _ => (0..n).map(|_| None).collect(),
    };
    let mut items: Vec<_> = outs.into_iter().zip(grads).collect();
    threads::for_each_item(&mut items, num_threads, |i, item| {
        let (out, grad) = (&mut *item.0, &mut item.1);
        for j in 0..CHUNK.min(rows - i * CHUNK) {
            let grad_row = grad.as_deref_mut().map(|g| &mut g[j * cols..(j + 1) * cols]);
            body(i * CHUNK + j, &mut out[j * width..(j + 1) * width], grad_row)?;
        }
        Ok(())
    })
}

/// A whole row's softmax, as the sweeps read it.
#[derive(Clone, Copy)]
struct Whole {
    ma: f32,
    ln_za: f32,
    mb: f32,
    ln_zb: f32,
    /// `ln Z_a − ln Z_b`, taken in f64.
    c_z: f32,
}

impl Whole {
    /// From `[M_a, ln Z_a, M_b, ln Z_b]` (the maxima are f32 values, so exact).
    fn of(x: &[f64]) -> Whole {
        Whole { ma: x[0] as f32, ln_za: x[1] as f32, mb: x[2] as f32, ln_zb: x[3] as f32, c_z: (x[1] - x[3]) as f32 }
    }
}

/// What a [`Sweep`] writes into its `out` block: nothing, `(q − p) · g`, or `(q h − q S) · g`.
const WRITE_NONE: u8 = 0;
const WRITE_CLOSED: u8 = 1;
const WRITE_DEVIATION: u8 = 2;

/// One padded block of a row: the sums of its terms `(Σ t_i, Σ q_i h_i)`, and the gradient
/// that `W` names into `out`.
struct Sweep<'a, D, const W: u8> {
    div: &'a D,
    a: &'a [f32],
    b: &'a [f32],
    whole: Whole,
    g: f32,
    big_s: f32,
    out: &'a mut [f32],
}

impl<D: Div, const W: u8> Kernel for Sweep<'_, D, W> {
    type Output = (f64, f64);
    #[inline(always)]
    fn run<M: Math>(self) -> (f64, f64) {
        let Sweep { div, a, b, whole: w, g, big_s, out } = self;
        // Forward KL's S is not needed (its gradient is closed): skip the qh its terms form.
        let wants_qh = D::CLOSED != Closed::Forward;
        let mut acc_l = [0.0f32; LANES];
        let mut acc_s = [0.0f32; LANES];
        for ((ca, cb), co) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)).zip(out.chunks_exact_mut(LANES)) {
            for l in 0..LANES {
                let (x, y) = (ca[l] - w.ma, cb[l] - w.mb);
                let (lq, lp) = (x - w.ln_za, y - w.ln_zb);
                let (q, p) = (M::exp(lq), M::exp(lp));
                let t = div.terms::<M>(lq, lp, log_ratio(x, y, w.c_z), q, p);
                acc_l[l] += t.loss;
                if wants_qh {
                    acc_s[l] += t.qg;
                }
                match W {
                    WRITE_CLOSED => co[l] = (q - p) * g,
                    WRITE_DEVIATION => co[l] = (t.qg - q * big_s) * g,
                    _ => {}
                }
            }
        }
        let total = |acc: [f32; LANES]| acc.iter().map(|&x| x as f64).sum::<f64>();
        (total(acc_l), total(acc_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::{dense_loss, DenseConfig};

    fn lse(x: &[f64]) -> f64 {
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    }

    /// Every loss on `cuts` slices of the rows, the ranks' merges done here, against the
    /// unsharded kernel: values and gradients.
    fn check_sharded(div: Divergence, cuts: &[usize], t: f32) {
        let (rows, v) = (3, *cuts.last().unwrap());
        let s: Vec<f32> = (0..rows * v).map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0).collect();
        let mut tt: Vec<f32> = (0..rows * v).map(|i| ((i * 104_729 % 997) as f32 / 80.0) - 6.0).collect();
        tt[5] = f32::NEG_INFINITY;
        let isa = Isa::detect();
        let bounds: Vec<(usize, usize)> = std::iter::once(0).chain(cuts.iter().copied()).zip(cuts.iter().copied()).collect();
        let take = |m: &Vec<f32>, (a, b): (usize, usize)| (0..rows).flat_map(|r| m[r * v + a..r * v + b].to_vec()).collect::<Vec<f32>>();
        let parts: Vec<(Vec<f32>, Vec<f32>, usize)> = bounds.iter().map(|&ab| (take(&s, ab), take(&tt, ab), ab.1 - ab.0)).collect();
        fn rows_of(x: &[f32], rows: usize, w: usize) -> Rows<'_, f32> {
            Rows::new(x, rows, w, w, "x").unwrap()
        }
        let run = |step: SliceStep<f32>, (ps, pt, w): &(Vec<f32>, Vec<f32>, usize)| slice_dense(rows_of(ps, rows, *w), rows_of(pt, rows, *w), div, t, 1.0, step, isa, 2).unwrap();
        // Step 1 and the merge of (max, sum) pairs over the ranks: M and ln Z of a and b.
        let stats: Vec<Vec<f64>> = parts
            .iter()
            .map(|p| {
                let mut st = vec![0.0; rows * STATS];
                run(SliceStep::Stats { stats: &mut st }, p);
                st
            })
            .collect();
        let mut softmax = vec![0.0; rows * 4];
        for r in 0..rows {
            for (k, col) in [(0, 0), (1, 4)] {
                let m = stats.iter().map(|st| st[r * STATS + col]).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = stats.iter().map(|st| st[r * STATS + col + 1] * (st[r * STATS + col] - m).exp()).sum();
                (softmax[r * 4 + 2 * k], softmax[r * 4 + 2 * k + 1]) = (m, z.ln());
            }
        }
        let mut sums = vec![0.0; rows * 2];
        let mut grads: Vec<Vec<f32>> = parts.iter().map(|p| vec![0.0f32; rows * p.2]).collect();
        for (p, grad) in parts.iter().zip(grads.iter_mut()) {
            let mut part = vec![0.0; rows * 2];
            run(SliceStep::Sums { softmax: &softmax, sums: &mut part, grad: Some(grad) }, p);
            sums.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        for (p, grad) in parts.iter().zip(grads.iter_mut()) {
            run(SliceStep::Gradient { softmax: &softmax, sums: &sums, grad }, p);
        }
        let cfg = DenseConfig { divergence: div, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: v };
        let (mut want, mut want_grad) = (vec![0.0f32; rows], vec![0.0f32; rows * v]);
        dense_loss(rows_of(&s, rows, v), rows_of(&tt, rows, v), None, &cfg, &mut want, Some(&mut want_grad), isa, 1).unwrap();
        for r in 0..rows {
            let got = sums[r * 2];
            assert!(got == want[r] as f64 || (got - want[r] as f64).abs() < 2e-5 * (want[r] as f64).abs().max(1e-2), "{div:?} row {r}: {got} vs {}", want[r]);
            for (k, &(a, _)) in bounds.iter().enumerate() {
                let w = parts[k].2;
                for c in 0..w {
                    let (g, e) = (grads[k][r * w + c], want_grad[r * v + a + c]);
                    assert!((g - e).abs() < 1e-6 + 1e-4 * e.abs(), "{div:?} row {r} col {}: {g} vs {e}", a + c);
                }
            }
        }
    }

    #[test]
    fn every_sharded_loss_matches_the_unsharded_kernel() {
        for div in [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.3 },
            Divergence::Jsd { beta: 1.0 },
            Divergence::SkewForwardKl { skew: 0.1 },
            Divergence::SkewReverseKl { skew: 0.4 },
            Divergence::Tvd,
            Divergence::Taid { t: 0.6 },
            Divergence::Taid { t: 0.0 },
        ] {
            // A cut inside a block, one on a block edge, an empty slice, a slice under one lane.
            for cuts in [&[1300, 2500][..], &[1024, 1024, 2500], &[5, 2007, 2500]] {
                check_sharded(div, cuts, 1.7);
            }
        }
        check_sharded(Divergence::ReverseKl, &[700, 2500], 0.05);
    }

    #[test]
    fn one_slice_is_the_whole_forward_kl() {
        let (rows, v, t) = (2, 1500, 2.0f32);
        let s: Vec<f32> = (0..rows * v).map(|i| (i % 37) as f32 / 7.0).collect();
        let tt: Vec<f32> = (0..rows * v).map(|i| (i % 23) as f32 / 5.0).collect();
        let x: Vec<f64> = s[..v].iter().map(|&a| (a * (1.0 / t)) as f64).collect();
        let y: Vec<f64> = tt[..v].iter().map(|&a| (a * (1.0 / t)) as f64).collect();
        let (lx, ly) = (lse(&x), lse(&y));
        let want: f64 = x.iter().zip(&y).map(|(a, b)| (b - ly).exp() * ((b - ly) - (a - lx))).sum();
        let (ms, mt) = (x.iter().copied().fold(f64::MIN, f64::max), y.iter().copied().fold(f64::MIN, f64::max));
        let softmax: Vec<f64> = (0..rows).flat_map(|_| [ms, lx - ms, mt, ly - mt]).collect();
        let mut sums = vec![0.0; rows * 2];
        let rs = Rows::new(&s, rows, v, v, "s").unwrap();
        let rt = Rows::new(&tt, rows, v, v, "t").unwrap();
        slice_dense(rs, rt, Divergence::ForwardKl, t, 1.0, SliceStep::Sums { softmax: &softmax, sums: &mut sums, grad: None }, Isa::detect(), 1).unwrap();
        assert!((sums[0] - want).abs() < 1e-5 * want.max(1.0), "{} vs {want}", sums[0]);
    }

    #[test]
    fn nan_and_inf_make_the_statistics_non_finite() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5f32; 3000];
            x[2100] = bad;
            let mut st = vec![0.0; STATS];
            let rows = Rows::new(&x, 1, 3000, 3000, "s").unwrap();
            slice_dense(rows, rows, Divergence::Taid { t: 0.5 }, 1.0, 1.0, SliceStep::Stats { stats: &mut st }, Isa::detect(), 1).unwrap();
            for k in 0..3 {
                assert!(!(st[2 * k] + st[2 * k + 1].ln()).is_finite(), "{bad}: {st:?}");
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = vec![0.0f32; 8];
        let r = Rows::new(&x, 2, 4, 4, "s").unwrap();
        let mut st = vec![0.0; 2 * STATS];
        let run = |div, t, stats: &mut [f64]| slice_dense(r, r, div, t, 1.0, SliceStep::Stats { stats }, Isa::detect(), 1);
        assert!(run(Divergence::Akl { head_mass: 0.5 }, 1.0, &mut st).is_err());
        assert!(run(Divergence::Jsd { beta: 2.0 }, 1.0, &mut st).is_err());
        assert!(run(Divergence::Tvd, 0.0, &mut st).is_err());
        assert!(run(Divergence::Tvd, 1.0, &mut st[..5]).is_err());
        let narrow = Rows::new(&x, 2, 3, 4, "t").unwrap();
        assert!(slice_dense(r, narrow, Divergence::Tvd, 1.0, 1.0, SliceStep::Stats { stats: &mut st }, Isa::detect(), 1).is_err());
    }
}
