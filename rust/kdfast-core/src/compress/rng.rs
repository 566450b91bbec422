//! The counter-based random streams of the sampler (SplitMix64 keyed by seed, row, stream).


const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_SALT: u64 = 0x6B64_6661_7374_2D31; // "kdfast-1"

/// The SplitMix64 finaliser (a bijection of u64).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of the random stream `stream` of row `row` under `seed`:
/// `mix(mix(mix(seed ^ SALT) ^ row) ^ stream)`.
#[inline]
pub fn stream_key(seed: u64, row: u64, stream: u64) -> u64 {
    mix64(mix64(mix64(seed ^ SEED_SALT) ^ row) ^ stream)
}

/// The `j`-th uniform of a stream, in `[0, 1)` with 53 random bits:
/// `(mix(key + (j + 1)·γ) >> 11) · 2^-53` (SplitMix64).
#[inline]
pub fn uniform(key: u64, j: u64) -> f64 {
    let z = mix64(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)));
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_range_and_distinct_streams_differ() {
        let k1 = stream_key(0, 0, 0);
        let k2 = stream_key(0, 1, 0);
        let k3 = stream_key(1, 0, 0);
        assert!(k1 != k2 && k1 != k3 && k2 != k3);
        let mean: f64 = (0..10_000).map(|j| uniform(k1, j)).sum::<f64>() / 1e4;
        assert!((mean - 0.5).abs() < 0.02);
        assert!((0..1000).all(|j| (0.0..1.0).contains(&uniform(k2, j))));
    }
}
