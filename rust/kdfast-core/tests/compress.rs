//! Top-k and sampled compression: f64 reference, streaming == one pass, ISA and thread-count
//! invariance, statistics of the sampler.

mod common;
use common::{isas, logits};
use half::{bf16, f16};
use kdfast_core::compress::{compress_sample, compress_topk, SampleStream, TopKStream};
use kdfast_core::{Elem, Isa, Rows};

/// f64 reference of one row's top-k: ids ordered (x desc, id asc) over finite x, logprobs,
/// tail log-mass. `x` are the kernel's f32 scaled logits.
fn topk_ref(z: &[f32], k: usize, t: f32) -> (Vec<i64>, Vec<f64>, f64) {
    let inv_t = 1.0f32 / t;
    let x: Vec<f32> = z.iter().map(|&v| v * inv_t).collect();
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    let mut order: Vec<usize> = (0..x.len()).filter(|&i| x[i] > f32::NEG_INFINITY).collect();
    order.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap().then(a.cmp(&b)));
    let kept = &order[..k.min(order.len())];
    let rest = &order[k.min(order.len())..];
    let tail = if rest.is_empty() {
        f64::NEG_INFINITY
    } else {
        let rm = rest.iter().map(|&i| x[i] as f64).fold(f64::NEG_INFINITY, f64::max);
        rm + rest.iter().map(|&i| (x[i] as f64 - rm).exp()).sum::<f64>().ln() - lse
    };
    (kept.iter().map(|&i| i as i64).collect(), kept.iter().map(|&i| x[i] as f64 - lse).collect(), tail)
}

fn run_topk<E: Elem>(z: &[E], rows: usize, cols: usize, k: usize, t: f32, isa: Isa, threads: usize) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
    let (mut ids, mut lp, mut tail) = (vec![0; rows * k], vec![0.0; rows * k], vec![0.0; rows]);
    compress_topk(Rows::new(z, rows, cols, cols, "teacher_logits").unwrap(), k, t, &mut ids, &mut lp, &mut tail, isa, threads).unwrap();
    (ids, lp, tail)
}

fn run_sample<E: Elem>(z: &[E], rows: usize, cols: usize, n: usize, t: f32, seed: u64, threads: usize) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
    let (mut ids, mut lp, mut w) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
    compress_sample(Rows::new(z, rows, cols, cols, "teacher_logits").unwrap(), n, t, seed, 0, &mut ids, &mut lp, &mut w, Isa::detect(), threads).unwrap();
    (ids, lp, w)
}

