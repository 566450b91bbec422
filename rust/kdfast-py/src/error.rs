//! The one conversion from core errors to Python exceptions.

use kdfast_core::KdError;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

/// A core error on its way to Python.
pub struct Error(KdError);

impl Error {
    pub fn arg(name: &'static str, expected: &str, got: &str) -> Self {
        Error(KdError::InvalidArgument { name, expected: expected.into(), got: got.into() })
    }
}

impl From<KdError> for Error {
    fn from(e: KdError) -> Self {
        Error(e)
    }
}

impl From<Error> for PyErr {
    /// Every core error is bad input: a `ValueError` carrying the core's message.
    fn from(e: Error) -> PyErr {
        PyValueError::new_err(e.0.to_string())
    }
}
