//! `kdfast._kdfast`: the thin PyO3 layer over `kdfast-core`.
//!
//! One module per core module (`dense`, `sparse`, `compress`, `encode`, `compact`). Every entry point
//! takes torch tensors themselves, converted once into checked views ([`tensor`]), and typed
//! configurations (`#[pyclass]`es mirroring the core's configs, validated when built); it
//! dispatches on dtypes with the one macro [`tensor::dispatch_float`], releases the interpreter
//! for the work and maps core errors to Python exceptions in one place ([`error`]). Outputs
//! are preallocated by the Python package (`kdfast/_native.py`), which owns allocation policy.

mod compact;
mod compress;
mod dense;
mod encode;
mod error;
mod sparse;
mod tensor;

use error::Error;
use kdfast_core::Isa;
use pyo3::prelude::*;

/// How a kernel runs: the instruction set and the worker-thread count (results do not depend
/// on either, up to the documented SIMD rounding).
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct Runtime {
    pub isa: Isa,
    pub num_threads: usize,
}

#[pymethods]
impl Runtime {
    /// `isa`: "auto", "scalar", "baseline", "avx2" or "avx512" (supported by this CPU);
    /// `num_threads` ≥ 1.
    #[new]
    #[pyo3(signature = (isa = "auto", num_threads = 1))]
    fn new(isa: &str, num_threads: usize) -> Result<Self, Error> {
        let isa = Isa::from_name(isa)
            .ok_or_else(|| Error::arg("isa", "auto, scalar, baseline, avx2 or avx512 (supported by this CPU)", &format!("{isa:?}")))?;
        if num_threads == 0 {
            return Err(Error::arg("num_threads", "an integer ≥ 1", "0"));
        }
        Ok(Runtime { isa, num_threads })
    }

    #[getter(isa)]
    fn isa_name(&self) -> &'static str {
        self.isa.name()
    }

    #[getter(num_threads)]
    fn threads(&self) -> usize {
        self.num_threads
    }

    fn __repr__(&self) -> String {
        format!("Runtime(isa={:?}, num_threads={})", self.isa.name(), self.num_threads)
    }
}

#[pymodule]
mod _kdfast {
    use pyo3::prelude::*;

    #[pymodule_export]
    #[allow(non_upper_case_globals)]
    const __version__: &str = env!("CARGO_PKG_VERSION");

    #[pymodule_export]
    use super::Runtime;
    #[pymodule_export]
    use super::compact::CompactCodec;
    #[pymodule_export]
    use super::compress::{compress_sample, compress_topk, compress_topk_slice, merge_sample_draws, sharded_slice_plan, sharded_sample, Sampling, TopK};
    #[pymodule_export]
    use super::dense::{dense_loss, mass_at_least, slice_dense, DenseConfig};
    #[pymodule_export]
    use super::encode::{decode_targets, encode_targets, Layout};
    #[pymodule_export]
    use super::sparse::{listed_gradient, listed_stats, sparse_loss, SparseConfig};

    /// The instruction set `"auto"` resolves to on this CPU.
    #[pyfunction]
    fn best_isa() -> &'static str {
        kdfast_core::Isa::detect().name()
    }
}
