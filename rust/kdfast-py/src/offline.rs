//! Offline distillation: compressing teacher logits into sparse targets, the loss against them,
//! and their storage encoding (`kdfast-core`'s `compress`, `sparse` and `encode` modules).
//!
//! Same conventions as the dense binding: tensors arrive as `(data_ptr, rows, cols, row_stride,
//! dtype)` descriptors of live CPU tensors that the Python side (`kdfast/sparse.py`) validated
//! and keeps alive; outputs are fresh contiguous tensors; the work runs with the interpreter
//! released. Byte records (the encoded form) arrive as `(data_ptr, len)` of a contiguous uint8
//! tensor.

use crate::error::Error;
use crate::tensor::{Dtype, TensorArg};
use half::{bf16, f16};
use kdfast_core::compress::{compress_sample as core_sample, compress_topk as core_topk};
use kdfast_core::encode::{decode, encode, Layout};
use kdfast_core::sparse::{sparse_kl as core_sparse_kl, SparseConfig, SparseMode, Targets};
use kdfast_core::{Isa, Rows};
use pyo3::prelude::*;

/// `(data_ptr, len)` of a contiguous byte buffer.
#[derive(Clone, Copy, Debug)]
pub struct ByteArg {
    ptr: usize,
    len: usize,
}

impl<'py> FromPyObject<'_, 'py> for ByteArg {
    type Error = PyErr;

    fn extract(ob: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let (ptr, len): (usize, usize) = ob.extract()?;
        if ptr == 0 || len > isize::MAX as usize {
            return Err(Error::arg("data", "a non-null byte buffer that fits in memory", &format!("{ptr:#x}, {len} bytes")).into());
        }
        Ok(ByteArg { ptr, len })
    }
}

impl ByteArg {
    fn expect_len(&self, len: usize) -> Result<&Self, Error> {
        if self.len != len {
            return Err(Error::arg("data", &format!("{len} bytes"), &format!("{} bytes", self.len)));
        }
        Ok(self)
    }

    /// # Safety
    /// Live memory of `len` bytes nobody writes to during the borrow.
    unsafe fn slice<'a>(&self) -> &'a [u8] {
        std::slice::from_raw_parts(self.ptr as *const u8, self.len)
    }

    /// # Safety
    /// As [`Self::slice`], and nothing else may read or write it during the borrow.
    unsafe fn slice_mut<'a>(&self) -> &'a mut [u8] {
        std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len)
    }
}

fn parse_isa(isa: &str) -> Result<Isa, Error> {
    Isa::from_name(isa).ok_or_else(|| Error::arg("isa", "auto, scalar, baseline, avx2 or avx512 (supported by this CPU)", isa))
}

/// A contiguous `[rows, k]` buffer of `dtype`.
fn expect_slots(t: &TensorArg, dtype: Dtype, rows: usize, k: usize, name: &'static str) -> Result<(), Error> {
    let len = rows.checked_mul(k).ok_or_else(|| Error::arg(name, "a buffer that fits in memory", "an overflowing size"))?;
    t.expect(dtype, name)?.expect_len(len, name)?;
    Ok(())
}

/// Top-k compression of `logits` (`[rows, V]`, float32/bfloat16/float16) at `temperature` into
/// `ids_out` (int64 `[rows, k]`), `logprobs_out` (float32 `[rows, k]`), `tail_out` (float32 `[rows]`).
#[pyfunction]
#[pyo3(signature = (logits, k, temperature, ids_out, logprobs_out, tail_out, isa, num_threads))]
#[allow(clippy::too_many_arguments)]
pub fn compress_topk(
    py: Python<'_>,
    logits: TensorArg,
    k: usize,
    temperature: f32,
    ids_out: TensorArg,
    logprobs_out: TensorArg,
    tail_out: TensorArg,
    isa: &str,
    num_threads: usize,
) -> Result<(), Error> {
    let isa = parse_isa(isa)?;
    let rows = logits.rows;
    expect_slots(&ids_out, Dtype::I64, rows, k, "ids_out")?;
    expect_slots(&logprobs_out, Dtype::F32, rows, k, "logprobs_out")?;
    tail_out.expect(Dtype::F32, "tail_out")?.expect_len(rows, "tail_out")?;
    // SAFETY (every `unsafe` slice here): live tensors of the stated dtype and extent, kept alive
    // by the caller; the outputs are fresh, distinct and not aliased by the input.
    let (ids, lp, tail) = unsafe { (ids_out.slice_mut::<i64>(), logprobs_out.slice_mut::<f32>(), tail_out.slice_mut::<f32>()) };
    macro_rules! run {
        ($e:ty) => {{
            let x = Rows::new(unsafe { logits.slice::<$e>() }, rows, logits.cols, logits.row_stride, "teacher_logits")?;
            py.detach(|| core_topk(x, k, temperature, ids, lp, tail, isa, num_threads.max(1)))
        }};
    }
    match logits.dtype {
        Dtype::F32 => run!(f32),
        Dtype::BF16 => run!(bf16),
        Dtype::F16 => run!(f16),
        Dtype::I64 => return Err(Error::arg("teacher_logits", "float32, bfloat16 or float16", "int64")),
    }?;
    Ok(())
}

