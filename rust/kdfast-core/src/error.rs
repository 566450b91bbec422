//! The one error type of the core. The Python binding converts it to exceptions in one place
//! (`kdfast-py/src/error.rs`), one exception class per variant.

use std::fmt;

/// Everything that can go wrong in a kdfast kernel call.
#[derive(Debug, Clone, PartialEq)]
pub enum KdError {
    /// An argument is outside its domain (`name`, what was expected, what was given).
    InvalidArgument { name: &'static str, expected: String, got: String },
    /// A tensor has the wrong element type (`name`, the dtypes accepted, the dtype given).
    Dtype { name: &'static str, expected: String, got: String },
    /// Two inputs whose shapes must agree do not.
    ShapeMismatch { what: String },
    /// A row of logits that has no finite maximum (all `-inf`, a `+inf` or a NaN): its softmax
    /// is undefined.
    NonFiniteRow { tensor: &'static str, row: usize, detail: &'static str },
    /// A buffer whose size the argument `name` sets could not be allocated (`bytes` requested).
    Alloc { name: &'static str, bytes: usize },
}

impl fmt::Display for KdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KdError::InvalidArgument { name, expected, got } => {
                write!(f, "{name}: expected {expected}, got {got}")
            }
            KdError::Dtype { name, expected, got } => write!(f, "{name}: expected dtype {expected}, got {got}"),
            KdError::ShapeMismatch { what } => write!(f, "shape mismatch: {what}"),
            KdError::NonFiniteRow { tensor, row, detail } => write!(
                f,
                "{tensor}: row {row} {detail}; every unmasked row needs at least one finite logit \
                 and no +inf or NaN"
            ),
            KdError::Alloc { name, bytes } => write!(
                f,
                "{name}: too large for this process: a buffer it sizes would need {bytes} more bytes, \
                 which could not be allocated"
            ),
        }
    }
}

impl std::error::Error for KdError {}

pub type Result<T> = std::result::Result<T, KdError>;

/// `name` (a flat buffer) must hold `want` elements.
pub fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(KdError::ShapeMismatch { what: format!("{name} has {got} elements, expected {want}") });
    }
    Ok(())
}

/// A temperature must be a finite number > 0.
pub fn check_temperature(t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(KdError::InvalidArgument { name: "temperature", expected: "a finite number > 0".into(), got: format!("{t}") })
    }
}

/// Make room for `additional` more elements in `v` (amortised growth, like `Vec::reserve`), or
/// fail with [`KdError::Alloc`] charged to the argument `name` whose value asked for that much:
/// buffers sized by a caller's number must never abort the process.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, name: &'static str) -> Result<()> {
    v.try_reserve(additional)
        .map_err(|_| KdError::Alloc { name, bytes: additional.saturating_mul(std::mem::size_of::<T>()) })
}
