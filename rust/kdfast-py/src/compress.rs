//! Compressing teacher logits into sparse targets: `kdfast-core`'s `compress` module.

use crate::error::Error;
use crate::sparse::TargetTensors;
use crate::tensor::{dispatch_float, Tensor};
use crate::Runtime;
use kdfast_core::compress::{compress_sample as core_sample, compress_topk as core_topk};
use pyo3::prelude::*;

/// Top-k compression options: `k ≥ 1` slots per row (k > V pads), temperature T > 0.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct TopK {
    #[pyo3(get)]
    k: usize,
    #[pyo3(get)]
    temperature: f32,
}

#[pymethods]
impl TopK {
    #[new]
    #[pyo3(signature = (k, temperature = 1.0))]
    fn new(k: usize, temperature: f32) -> Self {
        TopK { k, temperature }
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Sampling compression options: `num_samples` draws per row in `[1, 2^32)`, temperature T > 0,
/// the `seed`, and `row_offset`, the row index of the first row (keys its random streams).
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    #[pyo3(get)]
    num_samples: usize,
    #[pyo3(get)]
    temperature: f32,
    #[pyo3(get)]
    seed: u64,
    #[pyo3(get)]
    row_offset: u64,
}

#[pymethods]
impl Sampling {
    #[new]
    #[pyo3(signature = (num_samples, temperature = 1.0, seed = 0, row_offset = 0))]
    fn new(num_samples: usize, temperature: f32, seed: u64, row_offset: u64) -> Self {
        Sampling { num_samples, temperature, seed, row_offset }
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Top-k of every row of `teacher_logits` (`[N, V]`, unit column stride, float32/bfloat16/
/// float16) into `out = (ids int64 [N, k], logprobs float32 [N, k], None, tail float32 [N])`.
#[pyfunction]
#[pyo3(signature = (options, teacher_logits, out, runtime))]
pub fn compress_topk(py: Python<'_>, options: TopK, teacher_logits: Tensor, mut out: TargetTensors, runtime: Runtime) -> Result<(), Error> {
    let (rows, k) = (teacher_logits.shape().0, options.k);
    let o = out.outputs(rows, k, false, true, &[Some(&teacher_logits)])?;
    let (ids, lp, tail) = (o.ids, o.logprobs, o.tail.expect("checked by `outputs`"));
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        py.detach(|| core_topk(x, k, options.temperature, ids, lp, tail, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// `num_samples` draws per row of `teacher_logits` (as for [`compress_topk`]) into
/// `out = (ids int64, logprobs float32, weights float32, None)`, each `[N, num_samples]`.
#[pyfunction]
#[pyo3(signature = (options, teacher_logits, out, runtime))]
pub fn compress_sample(py: Python<'_>, options: Sampling, teacher_logits: Tensor, mut out: TargetTensors, runtime: Runtime) -> Result<(), Error> {
    let (rows, n) = (teacher_logits.shape().0, options.num_samples);
    let o = out.outputs(rows, n, true, false, &[Some(&teacher_logits)])?;
    let (ids, lp, w) = (o.ids, o.logprobs, o.weights.expect("checked by `outputs`"));
    let Sampling { temperature, seed, row_offset, .. } = options;
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        py.detach(|| core_sample(x, n, temperature, seed, row_offset, ids, lp, w, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}
