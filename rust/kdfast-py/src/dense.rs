//! Dense (full-vocabulary) losses: `kdfast-core`'s `dense` module.

use crate::error::Error;
use crate::tensor::{disjoint, dispatch_float, Tensor};
use crate::Runtime;
use kdfast_core::dense::head_mass::mass_at_least as core_mass_at_least;
use kdfast_core::dense::slice::{slice_dense as slice_dense_core, SliceStep, STATS};
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

/// One step of a dense loss over a vocabulary sharded across ranks (kdfast-core
/// `dense::slice`), on this rank's slices `student_logits`/`teacher_logits` (`[N, V_local]`),
/// with `config`'s loss, temperature and `grad_scale`. `step` 1 writes `out` = the slices'
/// `(max, sum)` of `s / T`, `t / T` and the loss's teacher (float64 `[N, 6]`); step 2 reads
/// `softmax` (float64 `[N, 4]`: the whole rows' `M_a, ln Z_a, M_b, ln Z_b`) and writes `out` = the
/// slices' `(Σ t_i, Σ q_i h_i)` (float64 `[N, 2]`) and, for forward KL and TAID, `grad_out`;
/// step 3 reads `softmax` and `sums` (the whole rows' step-2 sums) and writes `grad_out` for the
/// other losses (`[N, V_local]`, the student's dtype).
#[pyfunction]
#[pyo3(signature = (step, config, student_logits, teacher_logits, softmax, sums, out, grad_out, runtime))]
#[allow(clippy::too_many_arguments)]
pub fn slice_dense(
    py: Python<'_>,
    step: u8,
    config: DenseConfig,
    student_logits: Tensor,
    teacher_logits: Tensor,
    softmax: Option<Tensor>,
    sums: Option<Tensor>,
    mut out: Option<Tensor>,
    mut grad_out: Option<Tensor>,
    runtime: Runtime,
) -> Result<(), Error> {
    disjoint(&[("out", out.as_ref()), ("grad_out", grad_out.as_ref())], &[Some(&student_logits), Some(&teacher_logits), softmax.as_ref(), sums.as_ref()])?;
    let (rows, cols) = student_logits.shape();
    let missing = |name: &'static str| Error::arg(name, "a tensor for this step", "None");
    dispatch_float!(S = (student_logits, "student_logits"), T = (teacher_logits, "teacher_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        let t = teacher_logits.rows::<T>("teacher_logits")?;
        let step = match step {
            1 => SliceStep::Stats { stats: out.as_mut().ok_or_else(|| missing("out"))?.matrix_mut::<f64>("out", rows, STATS)? },
            2 => SliceStep::Sums {
                softmax: softmax.as_ref().ok_or_else(|| missing("softmax"))?.matrix::<f64>("softmax", rows, 4)?,
                sums: out.as_mut().ok_or_else(|| missing("out"))?.matrix_mut::<f64>("out", rows, 2)?,
                grad: grad_out.as_mut().map(|g| g.matrix_mut::<S>("grad_out", rows, cols)).transpose()?,
            },
            3 => SliceStep::Gradient {
                softmax: softmax.as_ref().ok_or_else(|| missing("softmax"))?.matrix::<f64>("softmax", rows, 4)?,
                sums: sums.as_ref().ok_or_else(|| missing("sums"))?.matrix::<f64>("sums", rows, 2)?,
                grad: grad_out.as_mut().ok_or_else(|| missing("grad_out"))?.matrix_mut::<S>("grad_out", rows, cols)?,
            },
            _ => return Err(Error::arg("step", "1, 2 or 3", &step.to_string())),
        };
        py.detach(|| slice_dense_core(s, t, config.divergence, config.temperature, config.grad_scale, step, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// AKL's head search over a sharded vocabulary (kdfast-core `dense::head_mass`): per row of the
/// teacher probabilities `p` (float32 `[N, V_local]`) and probe of `thresholds` (int64 `[N, m]`,
/// float32 bit patterns), the slice's mass at or above the probe into `out` (float64 `[N, m]`).
#[pyfunction]
#[pyo3(signature = (p, thresholds, out, runtime))]
pub fn mass_at_least(py: Python<'_>, p: Tensor, thresholds: Tensor, mut out: Tensor, runtime: Runtime) -> Result<(), Error> {
    disjoint(&[("out", Some(&out))], &[Some(&p), Some(&thresholds)])?;
    let (rows, m) = (p.shape().0, thresholds.shape().1);
    let rows_p = p.rows::<f32>("p")?;
    let th = thresholds.matrix::<i64>("thresholds", rows, m)?;
    let o = out.matrix_mut::<f64>("out", rows, m)?;
    py.detach(|| core_mass_at_least(rows_p, th, m, o, runtime.isa, runtime.num_threads))?;
    Ok(())
}
