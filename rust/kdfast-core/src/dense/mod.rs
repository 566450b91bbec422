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
//! The kernels: [`pointwise`] runs every [`Div`] (the losses that are a sum of per-element
//! terms, TAID included: forward KL against a teacher mixed block by block as it is read);
//! [`akl`] runs Adaptive KL, whose weights need the teacher's head ([`head`]: a selection inside
//! the streaming passes, no sort of the row).
//!
//! Scratch: `8·V` bytes per thread (two f32 rows; AKL: three, `12·V`). Up to [`SCRATCH_CAP`]
//! it is kept in a thread-local buffer between calls; larger rows take buffers owned by the call
//! (one per thread that runs rows), freed when it returns, so a call at a huge vocabulary does
//! not leave gigabytes resident.

/// Run `$body` with `$d` bound to the per-element math ([`Div`]) of `$div`; `$zero` for TAID at
/// `t = 0` (the mixed teacher is the student: ℓ = 0, a zero gradient) and `$akl` for AKL (not a
/// [`Div`]: its weights need the teacher's head). The one place where a parameter at the end of
/// its range becomes the plain KL it equals (β = 0 and λ = 0 and t = 1 are forward KL, β = 1 and
/// λ = 0 reverse KL, including their `+inf` rule), for every dense kernel.
macro_rules! with_divergence {
    ($div:expr, $d:ident => $body:expr, zero => $zero:expr, akl($h:ident) => $akl:expr $(,)?) => {{
        use $crate::divergence::{Divergence as V, ForwardKl, Jsd, ReverseKl, SkewForwardKl, SkewReverseKl, Taid, Tvd};
        match $div {
            V::ForwardKl | V::Jsd { beta: 0.0 } | V::SkewForwardKl { skew: 0.0 } | V::Taid { t: 1.0 } => {
                let $d = ForwardKl;
                $body
            }
            V::ReverseKl | V::Jsd { beta: 1.0 } | V::SkewReverseKl { skew: 0.0 } => {
                let $d = ReverseKl;
                $body
            }
            V::Jsd { beta } => {
                let $d = Jsd::new(beta);
                $body
            }
            V::SkewForwardKl { skew } => {
                let $d = SkewForwardKl::new(skew);
                $body
            }
            V::SkewReverseKl { skew } => {
                let $d = SkewReverseKl::new(skew);
                $body
            }
            V::Tvd => {
                let $d = Tvd;
                $body
            }
            V::Taid { t: 0.0 } => $zero,
            V::Taid { t } => {
                let $d = Taid::new(t);
                $body
            }
            V::Akl { head_mass: $h } => $akl,
        }
    }};
}

mod akl;
mod head;
mod pointwise;
pub mod head_mass;
pub mod slice;

use crate::divergence::{Akl, Divergence};
use crate::elem::Elem;
use crate::error::{check_temperature, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
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
    let call = Call { student, teacher, labels, cfg, isa, num_threads };
    with_divergence!(cfg.divergence,
        d => call.run(d, loss_out, grad_out),
        zero => call.run(pointwise::Unmoved, loss_out, grad_out),
        akl(head_mass) => call.run(Akl { head_mass }, loss_out, grad_out),
    )
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
    check_temperature(cfg.temperature)?;
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

/// The per-call constants of a row kernel.
#[derive(Clone, Copy)]
struct RowParams {
    inv_t: f32,
    loss_scale: f32,
    grad_scale: f32,
}

/// The loss of one row, as a kernel over its math (one per kind of loss).
trait RowLoss: Copy + Send + Sync {
    /// f32 rows of `V` (padded to whole blocks) of scratch the kernel needs.
    const SCRATCH_ROWS: usize;
    /// `ℓ` of the row (times `loss_scale`), writing `∂(ℓ · grad_scale)/∂z_s` into `grad[..V]`
    /// when asked (the caller zero-fills `grad[V..]`).
    fn row<M: Math, S: Elem, T: Elem>(self, p: RowParams, s_row: &[S], t_row: &[T], grad: Option<&mut [S]>, row: usize, scratch: &mut [f32]) -> Result<f32>;
}

/// The inputs of one call, shared by every kind of loss.
struct Call<'a, S, T> {
    student: Rows<'a, S>,
    teacher: Rows<'a, T>,
    labels: Option<(&'a [i64], i64)>,
    cfg: &'a DenseConfig,
    isa: Isa,
    num_threads: usize,
}

impl<S: Elem, T: Elem> Call<'_, S, T> {
    fn run<L: RowLoss>(&self, loss: L, loss_out: &mut [f32], grad_out: Option<&mut [S]>) -> Result<()> {
        let (cfg, isa, labels) = (self.cfg, self.isa, self.labels);
        let t = cfg.temperature;
        let loss_scale = if cfg.t2_scale { t * t } else { 1.0 };
        let p = RowParams { inv_t: 1.0 / t, loss_scale, grad_scale: cfg.grad_scale * loss_scale / t };
        let masked = |r: usize| labels.is_some_and(|(l, ig)| l[r] == ig);
        let v = self.student.cols;
        let need = scratch_len(v, L::SCRATCH_ROWS);
        let call_buffers = Mutex::new(Vec::new());
        let body = |r: usize, out: &mut f32, grad: Option<&mut [S]>| -> Result<()> {
            if masked(r) {
                *out = 0.0;
                if let Some(g) = grad {
                    g.fill(S::zero());
                }
                return Ok(());
            }
            let (s_row, t_row) = (self.student.row(r), self.teacher.row(r));
            let (grad, pad) = match grad {
                Some(g) => {
                    let (g, pad) = g.split_at_mut(v);
                    (Some(g), Some(pad))
                }
                None => (None, None),
            };
            *out = with_scratch(need, &call_buffers, |scratch| isa.run(RowJob { loss, p, s_row, t_row, grad, row: r, scratch }))?;
            if let Some(pad) = pad {
                pad.fill(S::zero());
            }
            Ok(())
        };
        threads::for_each_row(loss_out, grad_out, cfg.grad_cols, self.num_threads, body)
    }
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
struct RowJob<'a, L, S, T> {
    loss: L,
    p: RowParams,
    s_row: &'a [S],
    t_row: &'a [T],
    grad: Option<&'a mut [S]>,
    row: usize,
    scratch: &'a mut [f32],
}

impl<L: RowLoss, S: Elem, T: Elem> Kernel for RowJob<'_, L, S, T> {
    type Output = Result<f32>;
    #[inline(always)]
    fn run<M: Math>(self) -> Result<f32> {
        self.loss.row::<M, S, T>(self.p, self.s_row, self.t_row, self.grad, self.row, self.scratch)
    }
}

thread_local! {
    /// Per-thread row scratch (see [`scratch_len`]), for rows up to [`SCRATCH_CAP`].
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of scratch a row of `v` columns needs: `rows` padded rows and five per-block
/// statistics.
fn scratch_len(v: usize, rows: usize) -> usize {
    let blocks = v.div_ceil(BLOCK);
    rows * blocks * BLOCK + 5 * blocks
}
