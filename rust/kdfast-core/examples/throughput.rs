//! Rows per second of the dense kernels per instruction set:
//! `cargo run --release -p kdfast-core --example throughput -- [rows] [vocab]`.

use kdfast_core::{dense_loss, DenseConfig, Divergence, Isa, Rows};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("integer")).collect();
    let (rows, cols) = (args.first().copied().unwrap_or(512), args.get(1).copied().unwrap_or(32000));
    let threads = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let zs: Vec<f32> = (0..rows * cols).map(|i| ((i * 2654435761) % 1000) as f32 * 0.01).collect();
    let zt: Vec<f32> = (0..rows * cols).map(|i| ((i * 40503) % 997) as f32 * 0.01).collect();
    let mut loss = vec![0.0f32; rows];
    let mut grad = vec![0.0f32; rows * cols];
    let divs = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::Tvd,
        Divergence::Akl { head_mass: 0.5 },
        Divergence::Taid { t: 0.5 },
    ];
    let only_div = std::env::var("DIV").ok();
    for div in divs.into_iter().filter(|d| only_div.as_deref().is_none_or(|o| format!("{d:?}").starts_with(o))) {
        let only = std::env::var("KDFAST_ISA").ok();
        for isa in [Isa::Scalar, Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported() && only.as_deref().is_none_or(|o| o == i.name()))
        {
            let cfg = DenseConfig { divergence: div, temperature: 1.0, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
            let mut best = f64::INFINITY;
            let reps: usize = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
            for _ in 0..reps {
            let t0 = Instant::now();
            dense_loss(
                Rows::new(&zs, rows, cols, cols, "s").unwrap(),
                Rows::new(&zt, rows, cols, cols, "t").unwrap(),
                None,
                &cfg,
                &mut loss,
                Some(&mut grad),
                isa,
                threads,
            )
            .unwrap();
            best = best.min(t0.elapsed().as_secs_f64());
            }
            let dt = best;
            println!("{div:?} {:>8} {:>8.1} ms  {:>6.2} ns/element", isa.name(), dt * 1e3, dt * 1e9 / (rows * cols) as f64 * threads as f64);
        }
    }
}
