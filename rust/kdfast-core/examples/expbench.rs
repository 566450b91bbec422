use kdfast_core::isa::{Isa, Kernel};
use kdfast_core::math::Math;
use std::time::Instant;

struct SumExp<'a>(&'a [f32]);
impl Kernel for SumExp<'_> {
    type Output = f32;
    #[inline(always)]
    fn run<M: Math>(self) -> f32 {
        let mut acc = [0.0f32; 16];
        for c in self.0.chunks_exact(16) {
            for l in 0..16 {
                acc[l] += M::exp(c[l]);
            }
        }
        acc.iter().sum()
    }
}

fn main() {
    let x: Vec<f32> = (0..4096).map(|i| -(i as f32) * 0.001).collect();
    for isa in [Isa::Baseline, Isa::Avx2, Isa::Avx512] {
        let t0 = Instant::now();
        let mut s = 0.0;
        for _ in 0..10000 {
            s += isa.run(SumExp(std::hint::black_box(&x)));
        }
        let dt = t0.elapsed().as_secs_f64();
        println!("{isa:?}: {:.3} ns/exp ({s})", dt * 1e9 / (4096.0 * 10000.0));
    }
}
