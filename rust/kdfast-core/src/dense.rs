//! Dense (full-vocabulary) distillation losses: loss and student-logit gradient, fused.
//!
//! Per row, the inputs are read in blocks of `BLOCK` columns, each converted to f32 in an
//! L1-resident buffer (never a copy of the tensor), and every `exp` of the inputs is taken once:
//! 1. per-block maxima and exponentials into a per-thread scratch row, giving the row's
//!    log-sum-exps ([`LseStats`]) and `q`, `p` without further `exp`s (forward KL: its loss too);
//! 2. (other divergences) the loss `Σ t_i` and `S = Σ q_i g_i` (see [`crate::divergence`]);
//! 3. the gradient `(q_i h_i − q_i Σ q h) · grad_scale` from the scratch (forward KL: `q − p`).
//!
//! Accumulation is in f32 lanes within a block and in f64 across blocks. The tail of the last
//! block is padded with `-inf` on both sides, which every divergence maps to a zero term.
//!
//! A row whose loss is `+inf` (forward KL: a teacher entry alive where the student's logit is
//! `-inf`; reverse KL: the converse; see [`crate::divergence`]) gets a zero gradient row: there
//! is no finite descent direction, and a zero row keeps the other rows' update finite.
//!
//! Scratch: `8·V` bytes per thread (two f32 rows). Up to [`SCRATCH_CAP`] it is kept in a
//! thread-local buffer between calls; larger rows take buffers owned by the call (one per
//! thread that runs rows), freed when it returns, so a call at a huge vocabulary does not leave
//! gigabytes resident.

use crate::divergence::{Div, Divergence, ForwardKl, Jsd, ReverseKl, SkewForwardKl, SkewReverseKl, Tvd};
use crate::elem::Elem;
use crate::error::{KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{lane_max, LseStats, LANES};
use crate::threads;
use std::sync::Mutex;

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
        // λ = 0 is the plain KL exactly (including its +inf rule).
        Divergence::SkewForwardKl { skew: 0.0 } => {
            run(ForwardKl, student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
        Divergence::SkewReverseKl { skew: 0.0 } => {
            run(ReverseKl, student, teacher, labels, cfg, loss_out, grad_out, isa, num_threads)
        }
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
    let need = scratch_len(student.cols);
    let call_buffers = Mutex::new(Vec::new());
    let body = |r: usize, loss: &mut f32, grad: Option<&mut [S]>| -> Result<()> {
        if masked(r) {
            *loss = 0.0;
            if let Some(g) = grad {
                g.fill(S::zero());
            }
            return Ok(());
        }
        let (s_row, t_row) = (student.row(r), teacher.row(r));
        *loss = with_scratch(need, &call_buffers, |scratch| isa.run(RowJob { p, s_row, t_row, grad, row: r, scratch }))?;
        Ok(())
    };
    threads::for_each_row(loss_out, grad_out, cfg.grad_cols, num_threads, body)
}

/// Largest scratch (bytes) kept per thread between calls: 16 MiB, rows up to V ≈ 2M columns.
pub const SCRATCH_CAP: usize = 16 << 20;

/// Run `f` on a zeroed-or-reused scratch of `need` floats: the thread-local buffer when `need`
/// fits under [`SCRATCH_CAP`], else a buffer from `spare` (the call's own, returned there after
/// the row, so each thread allocates at most once per call and everything is freed with it).
fn with_scratch<R>(need: usize, spare: &Mutex<Vec<Vec<f32>>>, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if need * std::mem::size_of::<f32>() <= SCRATCH_CAP {
        return SCRATCH.with_borrow_mut(|buf| {
            if buf.len() < need {
                // Exact, so the retained capacity stays under the cap.
                buf.reserve_exact(need - buf.len());
                buf.resize(need, 0.0);
            }
            f(&mut buf[..need])
        });
    }
    let lock = || spare.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = lock().pop().unwrap_or_else(|| vec![0.0; need]);
    let out = f(&mut buf);
    lock().push(buf);
    out
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
    /// Per-thread row scratch: unnormalised exponentials, then `q` and `q·h` (2 × V f32), for
    /// rows up to [`SCRATCH_CAP`].
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
    let mut infinite = false;
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
        let mut acc_inf = [false; LANES];
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
                    // Forward KL's +inf: the teacher alive (even if e_b underflowed), q = 0.
                    acc_inf[l] |= (ca[l] == f32::NEG_INFINITY) & (cb[l] != f32::NEG_INFINITY);
                }
            }
        }
        let (za, zb) = (acc_a.iter().sum::<f32>(), acc_b.iter().sum::<f32>());
        (bma[k], bmb[k], bza[k], bzb[k], bkl[k]) = (sha, shb, za, zb, acc_k.iter().sum());
        infinite |= acc_inf.iter().any(|&x| x);
        sa = sa.merge(LseStats { max: ma, sum: if ma == f32::NEG_INFINITY && !za.is_nan() { 0.0 } else { za } });
        sb = sb.merge(LseStats { max: mb, sum: if mb == f32::NEG_INFINITY && !zb.is_nan() { 0.0 } else { zb } });
    }
    check_stats(sa, "student_logits", row)?;
    check_stats(sb, "teacher_logits", row)?;
    // lse = M + ln Z, kept as two parts: rounding M + ln Z to one f32 would lose most digits
    // of a small ln Z (a nearly one-hot row), and every q = e_a · exp(ma − M) / Z with it.
    let (ln_za, ln_zb) = (sa.sum.ln(), sb.sum.ln());
    let c = ((sa.max as f64 - sb.max as f64) + (ln_za as f64 - ln_zb as f64)) as f32;
    // ln Z_a − ln Z_b as one log of a ratio: rounded to a few eps, not eps·|ln Z|.
    let c_z = (sa.sum as f64 / sb.sum as f64).ln() as f32;
    // The factor from e_a to q (and e_b to p) in block k.
    let fa = |k: usize| (bma[k] - sa.max).exp() / sa.sum;
    let fb = |k: usize| (bmb[k] - sb.max).exp() / sb.sum;

    if fused && infinite {
        if let Some(gr) = grad {
            gr.fill(S::zero());
        }
        return Ok(f32::INFINITY);
    }
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

    // Pass 2: loss and Σ q h; q and q h replace e_a and e_b in the scratch. d is formed from
    // the shifted logits, d = (x − y) − (ln Z_a − ln Z_b) with x = a − M_a, y = b − M_b: where
    // p ≈ q, x − y is exact and d keeps its relative precision, instead of carrying the
    // rounding of lq and lp (≈ eps·|ln Z|) that the deviation form would amplify.
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
                let (x, y) = (ca[l] - sa.max, cb[l] - sb.max);
                let (lq, lp) = (x - ln_za, y - ln_zb);
                // NaN only from -inf − -inf: both probabilities are 0.
                let dd = (x - y) - c_z;
                let d = if dd.is_nan() { 0.0 } else { dd };
                let t = p.div.terms::<M>(lq, lp, d, q, pp);
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
        if let Some(gr) = grad {
            gr.fill(S::zero());
        }
        return Ok(f32::INFINITY);
    }
    // Pass 3: the gradient (q h − q Σ q h) · grad_scale, from the scratch.
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
