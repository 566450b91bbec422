//! Forward KL over a vocabulary sharded across ranks: this rank's slice of each row, in two
//! passes with the caller's collectives between them.
//!
//! With `x = s / T`, `y = t / T` on the slice and the whole row's log-sum-exps `L_x`, `L_y`
//! (`p = e^(y − L_y)`, `q = e^(x − L_x)`), the row's forward KL is
//!
//! ```text
//!     KL(p‖q) = Σ_v p_v (y_v − x_v) − L_y + L_x        (Σ_v p_v = 1 over the whole row)
//! ```
//!
//! 1. [`slice_lse`]: per row the slice's `(max, Σ e^(· − max))` of `x` and of `y` (the kernels'
//!    [`LseStats`] of each block, merged in f64 across blocks), which the caller merges over the
//!    ranks into `L_x`, `L_y`;
//! 2. [`slice_forward_kl`]: the slice's `Σ p (y − x)` (f64; `+inf` where `p > 0` and
//!    `x = −inf`, 0 where `p = 0`) and the gradient `∂KL/∂s = (q − p) / T` of the slice, which
//!    needs nothing else: the caller adds the partial sums over the ranks.

use super::{Rows, BLOCK};
use crate::elem::Elem;
use crate::error::{check_len, check_temperature, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{LseStats, LANES};
use crate::threads;

const NEG_INF: f32 = f32::NEG_INFINITY;
/// Rows of one work item.
const CHUNK: usize = 16;

fn check_pair<S, T>(s: &Rows<S>, t: &Rows<T>) -> Result<()> {
    if s.rows != t.rows || s.cols != t.cols {
        return Err(KdError::ShapeMismatch {
            what: format!("student slice [{}, {}], teacher slice [{}, {}]", s.rows, s.cols, t.rows, t.cols),
        });
    }
    Ok(())
}

/// The stats of one block padded with −inf to whole [`LANES`] (NaN or +inf make them non-finite,
/// which the caller's row check sees), compiled per instruction set.
struct BlockLse<'a>(&'a [f32]);

impl Kernel for BlockLse<'_> {
    type Output = LseStats;
    #[inline(always)]
    fn run<M: Math>(self) -> LseStats {
        LseStats::of_block::<M>(self.0)
    }
}

/// `a` merged with a block's `b` in f64 (a NaN or +inf in either is kept).
fn merge(a: (f64, f64), b: LseStats) -> (f64, f64) {
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

/// `x[..n]` scaled into `buf`, padded with −inf to whole lanes: the padded block.
fn load_block<'b, E: Elem>(x: &[E], inv_t: f32, buf: &'b mut [f32]) -> &'b [f32] {
    let (n, padded) = (x.len(), x.len().div_ceil(LANES) * LANES);
    E::load_scaled(x, &mut buf[..n], inv_t);
    buf[n..padded].fill(NEG_INF);
    &buf[..padded]
}

/// Pass 1: `stats` (`[rows, 4]`): the slice's `(max, sum)` of `x = s / T`, then of `y = t / T`
/// (`(−inf, 0)` for an all −inf or empty slice).
pub fn slice_lse<S: Elem, T: Elem>(s: Rows<S>, t: Rows<T>, temperature: f32, stats: &mut [f64], isa: Isa, num_threads: usize) -> Result<()> {
    check_pair(&s, &t)?;
    check_temperature(temperature)?;
    let inv_t = 1.0 / temperature;
    check_len("stats", stats.len(), s.rows * 4)?;
    let mut items: Vec<_> = stats.chunks_mut(CHUNK * 4).collect();
    threads::for_each_item(&mut items, num_threads, |i, out| {
        let mut buf = vec![0.0f32; BLOCK];
        for (j, st) in out.chunks_mut(4).enumerate() {
            let r = i * CHUNK + j;
            let (mut a, mut b) = ((f64::NEG_INFINITY, 0.0), (f64::NEG_INFINITY, 0.0));
            for c0 in (0..s.cols).step_by(BLOCK) {
                let n = BLOCK.min(s.cols - c0);
                a = merge(a, isa.run(BlockLse(load_block(&s.row(r)[c0..c0 + n], inv_t, &mut buf))));
                b = merge(b, isa.run(BlockLse(load_block(&t.row(r)[c0..c0 + n], inv_t, &mut buf))));
            }
            st.copy_from_slice(&[a.0, a.1, b.0, b.1]);
        }
        Ok(())
    })
}

