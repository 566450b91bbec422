//! Compact storage of sparse teacher targets: fixed-size byte records, one per row.
//!
//! A row of `k` slots over a vocabulary of `V` ids is stored as
//!
//! | bytes | content |
//! |---|---|
//! | `ceil(k · b / 8)` | the ids, `b = max(1, ceil(log2 V))` bits each, slot `j` in bits `[j b, (j+1) b)` of the little-endian bit stream (unused slots store 0) |
//! | `2 k` | log-prob codes, u16 little-endian (see below) |
//! | `4` (if the layout has a tail) | `tail_logprob`, f32 little-endian, exact |
//! | `2 k` (if sampled) | counts `w · N`, u16 little-endian, decoded as `count / N` |
//!
//! Records have the same size for every row, so a file of them is random-access (memory-map and
//! index). A slot is unused iff its code is [`CODE_NEG_INF`]; it decodes as id −1, log-prob
//! −inf (and weight 0), so a slot whose log-prob is −inf also decodes as unused.
//!
//! # Log-probability codes
//! `code = round(−lp · 2048)` ([`LOGPROB_SCALE`]), saturated to `[0, 65534]`; 65535 is −inf.
//! The scale is a power of two, so the decoded value `−code / 2048` is exact in f32, and:
//! * for `lp ∈ [−65534/2048, 0] ≈ [−31.999, 0]`: `|decoded − lp| ≤ 2^-12 ≈ 2.44e-4`
//!   ([`MAX_ABS_ERROR`]), i.e. each probability within a factor `e^(±2^-12)` (±0.025 %);
//! * `lp > 0` (rounding noise above 0) decodes as 0;
//! * `lp < −31.999` decodes as −31.999: the probability, below `e^-31.999 ≈ 1.3e-14`, is
//!   overstated by at most that much, in absolute terms;
//! * `−inf` round-trips exactly. NaN is an error.

use crate::error::{check_len, KdError, Result};
use crate::threads;

/// Codes per nat: a code unit is `1 / 2048` nat.
pub const LOGPROB_SCALE: f32 = 2048.0;
/// The code of `−inf` (an unused slot).
pub const CODE_NEG_INF: u16 = u16::MAX;
/// The largest finite code.
pub const CODE_MAX: u16 = u16::MAX - 1;
/// The most negative log-prob stored without saturation: `−65534 / 2048`.
pub const MIN_LOGPROB: f32 = -(CODE_MAX as f32) / LOGPROB_SCALE;
/// Bound on `|decoded − lp|` for `lp ∈ [MIN_LOGPROB, 0]`: half a code unit.
pub const MAX_ABS_ERROR: f32 = 0.5 / LOGPROB_SCALE;

/// The code of a log-probability (NaN must be rejected by the caller).
#[inline]
pub fn quantize_logprob(lp: f32) -> u16 {
    if lp == f32::NEG_INFINITY {
        CODE_NEG_INF
    } else {
        // −lp · 2048 is exact (power-of-two scale); clamp before the conversion.
        (-lp * LOGPROB_SCALE).round().clamp(0.0, CODE_MAX as f32) as u16
    }
}

/// The log-probability of a code.
#[inline]
pub fn dequantize_logprob(code: u16) -> f32 {
    if code == CODE_NEG_INF {
        f32::NEG_INFINITY
    } else {
        -(code as f32) / LOGPROB_SCALE
    }
}

/// Bits per stored id for a vocabulary of `vocab ≥ 1` ids: `max(1, ceil(log2 vocab))`.
pub fn id_bits(vocab: u64) -> u32 {
    (64 - (vocab.max(2) - 1).leading_zeros()).max(1)
}

/// The record layout of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Slots per row.
    pub k: usize,
    /// Vocabulary size V.
    pub vocab: u64,
    /// Whether a `tail_logprob` is stored.
    pub has_tail: bool,
    /// `Some(N)` for sampled targets: weights stored as counts out of N.
    pub num_samples: Option<u32>,
}

impl Layout {
    pub fn new(k: usize, vocab: u64, has_tail: bool, num_samples: Option<u32>) -> Result<Layout> {
        let bad = |name, expected: &str, got: String| Err(KdError::InvalidArgument { name, expected: expected.into(), got });
        if k == 0 {
            return bad("k", "at least one slot per row", "0".into());
        }
        if vocab == 0 || vocab > 1 << 32 {
            return bad("vocab_size", "an integer in [1, 2^32]", vocab.to_string());
        }
        if num_samples == Some(0) {
            return bad("num_samples", "an integer ≥ 1", "0".into());
        }
        if num_samples.is_some() && has_tail {
            return bad("tail_logprob", "no tail for sampled targets", "a tail".into());
        }
        Ok(Layout { k, vocab, has_tail, num_samples })
    }

