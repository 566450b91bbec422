//! The one place where tensor memory crosses the border.
//!
//! [`Tensor`] is extracted from a `torch.Tensor` itself (`data_ptr()`, `shape`, `stride()`,
//! `dtype`, `device`), and every check that makes a slice over that memory sound is made here
//! and nowhere else: a CPU tensor, 1-D or 2-D, unit column stride, a non-null pointer aligned
//! to the element, an extent whose byte size fits `isize` (all arithmetic checked). The views
//! ([`Tensor::rows`], [`Tensor::vector`], [`Tensor::matrix_mut`], ...) add the dtype and shape
//! checks of the call, and [`disjoint`] keeps written tensors apart from every other argument.
//!
//! Lifetime: a `Tensor` lives inside one `#[pyfunction]` call, whose arguments keep the Python
//! tensors (and so their storage) alive until it returns; the views borrow the `Tensor`, so
//! they cannot outlive the call. (As with NumPy buffers, resizing a tensor from another Python
//! thread while a call runs without the interpreter lock is not supported.)

use crate::error::Error;
use half::{bf16, f16};
use kdfast_core::Rows;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use pyo3::{intern, Borrowed};
use std::ops::Range;
use std::ptr::NonNull;

/// The element types that cross the border.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    F64,
    I64,
    U8,
}

impl Dtype {
    /// From `str(tensor.dtype)`, e.g. `"torch.float32"`.
    fn parse(name: &str) -> Option<Dtype> {
        Some(match name.strip_prefix("torch.").unwrap_or(name) {
            "float32" => Dtype::F32,
            "bfloat16" => Dtype::BF16,
            "float16" => Dtype::F16,
            "float64" => Dtype::F64,
            "int64" => Dtype::I64,
            "uint8" => Dtype::U8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::F64 => "float64",
            Dtype::I64 => "int64",
            Dtype::U8 => "uint8",
        }
    }

    /// Bytes per element, which is also the alignment the slices need.
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::U8 => 1,
        }
    }
}

/// A Rust element type with its tensor dtype.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: Dtype = Dtype::$d; })* };
}
element!(f32 => F32, bf16 => BF16, f16 => F16, f64 => F64, i64 => I64, u8 => U8);

/// Run `$body` with each `$E` a type alias for the element type of the floating-point tensor
/// `$t` (float32, bfloat16 or float16); any other dtype returns a dtype error naming `$name`.
/// The one dtype dispatch of the binding: `dispatch_float!(S = (s, "student_logits"), T = (t,
/// "teacher_logits") => { ... })` instantiates the body for every student × teacher pair.
macro_rules! dispatch_float {
    (=> $body:block) => { $body };
    ($E:ident = ($t:expr, $name:expr) $(, $E2:ident = ($t2:expr, $name2:expr))* => $body:block) => {
        match $t.dtype() {
            $crate::tensor::Dtype::F32 => { type $E = f32; $crate::tensor::dispatch_float!($($E2 = ($t2, $name2)),* => $body) }
            $crate::tensor::Dtype::BF16 => { type $E = half::bf16; $crate::tensor::dispatch_float!($($E2 = ($t2, $name2)),* => $body) }
            $crate::tensor::Dtype::F16 => { type $E = half::f16; $crate::tensor::dispatch_float!($($E2 = ($t2, $name2)),* => $body) }
            other => return Err($crate::error::Error::dtype($name, "float32, bfloat16 or float16", other.name()).into()),
        }
    };
}
pub(crate) use dispatch_float;

/// A checked 1-D or 2-D view of a CPU tensor's memory: `rows` rows of `cols` contiguous
/// elements, `row_stride` elements apart (a 1-D tensor is one row).
#[derive(Debug)]
pub struct Tensor {
    /// Non-null and aligned; dangling (never read) when the extent is empty.
    ptr: NonNull<u8>,
    dtype: Dtype,
    ndim: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    /// Elements from the first to one past the last: `(rows − 1) · row_stride + cols` (0 if empty).
    extent: usize,
}

// SAFETY: a `Tensor` is a checked address range of memory owned by a torch tensor that outlives
// the call; shared access follows the `&`/`&mut` rules of the views (and `disjoint`).
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

fn bad(name: &'static str, expected: &str, got: impl std::fmt::Display) -> PyErr {
    Error::arg(name, expected, &got.to_string()).into()
}