/// One block of pass 2: `Σ p (y − x)` and the gradient `(q − p) · g` into `grad`.
struct BlockKl<'a> {
    x: &'a [f32],
    y: &'a [f32],
    lx: f32,
    ly: f32,
    g: f32,
    grad: Option<&'a mut [f32]>,
}

impl Kernel for BlockKl<'_> {
    type Output = f64;
    #[inline(always)]
    fn run<M: Math>(self) -> f64 {
        let BlockKl { x, y, lx, ly, g, grad } = self;
        // p (y − x) where p > 0: +inf where x = −inf, so the row's sum is +inf there.
        let term = |xv: f32, yv: f32, p: f32| if p > 0.0 { p * (yv - xv) } else { 0.0 };
        let mut acc = [0.0f32; LANES];
        let split = x.len() / LANES * LANES;
        match grad {
            Some(grad) => {
                for ((cx, cy), cg) in x[..split].chunks_exact(LANES).zip(y[..split].chunks_exact(LANES)).zip(grad[..split].chunks_exact_mut(LANES)) {
                    for l in 0..LANES {
                        let p = M::exp(cy[l] - ly);
                        acc[l] += term(cx[l], cy[l], p);
                        cg[l] = (M::exp(cx[l] - lx) - p) * g;
                    }
                }
                for i in split..x.len() {
                    let p = M::exp(y[i] - ly);
                    acc[0] += term(x[i], y[i], p);
                    grad[i] = (M::exp(x[i] - lx) - p) * g;
                }
            }
            None => {
                for (cx, cy) in x[..split].chunks_exact(LANES).zip(y[..split].chunks_exact(LANES)) {
                    for l in 0..LANES {
                        acc[l] += term(cx[l], cy[l], M::exp(cy[l] - ly));
                    }
                }
                for i in split..x.len() {
                    acc[0] += term(x[i], y[i], M::exp(y[i] - ly));
                }
            }
        }
        acc.iter().map(|&a| a as f64).sum()
    }
}

