//! The loss against sparse teacher targets: `kdfast-core`'s `sparse` module; and
//! [`TargetTensors`], the tuple of target tensors that compression writes and encoding reads.

use crate::error::Error;
use crate::tensor::{disjoint, dispatch_float, Tensor};
use crate::Runtime;
use kdfast_core::sharded_student::{listed_gradient as core_listed_gradient, listed_stats as core_listed_stats, Listed};
use kdfast_core::sparse::{sparse_loss as core_sparse_loss, SparseMode, Targets};
use kdfast_core::Divergence;
use pyo3::prelude::*;

/// Sparse targets as the Python tuple `(ids, logprobs, weights, tail)`: int64 `[N, k]`,
/// float32 `[N, k]`, float32 `[N, k]` or None (sampled targets), float32 `[N]` or None.
#[derive(FromPyObject)]
pub struct TargetTensors(pub Tensor, pub Tensor, pub Option<Tensor>, pub Option<Tensor>);

impl TargetTensors {
    pub fn all(&self) -> [Option<&Tensor>; 4] {
        [Some(&self.0), Some(&self.1), self.2.as_ref(), self.3.as_ref()]
    }

    /// The read-only core view of `rows` rows with `k = ids.shape[1]` slots.
    pub fn view(&self, rows: usize) -> Result<Targets<'_>, Error> {
        let k = self.0.shape().1;
        Ok(Targets {
            ids: self.0.matrix::<i64>("targets.indices", rows, k)?,
            logprobs: self.1.matrix::<f32>("targets.logprobs", rows, k)?,
            weights: self.2.as_ref().map(|w| w.matrix::<f32>("targets.weights", rows, k)).transpose()?,
            tail_logprob: self.3.as_ref().map(|t| t.vector::<f32>("targets.tail_logprob", rows)).transpose()?,
            rows,
            k,
        })
    }

    /// Writable views for a kernel that fills targets of `rows` rows of `k` slots: weights iff
    /// `weights`, a tail iff `tail` (the presence of each is checked against what the kernel
    /// writes), none of them sharing memory with `inputs` or each other.
    pub fn outputs(&mut self, rows: usize, k: usize, weights: bool, tail: bool, inputs: &[Option<&Tensor>]) -> Result<TargetsMut<'_>, Error> {
        if self.2.is_some() != weights || self.3.is_some() != tail {
            let want = match (weights, tail) {
                (true, false) => "(ids, logprobs, weights, None)",
                (false, true) => "(ids, logprobs, None, tail)",
                (true, true) => "(ids, logprobs, weights, tail)",
                (false, false) => "(ids, logprobs, None, None)",
            };
            let got = format!("weights {}, tail {}", present(&self.2), present(&self.3));
            return Err(Error::arg("out", want, &got));
        }
        let names = ["ids_out", "logprobs_out", "weights_out", "tail_out"];
        let outs: Vec<_> = names.into_iter().zip(self.all()).collect();
        disjoint(&outs, inputs)?;
        let TargetTensors(ids, lp, w, t) = self;
        Ok(TargetsMut {
            ids: ids.matrix_mut::<i64>("ids_out", rows, k)?,
            logprobs: lp.matrix_mut::<f32>("logprobs_out", rows, k)?,
            weights: w.as_mut().map(|w| w.matrix_mut::<f32>("weights_out", rows, k)).transpose()?,
            tail: t.as_mut().map(|t| t.vector_mut::<f32>("tail_out", rows)).transpose()?,
        })
    }
}

fn present(t: &Option<Tensor>) -> &'static str {
    if t.is_some() {
        "given"
    } else {
        "None"
    }
}

/// The writable form of [`TargetTensors`] (see [`TargetTensors::outputs`]).
pub struct TargetsMut<'a> {
    pub ids: &'a mut [i64],
    pub logprobs: &'a mut [f32],
    pub weights: Option<&'a mut [f32]>,
    pub tail: Option<&'a mut [f32]>,
}

/// Options of a sparse loss call: `kdfast_core::sparse::SparseConfig` without `grad_cols` and
/// with the label mask's `ignore_index`.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct SparseConfig {
    mode: SparseMode,
    divergence: Divergence,
    temperature: f32,
    t2_scale: bool,
    grad_scale: f32,
    ignore_index: i64,
}

