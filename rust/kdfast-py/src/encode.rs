//! Fixed-size byte records of sparse targets: `kdfast-core`'s `encode` module.

use crate::error::Error;
use crate::sparse::TargetTensors;
use crate::tensor::{disjoint, Tensor};
use crate::Runtime;
use kdfast_core::encode::{decode, encode};
use pyo3::prelude::*;

/// The record layout of one row (`kdfast_core::encode::Layout`): `k ≥ 1` slots over a
/// vocabulary of `vocab_size ∈ [1, 2^32]` ids, with a tail log-prob or (sampled targets) the
/// `num_samples` that weights are counted out of. Invalid layouts raise `ValueError`.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct Layout(kdfast_core::encode::Layout);

#[pymethods]
impl Layout {
    #[new]
    #[pyo3(signature = (k, vocab_size, has_tail, num_samples = None))]
    fn new(k: usize, vocab_size: u64, has_tail: bool, num_samples: Option<u32>) -> Result<Self, Error> {
        Ok(Layout(kdfast_core::encode::Layout::new(k, vocab_size, has_tail, num_samples)?))
    }

    /// Bytes of one row's record.
    #[getter]
    fn row_bytes(&self) -> usize {
        self.0.row_bytes()
    }

    fn __repr__(&self) -> String {
        let l = &self.0;
        format!("Layout(k={}, vocab_size={}, has_tail={}, num_samples={:?})", l.k, l.vocab, l.has_tail, l.num_samples)
    }
}

/// Encode `targets` (contiguous, `N` rows of `layout.k` slots) into `out` (uint8
/// `[N, layout.row_bytes]`). Bad ids, log-probs or weights raise `ValueError` naming them.
#[pyfunction]
#[pyo3(signature = (layout, targets, out, runtime))]
pub fn encode_targets(py: Python<'_>, layout: Layout, targets: TargetTensors, mut out: Tensor, runtime: Runtime) -> Result<(), Error> {
    disjoint(&[("out", Some(&out))], &targets.all())?;
    let (layout, rows) = (layout.0, targets.0.shape().0);
    let t = targets.view(rows)?;
    if t.k != layout.k {
        return Err(Error::arg("targets.indices", &format!("{} slots per row", layout.k), &format!("{}", t.k)));
    }
    let data = out.matrix_mut::<u8>("out", rows, layout.row_bytes())?;
    py.detach(|| encode(&layout, rows, t.ids, t.logprobs, t.weights, t.tail_logprob, data, runtime.num_threads))?;
    Ok(())
}

/// Decode `data` (uint8 `[N, layout.row_bytes]`, contiguous) into `out = (ids int64 [N, k],
/// logprobs float32 [N, k], weights float32 [N, k] iff sampled, tail float32 [N] iff has_tail)`.
#[pyfunction]
#[pyo3(signature = (layout, data, out))]
pub fn decode_targets(py: Python<'_>, layout: Layout, data: Tensor, mut out: TargetTensors) -> Result<(), Error> {
    let layout = layout.0;
    let rows = data.shape().0;
    let o = out.outputs(rows, layout.k, layout.num_samples.is_some(), layout.has_tail, &[Some(&data)])?;
    let data = data.matrix::<u8>("data", rows, layout.row_bytes())?;
    py.detach(|| decode(&layout, rows, data, o.ids, o.logprobs, o.weights, o.tail))?;
    Ok(())
}
