//! The other divergences of sparse top-k targets (reverse KL, JSD, TVD over the categories)
//! against an f64 reference built from the category distributions, across instruction sets;
//! with k = V and a bucket they equal the dense losses; the +inf rule and bad combinations.

mod common;
use common::{isas, logits};
use kdfast_core::compress::compress_topk;
use kdfast_core::sparse::{sparse_loss, SparseConfig, SparseMode, Targets};
use kdfast_core::{dense_loss, DenseConfig, Divergence, Isa, Rows};

const NEG: f64 = f64::NEG_INFINITY;

fn topk(z: &[f32], rows: usize, cols: usize, k: usize, t: f32) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
    let (mut ids, mut lp, mut tail) = (vec![0; rows * k], vec![0.0; rows * k], vec![0.0; rows]);
    compress_topk(Rows::new(z, rows, cols, cols, "t").unwrap(), k, t, &mut ids, &mut lp, &mut tail, Isa::detect(), 2).unwrap();
    (ids, lp, tail)
}

#[allow(clippy::too_many_arguments)]
fn run(div: Divergence, mode: SparseMode, zs: &[f32], tg: &(Vec<i64>, Vec<f32>, Vec<f32>), tail: bool, rows: usize, cols: usize, t: f32, isa: Isa) -> kdfast_core::Result<(Vec<f32>, Vec<f32>)> {
    let k = tg.0.len() / rows;
    let targets = Targets { ids: &tg.0, logprobs: &tg.1, weights: None, tail_logprob: tail.then_some(&tg.2[..]), rows, k };
    let cfg = SparseConfig { mode, divergence: div, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
    let mut loss = vec![0.0; rows];
    let mut grad = vec![0.0f32; rows * cols];
    sparse_loss(Rows::new(zs, rows, cols, cols, "s").unwrap(), &targets, None, &cfg, &mut loss, Some(&mut grad), isa, 2)?;
    Ok((loss, grad))
}

/// `(ℓ, g = ∂ℓ/∂Q)` of the divergence between category distributions `P`, `Q` (f64).
fn divergence(div: Divergence, p: &[f64], q: &[f64]) -> (f64, Vec<f64>) {
    let kl = |a: f64, b: f64| if a == 0.0 { 0.0 } else { a * (a / b).ln() };
    let mut loss = 0.0;
    let mut g = vec![0.0; p.len()];
    for c in 0..p.len() {
        let (pc, qc) = (p[c], q[c]);
        match div {
            Divergence::ReverseKl => {
                loss += kl(qc, pc);
                g[c] = (qc / pc).ln() + 1.0;
            }
            Divergence::Jsd { beta } => {
                let b = beta as f64;
                let m = b * pc + (1.0 - b) * qc;
                loss += b * kl(pc, m) + (1.0 - b) * kl(qc, m);
                g[c] = if qc > 0.0 { (1.0 - b) * (qc / m).ln() } else { 0.0 };
            }
            Divergence::Tvd => {
                loss += 0.5 * (pc - qc).abs();
                g[c] = 0.5 * (qc - pc).signum() * ((qc - pc) != 0.0) as i32 as f64;
            }
            Divergence::ForwardKl => {
                loss += kl(pc, qc);
                g[c] = -pc / qc;
            }
            _ => unreachable!(),
        }
    }
    (loss, g)
}

/// f64 reference of one row: (ℓ, ∂ℓ/∂z_s) from the explicit category distributions.
fn reference(div: Divergence, mode: SparseMode, zs: &[f32], ids: &[i64], lp: &[f32], tail: Option<f32>, t: f64) -> (f64, Vec<f64>) {
    let v = zs.len();
    let a: Vec<f64> = zs.iter().map(|&x| x as f64 / t).collect();
    let m = a.iter().cloned().fold(NEG, f64::max);
    let z: f64 = a.iter().map(|x| (x - m).exp()).sum();
    let q: Vec<f64> = a.iter().map(|x| (x - m).exp() / z).collect();
    let listed: Vec<(usize, f64)> = (0..ids.len()).filter(|&i| ids[i] >= 0).map(|i| (ids[i] as usize, (lp[i] as f64).exp())).collect();
    let mut cat_of = vec![usize::MAX; v];
    for (c, &(j, _)) in listed.iter().enumerate() {
        cat_of[j] = c;
    }
    let mut p: Vec<f64> = listed.iter().map(|x| x.1).collect();
    let (mut qc, weight): (Vec<f64>, Vec<f64>) = match mode {
        SparseMode::Bucket => {
            let mut qc: Vec<f64> = listed.iter().map(|&(j, _)| q[j]).collect();
            let big_p: f64 = p.iter().sum();
            let pt = if listed.len() == v { 0.0 } else { tail.map_or((1.0 - big_p).max(0.0), |x| (x as f64).exp()) };
            p.push(pt);
            qc.push((0..v).filter(|&j| cat_of[j] == usize::MAX).map(|j| q[j]).sum());
            (qc, q.clone())
        }
        _ => {
            let big_p: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= big_p);
            let big_q: f64 = listed.iter().map(|&(j, _)| q[j]).sum();
            let qt: Vec<f64> = (0..v).map(|j| if cat_of[j] == usize::MAX { 0.0 } else { q[j] / big_q }).collect();
            (listed.iter().map(|&(j, _)| qt[j]).collect(), qt)
        }
    };
    if mode == SparseMode::Bucket && p[p.len() - 1] == 0.0 && qc[qc.len() - 1] == 0.0 {
        p.pop();
        qc.pop();
    }
    let (loss, g) = divergence(div, &p, &qc);
    let s: f64 = g.iter().zip(&qc).map(|(g, q)| if *q > 0.0 { g * q } else { 0.0 }).sum();
    let grad = (0..v)
        .map(|j| {
            let gj = if cat_of[j] != usize::MAX { g[cat_of[j]] } else if mode == SparseMode::Bucket { *g.last().unwrap() } else { 0.0 };
            if weight[j] > 0.0 {
                weight[j] * (gj - s) / t
            } else {
                0.0
            }
        })
        .collect();
    (loss, grad)
}

