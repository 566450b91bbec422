//! f64 `exp` and log-sum-exp for the sampler's running sums.

use super::*;

// ------------------------------------------------------------------------------ f64 exp

/// `e^x` for `x ≤ 0` in plain f64 arithmetic (vectorisable), within 2 ulp; 0 below −708
/// (there e^x < 1e-307: such an entry is never drawn in practice, exact libm or not).
/// Cody–Waite reduction `x = n ln2 + r`, `|r| ≤ ln2 / 2`, and the degree-13 Taylor polynomial
/// (truncation error < 1e-17 relative).
#[inline(always)]
pub(super) fn exp64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // fdlibm's split of ln 2: LN2_HI has 32 significant bits, so n · LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    let xc = x.max(-708.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0;
    p = p * r + 1.0 / 479_001_600.0;
    p = p * r + 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let k = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i64;
    let pow2n = f64::from_bits(((k + 1023) as u64) << 52);
    if x < -708.0 {
        0.0
    } else {
        p * pow2n
    }
}

/// `out[i] = exp64(x[i] − m)`, compiled per instruction set.
pub(super) struct ExpJob<'a> {
    pub(super) x: &'a [f32],
    pub(super) m: f64,
    pub(super) out: &'a mut [f64],
}

impl Kernel for ExpJob<'_> {
    type Output = ();
    #[inline(always)]
    fn run<M: Math>(self) {
        for (o, &v) in self.out.iter_mut().zip(self.x) {
            *o = exp64(v as f64 - self.m);
        }
    }
}

// ------------------------------------------------------------------------- f64 log-sum-exp

/// `ln Σ exp(x_i)` kept as `(max, Σ exp(x_i − max))` in f64; `sum == 0` is the empty set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Lse64 {
    pub(super) max: f64,
    pub(super) sum: f64,
}

impl Lse64 {
    pub(super) const EMPTY: Lse64 = Lse64 { max: f64::NEG_INFINITY, sum: 0.0 };

    pub(super) fn merge(self, o: Lse64) -> Lse64 {
        if o.sum == 0.0 {
            return self;
        }
        if self.sum == 0.0 {
            return o;
        }
        let max = self.max.max(o.max);
        Lse64 { max, sum: self.sum * (self.max - max).exp() + o.sum * (o.max - max).exp() }
    }

    /// The statistics of finite (or −inf) values.
    pub(super) fn of(xs: impl Iterator<Item = f32> + Clone) -> Lse64 {
        let max = xs.clone().fold(NEG_INF, f32::max);
        if max == NEG_INF {
            return Lse64::EMPTY;
        }
        let m = max as f64;
        Lse64 { max: m, sum: xs.map(|x| exp64(x as f64 - m)).sum() }
    }

    pub(super) fn ln(self) -> f64 {
        if self.sum == 0.0 {
            f64::NEG_INFINITY
        } else {
            self.max + self.sum.ln()
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn exp64_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 0.0f64;
        while x > -708.0 {
            let (a, b) = (exp64(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x -= 0.001_234_567;
        }
        assert!(worst < 3.0 * f64::EPSILON, "worst relative error {worst}");
        assert_eq!(exp64(0.0), 1.0);
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp64(-1e6), 0.0);
    }

    #[test]
    pub(super) fn lse64_merge() {
        let a = Lse64::of([1.0f32, 2.0].into_iter());
        let b = Lse64::of([3.0f32].into_iter());
        let want = ((1f64).exp() + (2f64).exp() + (3f64).exp()).ln();
        assert!((a.merge(b).ln() - want).abs() < 1e-12);
        assert_eq!(Lse64::EMPTY.merge(a), a);
        assert_eq!(a.merge(Lse64::EMPTY), a);
        assert_eq!(Lse64::of([NEG_INF].into_iter()), Lse64::EMPTY);
    }
}