/// Sampling compression: `num_samples` draws per row of `logits` under `seed`, row `r` keyed as
/// row `row_offset + r`; outputs int64/float32/float32 `[rows, num_samples]`.
#[pyfunction]
#[pyo3(signature = (logits, num_samples, temperature, seed, row_offset, ids_out, logprobs_out, weights_out, isa, num_threads))]
#[allow(clippy::too_many_arguments)]
pub fn compress_sample(
    py: Python<'_>,
    logits: TensorArg,
    num_samples: usize,
    temperature: f32,
    seed: u64,
    row_offset: u64,
    ids_out: TensorArg,
    logprobs_out: TensorArg,
    weights_out: TensorArg,
    isa: &str,
    num_threads: usize,
) -> Result<(), Error> {
    let isa = parse_isa(isa)?;
    let rows = logits.rows;
    expect_slots(&ids_out, Dtype::I64, rows, num_samples, "ids_out")?;
    expect_slots(&logprobs_out, Dtype::F32, rows, num_samples, "logprobs_out")?;
    expect_slots(&weights_out, Dtype::F32, rows, num_samples, "weights_out")?;
    // SAFETY: as in `compress_topk`.
    let (ids, lp, w) = unsafe { (ids_out.slice_mut::<i64>(), logprobs_out.slice_mut::<f32>(), weights_out.slice_mut::<f32>()) };
    macro_rules! run {
        ($e:ty) => {{
            let x = Rows::new(unsafe { logits.slice::<$e>() }, rows, logits.cols, logits.row_stride, "teacher_logits")?;
            py.detach(|| core_sample(x, num_samples, temperature, seed, row_offset, ids, lp, w, isa, num_threads.max(1)))
        }};
    }
    match logits.dtype {
        Dtype::F32 => run!(f32),
        Dtype::BF16 => run!(bf16),
        Dtype::F16 => run!(f16),
        Dtype::I64 => return Err(Error::arg("teacher_logits", "float32, bfloat16 or float16", "int64")),
    }?;
    Ok(())
}

/// Per-row sparse-target loss with the student-logit gradient. `mode`: "bucket", "renorm" or
/// "sampled"; targets are contiguous int64/float32 `[rows, k]` (`tail` float32 `[rows]`).
#[pyfunction]
#[pyo3(signature = (
    mode, student, ids, logprobs, weights, tail, labels, ignore_index, temperature, t2_scale,
    grad_scale, loss_out, grad_out, grad_cols, isa, num_threads
))]
#[allow(clippy::too_many_arguments)]
pub fn sparse_kl(
    py: Python<'_>,
    mode: &str,
    student: TensorArg,
    ids: TensorArg,
    logprobs: TensorArg,
    weights: Option<TensorArg>,
    tail: Option<TensorArg>,
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
    let cfg = SparseConfig { mode: SparseMode::from_name(mode)?, temperature, t2_scale, grad_scale, grad_cols };
    let isa = parse_isa(isa)?;
    let rows = student.rows;
    let k = ids.cols;
    expect_slots(&ids, Dtype::I64, rows, k, "targets.indices")?;
    expect_slots(&logprobs, Dtype::F32, rows, k, "targets.logprobs")?;
    if let Some(w) = &weights {
        expect_slots(w, Dtype::F32, rows, k, "targets.weights")?;
    }
    if let Some(t) = &tail {
        t.expect(Dtype::F32, "targets.tail_logprob")?.expect_len(rows, "targets.tail_logprob")?;
    }
    // SAFETY (every `unsafe` slice below): as in `compress_topk`; the gradient and loss outputs
    // are fresh and aliased by nothing else.
    let targets = unsafe {
        Targets {
            ids: ids.slice::<i64>(),
            logprobs: logprobs.slice::<f32>(),
            weights: weights.as_ref().map(|w| w.slice::<f32>()),
            tail_logprob: tail.as_ref().map(|t| t.slice::<f32>()),
            rows,
            k,
        }
    };
    let labels = match &labels {
        Some(l) => {
            l.expect(Dtype::I64, "labels")?.expect_len(rows, "labels")?;
            Some((unsafe { l.slice::<i64>() }, ignore_index))
        }
        None => None,
    };
    loss_out.expect(Dtype::F32, "loss_out")?.expect_len(rows, "loss_out")?;
    let loss = unsafe { loss_out.slice_mut::<f32>() };
    if let Some(g) = &grad_out {
        let len = rows.checked_mul(grad_cols).ok_or_else(|| Error::arg("grad_out", "a buffer that fits in memory", "an overflowing size"))?;
        g.expect(student.dtype, "grad_out")?.expect_len(len, "grad_out")?;
    }
    macro_rules! run {
        ($s:ty) => {{
            let s = Rows::new(unsafe { student.slice::<$s>() }, rows, student.cols, student.row_stride, "student_logits")?;
            let g = grad_out.as_ref().map(|g| unsafe { g.slice_mut::<$s>() });
            py.detach(|| core_sparse_kl(s, &targets, labels, &cfg, loss, g, isa, num_threads.max(1)))
        }};
    }
    match student.dtype {
        Dtype::F32 => run!(f32),
        Dtype::BF16 => run!(bf16),
        Dtype::F16 => run!(f16),
        Dtype::I64 => return Err(Error::arg("student_logits", "float32, bfloat16 or float16", "int64")),
    }?;
    Ok(())
}

