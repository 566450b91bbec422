//! Branch-free `exp`, `expm1` and `ln_1p` in plain `f32` arithmetic.
//!
//! Written with selects and bit casts only, so that LLVM vectorises a loop calling them with
//! whatever SIMD width the enclosing function is compiled for (see [`crate::isa`]). [`Libm`]
//! is the scalar reference used by the scalar path and by tests.

/// The elementary functions a kernel needs.
pub trait Math: Copy + Send + Sync + 'static {
    /// `e^x`; exactly 0 for `x = -inf` and for results below the smallest normal float.
    fn exp(x: f32) -> f32;
    /// `e^x` of `x` clamped to `[−87, 88.3]`, without the special cases of [`Math::exp`]: below
    /// −87 (and for −inf) it is e^-87 = 1.6e-38 instead of 0, and NaN is not propagated. For
    /// sums of exponentials whose largest term is 1, where a few instructions per element count.
    fn exp_clamped(x: f32) -> f32;
    /// `e^x − 1`, accurate to a few ulp of the result for every `x` (also where `e^x ≈ 1`);
    /// exactly −1 for `x = -inf`.
    fn expm1(x: f32) -> f32;
    /// `ln(1 + u)` for `u` in `[0, 1]`.
    fn ln_1p(u: f32) -> f32;

    /// `ln(e^x + e^y)` without overflow or NaN; `-inf` when both are `-inf`.
    #[inline(always)]
    fn log_add_exp(x: f32, y: f32) -> f32 {
        let hi = if x > y { x } else { y };
        let lo = if x > y { y } else { x };
        let r = hi + Self::ln_1p(Self::exp(lo - hi));
        if hi == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            r
        }
    }
}

/// Polynomial approximations (Cephes `expf`/`logf` coefficients), ~1-2 ulp, vectorisable.
/// `FMA`: evaluate them with fused multiply-adds, for code compiled where the CPU has them
/// (half the instructions, and no libm call: elsewhere `mul_add` would be one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Polynomial<const FMA: bool>;

/// [`Polynomial`] with separate multiplies and adds: the baseline instruction sets.
pub type Poly = Polynomial<false>;
/// [`Polynomial`] with fused multiply-adds: AVX2+FMA, AVX-512.
pub type PolyFma = Polynomial<true>;

/// `a · b + c`, fused when `FMA`.
#[inline(always)]
fn mad<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The platform's scalar libm: the reference the vectorised path is tested against.
#[derive(Clone, Copy, Debug, Default)]
pub struct Libm;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds to the nearest integer and leaves the integer in the low bits.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// Below this we return 0 (relative to the row's max term it is < 1e-37). Chosen so that the
/// result is never subnormal (e^-87 = 1.6e-38 > 2^-126): subnormals are slow on x86.
const EXP_LO: f32 = -87.0;
/// Above this 2^n would overflow the exponent field; e^88.3 = 2e38 is still finite.
const EXP_HI: f32 = 88.3;

