//! `kdfast._kdfast`: the thin PyO3 layer over `kdfast-core`.
//!
//! It receives tensors as `(data_ptr, rows, cols, row_stride, dtype)` descriptors built by the
//! Python package (`kdfast/_native.py`), which has already validated devices, dtypes and shapes
//! and keeps the tensors alive for the duration of the call. This crate re-checks every size,
//! builds slices over the tensors' memory (zero-copy; bf16/fp16 read directly), releases the
//! interpreter for the work, and maps core errors to Python exceptions in one place.

mod error;
mod offline;
mod tensor;

use pyo3::prelude::*;

#[pymodule]
mod _kdfast {
    use super::error::Error;
    use super::tensor::{Dtype, TensorArg};
    use half::{bf16, f16};
    use kdfast_core::{dense_loss as core_dense_loss, DenseConfig, Divergence, Isa, Rows};
    use pyo3::prelude::*;

    #[pymodule_export]
    #[allow(non_upper_case_globals)]
    const __version__: &str = env!("CARGO_PKG_VERSION");

    #[pymodule_export]
    use super::offline::compress_topk;
    #[pymodule_export]
    use super::offline::compress_sample;
    #[pymodule_export]
    use super::offline::sparse_kl;
    #[pymodule_export]
    use super::offline::encoded_row_bytes;
    #[pymodule_export]
    use super::offline::encode_targets;
    #[pymodule_export]
    use super::offline::decode_targets;

    /// The instruction set `"auto"` resolves to on this CPU.
    #[pyfunction]
    fn best_isa() -> &'static str {
        Isa::detect().name()
    }

    /// Per-row dense distillation loss with the student-logit gradient (see `kdfast-core`).
    #[pyfunction]
    #[pyo3(signature = (
        loss, param, student, teacher, labels, ignore_index, temperature, t2_scale,
        grad_scale, loss_out, grad_out, grad_cols, isa, num_threads
    ))]
    #[allow(clippy::too_many_arguments)]
    fn dense_loss(
        py: Python<'_>,
        loss: &str,
        param: f32,
        student: TensorArg,
        teacher: TensorArg,
        labels: Option<TensorArg>,
        ignore_index: i64,
        temperature: f32,
        t2_scale: bool,
        grad_scale: f32,
        loss_out: TensorArg,
        grad_out: Option<TensorArg>,
        grad_cols: usize,
        isa: &str,
        num_threads: usize,
    ) -> Result<(), Error> {
        let cfg = DenseConfig {
            divergence: Divergence::from_name(loss, param)?,
            temperature,
            t2_scale,
            grad_scale,
            grad_cols,
        };
        let isa = Isa::from_name(isa).ok_or_else(|| Error::arg("isa", "auto, scalar, baseline, avx2 or avx512 (supported by this CPU)", isa))?;
        let num_threads = num_threads.max(1);
        let rows = student.rows;
        // SAFETY (for every `unsafe` slice below): the descriptors come from live tensors of the
        // stated dtype and extent, kept alive by the caller, and the output tensors are fresh
        // and not aliased by the inputs; `TensorArg` checks each extent against the others.
        let labels = match &labels {
            Some(l) => {
                l.expect(Dtype::I64, "labels")?.expect_len(rows, "labels")?;
                Some((unsafe { l.slice::<i64>() }, ignore_index))
            }
            None => None,
        };
        loss_out.expect(Dtype::F32, "loss_out")?.expect_len(rows, "loss_out")?;
        let loss_out = unsafe { loss_out.slice_mut::<f32>() };
        if let Some(g) = &grad_out {
            g.expect(student.dtype, "grad_out")?.expect_len(rows * grad_cols, "grad_out")?;
        }

        macro_rules! run {
            ($s:ty, $t:ty) => {{
                let s = Rows::new(unsafe { student.slice::<$s>() }, rows, student.cols, student.row_stride, "student_logits")?;
                let t = Rows::new(unsafe { teacher.slice::<$t>() }, teacher.rows, teacher.cols, teacher.row_stride, "teacher_logits")?;
                let g = grad_out.as_ref().map(|g| unsafe { g.slice_mut::<$s>() });
                py.detach(|| core_dense_loss(s, t, labels, &cfg, loss_out, g, isa, num_threads))
            }};
        }
        macro_rules! by_teacher {
            ($s:ty) => {
                match teacher.dtype {
                    Dtype::F32 => run!($s, f32),
                    Dtype::BF16 => run!($s, bf16),
                    Dtype::F16 => run!($s, f16),
                    Dtype::I64 => return Err(Error::arg("teacher_logits", "float32, bfloat16 or float16", "int64")),
                }
            };
        }
        match student.dtype {
            Dtype::F32 => by_teacher!(f32),
            Dtype::BF16 => by_teacher!(bf16),
            Dtype::F16 => by_teacher!(f16),
            Dtype::I64 => return Err(Error::arg("student_logits", "float32, bfloat16 or float16", "int64")),
        }?;
        Ok(())
    }
}