fn layout(k: usize, vocab_size: u64, has_tail: bool, num_samples: Option<u32>) -> Result<Layout, Error> {
    Ok(Layout::new(k, vocab_size, has_tail, num_samples)?)
}

/// Bytes of one encoded row (see `kdfast_core::encode`).
#[pyfunction]
#[pyo3(signature = (k, vocab_size, has_tail, num_samples))]
pub fn encoded_row_bytes(k: usize, vocab_size: u64, has_tail: bool, num_samples: Option<u32>) -> Result<usize, Error> {
    Ok(layout(k, vocab_size, has_tail, num_samples)?.row_bytes())
}

/// Encode contiguous targets (`ids` int64 `[rows, k]`, `logprobs`/`weights` float32 `[rows, k]`,
/// `tail` float32 `[rows]`) into `out`, `rows` records of `encoded_row_bytes(...)` bytes.
#[pyfunction]
#[pyo3(signature = (ids, logprobs, weights, tail, vocab_size, num_samples, out, num_threads))]
#[allow(clippy::too_many_arguments)]
pub fn encode_targets(
    py: Python<'_>,
    ids: TensorArg,
    logprobs: TensorArg,
    weights: Option<TensorArg>,
    tail: Option<TensorArg>,
    vocab_size: u64,
    num_samples: Option<u32>,
    out: ByteArg,
    num_threads: usize,
) -> Result<(), Error> {
    let (rows, k) = (ids.rows, ids.cols);
    let layout = layout(k, vocab_size, tail.is_some(), num_samples)?;
    expect_slots(&ids, Dtype::I64, rows, k, "targets.indices")?;
    expect_slots(&logprobs, Dtype::F32, rows, k, "targets.logprobs")?;
    if let Some(w) = &weights {
        expect_slots(w, Dtype::F32, rows, k, "targets.weights")?;
    }
    if let Some(t) = &tail {
        t.expect(Dtype::F32, "targets.tail_logprob")?.expect_len(rows, "targets.tail_logprob")?;
    }
    out.expect_len(rows * layout.row_bytes())?;
    // SAFETY: as in `compress_topk`; `out` is a fresh byte tensor.
    let (i, l, w, t, o) = unsafe {
        (ids.slice::<i64>(), logprobs.slice::<f32>(), weights.as_ref().map(|w| w.slice::<f32>()), tail.as_ref().map(|t| t.slice::<f32>()), out.slice_mut())
    };
    py.detach(|| encode(&layout, rows, i, l, w, t, o, num_threads.max(1)))?;
    Ok(())
}

/// Decode `rows` records of `data` into fresh contiguous outputs.
#[pyfunction]
#[pyo3(signature = (data, rows, k, vocab_size, num_samples, ids_out, logprobs_out, weights_out, tail_out))]
#[allow(clippy::too_many_arguments)]
pub fn decode_targets(
    py: Python<'_>,
    data: ByteArg,
    rows: usize,
    k: usize,
    vocab_size: u64,
    num_samples: Option<u32>,
    ids_out: TensorArg,
    logprobs_out: TensorArg,
    weights_out: Option<TensorArg>,
    tail_out: Option<TensorArg>,
) -> Result<(), Error> {
    let layout = layout(k, vocab_size, tail_out.is_some(), num_samples)?;
    data.expect_len(rows.checked_mul(layout.row_bytes()).ok_or_else(|| Error::arg("rows", "a size that fits in memory", &rows.to_string()))?)?;
    expect_slots(&ids_out, Dtype::I64, rows, k, "ids_out")?;
    expect_slots(&logprobs_out, Dtype::F32, rows, k, "logprobs_out")?;
    if let Some(w) = &weights_out {
        expect_slots(w, Dtype::F32, rows, k, "weights_out")?;
    }
    if let Some(t) = &tail_out {
        t.expect(Dtype::F32, "tail_out")?.expect_len(rows, "tail_out")?;
    }
    // SAFETY: `data` is a live byte tensor; the outputs are fresh tensors.
    let (d, i, l, w, t) = unsafe {
        (data.slice(), ids_out.slice_mut::<i64>(), logprobs_out.slice_mut::<f32>(), weights_out.as_ref().map(|w| w.slice_mut::<f32>()), tail_out.as_ref().map(|t| t.slice_mut::<f32>()))
    };
    py.detach(|| decode(&layout, rows, d, i, l, w, t))?;
    Ok(())
}
