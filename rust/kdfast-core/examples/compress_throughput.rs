//! Nanoseconds per logit of the compressors (top-64, 50 draws) on LLM-like rows, with a plain
//! read of the same rows for scale:
//! `cargo run --release -p kdfast-core --example compress_throughput -- [rows] [vocab] [f32|bf16]`.
//! `THREADS` (default 1), `REPS` (default 5, the median is printed), `ONLY=topk|sample|read`.

use half::bf16;
use kdfast_core::compress::{compress_sample, compress_topk};
use kdfast_core::{Elem, Isa, Rows};
use std::time::Instant;

/// Zipf-like logits: `-ln(1 + rank)` of a random rank shared by the rows, noise, ~16 boosted
/// ids per row (roughly `kdfast.benchmarks.offline.logits.zipf_logits`).
fn logits(rows: usize, cols: usize) -> Vec<f32> {
    let mut z = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for i in 0..cols {
            let h = kdfast_core::compress::mix64((r * cols + i) as u64);
            let rank = kdfast_core::compress::mix64(i as u64 ^ 0x5eed) % cols as u64;
            let noise = ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0;
            let boost = if h % cols as u64 * 2 < 32 { 8.0 } else { 0.0 };
            z.push(-(1.0 + rank as f32).ln() + noise + boost);
        }
    }
    z
}

fn median(f: &mut dyn FnMut(), reps: usize) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[reps / 2]
}

fn run<E: Elem>(z: &[E], rows: usize, cols: usize) {
    let threads = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    let reps = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let only = std::env::var("ONLY").ok();
    let x = Rows::new(z, rows, cols, cols, "z").unwrap();
    let (k, n) = (64, 50);
    let per = |t: f64| t * 1e9 / (rows * cols) as f64 * threads as f64;
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if want("read") {
        let mut buf = vec![0.0f32; cols];
        let t = median(&mut || (0..rows).for_each(|r| E::load(x.row(r), &mut buf)), reps);
        println!("read   {:>8.2} ms {:>6.3} ns/logit (one thread)", t * 1e3, per(t) / threads as f64);
    }
    if want("topk") {
        let (mut ids, mut lp, mut tail) = (vec![0i64; rows * k], vec![0f32; rows * k], vec![0f32; rows]);
        let t = median(&mut || compress_topk(x, k, 1.0, &mut ids, &mut lp, &mut tail, Isa::detect(), threads).unwrap(), reps);
        println!("topk   {:>8.2} ms {:>6.3} ns/logit·thread", t * 1e3, per(t));
    }
    if want("sample") {
        let (mut ids, mut lp, mut w) = (vec![0i64; rows * n], vec![0f32; rows * n], vec![0f32; rows * n]);
        let t = median(&mut || compress_sample(x, n, 1.0, 0, 0, &mut ids, &mut lp, &mut w, Isa::detect(), threads).unwrap(), reps);
        println!("sample {:>8.2} ms {:>6.3} ns/logit·thread", t * 1e3, per(t));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows = args.first().map_or(256, |a| a.parse().expect("rows"));
    let cols = args.get(1).map_or(128_256, |a| a.parse().expect("vocab"));
    let z = logits(rows, cols);
    match args.get(2).map_or("f32", String::as_str) {
        "bf16" => run(&z.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), rows, cols),
        _ => run(&z, rows, cols),
    }
}