#[pymethods]
impl SparseConfig {
    /// `mode`: "bucket", "renorm" (top-k targets) or "sampled"; `loss`: "forward_kl" (any mode),
    /// or for top-k targets "reverse_kl", "jsd" (`param` = β) or "tvd". Bad names, parameters
    /// and combinations raise `ValueError`.
    #[new]
    #[pyo3(signature = (mode, temperature = 1.0, t2_scale = false, grad_scale = 1.0, ignore_index = -100, loss = "forward_kl", param = 0.0))]
    #[allow(clippy::too_many_arguments)] // seven Python arguments
    fn new(mode: &str, temperature: f32, t2_scale: bool, grad_scale: f32, ignore_index: i64, loss: &str, param: f32) -> Result<Self, Error> {
        let mode = SparseMode::from_name(mode)?;
        let divergence = Divergence::from_name(loss, param)?;
        kdfast_core::categories::CatLoss::new(divergence, mode)?; // the combination, checked here too
        Ok(SparseConfig { mode, divergence, temperature, t2_scale, grad_scale, ignore_index })
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Per-row loss of `student_logits` (`[N, V]`, unit column stride, float32/bfloat16/float16)
/// against `targets` into `loss_out` (float32 `[N]`) and, when given, the gradient into
/// `grad_out` (the student's dtype, contiguous `[N, V' ≥ V]`). `labels`: int64 `[N]` or None.
#[pyfunction]
#[pyo3(signature = (config, student_logits, targets, labels, loss_out, grad_out, runtime))]
#[allow(clippy::too_many_arguments)] // seven Python arguments plus the interpreter token
pub fn sparse_loss(
    py: Python<'_>,
    config: SparseConfig,
    student_logits: Tensor,
    targets: TargetTensors,
    labels: Option<Tensor>,
    mut loss_out: Tensor,
    mut grad_out: Option<Tensor>,
    runtime: Runtime,
) -> Result<(), Error> {
    let [ids, lp, w, tail] = targets.all();
    disjoint(&[("loss_out", Some(&loss_out)), ("grad_out", grad_out.as_ref())], &[Some(&student_logits), labels.as_ref(), ids, lp, w, tail])?;
    let (rows, cols) = student_logits.shape();
    let grad_cols = grad_out.as_ref().map_or(cols, |g| g.shape().1);
    let cfg = kdfast_core::sparse::SparseConfig {
        mode: config.mode,
        divergence: config.divergence,
        temperature: config.temperature,
        t2_scale: config.t2_scale,
        grad_scale: config.grad_scale,
        grad_cols,
    };
    let targets = targets.view(rows)?;
    let labels = labels.as_ref().map(|l| l.vector::<i64>("labels", rows)).transpose()?.map(|l| (l, config.ignore_index));
    let loss = loss_out.vector_mut::<f32>("loss_out", rows)?;
    dispatch_float!(S = (student_logits, "student_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        let grad = grad_out.as_mut().map(|g| g.matrix_mut::<S>("grad_out", rows, grad_cols)).transpose()?;
        py.detach(|| core_sparse_loss(s, &targets, labels, &cfg, loss, grad, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// A sparse loss's view of this rank's student slice `student_logits` (`[N, V_local]`) over a
/// vocabulary sharded across ranks (kdfast-core `sharded_student`): `ids` (int64 `[N, k]`) holds
/// each target slot's column in this slice, or −1. Writes `stats` (float64 `[N, 4]`: the slice's
/// `(max, sum)` of `s / T` over all its ids, then over the unlisted ones) and `at` (float32
/// `[N, k + 1]`: `s / T` at the owned slots, 0 elsewhere, then the count of listed columns).
#[pyfunction]
#[pyo3(signature = (student_logits, ids, temperature, stats, at, runtime))]
pub fn listed_stats(py: Python<'_>, student_logits: Tensor, ids: Tensor, temperature: f32, mut stats: Tensor, mut at: Tensor, runtime: Runtime) -> Result<(), Error> {
    disjoint(&[("stats", Some(&stats)), ("at", Some(&at))], &[Some(&student_logits), Some(&ids)])?;
    let (rows, k) = (student_logits.shape().0, ids.shape().1);
    let listed = Listed { ids: ids.matrix::<i64>("ids", rows, k)?, k };
    let st = stats.matrix_mut::<f64>("stats", rows, 4)?;
    let at = at.matrix_mut::<f32>("at", rows, k + 1)?;
    dispatch_float!(S = (student_logits, "student_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        py.detach(|| core_listed_stats(s, listed, temperature, st, at, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// The gradient of a sparse loss w.r.t. this rank's student slice (kdfast-core
/// `sharded_student::listed_gradient`) into `grad_out` (the student's dtype, `[N, V_local]`),
/// from `softmax` (float64 `[N, 4]`: the whole rows' `M, ln Z` over all ids and over the
/// unlisted ones), `coef` (float32 `[N, 2]`: `∂ℓ/∂L`, `∂ℓ/∂L_u`) and `g_at` (float32 `[N, k]`).
#[pyfunction]
#[pyo3(signature = (student_logits, ids, temperature, softmax, coef, g_at, grad_out, runtime))]
#[allow(clippy::too_many_arguments)]
pub fn listed_gradient(
    py: Python<'_>,
    student_logits: Tensor,
    ids: Tensor,
    temperature: f32,
    softmax: Tensor,
    coef: Tensor,
    g_at: Tensor,
    mut grad_out: Tensor,
    runtime: Runtime,
) -> Result<(), Error> {
    disjoint(&[("grad_out", Some(&grad_out))], &[Some(&student_logits), Some(&ids), Some(&softmax), Some(&coef), Some(&g_at)])?;
    let ((rows, cols), k) = (student_logits.shape(), ids.shape().1);
    let listed = Listed { ids: ids.matrix::<i64>("ids", rows, k)?, k };
    let softmax = softmax.matrix::<f64>("softmax", rows, 4)?;
    let coef = coef.matrix::<f32>("coef", rows, 2)?;
    let g_at = g_at.matrix::<f32>("g_at", rows, k)?;
    dispatch_float!(S = (student_logits, "student_logits") => {
        let s = student_logits.rows::<S>("student_logits")?;
        let grad = grad_out.matrix_mut::<S>("grad_out", rows, cols)?;
        py.detach(|| core_listed_gradient(s, listed, temperature, softmax, coef, g_at, grad, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}
