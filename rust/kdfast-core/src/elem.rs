//! Element types of logits and gradients, read and written block by block as `f32`.
//!
//! bf16 and fp16 are converted one L1-sized block at a time (the `half` crate's slice
//! conversions, which use F16C where the CPU has it), never through an fp32 copy of a tensor.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A floating-point storage type kdfast reads logits from and writes gradients to.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Its name in error messages.
    const NAME: &'static str;
    /// `dst[i] = src[i] as f32`.
    fn load(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i] as f32 * scale`, in one sweep where the conversion allows.
    #[inline]
    fn load_scaled(src: &[Self], dst: &mut [f32], scale: f32) {
        Self::load(src, dst);
        for x in dst.iter_mut() {
            *x *= scale;
        }
    }
    /// `dst[i] = src[i]` rounded to nearest-even.
    fn store(src: &[f32], dst: &mut [Self]);
    /// The element `0.0`.
    fn zero() -> Self;
}

impl Elem for f32 {
    const NAME: &'static str = "float32";
    #[inline]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline]
    fn load_scaled(src: &[f32], dst: &mut [f32], scale: f32) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s * scale;
        }
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn zero() -> Self {
        0.0
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline]
    fn load(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift, which LLVM vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[inline]
    fn load_scaled(src: &[bf16], dst: &mut [f32], scale: f32) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16) * scale;
        }
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [bf16]) {
        // Round to nearest even on the bit pattern, as `bf16::from_f32` does, written so that
        // it is inlined and vectorised with the caller (the `half` slice conversion is compiled
        // for the baseline and converts one element at a time).
        for (d, &x) in dst.iter_mut().zip(src) {
            let b = x.to_bits();
            let r = if b & 0x7FFF_FFFF > 0x7F80_0000 { (b >> 16) | 0x40 } else { (b + 0x7FFF + ((b >> 16) & 1)) >> 16 };
            *d = bf16::from_bits(r as u16);
        }
    }
    fn zero() -> Self {
        bf16::ZERO
    }
}

impl Elem for f16 {
    const NAME: &'static str = "float16";
    #[inline]
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline]
    fn store(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
    fn zero() -> Self {
        f16::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_store_rounds_as_half_does() {
        // Every exponent with the mantissa patterns around the rounding boundaries (ties to
        // even and odd, just below and above), the specials, and a sweep of other bit patterns.
        let mut bits: Vec<u32> = vec![0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0x7F80_0001, 0xFFFF_FFFF, 0x7F7F_FFFF, 0x0000_0001];
        for e in 0..=0x1FFu32 {
            for m in [0u32, 0x7FFF, 0x8000, 0x8001, 0x1_7FFF, 0x1_8000, 0x1_8001, 0x7F_FFFF, 0x7F_8000] {
                bits.push((e << 23) | m);
            }
        }
        bits.extend((0..200_000u32).map(|i| i.wrapping_mul(2_654_435_761)));
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut out = vec![bf16::ZERO; xs.len()];
        bf16::store(&xs, &mut out);
        for (x, y) in xs.iter().zip(&out) {
            assert_eq!(y.to_bits(), bf16::from_f32(*x).to_bits(), "{:#x}", x.to_bits());
        }
    }

    #[test]
    fn round_trips() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let mut b = vec![bf16::ZERO; xs.len()];
        let mut back = vec![0.0f32; xs.len()];
        bf16::store(&xs, &mut b);
        bf16::load(&b, &mut back);
        for (x, y) in xs.iter().zip(&back) {
            assert_eq!(*y, bf16::from_f32(*x).to_f32());
        }
        let mut h = vec![f16::ZERO; xs.len()];
        f16::store(&xs, &mut h);
        f16::load(&h, &mut back);
        for (x, y) in xs.iter().zip(&back) {
            assert_eq!(*y, f16::from_f32(*x).to_f32());
        }
    }
}
