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
        dst.convert_from_f32_slice(src);
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
