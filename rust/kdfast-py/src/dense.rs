//! Dense (full-vocabulary) losses: `kdfast-core`'s `dense` module.

use crate::error::Error;
use crate::tensor::{disjoint, dispatch_float, Tensor};
use crate::Runtime;
use kdfast_core::dense::slice::{slice_forward_kl as core_slice_forward_kl, slice_lse};
use kdfast_core::{dense_loss as core_dense_loss, Divergence};
use pyo3::prelude::*;

/// Options of a dense loss call: `kdfast_core::DenseConfig` without `grad_cols` (the gradient
/// tensor's width) and with the label mask's `ignore_index`.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct DenseConfig {
    divergence: Divergence,
    temperature: f32,
    t2_scale: bool,
    grad_scale: f32,
    ignore_index: i64,
}

#[pymethods]
impl DenseConfig {
    /// `loss`: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, akl or taid;
    /// `param`: β (jsd), the skew, head_mass (akl) or t (taid), ignored otherwise. Bad names
    /// and parameters raise `ValueError` naming the argument.
    #[new]
    #[pyo3(signature = (loss, param = 0.0, temperature = 1.0, t2_scale = false, grad_scale = 1.0, ignore_index = -100))]
    fn new(loss: &str, param: f32, temperature: f32, t2_scale: bool, grad_scale: f32, ignore_index: i64) -> Result<Self, Error> {
        Ok(DenseConfig { divergence: Divergence::from_name(loss, param)?, temperature, t2_scale, grad_scale, ignore_index })
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Per-row dense distillation loss into `loss_out` (float32 `[N]`) and, when given, the
/// student-logit gradient into `grad_out` (the student's dtype, contiguous `[N, V' ≥ V]`,
/// columns beyond V zero-filled). `student_logits`/`teacher_logits`: `[N, V]` with unit column
/// stride, float32/bfloat16/float16 each; `labels`: int64 `[N]` or None.
#[pyfunction]
#[pyo3(signature = (config, student_logits, teacher_logits, labels, loss_out, grad_out, runtime))]
#[allow(clippy::too_many_arguments)] // seven Python arguments plus the interpreter token
pub fn dense_loss(
    py: Python<'_>,
    config: DenseConfig,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Option<Tensor>,
    mut loss_out: Tensor,
    mut grad_out: Option<Tensor>,
    runtime: Runtime,
) -> Result<(), Error> {
    disjoint(&[("loss_out", Some(&loss_out)), ("grad_out", grad_out.as_ref())], &[Some(&student_logits), Some(&teacher_logits), labels.as_ref()])?;
    let (rows, cols) = student_logits.shape();
    let grad_cols = grad_out.as_ref().map_or(cols, |g| g.shape().1);
    let cfg = kdfast_core::DenseConfig {
        divergence: config.divergence,
        temperature: config.temperature,
        t2_scale: config.t2_scale,
        grad_scale: config.grad_scale,
        grad_cols,
    };
    let labels = labels.as_ref().map(|l| l.vector::<i64>("labels", rows)).transpose()?.map(|l| (l, config.ignore_index));
    let loss = loss_out.vector_mut::<f32>("loss_out", rows)?;
    dispatch_float!(S = (student_logits, "student_logits"), T = (teacher_logits, "teacher_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        let t = teacher_logits.rows::<T>("teacher_logits")?;
        let grad = grad_out.as_mut().map(|g| g.matrix_mut::<S>("grad_out", rows, grad_cols)).transpose()?;
        py.detach(|| core_dense_loss(s, t, labels, &cfg, loss, grad, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// Forward KL over a vocabulary sharded across ranks (kdfast-core `dense::slice`), this rank's
/// slices `student_logits`/`teacher_logits` (`[N, V_local]`). `step` 1 writes `out` = the slices'
/// `(max, sum)` of `s / T` and `t / T` (float64 `[N, 4]`); step 2 reads `lse` (float64 `[N, 2]`,
/// the whole rows' log-sum-exps) and writes `out` = the slices' `Σ p (y − x)` (float64 `[N]`) and,
/// if given, `grad_out` = `grad_scale · (q − p) / T` (`[N, V_local]`, the student's dtype).
#[pyfunction]
#[pyo3(signature = (step, student_logits, teacher_logits, temperature, lse, grad_scale, out, grad_out, runtime))]
#[allow(clippy::too_many_arguments)]
pub fn slice_forward_kl(
    py: Python<'_>,
    step: u8,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: f32,
    lse: Option<Tensor>,
    grad_scale: f32,
    mut out: Tensor,
    mut grad_out: Option<Tensor>,
    runtime: Runtime,
) -> Result<(), Error> {
    disjoint(&[("out", Some(&out)), ("grad_out", grad_out.as_ref())], &[Some(&student_logits), Some(&teacher_logits), lse.as_ref()])?;
    let (rows, cols) = student_logits.shape();
    dispatch_float!(S = (student_logits, "student_logits"), T = (teacher_logits, "teacher_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        let t = teacher_logits.rows::<T>("teacher_logits")?;
        match step {
            1 => {
                let stats = out.matrix_mut::<f64>("out", rows, 4)?;
                py.detach(|| slice_lse(s, t, temperature, stats, runtime.isa, runtime.num_threads))?;
            }
            2 => {
                let lse = lse.as_ref().ok_or_else(|| Error::arg("lse", "a tensor for step 2", "None"))?.matrix::<f64>("lse", rows, 2)?;
                let partial = out.vector_mut::<f64>("out", rows)?;
                let grad = grad_out.as_mut().map(|g| g.matrix_mut::<S>("grad_out", rows, cols)).transpose()?;
                py.detach(|| core_slice_forward_kl(s, t, temperature, lse, grad_scale, partial, grad, runtime.isa, runtime.num_threads))?;
            }
            _ => return Err(Error::arg("step", "1 or 2", &step.to_string())),
        }
    });
    Ok(())
}