/// `torch.Tensor`, looked up once.
fn tensor_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    TYPE.import(py, "torch", "Tensor")
}

impl<'py> FromPyObject<'_, 'py> for Tensor {
    type Error = PyErr;

    fn extract(ob: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let py = ob.py();
        if !ob.is_instance(tensor_type(py)?)? {
            let got = ob.get_type().name()?;
            return Err(PyTypeError::new_err(format!("expected a torch.Tensor, got {got}")));
        }
        let device: String = ob.getattr(intern!(py, "device"))?.getattr(intern!(py, "type"))?.extract()?;
        if device != "cpu" {
            return Err(bad("tensor", "a CPU tensor", format!("a tensor on {device}")));
        }
        let dtype_name = ob.getattr(intern!(py, "dtype"))?.str()?.to_string();
        let dtype = Dtype::parse(&dtype_name).ok_or_else(|| {
            PyErr::from(Error::dtype("tensor", "float32, bfloat16, float16, float64, int64 or uint8", &dtype_name))
        })?;
        if ob.call_method0(intern!(py, "is_neg"))?.extract::<bool>()? {
            // A lazily negated view: its memory holds the un-negated values.
            return Err(bad("tensor", "a tensor without the negative bit (call .resolve_neg())", "a negated view"));
        }
        let shape: Vec<usize> = ob.getattr(intern!(py, "shape"))?.extract()?;
        let strides: Vec<usize> = ob.call_method0(intern!(py, "stride"))?.extract()?;
        let (rows, cols, row_stride, col_stride) = match (&shape[..], &strides[..]) {
            (&[n], &[s]) => (1, n, n, s),
            // Rows without elements have no layout to honour: their row stride is their width.
            (&[r, c], &[rs, cs]) => (r, c, if r > 1 && c > 0 { rs } else { c }, cs),
            _ => return Err(bad("tensor", "a 1-D or 2-D tensor", format!("shape {shape:?}"))),
        };
        if cols > 1 && col_stride != 1 {
            return Err(bad("tensor", "unit stride along the last dimension", format!("shape {shape:?}, strides {strides:?}")));
        }
        let too_big = || bad("tensor", "a tensor whose extent fits in memory", format!("shape {shape:?}, strides {strides:?}"));
        let extent = match rows.checked_mul(cols) {
            Some(0) => 0,
            Some(_) => (rows - 1).checked_mul(row_stride).and_then(|e| e.checked_add(cols)).ok_or_else(too_big)?,
            None => return Err(too_big()),
        };
        let bytes = extent.checked_mul(dtype.size()).filter(|&b| b <= isize::MAX as usize).ok_or_else(too_big)?;
        let addr: usize = ob.call_method0(intern!(py, "data_ptr"))?.extract()?;
        let ptr = if extent == 0 {
            NonNull::<u64>::dangling().cast::<u8>() // aligned for every dtype; no element is read
        } else {
            if !addr.is_multiple_of(dtype.size()) || addr.checked_add(bytes).is_none() {
                return Err(bad("tensor", "data aligned to its element size", format!("address {addr:#x}")));
            }
            NonNull::new(addr as *mut u8).ok_or_else(|| bad("tensor", "a non-null data pointer", "null"))?
        };
        Ok(Tensor { ptr, dtype, ndim: shape.len(), rows, cols, row_stride, extent })
    }
}

impl Tensor {
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Rows and columns (a 1-D tensor is one row).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn expect<E: Element>(&self, name: &'static str) -> Result<(), Error> {
        if self.dtype != E::DTYPE {
            return Err(Error::dtype(name, E::DTYPE.name(), self.dtype.name()));
        }
        Ok(())
    }

    fn expect_shape(&self, name: &'static str, want: &[usize]) -> Result<(), Error> {
        let contiguous = self.rows <= 1 || self.row_stride == self.cols;
        let same = match *want {
            [n] => self.ndim == 1 && self.cols == n,
            [r, c] => self.ndim == 2 && (self.rows, self.cols) == (r, c) && contiguous,
            _ => false,
        };
        if !same {
            let got = match self.ndim {
                1 => format!("shape [{}]", self.cols),
                _ => format!("shape [{}, {}] with row stride {}", self.rows, self.cols, self.row_stride),
            };
            return Err(Error::arg(name, &format!("a contiguous tensor of shape {want:?}"), &got));
        }
        Ok(())
    }

