//! The one error type of the core. The Python binding converts it to exceptions in one place.

use std::fmt;

/// Everything that can go wrong in a kdfast kernel call.
#[derive(Debug, Clone, PartialEq)]
pub enum KdError {
    /// An argument is outside its domain (`name`, what was expected, what was given).
    InvalidArgument { name: &'static str, expected: String, got: String },
    /// Two inputs whose shapes must agree do not.
    ShapeMismatch { what: String },
    /// A row of logits that has no finite maximum (all `-inf`, a `+inf` or a NaN): its softmax
    /// is undefined.
    NonFiniteRow { tensor: &'static str, row: usize, detail: &'static str },
}

impl fmt::Display for KdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KdError::InvalidArgument { name, expected, got } => {
                write!(f, "{name}: expected {expected}, got {got}")
            }
            KdError::ShapeMismatch { what } => write!(f, "shape mismatch: {what}"),
            KdError::NonFiniteRow { tensor, row, detail } => write!(
                f,
                "{tensor}: row {row} {detail}; every unmasked row needs at least one finite logit \
                 and no +inf or NaN"
            ),
        }
    }
}

impl std::error::Error for KdError {}

pub type Result<T> = std::result::Result<T, KdError>;
