//! The row kernel of every loss that is a sum of per-element terms ([`Div`]), and the pass 1
//! that every dense kernel starts with.

use super::{RowLoss, RowParams, BLOCK};
use crate::divergence::{Closed, Div};
use crate::elem::Elem;
use crate::error::{KdError, Result};
use crate::math::Math;
use crate::stats::{lane_max, LseStats, LANES};

/// One row's scratch, split: the scratch rows (each `blocks · BLOCK` floats, column `i` at
/// index `i`) and the per-block statistics.
pub(super) struct Scratch<'a> {
    /// `e_a`, then (multi-pass kernels) `q`.
    pub ea: &'a mut [f32],
    /// `e_b`, then `q h` or (AKL) `p`.
    pub eb: &'a mut [f32],
    /// The third row of kernels that ask for one ([`RowLoss::SCRATCH_ROWS`] = 3), else empty.
    pub ex: &'a mut [f32],
    /// Per block: the shift `ma` of `e_a`, then (after pass 1) the factor from `e_a` to `q`.
    pub fa: &'a mut [f32],
    /// Per block: `mb`, then the factor from `e_b` to `p`.
    pub fb: &'a mut [f32],
    bza: &'a mut [f32],
    bzb: &'a mut [f32],
    bkl: &'a mut [f32],
}

impl<'a> Scratch<'a> {
    pub fn split(scratch: &'a mut [f32], v: usize, rows: usize) -> Self {
        let blocks = v.div_ceil(BLOCK);
        let (ea, rest) = scratch.split_at_mut(blocks * BLOCK);
        let (eb, rest) = rest.split_at_mut(blocks * BLOCK);
        let (ex, stats) = rest.split_at_mut(if rows > 2 { blocks * BLOCK } else { 0 });
        let (fa, stats) = stats.split_at_mut(blocks);
        let (fb, stats) = stats.split_at_mut(blocks);
        let (bza, stats) = stats.split_at_mut(blocks);
        let (bzb, bkl) = stats.split_at_mut(blocks);
        Scratch { ea, eb, ex, fa, fb, bza, bzb, bkl: &mut bkl[..blocks] }
    }
}

/// The row's softmax statistics after pass 1.
pub(super) struct Softmax {
    pub sa: LseStats,
    pub sb: LseStats,
    pub ln_za: f32,
    pub ln_zb: f32,
    /// `lse_a − lse_b`.
    pub c: f32,
    /// `ln Z_a − ln Z_b`, as the log of a ratio.
    pub c_z: f32,
    /// Forward KL's `+inf`: a teacher entry alive where the student's logit is `-inf` (fused only).
    pub infinite: bool,
}

