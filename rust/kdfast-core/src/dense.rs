//! Dense (full-vocabulary) distillation losses: loss and student-logit gradient, fused.
//!
//! Per row, the inputs are read in blocks of `BLOCK` columns, each converted to f32 in an
//! L1-resident buffer (never a copy of the tensor), and every `exp` of the inputs is taken once:
//! 1. per-block maxima and exponentials into a per-thread scratch row, giving the row's
//!    log-sum-exps ([`LseStats`]) and `q`, `p` without further `exp`s (forward KL: its loss too);
//! 2. (other divergences) the loss `Σ t_i` and `S = Σ q_i g_i` (see [`crate::divergence`]);
//! 3. the gradient `(q_i g_i − q_i S) · grad_scale` from the scratch (forward KL: `q − p`).
//!
//! Accumulation is in f32 lanes within a block and in f64 across blocks. The tail of the last
//! block is padded with `-inf` on both sides, which every divergence maps to a zero term.

use crate::divergence::{Div, Divergence, ForwardKl, Jsd, ReverseKl, SkewForwardKl, SkewReverseKl, Tvd};
use crate::elem::Elem;
use crate::error::{KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{lane_max, LseStats, LANES};
use crate::threads;

/// Columns per block: three f32 buffers of this size stay in L1.
pub const BLOCK: usize = 1024;

/// Rows of a matrix in memory: row `r` is `data[r * row_stride .. r * row_stride + cols]`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a, E> {
    pub data: &'a [E],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a, E> Rows<'a, E> {
    /// Check that the described rows lie inside `data`.
    pub fn new(data: &'a [E], rows: usize, cols: usize, row_stride: usize, name: &'static str) -> Result<Self> {
        let needed = if rows == 0 { 0 } else { (rows - 1) * row_stride + cols };
        if (rows > 1 && row_stride < cols) || needed > data.len() {
            return Err(KdError::InvalidArgument {
                name,
                expected: format!("{rows} rows of {cols} columns with row stride ≥ {cols} inside {} elements", data.len()),
                got: format!("row stride {row_stride}"),
            });
        }
        Ok(Rows { data, rows, cols, row_stride })
    }

    #[inline]
    pub fn row(&self, r: usize) -> &'a [E] {
        &self.data[r * self.row_stride..r * self.row_stride + self.cols]
    }
}

/// Options of a dense loss call.
#[derive(Clone, Copy, Debug)]
pub struct DenseConfig {
    pub divergence: Divergence,
    /// T > 0.
    pub temperature: f32,
    /// Multiply the loss (and gradient) by T² (Hinton).
    pub t2_scale: bool,
    /// Extra factor on the gradient only (e.g. 1 / D of a mean reduction).
    pub grad_scale: f32,
    /// Columns of the student's gradient row (≥ vocabulary used); the excess is zero-filled.
    pub grad_cols: usize,
}