/// Pass 2. `lse` (`[rows, 2]`): the whole rows' `L_x`, `L_y`. Writes `partial` (`[rows]`, f64):
/// the slice's `Σ p (y − x)`; and, if given, `grad` (`[rows, cols]`, the student's element type):
/// `grad_scale · (q − p) / T`.
#[allow(clippy::too_many_arguments)]
pub fn slice_forward_kl<S: Elem, T: Elem>(
    s: Rows<S>,
    t: Rows<T>,
    temperature: f32,
    lse: &[f64],
    grad_scale: f32,
    partial: &mut [f64],
    grad: Option<&mut [S]>,
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    check_pair(&s, &t)?;
    check_temperature(temperature)?;
    let inv_t = 1.0 / temperature;
    let (rows, cols) = (s.rows, s.cols);
    check_len("lse", lse.len(), rows * 2)?;
    check_len("partial", partial.len(), rows)?;
    if let Some(g) = &grad {
        check_len("grad", g.len(), rows * cols)?;
    }
    let g = grad_scale * inv_t;
    let mut grads: Vec<Option<&mut [S]>> = match grad {
        Some(gr) => gr.chunks_mut((CHUNK * cols).max(1)).map(Some).chain(std::iter::repeat_with(|| None)).take(rows.div_ceil(CHUNK)).collect(),
        None => (0..rows.div_ceil(CHUNK)).map(|_| None).collect(),
    };
    if cols == 0 {
        grads.iter_mut().for_each(|g| *g = None);
    }
    let mut items: Vec<_> = partial.chunks_mut(CHUNK).zip(grads).collect();
    threads::for_each_item(&mut items, num_threads, |i, (out, grad)| {
        let (mut bx, mut by, mut bg) = (vec![0.0f32; BLOCK], vec![0.0f32; BLOCK], vec![0.0f32; BLOCK]);
        for (j, o) in out.iter_mut().enumerate() {
            let r = i * CHUNK + j;
            let (lx, ly) = (lse[2 * r] as f32, lse[2 * r + 1] as f32);
            let mut sum = 0.0f64;
            for c0 in (0..cols).step_by(BLOCK) {
                let n = BLOCK.min(cols - c0);
                S::load_scaled(&s.row(r)[c0..c0 + n], &mut bx[..n], inv_t);
                T::load_scaled(&t.row(r)[c0..c0 + n], &mut by[..n], inv_t);
                let want = grad.is_some();
                sum += isa.run(BlockKl { x: &bx[..n], y: &by[..n], lx, ly, g, grad: want.then_some(&mut bg[..n]) });
                if let Some(gr) = grad.as_deref_mut() {
                    S::store(&bg[..n], &mut gr[j * cols + c0..j * cols + c0 + n]);
                }
            }
            *o = sum;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lse(x: &[f64]) -> f64 {
        let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn two_slices_give_the_forward_kl_and_its_gradient() {
        let (rows, v, cut, t) = (3, 2500, 1300, 1.7f32);
        let s: Vec<f32> = (0..rows * v).map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0).collect();
        let mut tt: Vec<f32> = (0..rows * v).map(|i| ((i * 104_729 % 997) as f32 / 80.0) - 6.0).collect();
        tt[5] = NEG_INF;
        let isa = Isa::detect();
        let parts: Vec<(Vec<f32>, Vec<f32>, usize)> = [(0, cut), (cut, v)]
            .iter()
            .map(|&(a, b)| {
                let take = |m: &Vec<f32>| (0..rows).flat_map(|r| m[r * v + a..r * v + b].to_vec()).collect::<Vec<f32>>();
                (take(&s), take(&tt), b - a)
            })
            .collect();
        let mut lses = vec![0.0; rows * 2];
        let mut stats_all = vec![];
        for (ps, pt, w) in &parts {
            let mut st = vec![0.0; rows * 4];
            slice_lse(Rows::new(ps, rows, *w, *w, "s").unwrap(), Rows::new(pt, rows, *w, *w, "t").unwrap(), t, &mut st, isa, 2).unwrap();
            stats_all.push(st);
        }
        for r in 0..rows {
            for (k, off) in [(0, 0), (1, 2)] {
                let terms: Vec<f64> = stats_all.iter().map(|st| st[r * 4 + off] + st[r * 4 + off + 1].ln()).collect();
                lses[r * 2 + k] = lse(&terms);
            }
        }
        let mut total = vec![0.0; rows];
        for (ps, pt, w) in &parts {
            let (mut part, mut grad) = (vec![0.0; rows], vec![0.0f32; rows * w]);
            slice_forward_kl(Rows::new(ps, rows, *w, *w, "s").unwrap(), Rows::new(pt, rows, *w, *w, "t").unwrap(), t, &lses, 1.0, &mut part, Some(&mut grad), isa, 2).unwrap();
            total.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        for r in 0..rows {
            let x: Vec<f64> = s[r * v..(r + 1) * v].iter().map(|&a| (a * (1.0 / t)) as f64).collect();
            let y: Vec<f64> = tt[r * v..(r + 1) * v].iter().map(|&a| (a * (1.0 / t)) as f64).collect();
            let (lx, ly) = (lse(&x), lse(&y));
            let want: f64 = x.iter().zip(&y).filter(|(_, &b)| b > f64::NEG_INFINITY).map(|(a, b)| (b - ly).exp() * ((b - ly) - (a - lx))).sum();
            let got = total[r] - lses[r * 2 + 1] + lses[r * 2];
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "row {r}: {got} vs {want}");
        }
    }

    #[test]
    fn nan_and_inf_make_the_statistics_non_finite() {
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5f32; 3000];
            x[2100] = bad;
            let mut st = vec![0.0; 4];
            let rows = Rows::new(&x, 1, 3000, 3000, "s").unwrap();
            slice_lse(rows, rows, 1.0, &mut st, Isa::detect(), 1).unwrap();
            assert!(!(st[0] + st[1].ln()).is_finite() && !(st[2] + st[3].ln()).is_finite(), "{bad}: {st:?}");
        }
    }
}
