//! Dense (full-vocabulary) distillation losses: loss and student-logit gradient, fused.
//!
//! Per row, three streaming passes over blocks of `BLOCK` columns (each block converted to
//! f32 in an L1-resident buffer, never a copy of the row):
//! 1. online log-sum-exp of the scaled student and teacher logits ([`LseStats`]);
//! 2. the loss `Σ t_i` and `S = Σ q_i g_i` (see [`crate::divergence`]); for forward KL the
//!    gradient `q − p` is written here too;
//! 3. the gradient `(q_i g_i − q_i S) · grad_scale`, when `S` is not known in closed form.
//!
//! Accumulation is in f32 lanes within a block and in f64 across blocks. The tail of the last
//! block is padded with `-inf` on both sides, which every divergence maps to a zero term.

use crate::divergence::{Div, Divergence, ForwardKl, Jsd, ReverseKl, SkewForwardKl, SkewReverseKl, Tvd};
use crate::elem::Elem;
use crate::error::{KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{LseStats, LANES};
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
        *loss = isa.run(RowJob { p, s_row, t_row, grad, row: r })?;
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
}

impl<D: Div, S: Elem, T: Elem> Kernel for RowJob<'_, D, S, T> {
    type Output = Result<f32>;
    #[inline(always)]
    fn run<M: Math>(self) -> Result<f32> {
        row_kernel::<M, D, S, T>(self.p, self.s_row, self.t_row, self.grad, self.row)
    }
}

/// Loss of one row, writing its gradient when asked.
#[inline(always)]
fn row_kernel<M: Math, D: Div, S: Elem, T: Elem>(
    p: RowParams<D>,
    s_row: &[S],
    t_row: &[T],
    grad: Option<&mut [S]>,
    row: usize,
) -> Result<f32> {
    let v = s_row.len();
    let mut a = [0.0f32; BLOCK];
    let mut b = [0.0f32; BLOCK];
    let mut g = [0.0f32; BLOCK];

    // Pass 1: log-sum-exp of both rows.
    let (mut sa, mut sb) = (LseStats::EMPTY, LseStats::EMPTY);
    for start in (0..v).step_by(BLOCK) {
        let n = load_scaled(&s_row[start..v.min(start + BLOCK)], &mut a, p.inv_t);
        load_scaled(&t_row[start..v.min(start + BLOCK)], &mut b, p.inv_t);
        sa = sa.merge(LseStats::of_block::<M>(&a[..n]));
        sb = sb.merge(LseStats::of_block::<M>(&b[..n]));
    }
    let lse_a = checked_lse(sa, "student_logits", row)?;
    let lse_b = checked_lse(sb, "teacher_logits", row)?;

    let c = lse_a - lse_b;

    // Pass 2: loss and S (and the forward-KL gradient).
    let fused = D::KNOWN_S.is_some();
    let known_s = D::KNOWN_S.unwrap_or(0.0);
    let mut grad = grad;
    let (mut loss, mut s_sum) = (0.0f64, 0.0f64);
    for start in (0..v).step_by(BLOCK) {
        let end = v.min(start + BLOCK);
        let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
        load_scaled(&t_row[start..end], &mut b, p.inv_t);
        let mut acc_l = [0.0f32; LANES];
        let mut acc_s = [0.0f32; LANES];
        for ((ca, cb), cg) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)).zip(g.chunks_exact_mut(LANES)) {
            for l in 0..LANES {
                let t = p.div.terms::<M>(ca[l] - lse_a, cb[l] - lse_b, (ca[l] - cb[l]) - c);
                acc_l[l] += t.loss;
                acc_s[l] += t.qg;
                if fused {
                    cg[l] = (t.qg - t.q * known_s) * p.grad_scale;
                }
            }
        }
        loss += acc_l.iter().map(|&x| x as f64).sum::<f64>();
        s_sum += acc_s.iter().map(|&x| x as f64).sum::<f64>();
        if fused {
            if let Some(gr) = grad.as_deref_mut() {
                S::store(&g[..end - start], &mut gr[start..end]);
            }
        }
    }

    if let Some(gr) = grad {
        // Pass 3: the gradient, once S is known.
        if !fused {
            let s = s_sum as f32;
            for start in (0..v).step_by(BLOCK) {
                let end = v.min(start + BLOCK);
                let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
                load_scaled(&t_row[start..end], &mut b, p.inv_t);
                for ((ca, cb), cg) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)).zip(g.chunks_exact_mut(LANES)) {
                    for l in 0..LANES {
                        let t = p.div.terms::<M>(ca[l] - lse_a, cb[l] - lse_b, (ca[l] - cb[l]) - c);
                        cg[l] = (t.qg - t.q * s) * p.grad_scale;
                    }
                }
                S::store(&g[..end - start], &mut gr[start..end]);
            }
        }
        gr[v..].fill(S::zero());
    }
    Ok(loss as f32 * p.loss_scale)
}

/// Convert `src` into `dst[..src.len()]` times `scale`, pad with `-inf` up to a multiple of
/// [`LANES`], and return the padded length.
#[inline(always)]
fn load_scaled<E: Elem>(src: &[E], dst: &mut [f32; BLOCK], scale: f32) -> usize {
    let n = src.len();
    E::load(src, &mut dst[..n]);
    for x in dst[..n].iter_mut() {
        *x *= scale;
    }
    let padded = n.div_ceil(LANES) * LANES;
    dst[n..padded].fill(f32::NEG_INFINITY);
    padded
}

fn checked_lse(s: LseStats, tensor: &'static str, row: usize) -> Result<f32> {
    let detail = if s.max.is_nan() || s.sum.is_nan() {
        "contains NaN"
    } else if s.max == f32::INFINITY {
        "contains +inf"
    } else if s.max == f32::NEG_INFINITY {
        "is entirely -inf"
    } else {
        return Ok(s.logsumexp());
    };
    Err(KdError::NonFiniteRow { tensor, row, detail })
}
