//! The one conversion from core errors to Python exceptions: each [`KdError`] variant says
//! which exception it is.

use kdfast_core::KdError;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// A core error on its way to Python.
#[derive(Debug)]
pub struct Error(KdError);

impl Error {
    /// An argument outside its domain (→ `ValueError`).
    pub fn arg(name: &'static str, expected: &str, got: &str) -> Self {
        Error(KdError::InvalidArgument { name, expected: expected.into(), got: got.into() })
    }

    /// A tensor of the wrong dtype (→ `kdfast.DtypeError`).
    pub fn dtype(name: &'static str, expected: &str, got: &str) -> Self {
        Error(KdError::Dtype { name, expected: expected.into(), got: got.into() })
    }
}

impl From<KdError> for Error {
    fn from(e: KdError) -> Self {
        Error(e)
    }
}

impl From<Error> for PyErr {
    /// Bad values, shapes, rows and sizes are `ValueError`s; a dtype error is
    /// `kdfast.DtypeError` (a `TypeError` and a `ValueError`, as the Python layer raises).
    fn from(e: Error) -> PyErr {
        let msg = e.0.to_string();
        match e.0 {
            KdError::Dtype { .. } => Python::attach(|py| dtype_error(py, msg)),
            KdError::InvalidArgument { .. } | KdError::ShapeMismatch { .. } | KdError::NonFiniteRow { .. } | KdError::Alloc { .. } => {
                PyValueError::new_err(msg)
            }
        }
    }
}

/// `kdfast._errors.DtypeError(msg)`, or a `TypeError` if that module cannot be imported (the
/// extension loaded outside its package).
fn dtype_error(py: Python<'_>, msg: String) -> PyErr {
    let class = py.import("kdfast._errors").and_then(|m| m.getattr("DtypeError")).and_then(|c| Ok(c.cast_into::<PyType>()?));
    match class {
        Ok(class) => PyErr::from_type(class, msg),
        Err(_) => PyTypeError::new_err(msg),
    }
}