/// Per-row losses (and optionally the gradient w.r.t. the student logits) of one dense loss.
///
/// * `labels`: rows whose label equals `ignore_index` get loss 0 and a zero gradient row.
/// * `loss_out[r]`: `ℓ_r` (times T² when `t2_scale`).
/// * `grad_out`: contiguous `[rows, grad_cols]`, written as `∂(ℓ_r · grad_scale)/∂z_s`.
#[allow(clippy::too_many_arguments)]
pub fn dense_loss<S: Elem, T: Elem>(
    student: Rows<S>,
    teacher: Rows<T>,
    labels: Option<(&[i64], i64)>,
    cfg: &DenseConfig,
    loss_out: &mut [f32],
    grad_out: Option<&mut [S]>,
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    validate(&student, &teacher, labels, cfg, loss_out, grad_out.as_deref())?;
    match cfg.divergence {
        Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => {
            run(ForwardKl, student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
        Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => {
            run(ReverseKl, student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
        Divergence::Jsd { beta } => run(Jsd::new(beta), student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads),
        Divergence::SkewForwardKl { skew } => {
            run(SkewForwardKl::new(skew), student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
        Divergence::SkewReverseKl { skew } => {
            run(SkewReverseKl::new(skew), student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
        Divergence::Tvd => run(Tvd, student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads),
    }
}

fn validate<S: Elem, T: Elem>(
    student: &Rows<S>,
    teacher: &Rows<T>,
    labels: Option<(&[i64], i64)>,
    cfg: &DenseConfig,
    loss_out: &[f32],
    grad_out: Option<&[S]>,
) -> Result<()> {
    cfg.divergence.validate()?;
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return Err(KdError::InvalidArgument {
            name: "temperature",
            expected: "a finite number > 0".into(),
            got: format!("{}", cfg.temperature),
        });
    }
    let n = student.rows;
    let mismatch = |what: String| Err(KdError::ShapeMismatch { what });
    if teacher.rows != n || loss_out.len() != n {
        return mismatch(format!("student has {n} rows, teacher {}, loss output {}", teacher.rows, loss_out.len()));
    }
    if student.cols != teacher.cols || student.cols == 0 {
        return mismatch(format!("vocabulary sizes: student {}, teacher {} (need equal and > 0)", student.cols, teacher.cols));
    }
    if let Some((l, _)) = labels {
        if l.len() != n {
            return mismatch(format!("labels has {} entries for {n} rows", l.len()));
        }
    }
    if let Some(g) = grad_out {
        if cfg.grad_cols < student.cols || g.len() != n * cfg.grad_cols {
            return mismatch(format!(
                "gradient buffer of {} elements for {n} rows of {} columns (≥ {})",
                g.len(),
                cfg.grad_cols,
                student.cols
            ));
        }
    }
    Ok(())
}

/// The per-call constants of the row kernel.
#[derive(Clone, Copy)]
struct RowParams<D> {
    div: D,
    inv_t: f32,
    loss_scale: f32,
    grad_scale: f32,
}

#[allow(clippy::too_many_arguments)]
fn run<D: Div, S: Elem, T: Elem>(
    div: D,
    student: Rows<S>,
    teacher: Rows<T>,
    labels: Option<(&[i64], i64)>,
    cfg: &DenseConfig,
    loss_out: &mut [f32],
    grad_out: Option<&mut [S]>,
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    let t = cfg.temperature;
    let loss_scale = if cfg.t2_scale { t * t } else { 1.0 };
    let p = RowParams { div, inv_t: 1.0 / t, loss_scale, grad_scale: cfg.grad_scale * loss_scale / t };
    let masked = |r: usize| labels.is_some_and(|(l, ig)| l[r] == ig);
    let body = |r: usize, loss: &mut f32, grad: Option<&mut [S]>| -> Result<()> {
        if masked(r) {
            *loss = 0.0;
            if let Some(g) = grad {
                g.fill(S::zero());
            }
            return Ok(());
        }
        let (s_row, t_row) = (student.row(r), teacher.row(r));
        *loss = SCRATCH.with_borrow_mut(|buf| {
            let need = scratch_len(s_row.len());
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            isa.run(RowJob { p, s_row, t_row, grad, row: r, scratch: &mut buf[..need] })
        })?;
        Ok(())
    };
    threads::for_each_row(loss_out, grad_out, cfg.grad_cols, num_threads, body)
}

/// One row's work, compiled once per instruction set by [`Isa::run`].
struct RowJob<'a, D, S, T> {
    p: RowParams<D>,
    s_row: &'a [S],
    t_row: &'a [T],
    grad: Option<&'a mut [S]>,
    row: usize,
    scratch: &'a mut [f32],
}

impl<D: Div, S: Elem, T: Elem> Kernel for RowJob<'_, D, S, T> {
    type Output = Result<f32>;
    #[inline(always)]
    fn run<M: Math>(self) -> Result<f32> {
        row_kernel::<M, D, S, T>(self.p, self.s_row, self.t_row, self.grad, self.row, self.scratch)
    }
}

thread_local! {
    /// Per-thread row scratch: unnormalised exponentials, then `q` and `q·g` (2 × V f32).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of scratch a row of `v` columns needs: two padded rows and five per-block statistics.
fn scratch_len(v: usize) -> usize {
    let blocks = v.div_ceil(BLOCK);
    2 * blocks * BLOCK + 5 * blocks
}

/// Loss of one row, writing its gradient when asked.
///
/// Pass 1 reads the inputs once: per block its maxima `ma`, `mb`, the exponentials
/// `e_a = exp(a − ma)`, `e_b = exp(b − mb)` (kept in `scratch`), their sums, and for forward KL
/// `Σ e_b (b − a)`. The block statistics then give `lse_a`, `lse_b`, and `q = e_a · exp(ma −
/// lse_a)` without another `exp`. Forward KL is then complete (its loss is
/// `Σ_blocks f_b (Σ e_b (b − a) + c Σ e_b)`, `c = lse_a − lse_b`), and its gradient `q − p`
/// is written from the scratch alone. Other divergences make pass 2 over the inputs and the
/// scratch (loss and `S = Σ q g`, leaving `q` and `q g` in the scratch) and write the gradient
/// `q g − q S` from the scratch in pass 3.
#[inline(always)]
fn row_kernel<M: Math, D: Div, S: Elem, T: Elem>(
    p: RowParams<D>,
    s_row: &[S],
    t_row: &[T],
    grad: Option<&mut [S]>,
    row: usize,
    scratch: &mut [f32],
) -> Result<f32> {
    let v = s_row.len();
    let blocks = v.div_ceil(BLOCK);
    let (ea, rest) = scratch.split_at_mut(blocks * BLOCK);
    let (eb, stats) = rest.split_at_mut(blocks * BLOCK);
    // Per block: ma, mb, Σe_a, Σe_b, Σ e_b (b − a).
    let (bma, stats) = stats.split_at_mut(blocks);
    let (bmb, stats) = stats.split_at_mut(blocks);
    let (bza, stats) = stats.split_at_mut(blocks);
    let (bzb, bkl) = stats.split_at_mut(blocks);
    let mut a = [0.0f32; BLOCK];
    let mut b = [0.0f32; BLOCK];
    let fused = D::KNOWN_S.is_some();

    // Pass 1.
    let (mut sa, mut sb) = (LseStats::EMPTY, LseStats::EMPTY);
    for (k, start) in (0..v).step_by(BLOCK).enumerate() {
        let end = v.min(start + BLOCK);
        let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
        load_scaled(&t_row[start..end], &mut b, p.inv_t);
        let (ma, mb) = (lane_max(&a[..n]), lane_max(&b[..n]));
        // An all -inf block has sum 0: subtract 0 instead of -inf to avoid -inf − -inf.
        let (sha, shb) = (finite_or_zero(ma), finite_or_zero(mb));
        let (xa, xb) = (&mut ea[k * BLOCK..k * BLOCK + n], &mut eb[k * BLOCK..k * BLOCK + n]);
        let mut acc_a = [0.0f32; LANES];
        let mut acc_b = [0.0f32; LANES];
        let mut acc_k = [0.0f32; LANES];
        for (((ca, cb), xa), xb) in a[..n]
            .chunks_exact(LANES)
            .zip(b[..n].chunks_exact(LANES))
            .zip(xa.chunks_exact_mut(LANES))
            .zip(xb.chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let e_a = M::exp(ca[l] - sha);
                let e_b = M::exp(cb[l] - shb);
                xa[l] = e_a;
                xb[l] = e_b;
                acc_a[l] += e_a;
                acc_b[l] += e_b;
                if fused {
                    acc_k[l] += if e_b == 0.0 { 0.0 } else { e_b * (cb[l] - ca[l]) };
                }
            }
        }
        let (za, zb) = (acc_a.iter().sum::<f32>(), acc_b.iter().sum::<f32>());
        (bma[k], bmb[k], bza[k], bzb[k], bkl[k]) = (sha, shb, za, zb, acc_k.iter().sum());
        sa = sa.merge(LseStats { max: ma, sum: if ma == f32::NEG_INFINITY && !za.is_nan() { 0.0 } else { za } });
        sb = sb.merge(LseStats { max: mb, sum: if mb == f32::NEG_INFINITY && !zb.is_nan() { 0.0 } else { zb } });
    }
    check_stats(sa, "student_logits", row)?;
    check_stats(sb, "teacher_logits", row)?;
    // lse = M + ln Z, kept as two parts: rounding M + ln Z to one f32 would lose most digits
    // of a small ln Z (a nearly one-hot row), and every q = e_a · exp(ma − M) / Z with it.
    let (ln_za, ln_zb) = (sa.sum.ln(), sb.sum.ln());
    let c = ((sa.max as f64 - sb.max as f64) + (ln_za as f64 - ln_zb as f64)) as f32;
    // The factor from e_a to q (and e_b to p) in block k.
    let fa = |k: usize| (bma[k] - sa.max).exp() / sa.sum;
    let fb = |k: usize| (bmb[k] - sb.max).exp() / sb.sum;

    if fused {
        let mut loss = 0.0f64;
        for k in 0..blocks {
            loss += fb(k) as f64 * (bkl[k] as f64 + c as f64 * bzb[k] as f64);
        }
        if let Some(gr) = grad {
            let known_s = D::KNOWN_S.unwrap_or(0.0);
            let mut g = [0.0f32; BLOCK];
            for (k, start) in (0..v).step_by(BLOCK).enumerate() {
                let end = v.min(start + BLOCK);
                let n = (end - start).div_ceil(LANES) * LANES;
                let (xa, xb) = (&ea[k * BLOCK..k * BLOCK + n], &eb[k * BLOCK..k * BLOCK + n]);
                let (sfa, sfb) = (fa(k) * p.grad_scale, fb(k) * p.grad_scale);
                // With S = −1 (forward KL, q g = −p): grad = (q − p) · grad_scale.
                let sq = -known_s * sfa;
                for ((g, &ea), &eb) in g[..n].iter_mut().zip(xa).zip(xb) {
                    *g = ea * sq - eb * sfb;
                }
                S::store(&g[..end - start], &mut gr[start..end]);
            }
            gr[v..].fill(S::zero());
        }
        return Ok(loss as f32 * p.loss_scale);
    }

    // Pass 2: loss and S = Σ q g; q and q g replace e_a and e_b in the scratch.
    let (mut loss, mut s_sum) = (0.0f64, 0.0f64);
    for (k, start) in (0..v).step_by(BLOCK).enumerate() {
        let end = v.min(start + BLOCK);
        let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
        load_scaled(&t_row[start..end], &mut b, p.inv_t);
        let (sfa, sfb) = (fa(k), fb(k));
        let (xa, xb) = (&mut ea[k * BLOCK..k * BLOCK + n], &mut eb[k * BLOCK..k * BLOCK + n]);
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
                let lq = (ca[l] - sa.max) - ln_za;
                let lp = (cb[l] - sb.max) - ln_zb;
                let t = p.div.terms::<M>(lq, lp, lq - lp, q, pp);
                acc_l[l] += t.loss;
                acc_s[l] += t.qg;
                xa[l] = q;
                xb[l] = t.qg;
            }
        }
        loss += acc_l.iter().map(|&x| x as f64).sum::<f64>();
        s_sum += acc_s.iter().map(|&x| x as f64).sum::<f64>();
    }

    // Pass 3: the gradient (q g − q S) · grad_scale, from the scratch.
    if let Some(gr) = grad {
        let s = s_sum as f32;
        let mut g = [0.0f32; BLOCK];
        for (k, start) in (0..v).step_by(BLOCK).enumerate() {
            let end = v.min(start + BLOCK);
            let n = (end - start).div_ceil(LANES) * LANES;
            let (xa, xb) = (&ea[k * BLOCK..k * BLOCK + n], &eb[k * BLOCK..k * BLOCK + n]);
            for ((g, &q), &qg) in g[..n].iter_mut().zip(xa).zip(xb) {
                *g = (qg - q * s) * p.grad_scale;
            }
            S::store(&g[..end - start], &mut gr[start..end]);
        }
        gr[v..].fill(S::zero());
    }
    Ok(loss as f32 * p.loss_scale)
}

#[inline(always)]
fn finite_or_zero(m: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        m
    }
}

/// Convert `src` into `dst[..src.len()]` times `scale`, pad with `-inf` up to a multiple of
/// [`LANES`], and return the padded length.
#[inline(always)]
fn load_scaled<E: Elem>(src: &[E], dst: &mut [f32; BLOCK], scale: f32) -> usize {
    let n = src.len();
    E::load_scaled(src, &mut dst[..n], scale);
    let padded = n.div_ceil(LANES) * LANES;
    dst[n..padded].fill(f32::NEG_INFINITY);
    padded
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
