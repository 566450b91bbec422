//! The sparse-target loss against an f64 reference, across instruction sets; top-k with k = V
//! and a tail bucket equals dense forward KL; conventions (masking, duplicates, errors).

mod common;
use common::{isas, logits};
use half::{bf16, f16};
use kdfast_core::compress::{compress_sample, compress_topk};
use kdfast_core::sparse::{sparse_loss, SparseConfig, SparseMode, Targets};
use kdfast_core::{dense_loss, DenseConfig, Divergence, Elem, Isa, Rows};

struct Tg {
    ids: Vec<i64>,
    lp: Vec<f32>,
    w: Option<Vec<f32>>,
    tail: Option<Vec<f32>>,
    k: usize,
}

impl Tg {
    fn view(&self, rows: usize) -> Targets<'_> {
        Targets { ids: &self.ids, logprobs: &self.lp, weights: self.w.as_deref(), tail_logprob: self.tail.as_deref(), rows, k: self.k }
    }
}

fn topk(z: &[f32], rows: usize, cols: usize, k: usize, t: f32) -> Tg {
    let (mut ids, mut lp, mut tail) = (vec![0; rows * k], vec![0.0; rows * k], vec![0.0; rows]);
    compress_topk(Rows::new(z, rows, cols, cols, "t").unwrap(), k, t, &mut ids, &mut lp, &mut tail, Isa::detect(), 2).unwrap();
    Tg { ids, lp, w: None, tail: Some(tail), k }
}

fn sample(z: &[f32], rows: usize, cols: usize, n: usize, t: f32, seed: u64) -> Tg {
    let (mut ids, mut lp, mut w) = (vec![0; rows * n], vec![0.0; rows * n], vec![0.0; rows * n]);
    compress_sample(Rows::new(z, rows, cols, cols, "t").unwrap(), n, t, seed, 0, &mut ids, &mut lp, &mut w, Isa::detect(), 2).unwrap();
    Tg { ids, lp, w: Some(w), tail: None, k: n }
}

/// f64 reference of one row: (ℓ, ∂ℓ/∂z_s, magnitude of the terms of each gradient entry).
fn reference(mode: SparseMode, zs: &[f32], ids: &[i64], lp: &[f32], w: Option<&[f32]>, tail: Option<f32>, t: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let a: Vec<f64> = zs.iter().map(|&x| x as f64 / t).collect();
    let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + a.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    let lq: Vec<f64> = a.iter().map(|x| x - lse).collect();
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    let v = zs.len();
    let slots: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] >= 0 && w.is_none_or(|w| w[i] > 0.0)).collect();
    let mut listed = vec![false; v];
    for &i in &slots {
        listed[ids[i] as usize] = true;
    }
    let mut grad = vec![0.0f64; v];
    let loss = match mode {
        SparseMode::Bucket => {
            let p: Vec<f64> = slots.iter().map(|&i| (lp[i] as f64).exp()).collect();
            let big_p: f64 = p.iter().sum();
            let (pt, lpt) = match tail {
                _ if listed.iter().all(|&l| l) => (0.0, f64::NEG_INFINITY),
                Some(tl) => ((tl as f64).exp(), tl as f64),
                None => ((1.0 - big_p).max(0.0), (1.0 - big_p).max(0.0).ln()),
            };
            let qt: f64 = (0..v).filter(|&j| !listed[j]).map(|j| q[j]).sum();
            let mut l = 0.0;
            for (s, &i) in slots.iter().enumerate() {
                if p[s] > 0.0 {
                    l += p[s] * (lp[i] as f64 - lq[ids[i] as usize]);
                }
            }
            if pt > 0.0 {
                l += pt * (lpt - qt.ln());
            }
            for j in 0..v {
                grad[j] = q[j] * (big_p + pt) - if listed[j] { 0.0 } else if qt > 0.0 { pt * q[j] / qt } else { 0.0 };
            }
            for (s, &i) in slots.iter().enumerate() {
                grad[ids[i] as usize] -= p[s];
            }
            l
        }
        SparseMode::Renorm => {
            let p: Vec<f64> = slots.iter().map(|&i| (lp[i] as f64).exp()).collect();
            let big_p: f64 = p.iter().sum();
            let mut l = 0.0;
            for (s, &i) in slots.iter().enumerate() {
                let pt = p[s] / big_p;
                if pt > 0.0 {
                    l += pt * (pt.ln() - lq[ids[i] as usize]);
                }
                grad[ids[i] as usize] -= pt;
            }
            for j in 0..v {
                grad[j] += q[j];
            }
            l
        }
        SparseMode::Sampled => {
            let w = w.unwrap();
            let big_w: f64 = slots.iter().map(|&i| w[i] as f64).sum();
            let mut l = 0.0;
            for &i in &slots {
                l += w[i] as f64 * (lp[i] as f64 - lq[ids[i] as usize]);
                grad[ids[i] as usize] -= w[i] as f64;
            }
            for j in 0..v {
                grad[j] += q[j] * big_w;
            }
            l
        }
    };
    // |q_j c| + |target_j|, bounding the terms that cancel in the gradient.
    let mut mag: Vec<f64> = q.iter().map(|x| x * 2.0).collect();
    for &i in &slots {
        mag[ids[i] as usize] += w.map_or((lp[i] as f64).exp(), |w| w[i] as f64);
    }
    (loss, grad.iter().map(|g| g / t).collect(), mag.iter().map(|m| m / t).collect())
}