/// `x = n ln2 + r` with `|r| ≤ ln2/2` for `x` clamped to `[EXP_LO, EXP_HI]`: returns `(r, 2^n)`.
#[inline(always)]
fn reduce_ln2<const FMA: bool>(x: f32) -> (f32, f32) {
    let xc = x.max(EXP_LO).min(EXP_HI);
    let t = mad::<FMA>(xc, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = mad::<FMA>(-n, LN2_LO, mad::<FMA>(-n, LN2_HI, xc));
    // 2^n from the integer left in t's mantissa by the magic-number rounding.
    let k = t.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    (r, f32::from_bits(k.wrapping_add(127) << 23))
}

impl<const FMA: bool> Math for Polynomial<FMA> {
    #[inline(always)]
    fn exp_clamped(x: f32) -> f32 {
        let (r, pow2n) = reduce_ln2::<FMA>(x);
        let mut p = 1.987_569_2e-4_f32;
        p = mad::<FMA>(p, r, 1.398_199_9e-3);
        p = mad::<FMA>(p, r, 8.333_452e-3);
        p = mad::<FMA>(p, r, 4.166_579_6e-2);
        p = mad::<FMA>(p, r, 1.666_666_5e-1);
        p = mad::<FMA>(p, r, 5.000_000_1e-1);
        let e = mad::<FMA>(p, r * r, r) + 1.0;
        e * pow2n
    }

    #[inline(always)]
    fn exp(x: f32) -> f32 {
        let y = Self::exp_clamped(x);
        let y = if x < EXP_LO { 0.0 } else { y };
        let y = if x > EXP_HI { f32::INFINITY } else { y };
        if x.is_nan() {
            x
        } else {
            y
        }
    }

    /// With `x = n ln2 + r`, `|r| ≤ ln2/2`: `e^x − 1 = 2^n (e^r − 1) + (2^n − 1)`. `e^r − 1` is
    /// a degree-7 Taylor polynomial (truncation `|r|^7/8! < 2e-8` relative), `2^n − 1` is exact
    /// for `|n| ≤ 24` and rounds harmlessly beyond, so there is no cancellation near `x = 0`
    /// (`n = 0`, the result is the polynomial itself) and no second code path.
    #[inline(always)]
    fn expm1(x: f32) -> f32 {
        let (r, pow2n) = reduce_ln2::<FMA>(x);
        let mut p = 1.0 / 5040.0_f32;
        p = mad::<FMA>(p, r, 1.0 / 720.0);
        p = mad::<FMA>(p, r, 1.0 / 120.0);
        p = mad::<FMA>(p, r, 1.0 / 24.0);
        p = mad::<FMA>(p, r, 1.0 / 6.0);
        p = mad::<FMA>(p, r, 0.5);
        let em = mad::<FMA>(p, r * r, r);
        let y = mad::<FMA>(pow2n, em, pow2n - 1.0);
        let y = if x < EXP_LO { -1.0 } else { y };
        let y = if x > EXP_HI { f32::INFINITY } else { y };
        if x.is_nan() {
            x
        } else {
            y
        }
    }

    #[inline(always)]
    fn ln_1p(u: f32) -> f32 {
        // ln(w) for w = 1 + u in [1, 2], plus the rounding error of w: ln(1+u) ≈ ln w + (u − (w−1))/w,
        // where dividing by w ∈ [1, 2] changes a correction below 1 ulp of 1 by at most 2×;
        // so tiny u keep their precision (w = 1 gives exactly u) without a division.
        let w = 1.0 + u;
        ln_normal::<FMA>(w) + (u - (w - 1.0))
    }
}

/// Natural log of a positive normal float (Cephes `logf`).
#[inline(always)]
fn ln_normal<const FMA: bool>(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    // Mantissa in [0.5, 1).
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < SQRT_HALF;
    e -= small as i32;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    let z = f * f;
    let mut y = 7.037_683_6e-2_f32;
    y = mad::<FMA>(y, f, -1.151_461e-1);
    y = mad::<FMA>(y, f, 1.167_699_9e-1);
    y = mad::<FMA>(y, f, -1.242_014_1e-1);
    y = mad::<FMA>(y, f, 1.424_932_3e-1);
    y = mad::<FMA>(y, f, -1.666_805_8e-1);
    y = mad::<FMA>(y, f, 2.000_071_4e-1);
    y = mad::<FMA>(y, f, -2.499_999_4e-1);
    y = mad::<FMA>(y, f, 3.333_333_1e-1);
    let mut r = y * f * z;
    let ef = e as f32;
    r = mad::<FMA>(LN2_LO, ef, r);
    r = mad::<FMA>(-0.5, z, r);
    f + r + LN2_HI * ef
}

impl Math for Libm {
    #[inline(always)]
    fn exp(x: f32) -> f32 {
        x.exp()
    }

    #[inline(always)]
    fn exp_clamped(x: f32) -> f32 {
        x.max(EXP_LO).min(EXP_HI).exp()
    }

    #[inline(always)]
    fn expm1(x: f32) -> f32 {
        x.exp_m1()
    }

    #[inline(always)]
    fn ln_1p(u: f32) -> f32 {
        u.ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f32, b: f64) -> f64 {
        if b == 0.0 {
            (a as f64).abs()
        } else {
            ((a as f64 - b) / b).abs()
        }
    }

    /// Worst relative error of `f` against `g` on a grid of step 0.0137 over `[lo, 88)`.
    fn worst_on_grid(lo: f32, f: fn(f32) -> f32, g: fn(f64) -> f64) -> f64 {
        let (mut worst, mut x) = (0.0f64, lo);
        while x < 88.0 {
            worst = worst.max(rel(f(x), g(x as f64)));
            x += 0.0137;
        }
        worst
    }

    #[test]
    fn exp_matches_f64() {
        for f in [Poly::exp, PolyFma::exp] {
            let worst = worst_on_grid(-86.99, f, f64::exp);
            assert!(worst < 4e-7, "worst relative error {worst}");
        }
    }

    #[test]
    fn exp_clamped_is_exp_inside_the_range() {
        for f in [Poly::exp_clamped, PolyFma::exp_clamped, Libm::exp_clamped] {
            let worst = worst_on_grid(-86.99, f, f64::exp);
            assert!(worst < 4e-7, "worst relative error {worst}");
            assert_eq!(f(f32::NEG_INFINITY), f(EXP_LO));
            assert!(f(-1e4) > 0.0 && f(-1e4) < 2e-38 && f(1e4).is_finite());
        }
        assert_eq!(PolyFma::exp_clamped(-3.0), PolyFma::exp(-3.0));
    }

    #[test]
    fn exp_edges() {
        assert_eq!(PolyFma::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(PolyFma::exp(0.0), 1.0);
        assert!(PolyFma::exp(f32::NAN).is_nan());
        assert_eq!(Poly::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(Poly::exp(-1e4), 0.0);
        assert_eq!(Poly::exp(0.0), 1.0);
        assert_eq!(Poly::exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(Poly::exp(1e4), f32::INFINITY);
        assert!(Poly::exp(f32::NAN).is_nan());
    }

    #[test]
    fn expm1_matches_f64() {
        for f in [Poly::expm1, PolyFma::expm1] {
            let mut worst = worst_on_grid(-90.0, f, f64::exp_m1);
            // Near 0, where e^x − 1 would cancel: every scale down to subnormal-free tiny values,
            // both signs, and the polynomial's range edges ±ln2/2.
            for e in 0..120 {
                for &s in &[1.0f32, -1.0, 1.37, -1.37, 0.3466, -0.3466] {
                    let x = s * 2f32.powi(-e);
                    worst = worst.max(rel(f(x), (x as f64).exp_m1()));
                }
            }
            assert!(worst < 4e-7, "worst relative error {worst}");
        }
    }

    #[test]
    fn expm1_edges() {
        assert_eq!(Poly::expm1(f32::NEG_INFINITY), -1.0);
        assert_eq!(Poly::expm1(-1e4), -1.0);
        assert_eq!(Poly::expm1(0.0), 0.0);
        assert_eq!(Poly::expm1(f32::INFINITY), f32::INFINITY);
        assert!(Poly::expm1(88.0).is_finite());
        assert!(Poly::expm1(f32::NAN).is_nan());
        assert_eq!(Libm::expm1(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn ln_1p_matches_f64() {
        for f in [Poly::ln_1p, PolyFma::ln_1p] {
            let mut worst = 0.0f64;
            for i in 0..=100_000 {
                let u = i as f32 / 100_000.0;
                worst = worst.max(rel(f(u), (u as f64).ln_1p()));
            }
            for e in 1..40 {
                let u = 2f32.powi(-e);
                worst = worst.max(rel(f(u), (u as f64).ln_1p()));
            }
            assert!(worst < 4e-7, "worst relative error {worst}");
        }
    }

    #[test]
    fn log_add_exp_edges() {
        let ninf = f32::NEG_INFINITY;
        assert_eq!(Poly::log_add_exp(ninf, ninf), ninf);
        assert_eq!(Poly::log_add_exp(ninf, -3.0), -3.0);
        assert!((Poly::log_add_exp(-200.0, -200.0) - (-200.0 + std::f32::consts::LN_2)).abs() < 1e-5);
    }
}
