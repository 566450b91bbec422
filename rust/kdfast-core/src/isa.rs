//! Runtime instruction-set dispatch.
//!
//! Kernels are written once as `#[inline(always)]` generic code over [`Math`]; each entry point
//! below is a `#[target_feature]` function into which that code is inlined, so LLVM vectorises
//! it for AVX-512, AVX2+FMA, or the baseline (SSE2 on x86-64, NEON on aarch64). One wheel is
//! fast on every CPU. [`Isa::Scalar`] runs the same code with the platform's libm instead of
//! the vectorisable polynomials: the reference the SIMD paths are tested against.

use crate::math::{Libm, Math, Poly, PolyFma};

/// An instruction set a kernel can run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// libm `exp`/`ln_1p`, no target features: the test reference.
    Scalar,
    /// The target's baseline features (SSE2 / NEON), polynomial math.
    Baseline,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Parse `"auto" | "scalar" | "baseline" | "avx2" | "avx512"`; `None` for an unknown name or
    /// an instruction set this CPU lacks.
    pub fn from_name(name: &str) -> Option<Isa> {
        let best = Isa::detect();
        let isa = match name {
            "auto" => best,
            "scalar" => Isa::Scalar,
            "baseline" => Isa::Baseline,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            _ => return None,
        };
        isa.supported().then_some(isa)
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar | Isa::Baseline => true,
            Isa::Avx2 => matches!(Isa::detect(), Isa::Avx2 | Isa::Avx512),
            Isa::Avx512 => Isa::detect() == Isa::Avx512,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Run `k` compiled for this instruction set, with subnormal results flushed to zero.
    #[inline(always)]
    pub fn run<K: Kernel>(self, k: K) -> K::Output {
        let _ftz = FlushDenormals::new();
        match self {
            Isa::Scalar => k.run::<Libm>(),
            Isa::Baseline => k.run::<Poly>(),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::from_name`/`detect` only yield these when the CPU has the features.
            Isa::Avx2 => unsafe { run_avx2(k) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { run_avx512(k) },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => k.run::<Poly>(),
        }
    }
}

/// A computation generic over its math, to be compiled once per instruction set.
pub trait Kernel {
    type Output;
    /// Must be `#[inline(always)]` so it is compiled with the caller's target features.
    fn run<M: Math>(self) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    k.run::<PolyFma>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    k.run::<PolyFma>()
}

/// Sets the x86 MXCSR flush-to-zero and denormals-are-zero bits for its lifetime, restoring the
/// caller's mode on drop. Products like `q · g` of tiny probabilities would otherwise produce
/// subnormals, each costing a ~100-cycle microcode assist; their contribution is below 1e-38.
struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushDenormals {
    #[inline(always)]
    fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let mut saved: u32 = 0;
            // SAFETY: stmxcsr/ldmxcsr read and write the SSE control register of this thread only;
            // bits 15 (FTZ) and 6 (DAZ) change no other state.
            unsafe {
                std::arch::asm!("stmxcsr [{}]", in(reg) &mut saved, options(nostack, preserves_flags));
                let flushed = saved | 0x8040;
                std::arch::asm!("ldmxcsr [{}]", in(reg) &flushed, options(nostack, preserves_flags, readonly));
            }
            FlushDenormals { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushDenormals {}
    }
}

impl Drop for FlushDenormals {
    #[inline(always)]
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: restores the value read in `new`.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &self.saved, options(nostack, preserves_flags, readonly));
        }
    }
}