const LOSSES: [Divergence; 4] = [Divergence::ReverseKl, Divergence::Jsd { beta: 0.5 }, Divergence::Jsd { beta: 0.1 }, Divergence::Tvd];

#[test]
fn every_isa_matches_the_category_reference() {
    for &cols in &[2usize, 127, 1500, 4099] {
        for &(t, spread) in &[(1.0f32, 8.0f32), (0.05, 4.0), (10.0, 20.0)] {
            let rows = 3;
            let zt = logits(rows, cols, cols as u64 + 1, spread, 0);
            let zs = logits(rows, cols, cols as u64 + 2, spread, 0);
            for &k in &[1usize, 5, 40] {
                let tg = topk(&zt, rows, cols, k, t);
                let kk = tg.0.len() / rows;
                for div in LOSSES.into_iter().chain([Divergence::Jsd { beta: 0.0 }, Divergence::Jsd { beta: 1.0 }]) {
                    for (mode, has_tail) in [(SparseMode::Bucket, true), (SparseMode::Bucket, false), (SparseMode::Renorm, false)] {
                        let ref_div = match (div, mode) {
                            (Divergence::Jsd { beta: 0.0 }, _) => Divergence::ForwardKl,
                            (Divergence::Jsd { beta: 1.0 }, _) => Divergence::ReverseKl,
                            _ => div,
                        };
                        for isa in isas() {
                            let (loss, grad) = run(div, mode, &zs, &tg, has_tail, rows, cols, t, isa).unwrap();
                            for r in 0..rows {
                                let s = r * kk..(r + 1) * kk;
                                let row = &zs[r * cols..(r + 1) * cols];
                                let (l64, g64) = reference(ref_div, mode, row, &tg.0[s.clone()], &tg.1[s], has_tail.then_some(tg.2[r]), t as f64);
                                let scale = 1.0 + spread as f64 / t as f64;
                                let what = format!("{div:?} {mode:?} tail={has_tail} {isa:?} V={cols} k={k} T={t} row {r}");
                                if l64 == f64::INFINITY {
                                    // E.g. 1 − Σp rounded to 0 without a stored tail: reverse KL +inf.
                                    assert!(loss[r] == f32::INFINITY && grad[r * cols..(r + 1) * cols].iter().all(|&x| x == 0.0), "{what}");
                                    continue;
                                }
                                assert!((loss[r] as f64 - l64).abs() <= 2e-5 * l64.abs() + 2e-6 * scale, "{what}: loss {} vs {l64}", loss[r]);
                                let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                                for j in 0..cols {
                                    let (got, want) = (grad[r * cols + j] as f64, g64[j]);
                                    // f32 category terms: eps32 · Q_c · |h| / T, |h| ≲ scale (as tests/conftest.py).
                                    let atol = 2e-6 * gmax * scale + 1e-6 * scale / t as f64;
                                    assert!((got - want).abs() <= 2e-5 * want.abs() + atol, "{what}: grad[{j}] {got} vs {want}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn topk_with_k_equal_v_and_bucket_is_the_dense_loss() {
    for &(cols, neg) in &[(1usize, 0u64), (7, 3), (3000, 0), (4099, 11)] {
        for &t in &[0.5f32, 3.0] {
            let rows = 3;
            let zt = logits(rows, cols, 5, 10.0, neg);
            let zs = logits(rows, cols, 6, 10.0, neg);
            let tg = topk(&zt, rows, cols, cols, t);
            for div in LOSSES {
                let (sl, sg) = run(div, SparseMode::Bucket, &zs, &tg, true, rows, cols, t, Isa::detect()).unwrap();
                let cfg = DenseConfig { divergence: div, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
                let (mut dl, mut dg) = (vec![0.0; rows], vec![0.0f32; rows * cols]);
                dense_loss(Rows::new(&zs, rows, cols, cols, "s").unwrap(), Rows::new(&zt, rows, cols, cols, "t").unwrap(), None, &cfg, &mut dl, Some(&mut dg), Isa::detect(), 2).unwrap();
                let scale = 1.0 + 10.0 / t;
                for r in 0..rows {
                    // The -inf entries of the two sides differ: reverse KL rows may be +inf.
                    if dl[r].is_finite() {
                        assert!((sl[r] - dl[r]).abs() <= 1e-5 * dl[r].abs() + 2e-6 * scale, "{div:?} V={cols} T={t}: {} vs {}", sl[r], dl[r]);
                    } else {
                        assert_eq!(sl[r], dl[r], "{div:?} V={cols} T={t}");
                    }
                }
                let gmax = dg.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                for (a, b) in sg.iter().zip(&dg) {
                    assert!((a - b).abs() <= 1e-5 * b.abs() + 2e-6 * gmax * scale, "{div:?} V={cols} T={t}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn infinite_rows_have_zero_gradients_and_mixtures_stay_finite() {
    // The teacher's tail is empty (tail_logprob = -inf) while the student has mass outside the
    // listed ids: reverse KL is +inf (zero gradient row), JSD and TVD are finite.
    let cols = 20;
    let zs = logits(1, cols, 3, 3.0, 0);
    let tg = (vec![2i64, 5], vec![(0.75f32).ln(), (0.25f32).ln()], vec![f32::NEG_INFINITY]);
    for mode in [SparseMode::Bucket] {
        let (l, g) = run(Divergence::ReverseKl, mode, &zs, &tg, true, 1, cols, 1.0, Isa::detect()).unwrap();
        assert!(l[0] == f32::INFINITY && g.iter().all(|&x| x == 0.0));
        for div in [Divergence::Jsd { beta: 0.5 }, Divergence::Tvd] {
            let (l, g) = run(div, mode, &zs, &tg, true, 1, cols, 1.0, Isa::detect()).unwrap();
            assert!(l[0].is_finite() && l[0] > 0.0 && g.iter().all(|x| x.is_finite()), "{div:?}");
        }
    }
    // Forward KL (sparse_kl): teacher mass at a listed id the student excludes: +inf, zero row.
    let mut zinf = zs.clone();
    zinf[2] = f32::NEG_INFINITY;
    for mode in [SparseMode::Bucket, SparseMode::Renorm] {
        let (l, g) = run(Divergence::ForwardKl, mode, &zinf, &tg, true, 1, cols, 1.0, Isa::detect()).unwrap();
        assert!(l[0] == f32::INFINITY && g.iter().all(|&x| x == 0.0), "{mode:?}");
    }
    // Renormalised reverse KL there: the student's mass on the listed ids is all at id 5, which
    // the teacher gives 0.25: finite, and the unlisted ids get no gradient.
    let (l, g) = run(Divergence::ReverseKl, SparseMode::Renorm, &zinf, &tg, false, 1, cols, 1.0, Isa::detect()).unwrap();
    assert!((l[0] as f64 - (4.0f64).ln()).abs() < 1e-6, "{}", l[0]);
    assert!(g.iter().enumerate().all(|(j, &x)| x == 0.0 || j == 5));
    // A student -inf at every listed id: the renormalised student is undefined.
    zinf[5] = f32::NEG_INFINITY;
    let e = run(Divergence::Tvd, SparseMode::Renorm, &zinf, &tg, false, 1, cols, 1.0, Isa::detect()).unwrap_err().to_string();
    assert!(e.contains("student_logits") && e.contains("every listed id"), "{e}");
}

#[test]
fn sampled_targets_and_skews_are_rejected() {
    let cols = 10;
    let zs = logits(1, cols, 3, 3.0, 0);
    let ids = [1i64, 2];
    let (lp, w) = ([-1.0f32, -2.0], [0.5f32, 0.5]);
    let targets = Targets { ids: &ids, logprobs: &lp, weights: Some(&w), tail_logprob: None, rows: 1, k: 2 };
    for div in [Divergence::ReverseKl, Divergence::Jsd { beta: 0.0 }, Divergence::Tvd] {
        let cfg = SparseConfig { mode: SparseMode::Sampled, divergence: div, temperature: 1.0, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
        let e = sparse_loss(Rows::new(&zs, 1, cols, cols, "s").unwrap(), &targets, None, &cfg, &mut [0.0], None::<&mut [f32]>, Isa::detect(), 1).unwrap_err().to_string();
        assert!(e.starts_with("loss:") && e.contains("unbiased"), "{e}");
    }
    let tg = (vec![1i64, 2], vec![-1.0f32, -2.0], vec![-1.0f32]);
    let e = run(Divergence::SkewForwardKl { skew: 0.1 }, SparseMode::Bucket, &zs, &tg, true, 1, cols, 1.0, Isa::detect()).unwrap_err().to_string();
    assert!(e.starts_with("loss:"), "{e}");
    let e = run(Divergence::Jsd { beta: 1.5 }, SparseMode::Bucket, &zs, &tg, true, 1, cols, 1.0, Isa::detect()).unwrap_err().to_string();
    assert!(e.starts_with("beta:"), "{e}");
}


#[test]
fn jsd_keeps_its_precision_at_huge_deviations() {
    // Disjoint supports with |d| ~ 1e5: JSD_β = H(β) exactly (its log p − log m once lost ulp(d)).
    let cols = 64;
    let mut zs = vec![f32::NEG_INFINITY; cols];
    let mut zt = vec![f32::NEG_INFINITY; cols];
    zs[..8].fill(-5000.0);
    zs[8..].fill(0.0);
    zt[..8].fill(0.0);
    zt[8..].fill(-5000.0);
    let t = 0.05f32;
    for beta in [0.3f32, 0.9] {
        let h = -(beta as f64) * (beta as f64).ln() - (1.0 - beta as f64) * (1.0 - beta as f64).ln();
        let div = Divergence::Jsd { beta };
        let cfg = DenseConfig { divergence: div, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
        let mut dl = vec![0.0f32];
        dense_loss(Rows::new(&zs, 1, cols, cols, "s").unwrap(), Rows::new(&zt, 1, cols, cols, "t").unwrap(), None, &cfg, &mut dl, None::<&mut [f32]>, Isa::Scalar, 1).unwrap();
        let tg = topk(&zt, 1, cols, 8, t);
        let (sl, _) = run(div, SparseMode::Bucket, &zs, &tg, true, 1, cols, t, Isa::detect()).unwrap();
        for (what, got) in [("dense", dl[0]), ("sparse", sl[0])] {
            assert!((got as f64 - h).abs() < 1e-6, "{what} β={beta}: {got} vs {h}");
        }
    }
}