/// Pass 1 of a row (see the [`Div`] kernel below): exponentials into `sc.ea`/`sc.eb`, the block
/// factors into `sc.fa`/`sc.fb`, and the row's statistics. With a closed form, also per block
/// `Σ e_b (b − a)` ([`Closed::Forward`]), or `Σ e_a u` with `u = (a − m_a) − (b − m_b)` the
/// shifted logits' difference, which replaces `e_b` in `sc.eb` ([`Closed::Reverse`]; 0 where
/// `e_a = 0`). `Ok(None)`: the teacher is a mixture ([`Div::MIXED_TEACHER`]) that is `-inf`
/// everywhere although both inputs are valid rows.
#[inline(always)]
pub(super) fn pass1<M: Math, D: Div, S: Elem, T: Elem>(div: &D, closed: Closed, inv_t: f32, s_row: &[S], t_row: &[T], row: usize, sc: &mut Scratch) -> Result<Option<Softmax>> {
    let v = s_row.len();
    let mut a = [0.0f32; BLOCK];
    let mut b = [0.0f32; BLOCK];
    let (mut sa, mut sb) = (LseStats::EMPTY, LseStats::EMPTY);
    let mut infinite = false;
    for (k, start) in (0..v).step_by(BLOCK).enumerate() {
        let n = load_pair(div, &s_row[start..v.min(start + BLOCK)], &t_row[start..v.min(start + BLOCK)], &mut a, &mut b, inv_t);
        let (ma, mb) = (lane_max(&a[..n]), lane_max(&b[..n]));
        // An all -inf block has sum 0: subtract 0 instead of -inf to avoid -inf − -inf.
        let (sha, shb) = (finite_or_zero(ma), finite_or_zero(mb));
        let (xa, xb) = (&mut sc.ea[k * BLOCK..k * BLOCK + n], &mut sc.eb[k * BLOCK..k * BLOCK + n]);
        let mut acc_a = [0.0f32; LANES];
        let mut acc_b = [0.0f32; LANES];
        let mut acc_k = [0.0f32; LANES];
        // Flags as floats (1.0 = seen): a bool array here costs byte shuffles per step.
        let mut acc_inf = [0.0f32; LANES];
        for (((ca, cb), xa), xb) in a[..n]
            .chunks_exact(LANES)
            .zip(b[..n].chunks_exact(LANES))
            .zip(xa.chunks_exact_mut(LANES))
            .zip(xb.chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let (ua, ub) = (ca[l] - sha, cb[l] - shb);
                let e_a = M::exp(ua);
                let e_b = M::exp(ub);
                acc_a[l] += e_a;
                acc_b[l] += e_b;
                xa[l] = e_a;
                match closed {
                    Closed::No => xb[l] = e_b,
                    Closed::Forward => {
                        xb[l] = e_b;
                        acc_k[l] += if e_b == 0.0 { 0.0 } else { e_b * (cb[l] - ca[l]) };
                        // +inf: the teacher alive (even if e_b underflowed), q = 0.
                        let dead = (ca[l] == f32::NEG_INFINITY) & (cb[l] != f32::NEG_INFINITY);
                        acc_inf[l] = if dead { 1.0 } else { acc_inf[l] };
                    }
                    Closed::Reverse => {
                        let u = if e_a == 0.0 { 0.0 } else { ua - ub };
                        xb[l] = u;
                        acc_k[l] += e_a * u;
                        // +inf: the student alive (even if e_a underflowed), p = 0.
                        let dead = (cb[l] == f32::NEG_INFINITY) & (ca[l] != f32::NEG_INFINITY);
                        acc_inf[l] = if dead { 1.0 } else { acc_inf[l] };
                    }
                }
            }
        }
        let (za, zb) = (acc_a.iter().sum::<f32>(), acc_b.iter().sum::<f32>());
        (sc.fa[k], sc.fb[k], sc.bza[k], sc.bzb[k], sc.bkl[k]) = (sha, shb, za, zb, acc_k.iter().sum());
        infinite |= acc_inf.iter().any(|&x| x != 0.0);
        sa = sa.merge(LseStats { max: ma, sum: if ma == f32::NEG_INFINITY && !za.is_nan() { 0.0 } else { za } });
        sb = sb.merge(LseStats { max: mb, sum: if mb == f32::NEG_INFINITY && !zb.is_nan() { 0.0 } else { zb } });
    }
    check_stats(sa, "student_logits", row)?;
    if let Err(e) = check_stats(sb, "teacher_logits", row) {
        if !D::MIXED_TEACHER {
            return Err(e);
        }
        // The mixture can hide what is wrong with the teacher itself (a +inf against a -inf
        // student gives NaN), so the error names the teacher's own defect; with both inputs
        // valid, a mixture that is -inf everywhere is the documented +inf row.
        check_row(t_row, inv_t, "teacher_logits", row)?;
        if sb.max == f32::NEG_INFINITY && !sb.sum.is_nan() {
            return Ok(None);
        }
        return Err(e);
    }
    // lse = M + ln Z, kept as two parts: rounding M + ln Z to one f32 would lose most digits
    // of a small ln Z (a nearly one-hot row), and every q = e_a · exp(ma − M) / Z with it.
    let (ln_za, ln_zb) = (sa.sum.ln(), sb.sum.ln());
    let c = ((sa.max as f64 - sb.max as f64) + (ln_za as f64 - ln_zb as f64)) as f32;
    // ln Z_a − ln Z_b as one log of a ratio: rounded to a few eps, not eps·|ln Z|.
    let c_z = (sa.sum as f64 / sb.sum as f64).ln();
    for k in 0..sc.fa.len() {
        if closed == Closed::Reverse {
            // C_k of `reverse_finish`, from the block shifts (Σ e_b is not needed there).
            sc.bzb[k] = ((sc.fa[k] as f64 - sa.max as f64) - (sc.fb[k] as f64 - sb.max as f64) - c_z) as f32;
        }
        sc.fa[k] = (sc.fa[k] - sa.max).exp() / sa.sum;
        sc.fb[k] = (sc.fb[k] - sb.max).exp() / sb.sum;
    }
    let c_z = c_z as f32;
    Ok(Some(Softmax { sa, sb, ln_za, ln_zb, c, c_z, infinite }))
}

