//! Inputs shared by the integration tests.

#![allow(dead_code)]

pub mod dense;

use kdfast_core::Isa;

/// Deterministic wide-spread logits in `[-spread, spread)` with a `-inf` about every
/// `neg_inf_every` entries (never in column 0, so no row is all `-inf`; 0 disables them).
pub fn logits(rows: usize, cols: usize, seed: u64, spread: f32, neg_inf_every: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..rows * cols)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((state >> 40) as f32) / (1u64 << 24) as f32;
            if i % cols != 0 && neg_inf_every > 0 && (state >> 20).is_multiple_of(neg_inf_every) {
                f32::NEG_INFINITY
            } else {
                (u - 0.5) * 2.0 * spread
            }
        })
        .collect()
}

/// The instruction sets this CPU can run, the scalar reference first.
pub fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Baseline, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.supported()).collect()
}