    pub fn bits(&self) -> u32 {
        id_bits(self.vocab)
    }

    fn id_bytes(&self) -> usize {
        (self.k * self.bits() as usize).div_ceil(8)
    }

    /// Bytes of one row's record.
    pub fn row_bytes(&self) -> usize {
        self.id_bytes() + 2 * self.k + if self.has_tail { 4 } else { 0 } + if self.num_samples.is_some() { 2 * self.k } else { 0 }
    }
}

/// Encode one row into `out` (`layout.row_bytes()` bytes). `row` only labels errors.
pub fn encode_row(layout: &Layout, ids: &[i64], logprobs: &[f32], weights: Option<&[f32]>, tail: Option<f32>, out: &mut [u8], row: usize) -> Result<()> {
    let k = layout.k;
    let bits = layout.bits();
    let bad = |name, expected: String, got: String| Err(KdError::InvalidArgument { name, expected, got });
    let (id_part, rest) = out.split_at_mut(layout.id_bytes());
    let (codes, rest) = rest.split_at_mut(2 * k);
    let mut acc = 0u64;
    let mut nbits = 0u32;
    let mut pos = 0;
    for j in 0..k {
        let (id, lp) = (ids[j], logprobs[j]);
        let used = id != -1;
        if id < -1 || (used && id as u64 >= layout.vocab) {
            return bad("targets.indices", format!("ids in [0, {}) or -1 for an unused slot", layout.vocab), format!("{id} at row {row}, slot {j}"));
        }
        if used && lp.is_nan() {
            return bad("targets.logprobs", "log-probabilities (finite or -inf)".into(), format!("NaN at row {row}, slot {j}"));
        }
        let code = if used { quantize_logprob(lp) } else { CODE_NEG_INF };
        codes[2 * j..2 * j + 2].copy_from_slice(&code.to_le_bytes());
        acc |= (if used { id as u64 } else { 0 }) << nbits;
        nbits += bits;
        while nbits >= 8 {
            id_part[pos] = acc as u8;
            pos += 1;
            acc >>= 8;
            nbits -= 8;
        }
    }
    if nbits > 0 {
        id_part[pos] = acc as u8;
    }
    let mut rest = rest;
    if layout.has_tail {
        let t = tail.unwrap_or(f32::NAN);
        if t.is_nan() || t > 0.0 {
            return bad("targets.tail_logprob", "a log-probability ≤ 0 (or -inf)".into(), format!("{t} at row {row}"));
        }
        rest[..4].copy_from_slice(&t.to_le_bytes());
        rest = &mut rest[4..];
    }
    if let Some(n) = layout.num_samples {
        let w = weights.ok_or_else(|| KdError::InvalidArgument { name: "targets.weights", expected: "weights for sampled targets".into(), got: "None".into() })?;
        for j in 0..k {
            let x = if ids[j] == -1 { 0.0 } else { w[j] as f64 * n as f64 };
            let c = x.round();
            if !(x.is_finite() && (0.0..=u16::MAX as f64).contains(&c) && (x - c).abs() <= 1e-4 * c.max(1.0)) {
                return bad(
                    "targets.weights",
                    format!("multiples of 1/{n} (count / num_samples) with counts ≤ 65535"),
                    format!("{} at row {row}, slot {j}", w[j]),
                );
            }
            rest[2 * j..2 * j + 2].copy_from_slice(&(c as u16).to_le_bytes());
        }
    }
    Ok(())
}

/// Decode one row's record (the inverse of [`encode_row`] up to the log-prob quantisation).
pub fn decode_row(layout: &Layout, data: &[u8], ids: &mut [i64], logprobs: &mut [f32], weights: Option<&mut [f32]>, tail: Option<&mut f32>, row: usize) -> Result<()> {
    let k = layout.k;
    let bits = layout.bits();
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let (id_part, rest) = data.split_at(layout.id_bytes());
    let (codes, mut rest) = rest.split_at(2 * k);
    let mut acc = 0u64;
    let mut nbits = 0u32;
    let mut pos = 0;
    for j in 0..k {
        while nbits < bits {
            acc |= (id_part[pos] as u64) << nbits;
            pos += 1;
            nbits += 8;
        }
        let id = acc & mask;
        acc >>= bits;
        nbits -= bits;
        let code = u16::from_le_bytes([codes[2 * j], codes[2 * j + 1]]);
        if code == CODE_NEG_INF {
            (ids[j], logprobs[j]) = (-1, f32::NEG_INFINITY);
        } else {
            if id >= layout.vocab {
                return Err(KdError::InvalidArgument {
                    name: "data",
                    expected: format!("ids below the vocabulary size {}", layout.vocab),
                    got: format!("{id} at row {row}, slot {j} (corrupt record?)"),
                });
            }
            (ids[j], logprobs[j]) = (id as i64, dequantize_logprob(code));
        }
    }
    if layout.has_tail {
        let t = f32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if let Some(out) = tail {
            *out = t;
        }
        rest = &rest[4..];
    }
    if let (Some(n), Some(w)) = (layout.num_samples, weights) {
        for j in 0..k {
            let c = u16::from_le_bytes([rest[2 * j], rest[2 * j + 1]]);
            w[j] = if ids[j] == -1 { 0.0 } else { c as f32 / n as f32 };
        }
    }
    Ok(())
}

