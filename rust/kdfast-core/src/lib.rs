//! kdfast-core: fused knowledge-distillation losses for CPU.
//!
//! The numerics of kdfast, free of Python: per-row kernels that compute a divergence between a
//! teacher and a student distribution together with its gradient w.r.t. the student logits in a
//! few streaming passes (see [`dense`]), for f32/bf16/f16 storage, SIMD-dispatched at run time
//! ([`isa`]) and row-parallel ([`threads`]).

pub mod categories;
pub mod compress;
pub mod dense;
pub mod divergence;
pub mod elem;
pub mod compact;
pub mod encode;
pub mod error;
pub mod isa;
pub mod math;
pub mod sharded_student;
pub mod sparse;
pub mod stats;
pub mod threads;

pub use dense::{dense_loss, DenseConfig, Rows};
pub use divergence::Divergence;
pub use elem::Elem;
pub use error::{KdError, Result};
pub use isa::Isa;
pub use stats::LseStats;