/// The kernel of a [`Div`].
///
/// Pass 1 ([`pass1`]) reads the inputs once: per block its maxima `ma`, `mb`, the exponentials
/// `e_a = exp(a − ma)`, `e_b = exp(b − mb)` (kept in the scratch), their sums, and for forward
/// KL `Σ e_b (b − a)`. The block statistics then give `lse_a`, `lse_b`, and `q = e_a · exp(ma −
/// lse_a)` without another `exp`. Forward KL is then complete (its loss is
/// `Σ_blocks f_b (Σ e_b (b − a) + c Σ e_b)`, `c = lse_a − lse_b`), and its gradient `q − p`
/// is written from the scratch alone. Other divergences make pass 2 over the inputs and the
/// scratch (loss and `S = Σ q g`, leaving `q` and `q g` in the scratch) and write the gradient
/// `q g − q S` from the scratch in pass 3. TAID is forward KL against the teacher `b` that
/// [`Div::teacher`] mixes in each block as it is loaded, so it costs one FMA per element more.
impl<D: Div> RowLoss for D {
    const SCRATCH_ROWS: usize = 2;

    #[inline(always)]
    fn row<M: Math, S: Elem, T: Elem>(self, p: RowParams, s_row: &[S], t_row: &[T], grad: Option<&mut [S]>, row: usize, scratch: &mut [f32]) -> Result<f32> {
        let v = s_row.len();
        let mut sc = Scratch::split(scratch, v, Self::SCRATCH_ROWS);
        let Some(st) = pass1::<M, D, S, T>(&self, D::CLOSED, p.inv_t, s_row, t_row, row, &mut sc)? else {
            return Ok(infinite_row(grad));
        };
        match D::CLOSED {
            Closed::Forward => return Ok(forward_finish(p, v, &st, &sc, grad)),
            Closed::Reverse => return Ok(reverse_finish(p, v, &st, &sc, grad)),
            Closed::No => {}
        }
        let mut a = [0.0f32; BLOCK];
        let mut b = [0.0f32; BLOCK];

        // Pass 2: loss and Σ q h; q and q h replace e_a and e_b in the scratch. d is formed
        // from the shifted logits, d = (x − y) − (ln Z_a − ln Z_b) with x = a − M_a,
        // y = b − M_b: where p ≈ q, x − y is exact and d keeps its relative precision, instead
        // of carrying the rounding of lq and lp (≈ eps·|ln Z|) that the deviation form would
        // amplify.
        let (mut loss, mut s_sum) = (0.0f64, 0.0f64);
        for (k, start) in (0..v).step_by(BLOCK).enumerate() {
            let (s_blk, t_blk) = (&s_row[start..v.min(start + BLOCK)], &t_row[start..v.min(start + BLOCK)]);
            // A loss of q and p alone (TVD) reads only the scratch: `a`, `b` are then unused.
            let n = if D::USES_D { load_pair(&self, s_blk, t_blk, &mut a, &mut b, p.inv_t) } else { s_blk.len().div_ceil(LANES) * LANES };
            let (sfa, sfb) = (sc.fa[k], sc.fb[k]);
            let (xa, xb) = (&mut sc.ea[k * BLOCK..k * BLOCK + n], &mut sc.eb[k * BLOCK..k * BLOCK + n]);
            let mut acc_l = [0.0f32; LANES];
            let mut acc_s = [0.0f32; LANES];
            for (((ca, cb), xa), xb) in a[..n]
                .chunks_exact(LANES)
                .zip(b[..n].chunks_exact(LANES))
                .zip(xa.chunks_exact_mut(LANES))
                .zip(xb.chunks_exact_mut(LANES))
            {
                for l in 0..LANES {
                    let q = xa[l] * sfa;
                    let pp = xb[l] * sfb;
                    let t = if D::USES_D {
                        let (x, y) = (ca[l] - st.sa.max, cb[l] - st.sb.max);
                        let (lq, lp) = (x - st.ln_za, y - st.ln_zb);
                        self.terms::<M>(lq, lp, log_ratio(x, y, st.c_z), q, pp)
                    } else {
                        self.terms::<M>(0.0, 0.0, 0.0, q, pp)
                    };
                    acc_l[l] += t.loss;
                    acc_s[l] += t.qg;
                    xa[l] = q;
                    xb[l] = t.qg;
                }
            }
            loss += acc_l.iter().map(|&x| x as f64).sum::<f64>();
            s_sum += acc_s.iter().map(|&x| x as f64).sum::<f64>();
        }

        if loss == f64::INFINITY {
            return Ok(infinite_row(grad));
        }
        // Pass 3: the gradient (q h − q Σ q h) · grad_scale, from the scratch.
        if let Some(gr) = grad {
            let s = s_sum as f32;
            write_gradient(v, gr, |_| (), |g, (), q, qg| {
                for ((g, &q), &qg) in g.iter_mut().zip(q).zip(qg) {
                    *g = (qg - q * s) * p.grad_scale;
                }
            }, &sc);
        }
        Ok(loss as f32 * p.loss_scale)
    }
}