#[test]
fn topk_matches_f64_reference() {
    for &cols in &[1usize, 2, 127, 4095, 4096, 4097, 10_000] {
        for &k in &[1usize, 5, 64, cols, cols + 3] {
            for &(t, spread, neg) in &[(1.0f32, 8.0f32, 0u64), (0.05, 20.0, 7), (10.0, 3.0, 53), (1.0, 1e4, 0)] {
                let rows = 3;
                let z = logits(rows, cols, (cols * 31 + k) as u64, spread, neg);
                for isa in isas() {
                    let (ids, lp, tail) = run_topk(&z, rows, cols, k, t, isa, 2);
                    for r in 0..rows {
                        let (rid, rlp, rtail) = topk_ref(&z[r * cols..(r + 1) * cols], k, t);
                        let got = &ids[r * k..(r + 1) * k];
                        assert_eq!(&got[..rid.len()], &rid[..], "V={cols} k={k} T={t} {isa:?} row {r}");
                        assert!(got[rid.len()..].iter().all(|&i| i == -1));
                        assert!(lp[r * k + rid.len()..(r + 1) * k].iter().all(|&x| x == f32::NEG_INFINITY));
                        for (j, &want) in rlp.iter().enumerate() {
                            let g = lp[r * k + j] as f64;
                            assert!((g - want).abs() <= 1e-6 * (1.0 + want.abs()), "V={cols} k={k} T={t} {isa:?} lp {g} vs {want}");
                        }
                        let g = tail[r] as f64;
                        if rtail == f64::NEG_INFINITY {
                            assert_eq!(g, f64::NEG_INFINITY);
                        } else {
                            assert!((g - rtail).abs() <= 2e-6 * (1.0 + rtail.abs()), "V={cols} k={k} T={t} {isa:?} tail {g} vs {rtail}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn topk_tail_is_precise_when_tiny() {
    // One dominant logit: the tail mass is ~V·e^-60, far below f32 resolution of 1 − p_top.
    let cols = 5000;
    let mut z = vec![0.0f32; cols];
    z[1234] = 60.0;
    let (ids, lp, tail) = run_topk(&z, 1, cols, 1, 1.0, Isa::detect(), 1);
    assert_eq!(ids, vec![1234]);
    let want_tail = ((cols - 1) as f64).ln() - 60.0; // log((V−1) e^0 / e^60), lse ≈ 60
    assert!((tail[0] as f64 - want_tail).abs() < 1e-5, "{} vs {want_tail}", tail[0]);
    assert!(lp[0] <= 0.0 && lp[0] > -1e-20);
}

#[test]
fn ties_prefer_lower_ids() {
    let cols = 9000;
    let z = vec![1.5f32; cols];
    let (ids, lp, tail) = run_topk(&z, 1, cols, 7, 1.0, Isa::detect(), 1);
    assert_eq!(ids, (0..7).collect::<Vec<i64>>());
    let want = -(cols as f64).ln();
    assert!(lp.iter().all(|&x| (x as f64 - want).abs() < 1e-6));
    assert!((tail[0] as f64 - ((cols - 7) as f64 / cols as f64).ln()).abs() < 1e-6);
    // Ties across blocks: the larger later value wins, equal later values lose.
    let mut z = vec![0.0f32; cols];
    z[8000] = 1.0;
    z[100] = 1.0;
    z[5000] = 2.0;
    let (ids, _, _) = run_topk(&z, 1, cols, 3, 1.0, Isa::detect(), 1);
    assert_eq!(ids, vec![5000, 100, 8000]);
}

#[test]
fn streaming_is_bit_identical_to_one_pass() {
    let cols = 23_456;
    let z = logits(1, cols, 9, 12.0, 41);
    let cuts_list: Vec<Vec<usize>> = vec![vec![], vec![1], vec![4095, 4096, 4097], vec![17, 5000, 5001, 16_000], (1..40).map(|i| i * 577).collect()];
    for isa in isas() {
        for &k in &[1usize, 10, 300] {
            let (ids1, lp1, tail1) = run_topk(&z, 1, cols, k, 0.7, isa, 1);
            for cuts in &cuts_list {
                let mut s = TopKStream::new(k, 0.7, isa, 0).unwrap();
                let mut bounds = vec![0];
                bounds.extend(cuts.iter().copied());
                bounds.push(cols);
                for w in bounds.windows(2) {
                    s.push(w[0], &z[w[0]..w[1]]).unwrap();
                }
                assert_eq!(s.len(), cols);
                let (mut ids, mut lp) = (vec![0; k], vec![0.0; k]);
                let tail = s.finish(&mut ids, &mut lp).unwrap();
                assert_eq!(ids, ids1);
                assert_eq!(lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lp1.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                assert_eq!(tail.to_bits(), tail1[0].to_bits());
            }
        }
    }
    for &n in &[1usize, 16, 200] {
        let (ids1, lp1, w1) = run_sample(&z, 1, cols, n, 0.7, 42, 1);
        for cuts in &cuts_list {
            let mut s = SampleStream::new(n, 0.7, 42, 0, Isa::Baseline).unwrap();
            let mut bounds = vec![0];
            bounds.extend(cuts.iter().copied());
            bounds.push(cols);
            for w in bounds.windows(2) {
                s.push(w[0], &z[w[0]..w[1]]).unwrap();
            }
            let (mut ids, mut lp, mut w) = (vec![0; n], vec![0.0; n], vec![0.0; n]);
            s.finish(&mut ids, &mut lp, &mut w).unwrap();
            assert_eq!(ids, ids1);
            assert_eq!(lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lp1.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(w, w1);
        }
    }
}

#[test]
fn stream_rejects_gaps_and_bad_rows() {
    let mut s = TopKStream::new(3, 1.0, Isa::detect(), 0).unwrap();
    s.push(0, &[1.0f32, 2.0]).unwrap();
    assert!(s.push(5, &[1.0f32]).unwrap_err().to_string().contains("offset"));
    assert!(TopKStream::new(0, 1.0, Isa::detect(), 0).is_err());
    assert!(TopKStream::new(3, 0.0, Isa::detect(), 0).is_err());
    assert!(SampleStream::new(0, 1.0, 0, 0, Isa::detect()).is_err());
    let bad = |row: Vec<f32>| {
        let cols = row.len();
        let (mut ids, mut lp, mut tail) = (vec![0; 2], vec![0.0; 2], vec![0.0; 1]);
        let e1 = compress_topk(Rows::new(&row, 1, cols, cols, "t").unwrap(), 2, 1.0, &mut ids, &mut lp, &mut tail, Isa::detect(), 1).unwrap_err().to_string();
        let mut w = vec![0.0; 2];
        let e2 = compress_sample(Rows::new(&row, 1, cols, cols, "t").unwrap(), 2, 1.0, 0, 0, &mut ids, &mut lp, &mut w, Isa::detect(), 1).unwrap_err().to_string();
        (e1, e2)
    };
    let (a, b) = bad(vec![f32::NEG_INFINITY; 5000]);
    assert!(a.contains("entirely -inf") && b.contains("entirely -inf"), "{a} / {b}");
    let mut r = vec![0.0; 5000];
    r[4500] = f32::NAN;
    let (a, b) = bad(r);
    assert!(a.contains("NaN") && b.contains("NaN"), "{a} / {b}");
    let mut r = vec![0.0; 100];
    r[3] = f32::INFINITY;
    let (a, b) = bad(r);
    assert!(a.contains("+inf") && b.contains("+inf"), "{a} / {b}");
}

#[test]
fn half_precision_inputs() {
    let (rows, cols) = (3, 5000);
    let z = logits(rows, cols, 3, 10.0, 37);
    let b: Vec<bf16> = z.iter().map(|&x| bf16::from_f32(x)).collect();
    let h: Vec<f16> = z.iter().map(|&x| f16::from_f32(x)).collect();
    let zb: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    let zh: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    assert_eq!(run_topk(&b, rows, cols, 20, 1.3, Isa::detect(), 2), run_topk(&zb, rows, cols, 20, 1.3, Isa::detect(), 2));
    assert_eq!(run_topk(&h, rows, cols, 20, 1.3, Isa::detect(), 2), run_topk(&zh, rows, cols, 20, 1.3, Isa::detect(), 2));
    assert_eq!(run_sample(&b, rows, cols, 20, 1.3, 5, 2), run_sample(&zb, rows, cols, 20, 1.3, 5, 1));
    assert_eq!(run_sample(&h, rows, cols, 20, 1.3, 5, 2), run_sample(&zh, rows, cols, 20, 1.3, 5, 1));
}

#[test]
fn results_do_not_depend_on_threads() {
    let (rows, cols) = (41, 9000);
    let z = logits(rows, cols, 5, 6.0, 19);
    assert_eq!(run_topk(&z, rows, cols, 17, 2.0, Isa::detect(), 1), run_topk(&z, rows, cols, 17, 2.0, Isa::detect(), 2));
    assert_eq!(run_topk(&z, rows, cols, 17, 2.0, Isa::detect(), 1), run_topk(&z, rows, cols, 17, 2.0, Isa::detect(), 5));
    let one = run_sample(&z, rows, cols, 33, 2.0, 7, 1);
    assert_eq!(one, run_sample(&z, rows, cols, 33, 2.0, 7, 2));
    assert_eq!(one, run_sample(&z, rows, cols, 33, 2.0, 7, 6));
    assert_ne!(one.0, run_sample(&z, rows, cols, 33, 2.0, 8, 2).0, "another seed gives other draws");
    for isa in isas() {
        let (mut ids, mut lp, mut w) = (vec![0; rows * 33], vec![0.0; rows * 33], vec![0.0; rows * 33]);
        compress_sample(Rows::new(&z, rows, cols, cols, "t").unwrap(), 33, 2.0, 7, 0, &mut ids, &mut lp, &mut w, isa, 2).unwrap();
        assert_eq!(one, (ids, lp, w), "{isa:?}");
    }
}

#[test]
fn sample_outputs_are_well_formed() {
    let (rows, cols, n) = (20, 9001, 64);
    let z = logits(rows, cols, 11, 4.0, 23);
    let (ids, lp, w) = run_sample(&z, rows, cols, n, 1.0, 3, 2);
    for r in 0..rows {
        let x: Vec<f64> = z[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).collect();
        let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let s = r * n..(r + 1) * n;
        let used = ids[s.clone()].iter().take_while(|&&i| i >= 0).count();
        assert!(used >= 1 && ids[s.clone()][used..].iter().all(|&i| i == -1));
        assert!(w[s.clone()][used..].iter().all(|&v| v == 0.0) && lp[s.clone()][used..].iter().all(|&v| v == f32::NEG_INFINITY));
        let total: f32 = w[s.clone()].iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        let mut seen = std::collections::HashSet::new();
        for j in 0..used {
            let id = ids[r * n + j] as usize;
            assert!(seen.insert(id), "duplicate id");
            assert!(x[id] > f64::NEG_INFINITY, "sampled a zero-probability id");
            assert!((lp[r * n + j] as f64 - (x[id] - lse)).abs() < 1e-5);
            let c = w[r * n + j] * n as f32;
            assert_eq!(c, c.round());
            if j > 0 {
                assert!(lp[r * n + j - 1] >= lp[r * n + j]);
            }
        }
    }
}

#[test]
fn sampling_is_unbiased() {
    // Averaged over seeds, the weights estimate p (z-test per id with p large enough). The
    // row spans three blocks with different masses, to exercise the two-level scheme.
    let cols = 10_000;
    let mut z = vec![f32::NEG_INFINITY; cols];
    let hot = [(3usize, 2.0f32), (100, 1.0), (4095, 0.5), (4096, 1.5), (5000, 0.0), (9999, 2.2), (8191, -1.0)];
    for &(i, v) in &hot {
        z[i] = v;
    }
    for (i, zi) in z.iter_mut().enumerate().skip(6000).step_by(97) {
        if i != 8191 && i != 9999 {
            *zi = -2.0;
        }
    }
    let mx = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let zsum: f64 = z.iter().map(|&v| (v as f64 - mx).exp()).sum();
    let p: Vec<f64> = z.iter().map(|&v| (v as f64 - mx).exp() / zsum).collect();
    let (n, seeds) = (16usize, 4000u64);
    let mut mean = vec![0.0f64; cols];
    for seed in 0..seeds {
        let (ids, _, w) = run_sample(&z, 1, cols, n, 1.0, seed, 1);
        for j in 0..n {
            if ids[j] >= 0 {
                mean[ids[j] as usize] += w[j] as f64 / seeds as f64;
            }
        }
    }
    for i in 0..cols {
        let sd = (p[i] * (1.0 - p[i]) / (n as f64 * seeds as f64)).sqrt();
        assert!((mean[i] - p[i]).abs() <= 5.0 * sd + 1e-12, "id {i}: mean weight {} vs p {} (sd {sd})", mean[i], p[i]);
    }
}