/// Encode `rows` rows (contiguous `[rows, k]` inputs, `tail` `[rows]`) into `out`
/// (`rows · layout.row_bytes()` bytes), rows in parallel.
#[allow(clippy::too_many_arguments)]
pub fn encode(layout: &Layout, rows: usize, ids: &[i64], logprobs: &[f32], weights: Option<&[f32]>, tail: Option<&[f32]>, out: &mut [u8], num_threads: usize) -> Result<()> {
    let k = layout.k;
    let rb = layout.row_bytes();
    check_len("indices", ids.len(), rows * k)?;
    check_len("logprobs", logprobs.len(), rows * k)?;
    check_len("data", out.len(), rows * rb)?;
    if let Some(w) = weights {
        check_len("weights", w.len(), rows * k)?;
    }
    if layout.has_tail {
        check_len("tail_logprob", tail.map_or(0, <[f32]>::len), rows)?;
    }
    if layout.num_samples.is_some() && weights.is_none() {
        return Err(KdError::InvalidArgument { name: "targets.weights", expected: "weights for sampled targets".into(), got: "None".into() });
    }
    let mut dummy = vec![0.0f32; rows];
    threads::for_each_row(&mut dummy, Some(out), rb, num_threads, |r, _, o| {
        let s = r * k..(r + 1) * k;
        encode_row(layout, &ids[s.clone()], &logprobs[s.clone()], weights.map(|w| &w[s]), tail.map(|t| t[r]), o.expect("row buffer"), r)
    })
}

/// Decode `rows` records from `data` into contiguous outputs (`weights` for sampled layouts,
/// `tail` for layouts with a tail).
pub fn decode(layout: &Layout, rows: usize, data: &[u8], ids: &mut [i64], logprobs: &mut [f32], mut weights: Option<&mut [f32]>, mut tail: Option<&mut [f32]>) -> Result<()> {
    let k = layout.k;
    let rb = layout.row_bytes();
    check_len("data", data.len(), rows * rb)?;
    check_len("indices", ids.len(), rows * k)?;
    check_len("logprobs", logprobs.len(), rows * k)?;
    if let Some(w) = weights.as_deref() {
        check_len("weights", w.len(), rows * k)?;
    }
    if let Some(t) = tail.as_deref() {
        check_len("tail_logprob", t.len(), rows)?;
    }
    for r in 0..rows {
        let s = r * k..(r + 1) * k;
        decode_row(
            layout,
            &data[r * rb..(r + 1) * rb],
            &mut ids[s.clone()],
            &mut logprobs[s.clone()],
            weights.as_deref_mut().map(|w| &mut w[s]),
            tail.as_deref_mut().map(|t| &mut t[r]),
            r,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        assert_eq!(id_bits(1), 1);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(32000), 15);
        assert_eq!(id_bits(32768), 15);
        assert_eq!(id_bits(32769), 16);
        assert_eq!(id_bits(151936), 18);
        assert_eq!(id_bits(1 << 32), 32);
    }

    #[test]
    fn quantisation_error_is_bounded() {
        let mut lp = 0.0f32;
        while lp > MIN_LOGPROB {
            let d = dequantize_logprob(quantize_logprob(lp));
            assert!((d - lp).abs() <= MAX_ABS_ERROR, "{lp} -> {d}");
            lp -= 0.000_37;
        }
        assert_eq!(dequantize_logprob(quantize_logprob(f32::NEG_INFINITY)), f32::NEG_INFINITY);
        assert_eq!(dequantize_logprob(quantize_logprob(1e-6)), 0.0);
        assert_eq!(dequantize_logprob(quantize_logprob(-1e4)), MIN_LOGPROB);
        assert_eq!(dequantize_logprob(quantize_logprob(MIN_LOGPROB)), MIN_LOGPROB);
    }
}