/// Forward KL's loss and gradient from pass 1's scratch alone: `ℓ = Σ_blocks f_b (Σ e_b (b − a)
/// + c Σ e_b)` with `c = lse_a − lse_b`, and `∂/∂a = q − p`.
#[inline(always)]
fn forward_finish<S: Elem>(p: RowParams, v: usize, st: &Softmax, sc: &Scratch, grad: Option<&mut [S]>) -> f32 {
    if st.infinite {
        return infinite_row(grad);
    }
    let mut loss = 0.0f64;
    for k in 0..sc.fb.len() {
        loss += sc.fb[k] as f64 * (sc.bkl[k] as f64 + st.c as f64 * sc.bzb[k] as f64);
    }
    if let Some(gr) = grad {
        write_gradient(v, gr, |k| (sc.fa[k] * p.grad_scale, sc.fb[k] * p.grad_scale), |g, (sq, sp), ea, eb| {
            for ((g, &ea), &eb) in g.iter_mut().zip(ea).zip(eb) {
                *g = ea * sq - eb * sp;
            }
        }, sc);
    }
    loss as f32 * p.loss_scale
}

/// Reverse KL's loss and gradient from pass 1's scratch alone. With `u` the shifted logits'
/// difference, `d = u + C_k` in block `k`, where `C_k = (m_a − M_a) − (m_b − M_b) − (ln Z_a −
/// ln Z_b)` (the block shifts `m`, the row maxima `M`; pass 1 leaves it in `sc.bzb`), so `ℓ = Σ q d = Σ_k f_a (Σ e_a u + C_k
/// Σ e_a)` and `∂/∂a = q (d − ℓ) = e_a f_a (u + (C_k − ℓ))`: `d` from the shifted logits, as
/// in the general kernel.
#[inline(always)]
fn reverse_finish<S: Elem>(p: RowParams, v: usize, st: &Softmax, sc: &Scratch, grad: Option<&mut [S]>) -> f32 {
    if st.infinite {
        return infinite_row(grad);
    }
    let block_c = |k: usize| sc.bzb[k] as f64;
    let mut loss = 0.0f64;
    for k in 0..sc.fa.len() {
        loss += sc.fa[k] as f64 * (sc.bkl[k] as f64 + block_c(k) * sc.bza[k] as f64);
    }
    if loss == f64::INFINITY {
        return infinite_row(grad);
    }
    if let Some(gr) = grad {
        write_gradient(v, gr, |k| (sc.fa[k] * p.grad_scale, (block_c(k) - loss) as f32), |g, (sq, kk), ea, u| {
            for ((g, &ea), &u) in g.iter_mut().zip(ea).zip(u) {
                *g = ea * sq * (u + kk);
            }
        }, sc);
    }
    loss as f32 * p.loss_scale
}

/// Write a gradient row block by block from the scratch rows: `body(g, consts(k), ea, eb)` fills
/// the block's `g` from its `sc.ea`, `sc.eb`, then it is stored as `S`.
#[inline(always)]
fn write_gradient<S: Elem, K: Copy>(v: usize, gr: &mut [S], consts: impl Fn(usize) -> K, body: impl Fn(&mut [f32], K, &[f32], &[f32]), sc: &Scratch) {
    let mut g = [0.0f32; BLOCK];
    for (k, start) in (0..v).step_by(BLOCK).enumerate() {
        let end = v.min(start + BLOCK);
        let n = (end - start).div_ceil(LANES) * LANES;
        body(&mut g[..n], consts(k), &sc.ea[k * BLOCK..k * BLOCK + n], &sc.eb[k * BLOCK..k * BLOCK + n]);
        S::store(&g[..end - start], &mut gr[start..end]);
    }
}

