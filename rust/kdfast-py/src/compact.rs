//! Variable-length records of one sequence's targets: `kdfast-core`'s `compact` module.

use crate::error::Error;
use crate::sparse::TargetTensors;
use crate::tensor::Tensor;
use kdfast_core::compact::{Compact, Rows, RowsMut, Scheme};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The compact codec of one cache (`kdfast_core::compact::Compact`): `method` "topk" (with a
/// tail or not) or "sample" (`num_samples` draws) over `vocab_size ∈ [1, 2^32]` ids.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct CompactCodec(Compact);

#[pymethods]
impl CompactCodec {
    #[new]
    #[pyo3(signature = (method, vocab_size, has_tail, num_samples = None))]
    fn new(method: &str, vocab_size: u64, has_tail: bool, num_samples: Option<u32>) -> Result<Self, Error> {
        let scheme = match (method, num_samples, has_tail) {
            ("topk", None, _) => Scheme::TopK { has_tail },
            ("sample", Some(n), false) => Scheme::Sample { num_samples: n },
            _ => {
                let got = format!("method={method:?}, num_samples={num_samples:?}, has_tail={has_tail}");
                return Err(Error::arg("method", "'topk' (no num_samples) or 'sample' (num_samples, no tail)", &got));
            }
        };
        Ok(CompactCodec(Compact::new(scheme, vocab_size)?))
    }

    /// `(record, k_row)` of one sequence's contiguous targets `(ids [S, k], logprobs [S, k],
    /// weights [S, k] or None, tail [S] or None)`. Bad targets raise `ValueError` naming them.
    fn encode<'py>(&self, py: Python<'py>, targets: TargetTensors) -> Result<(Bound<'py, PyBytes>, usize), Error> {
        let rows = targets.0.shape().0;
        let t = targets.view(rows)?;
        let rows = Rows { rows, k: t.k, ids: t.ids, logprobs: t.logprobs, weights: t.weights, tail: t.tail_logprob };
        let (data, k_row) = py.detach(|| self.0.encode(&rows))?;
        Ok((PyBytes::new(py, &data), k_row))
    }

    /// Decode the record `data` (uint8 [bytes], contiguous) of `rows` positions with `k_row`
    /// slots into `out = (ids [rows, k_row], logprobs, weights iff sampled, tail iff present)`.
    fn decode(&self, py: Python<'_>, data: Tensor, rows: usize, k_row: usize, mut out: TargetTensors) -> Result<(), Error> {
        let sampled = matches!(self.0.scheme, Scheme::Sample { .. });
        let tail = matches!(self.0.scheme, Scheme::TopK { has_tail: true });
        let o = out.outputs(rows, k_row, sampled, tail, &[Some(&data)])?;
        let bytes = data.vector::<u8>("data", data.shape().1)?;
        let outputs = RowsMut { ids: o.ids, logprobs: o.logprobs, weights: o.weights, tail: o.tail };
        py.detach(|| self.0.decode(bytes, rows, k_row, outputs))?;
        Ok(())
    }

    /// Decode `len(rows)` records (`data[offsets[b]:offsets[b+1]]`, `rows[b]` positions of
    /// `k_rows[b]` slots; int64 vectors) into one padded batch `out` of `len(rows) · stride`
    /// rows of `width` slots: record `b` fills rows `b·stride ..`, the rest is padding.
    #[allow(clippy::too_many_arguments)]
    fn decode_many(&self, py: Python<'_>, data: Tensor, offsets: Tensor, rows: Tensor, k_rows: Tensor, stride: usize, width: usize, mut out: TargetTensors) -> Result<(), Error> {
        let sampled = matches!(self.0.scheme, Scheme::Sample { .. });
        let tail = matches!(self.0.scheme, Scheme::TopK { has_tail: true });
        let records = rows.shape().1;
        let o = out.outputs(records * stride, width, sampled, tail, &[Some(&data), Some(&offsets), Some(&rows), Some(&k_rows)])?;
        let bytes = data.vector::<u8>("data", data.shape().1)?;
        let offsets = offsets.vector::<i64>("offsets", records + 1)?;
        let (rows, k_rows) = (rows.vector::<i64>("rows", records)?, k_rows.vector::<i64>("k_rows", records)?);
        let outputs = RowsMut { ids: o.ids, logprobs: o.logprobs, weights: o.weights, tail: o.tail };
        py.detach(|| self.0.decode_many(bytes, offsets, rows, k_rows, stride, width, outputs))?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("CompactCodec({:?}, vocab_size={})", self.0.scheme, self.0.vocab)
    }
}
