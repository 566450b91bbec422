//! Tensor descriptors passed from Python: `(data_ptr, rows, cols, row_stride, dtype)`.

use crate::error::Error;
use pyo3::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    BF16,
    F16,
    I64,
}

impl Dtype {
    fn parse(name: &str) -> Option<Dtype> {
        Some(match name {
            "float32" => Dtype::F32,
            "bfloat16" => Dtype::BF16,
            "float16" => Dtype::F16,
            "int64" => Dtype::I64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::I64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
            Dtype::I64 => "int64",
        }
    }
}

/// A 2-D strided view of CPU memory: `rows` rows of `cols` contiguous elements, `row_stride`
/// elements apart.
#[derive(Clone, Copy, Debug)]
pub struct TensorArg {
    ptr: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub dtype: Dtype,
}

impl<'py> FromPyObject<'_, 'py> for TensorArg {
    type Error = PyErr;

    fn extract(ob: Borrowed<'_, 'py, PyAny>) -> PyResult<Self> {
        let (ptr, rows, cols, row_stride, dtype): (usize, usize, usize, usize, String) = ob.extract()?;
        let dtype = Dtype::parse(&dtype).ok_or_else(|| PyErr::from(Error::arg("dtype", "float32, bfloat16, float16 or int64", &dtype)))?;
        if ptr == 0 || ptr % dtype.size() != 0 {
            return Err(Error::arg("data_ptr", "a non-null pointer aligned to the element size", &format!("{ptr:#x}")).into());
        }
        let extent = if rows == 0 { Some(0) } else { (rows - 1).checked_mul(row_stride).and_then(|e| e.checked_add(cols)) };
        if extent.is_none_or(|e| e.checked_mul(dtype.size()).is_none_or(|b| b > isize::MAX as usize)) {
            return Err(Error::arg("shape", "a tensor that fits in memory", &format!("{rows} x {cols}, stride {row_stride}")).into());
        }
        Ok(TensorArg { ptr, rows, cols, row_stride, dtype })
    }
}

impl TensorArg {
    pub fn expect(&self, dtype: Dtype, name: &'static str) -> Result<&Self, Error> {
        if self.dtype != dtype {
            return Err(Error::arg(name, dtype.name(), self.dtype.name()));
        }
        Ok(self)
    }

    /// Require a contiguous buffer of exactly `len` elements.
    pub fn expect_len(&self, len: usize, name: &'static str) -> Result<&Self, Error> {
        if self.len() != len || (self.rows > 1 && self.row_stride != self.cols) {
            return Err(Error::arg(name, &format!("a contiguous buffer of {len} elements"), &format!("{} x {}", self.rows, self.cols)));
        }
        Ok(self)
    }

    fn len(&self) -> usize {
        if self.rows == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + self.cols
        }
    }

    /// # Safety
    /// The descriptor must describe live memory of element type `E` that nothing writes to
    /// during the borrow.
    pub unsafe fn slice<'a, E>(&self) -> &'a [E] {
        std::slice::from_raw_parts(self.ptr as *const E, self.len())
    }

    /// # Safety
    /// As [`Self::slice`], and nothing else may read or write the memory during the borrow.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<'a, E>(&self) -> &'a mut [E] {
        std::slice::from_raw_parts_mut(self.ptr as *mut E, self.len())
    }
}