    /// The whole extent as elements of `E`.
    ///
    /// # Safety
    /// The dtype must be `E`'s (checked by every caller), and no `&mut` to the same memory may
    /// exist while the slice does.
    unsafe fn slice<E: Element>(&self) -> &[E] {
        // SAFETY: `extract` checked that `ptr` is non-null and aligned, that `extent` elements
        // of this dtype lie in the tensor's live storage and that their byte size fits `isize`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<E>(), self.extent) }
    }

    /// As [`Self::slice`], writable.
    ///
    /// # Safety
    /// As [`Self::slice`], and no other reference to the memory may exist while the slice does
    /// (see [`disjoint`]).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<E: Element>(&self) -> &mut [E] {
        // SAFETY: as in `slice`; the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<E>(), self.extent) }
    }

    /// The rows of a 2-D input of element type `E` (any row stride the core accepts).
    pub fn rows<E: Element>(&self, name: &'static str) -> Result<Rows<'_, E>, Error> {
        self.expect::<E>(name)?;
        if self.ndim != 2 {
            return Err(Error::arg(name, "a 2-D tensor [rows, vocab]", &format!("shape [{}]", self.cols)));
        }
        // SAFETY: dtype checked above; inputs are only ever read (outputs pass `disjoint`).
        Ok(Rows::new(unsafe { self.slice::<E>() }, self.rows, self.cols, self.row_stride, name)?)
    }

    /// A contiguous 1-D input of `len` elements.
    pub fn vector<E: Element>(&self, name: &'static str, len: usize) -> Result<&[E], Error> {
        self.expect::<E>(name)?;
        self.expect_shape(name, &[len])?;
        // SAFETY: dtype checked above; inputs are only ever read.
        Ok(unsafe { self.slice::<E>() })
    }

    /// A contiguous 2-D input of shape `[rows, cols]`.
    pub fn matrix<E: Element>(&self, name: &'static str, rows: usize, cols: usize) -> Result<&[E], Error> {
        self.expect::<E>(name)?;
        self.expect_shape(name, &[rows, cols])?;
        // SAFETY: dtype checked above; inputs are only ever read.
        Ok(unsafe { self.slice::<E>() })
    }

    /// A contiguous 1-D output of `len` elements. Pass it through [`disjoint`] first.
    pub fn vector_mut<E: Element>(&mut self, name: &'static str, len: usize) -> Result<&mut [E], Error> {
        self.expect::<E>(name)?;
        self.expect_shape(name, &[len])?;
        // SAFETY: dtype checked above; `&mut self` and `disjoint` make this the only reference.
        Ok(unsafe { self.slice_mut::<E>() })
    }

    /// A contiguous 2-D output of shape `[rows, cols]`. Pass it through [`disjoint`] first.
    pub fn matrix_mut<E: Element>(&mut self, name: &'static str, rows: usize, cols: usize) -> Result<&mut [E], Error> {
        self.expect::<E>(name)?;
        self.expect_shape(name, &[rows, cols])?;
        // SAFETY: dtype checked above; `&mut self` and `disjoint` make this the only reference.
        Ok(unsafe { self.slice_mut::<E>() })
    }

    fn bytes(&self) -> Range<usize> {
        let start = self.ptr.as_ptr() as usize;
        start..start + self.extent * self.dtype.size() // no overflow: checked in `extract`
    }
}

/// Check that no output overlaps another argument of the call (inputs may overlap each other:
/// they are only read). Every entry point calls it before taking a `*_mut` view.
pub fn disjoint(outputs: &[(&'static str, Option<&Tensor>)], inputs: &[Option<&Tensor>]) -> Result<(), Error> {
    for (i, &(name, out)) in outputs.iter().enumerate() {
        let Some(out) = out else { continue };
        let o = out.bytes();
        let others = outputs[i + 1..].iter().map(|&(_, t)| t).chain(inputs.iter().copied()).flatten();
        for t in others {
            let r = t.bytes();
            if o.start < r.end && r.start < o.end {
                return Err(Error::arg(name, "an output tensor that shares no memory with the other arguments", "an overlapping tensor"));
            }
        }
    }
    Ok(())
}