#[allow(clippy::too_many_arguments)]
fn run<E: Elem>(mode: SparseMode, zs: &[E], tg: &Tg, rows: usize, cols: usize, t: f32, isa: Isa, threads: usize) -> kdfast_core::Result<(Vec<f32>, Vec<E>)> {
    let cfg = SparseConfig { mode, divergence: Divergence::ForwardKl, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
    let mut loss = vec![0.0; rows];
    let mut grad = vec![E::zero(); rows * cols];
    sparse_loss(Rows::new(zs, rows, cols, cols, "s").unwrap(), &tg.view(rows), None, &cfg, &mut loss, Some(&mut grad), isa, threads)?;
    Ok((loss, grad))
}

/// Loss within f32 rounding of |z/T|; each gradient entry within f32 accumulation error of the
/// terms that cancel in it (q_j vs the teacher's mass, ~1e-7 relative, from the f32 sums).
#[allow(clippy::too_many_arguments)]
fn check_row(mode: SparseMode, loss: f32, grad: &[f32], l64: f64, g64: &[f64], mag: &[f64], zs: &[f32], t: f64, what: &str) {
    let scale = 1.0 + zs.iter().filter(|x| x.is_finite()).fold(0.0f64, |m, &x| m.max((x as f64 / t).abs()));
    assert!((loss as f64 - l64).abs() <= 2e-5 * l64.abs() + 2e-6 * scale, "{mode:?} {what}: loss {loss} vs {l64}");
    let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (j, (&g, &r)) in grad.iter().zip(g64).enumerate() {
        assert!((g as f64 - r).abs() <= 2e-5 * r.abs() + 1e-6 * gmax + 5e-7 * mag[j] + 1e-12, "{mode:?} {what}: grad[{j}] {g} vs {r}");
    }
}

#[test]
fn every_isa_matches_f64_reference() {
    for &cols in &[1usize, 2, 127, 1500, 4099] {
        for &(t, spread, neg) in &[(1.0f32, 8.0f32, 0u64), (0.05, 4.0, 7), (10.0, 20.0, 31), (2.0, 30.0, 0)] {
            let rows = 4;
            let zt = logits(rows, cols, cols as u64 + 1, spread, neg);
            let zs = logits(rows, cols, cols as u64 + 2, spread, 0);
            for &k in &[1usize, 3, 50] {
                let tk = topk(&zt, rows, cols, k, t);
                let mut tk_no_tail = topk(&zt, rows, cols, k, t);
                tk_no_tail.tail = None;
                let sm = sample(&zt, rows, cols, k, t, 9);
                let cases: [(SparseMode, &Tg); 4] = [(SparseMode::Bucket, &tk), (SparseMode::Bucket, &tk_no_tail), (SparseMode::Renorm, &tk), (SparseMode::Sampled, &sm)];
                for (mode, tg) in cases {
                    for isa in isas() {
                        let (loss, grad) = run(mode, &zs, tg, rows, cols, t, isa, 2).unwrap();
                        for r in 0..rows {
                            let s = r * k..(r + 1) * k;
                            let (l64, g64, mag) = reference(mode, &zs[r * cols..(r + 1) * cols], &tg.ids[s.clone()], &tg.lp[s.clone()], tg.w.as_ref().map(|w| &w[s.clone()]), tg.tail.as_ref().map(|x| x[r]), t as f64);
                            let what = format!("{isa:?} V={cols} k={k} T={t} row {r}");
                            check_row(mode, loss[r], &grad[r * cols..(r + 1) * cols], l64, &g64, &mag, &zs[r * cols..(r + 1) * cols], t as f64, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn topk_with_k_equal_v_and_bucket_is_forward_kl() {
    for &(cols, neg) in &[(1usize, 0u64), (7, 3), (3000, 0), (4099, 11)] {
        for &t in &[0.5f32, 1.0, 3.0] {
            let rows = 3;
            let zt = logits(rows, cols, 5, 10.0, neg);
            let zs = logits(rows, cols, 6, 10.0, 0);
            let tg = topk(&zt, rows, cols, cols, t);
            assert!(tg.tail.as_ref().unwrap().iter().all(|&x| x == f32::NEG_INFINITY));
            let (sl, sg) = run(SparseMode::Bucket, &zs, &tg, rows, cols, t, Isa::detect(), 2).unwrap();
            let cfg = DenseConfig { divergence: Divergence::ForwardKl, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
            let (mut dl, mut dg) = (vec![0.0; rows], vec![0.0f32; rows * cols]);
            dense_loss(Rows::new(&zs, rows, cols, cols, "s").unwrap(), Rows::new(&zt, rows, cols, cols, "t").unwrap(), None, &cfg, &mut dl, Some(&mut dg), Isa::detect(), 2).unwrap();
            for r in 0..rows {
                assert!((sl[r] - dl[r]).abs() <= 1e-5 * dl[r].abs() + 1e-5, "V={cols} T={t}: {} vs {}", sl[r], dl[r]);
            }
            // Both are f32 computations of q − p (which cancel): allow f32 rounding of a = z/T.
            let gmax = dg.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = 1.0 + 10.0 / t;
            for (a, b) in sg.iter().zip(&dg) {
                assert!((a - b).abs() <= 1e-5 * b.abs() + 1e-6 * gmax * scale, "V={cols} T={t}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn bucket_gradient_sums_to_zero_and_is_finite_when_the_student_tail_underflows() {
    // Student concentrated on the listed ids (q_tail ≈ e^-200), teacher tail 0.3.
    let cols = 2000;
    let mut zs = vec![-200.0f32; cols];
    zs[5] = 0.0;
    zs[9] = 0.0;
    let tg = Tg { ids: vec![5, 9], lp: vec![(0.4f32).ln(), (0.3f32).ln()], w: None, tail: Some(vec![(0.3f32).ln()]), k: 2 };
    for isa in isas() {
        let (loss, grad) = run(SparseMode::Bucket, &zs, &tg, 1, cols, 1.0, isa, 1).unwrap();
        assert!(loss[0].is_finite() && loss[0] > 50.0, "{isa:?} {}", loss[0]);
        assert!(grad.iter().all(|g| g.is_finite()), "{isa:?}");
        let s: f64 = grad.iter().map(|&g| g as f64).sum();
        assert!(s.abs() < 1e-5, "{isa:?} gradient sums to {s}");
        // Unlisted entries share −p_tail equally.
        assert!((grad[0] as f64 + 0.3 / (cols - 2) as f64).abs() < 1e-8);
    }
}

#[test]
fn half_precision_students_agree_across_isas() {
    let (rows, cols, k) = (3, 3001, 20);
    let zt = logits(rows, cols, 1, 10.0, 17);
    let zs = logits(rows, cols, 2, 10.0, 0);
    let bs: Vec<bf16> = zs.iter().map(|&x| bf16::from_f32(x)).collect();
    let hs: Vec<f16> = zs.iter().map(|&x| f16::from_f32(x)).collect();
    let tk = topk(&zt, rows, cols, k, 1.0);
    for mode in [SparseMode::Bucket, SparseMode::Renorm] {
        let (l0, g0) = run(mode, &bs, &tk, rows, cols, 1.0, Isa::Scalar, 1).unwrap();
        let (h0, k0) = run(mode, &hs, &tk, rows, cols, 1.0, Isa::Scalar, 1).unwrap();
        for isa in isas() {
            let (l1, g1) = run(mode, &bs, &tk, rows, cols, 1.0, isa, 2).unwrap();
            let (h1, k1) = run(mode, &hs, &tk, rows, cols, 1.0, isa, 2).unwrap();
            for r in 0..rows {
                assert!((l0[r] - l1[r]).abs() <= 1e-5 * l0[r].abs() + 1e-6);
                assert!((h0[r] - h1[r]).abs() <= 1e-5 * h0[r].abs() + 1e-6);
            }
            let close = |a: f32, b: f32| (a - b).abs() <= 8e-3 * a.abs().max(b.abs()) + 1e-7;
            assert!(g0.iter().zip(&g1).all(|(a, b)| close(a.to_f32(), b.to_f32())), "{mode:?} {isa:?} bf16");
            assert!(k0.iter().zip(&k1).all(|(a, b)| close(a.to_f32(), b.to_f32())), "{mode:?} {isa:?} f16");
            // And the f32 reference of the rounded inputs.
            let zb: Vec<f32> = bs.iter().map(|x| x.to_f32()).collect();
            for r in 0..rows {
                let s = r * k..(r + 1) * k;
                let (l64, _, _) = reference(mode, &zb[r * cols..(r + 1) * cols], &tk.ids[s.clone()], &tk.lp[s], None, Some(tk.tail.as_ref().unwrap()[r]), 1.0);
                assert!((l1[r] as f64 - l64).abs() <= 2e-5 * l64.abs() + 1e-4);
            }
        }
    }
}

#[test]
fn masking_scaling_and_padding_columns() {
    let (rows, cols, grad_cols, k) = (3, 50, 53, 4);
    let zt = logits(rows, cols, 3, 4.0, 0);
    let zs = logits(rows, cols, 4, 4.0, 0);
    let tg = topk(&zt, rows, cols, k, 2.0);
    let labels = [1i64, -100, 7];
    let cfg = SparseConfig { mode: SparseMode::Bucket, divergence: Divergence::ForwardKl, temperature: 2.0, t2_scale: true, grad_scale: 0.5, grad_cols };
    let mut loss = vec![9.0; rows];
    let mut grad = vec![7.0f32; rows * grad_cols];
    sparse_loss(Rows::new(&zs, rows, cols, cols, "s").unwrap(), &tg.view(rows), Some((&labels, -100)), &cfg, &mut loss, Some(&mut grad), Isa::detect(), 2).unwrap();
    assert_eq!(loss[1], 0.0);
    assert!(grad[grad_cols..2 * grad_cols].iter().all(|&g| g == 0.0));
    for r in [0, 2] {
        let s = r * k..(r + 1) * k;
        let (l64, g64, _) = reference(SparseMode::Bucket, &zs[r * cols..(r + 1) * cols], &tg.ids[s.clone()], &tg.lp[s], None, Some(tg.tail.as_ref().unwrap()[r]), 2.0);
        assert!((loss[r] as f64 - 4.0 * l64).abs() < 1e-5 * (1.0 + l64.abs()));
        for j in 0..cols {
            assert!((grad[r * grad_cols + j] as f64 - 2.0 * g64[j]).abs() < 1e-6, "T² · 0.5 · grad");
        }
        assert!(grad[r * grad_cols + cols..(r + 1) * grad_cols].iter().all(|&g| g == 0.0));
    }
}

#[test]
fn sampled_duplicates_are_summed_topk_duplicates_are_errors() {
    let cols = 30;
    let zs = logits(1, cols, 8, 3.0, 0);
    let lp = [(0.2f32).ln(), (0.2f32).ln(), (0.1f32).ln(), f32::NEG_INFINITY];
    let raw = Tg { ids: vec![4, 4, 9, -1], lp: lp.to_vec(), w: Some(vec![0.25, 0.25, 0.5, 0.0]), tail: None, k: 4 };
    let merged = Tg { ids: vec![4, 9, -1, -1], lp: vec![lp[0], lp[2], f32::NEG_INFINITY, f32::NEG_INFINITY], w: Some(vec![0.5, 0.5, 0.0, 0.0]), tail: None, k: 4 };
    let (l1, g1) = run(SparseMode::Sampled, &zs, &raw, 1, cols, 1.0, Isa::detect(), 1).unwrap();
    let (l2, g2) = run(SparseMode::Sampled, &zs, &merged, 1, cols, 1.0, Isa::detect(), 1).unwrap();
    assert!((l1[0] - l2[0]).abs() < 1e-6);
    assert!(g1.iter().zip(&g2).all(|(a, b)| (a - b).abs() < 1e-7));
    let dup = Tg { ids: vec![4, 4, 9, -1], lp: lp.to_vec(), w: None, tail: None, k: 4 };
    for mode in [SparseMode::Bucket, SparseMode::Renorm] {
        let e = run(mode, &zs, &dup, 1, cols, 1.0, Isa::detect(), 1).unwrap_err().to_string();
        assert!(e.contains("targets.indices") && e.contains("twice"), "{e}");
    }
}

#[test]
fn bad_targets_are_errors() {
    let cols = 30;
    let zs = logits(1, cols, 8, 3.0, 0);
    let err = |tg: Tg, mode| run(mode, &zs, &tg, 1, cols, 1.0, Isa::detect(), 1).unwrap_err().to_string();
    let tk = |ids: Vec<i64>, lp: Vec<f32>| Tg { ids, lp, w: None, tail: None, k: 2 };
    assert!(err(tk(vec![3, 30], vec![-1.0, -2.0]), SparseMode::Bucket).contains("targets.indices"));
    assert!(err(tk(vec![3, -2], vec![-1.0, -2.0]), SparseMode::Bucket).contains("targets.indices"));
    assert!(err(tk(vec![3, 4], vec![-1.0, f32::NAN]), SparseMode::Renorm).contains("targets.logprobs"));
    let mut t = tk(vec![3, 4], vec![-1.0, -2.0]);
    t.tail = Some(vec![f32::NAN]);
    assert!(err(t, SparseMode::Bucket).contains("targets.tail_logprob"));
    let s = Tg { ids: vec![3, 4], lp: vec![-1.0, -2.0], w: Some(vec![0.5, -0.5]), tail: None, k: 2 };
    assert!(err(s, SparseMode::Sampled).contains("targets.weights"));
    let s = Tg { ids: vec![3, 4], lp: vec![-1.0, f32::NEG_INFINITY], w: Some(vec![0.5, 0.5]), tail: None, k: 2 };
    assert!(err(s, SparseMode::Sampled).contains("targets.logprobs"));
    assert!(err(tk(vec![3, 4], vec![-1.0, -2.0]), SparseMode::Sampled).contains("targets.weights"));
    let mut zbad = zs.clone();
    zbad[3] = f32::NAN; // a listed id: masked out of the bucket's tail statistics
    let tg = tk(vec![3, 4], vec![-1.0, -2.0]);
    let e = run(SparseMode::Bucket, &zbad, &tg, 1, cols, 1.0, Isa::detect(), 1).unwrap_err().to_string();
    assert!(e.contains("student_logits") && e.contains("NaN"), "{e}");
    let all_inf = vec![f32::NEG_INFINITY; cols];
    let e = run(SparseMode::Renorm, &all_inf, &tg, 1, cols, 1.0, Isa::detect(), 1).unwrap_err().to_string();
    assert!(e.contains("entirely -inf"), "{e}");
}

#[test]
fn empty_and_zero_mass_rows() {
    let cols = 10;
    let zs = logits(1, cols, 8, 3.0, 0);
    // No listed ids, renorm: contributes 0; bucket without tail: p_tail = 1 = q_tail: 0.
    let none = Tg { ids: vec![-1, -1], lp: vec![f32::NEG_INFINITY; 2], w: None, tail: None, k: 2 };
    for mode in [SparseMode::Renorm, SparseMode::Bucket] {
        let (l, g) = run(mode, &zs, &none, 1, cols, 1.0, Isa::detect(), 1).unwrap();
        assert!(l[0].abs() < 1e-6 && g.iter().all(|x| x.abs() < 1e-6), "{mode:?} {l:?}");
    }
    let none = Tg { ids: vec![-1, -1], lp: vec![f32::NEG_INFINITY; 2], w: Some(vec![0.0; 2]), tail: None, k: 2 };
    let (l, g) = run(SparseMode::Sampled, &zs, &none, 1, cols, 1.0, Isa::detect(), 1).unwrap();
    assert!(l[0] == 0.0 && g.iter().all(|&x| x == 0.0));
}

#[test]
fn thread_count_does_not_change_results() {
    let (rows, cols, k) = (37, 700, 9);
    let zt = logits(rows, cols, 7, 10.0, 13);
    let zs = logits(rows, cols, 8, 10.0, 0);
    let tg = topk(&zt, rows, cols, k, 1.3);
    for mode in [SparseMode::Bucket, SparseMode::Renorm] {
        assert_eq!(run(mode, &zs, &tg, rows, cols, 1.3, Isa::detect(), 1).unwrap(), run(mode, &zs, &tg, rows, cols, 1.3, Isa::detect(), 2).unwrap());
    }
}