/// TAID at `t = 0`: the mixed teacher is the student, so `ℓ = 0` and the gradient is 0; the
/// rows are still checked like every other loss's.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unmoved;

impl RowLoss for Unmoved {
    const SCRATCH_ROWS: usize = 0;

    #[inline(always)]
    fn row<M: Math, S: Elem, T: Elem>(self, p: RowParams, s_row: &[S], t_row: &[T], grad: Option<&mut [S]>, row: usize, _scratch: &mut [f32]) -> Result<f32> {
        check_row(s_row, p.inv_t, "student_logits", row)?;
        check_row(t_row, p.inv_t, "teacher_logits", row)?;
        if let Some(g) = grad {
            g.fill(S::zero());
        }
        Ok(0.0)
    }
}

/// A row whose loss is `+inf`: zero gradient (no finite descent direction).
#[inline(always)]
pub(super) fn infinite_row<S: Elem>(grad: Option<&mut [S]>) -> f32 {
    if let Some(g) = grad {
        g.fill(S::zero());
    }
    f32::INFINITY
}

/// `d = log q − log p` from the shifted logits `x = a − M_a`, `y = b − M_b` and
/// `c_z = ln Z_a − ln Z_b`; 0 where both are `-inf` (the NaN of `-inf − -inf`: both
/// probabilities are 0).
#[inline(always)]
pub(super) fn log_ratio(x: f32, y: f32, c_z: f32) -> f32 {
    let dd = (x - y) - c_z;
    if dd.is_nan() {
        0.0
    } else {
        dd
    }
}

#[inline(always)]
fn finite_or_zero(m: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        m
    }
}

/// Load one block of both rows scaled by `inv_t` (the teacher as [`Div::teacher`] sees it),
/// padded with `-inf` to a multiple of [`LANES`]; returns the padded length.
#[inline(always)]
pub(super) fn load_pair<D: Div, S: Elem, T: Elem>(div: &D, s: &[S], t: &[T], a: &mut [f32; BLOCK], b: &mut [f32; BLOCK], inv_t: f32) -> usize {
    let n = load_scaled(s, a, inv_t);
    load_scaled(t, b, inv_t);
    if D::MIXED_TEACHER {
        for (x, y) in a[..n].iter().zip(b[..n].iter_mut()) {
            *y = div.teacher(*x, *y);
        }
    }
    n
}

/// Convert `src` into `dst[..src.len()]` times `scale`, pad with `-inf` up to a multiple of
/// [`LANES`], and return the padded length.
#[inline(always)]
pub(super) fn load_scaled<E: Elem>(src: &[E], dst: &mut [f32; BLOCK], scale: f32) -> usize {
    let n = src.len();
    E::load_scaled(src, &mut dst[..n], scale);
    let padded = n.div_ceil(LANES) * LANES;
    dst[n..padded].fill(f32::NEG_INFINITY);
    padded
}

/// The check of [`check_stats`] on a row by itself (its maximum and whether it holds a NaN),
/// for the kernels whose pass 1 does not see that row as it is.
fn check_row<E: Elem>(src: &[E], inv_t: f32, tensor: &'static str, row: usize) -> Result<()> {
    let mut x = [0.0f32; BLOCK];
    let (mut max, mut nan) = (f32::NEG_INFINITY, false);
    for chunk in src.chunks(BLOCK) {
        let n = load_scaled(chunk, &mut x, inv_t);
        max = max.max(lane_max(&x[..n]));
        nan |= x[..n].iter().any(|v| v.is_nan());
    }
    check_stats(LseStats { max, sum: if nan { f32::NAN } else { 1.0 } }, tensor, row)
}

fn check_stats(s: LseStats, tensor: &'static str, row: usize) -> Result<()> {
    let detail = if s.max.is_nan() || s.sum.is_nan() {
        "contains NaN"
    } else if s.max == f32::INFINITY {
        "contains +inf"
    } else if s.max == f32::NEG_INFINITY {
        "is entirely -inf"
    } else {
        return Ok(());
    };
    Err(KdError::NonFiniteRow { tensor, row, detail })
}
