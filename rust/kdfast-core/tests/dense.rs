//! The SIMD paths agree with the scalar (libm) path, and all agree with an f64 reference.

mod common;
use common::dense::{akl_slack, call, pair, reference, run};
use common::{isas, logits};
use half::{bf16, f16};
use kdfast_core::{dense_loss, DenseConfig, Divergence, Isa, Rows};

const DIVS: [Divergence; 14] = [
    Divergence::ForwardKl,
    Divergence::ReverseKl,
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 0.1 },
    Divergence::SkewForwardKl { skew: 0.1 },
    Divergence::SkewReverseKl { skew: 0.1 },
    Divergence::SkewForwardKl { skew: 0.0 },
    Divergence::Tvd,
    Divergence::Akl { head_mass: 0.5 },
    Divergence::Akl { head_mass: 0.0 },
    Divergence::Akl { head_mass: 0.9 },
    Divergence::Taid { t: 0.3 },
    Divergence::Taid { t: 0.0 },
    Divergence::Taid { t: 1.0 },
];

#[test]
fn every_isa_matches_f64_reference() {
    for &(rows, cols) in &[(3usize, 1usize), (4, 2), (5, 127), (3, 1500), (2, 4099)] {
        for &t in &[0.5f32, 1.0, 2.0] {
            let (zs, zt) = pair(rows, cols, 1, 8.0);
            for div in DIVS {
                for isa in isas() {
                    let (loss, grad) = run(div, &zs, &zt, rows, cols, t, isa, 2);
                    for r in 0..rows {
                        let (s_row, t_row) = (&zs[r * cols..(r + 1) * cols], &zt[r * cols..(r + 1) * cols]);
                        let (l64, g64) = reference(div, s_row, t_row, t as f64);
                        let (ls, gs) = if let Divergence::Akl { .. } = div { akl_slack(s_row, t_row, t as f64) } else { (0.0, vec![0.0; cols]) };
                        assert!((loss[r] as f64 - l64).abs() <= 2e-5 * l64.abs() + 1e-6 + ls, "{div:?} {isa:?} V={cols} T={t} row {r}: {} vs {l64}", loss[r]);
                        let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                        for c in 0..cols {
                            let d = (grad[r * cols + c] as f64 - g64[c]).abs();
                            // q_j (g_j − S) cancels where g_j ≈ S: allow f32 rounding of the
                            // log-ratios (|a| ≤ 8/T) on top of the relative error.
                            let z = zs[r * cols + c] as f64 / t as f64;
                            let cancel = if !z.is_finite() { 0.0 } else { 4e-7 * (z.abs() + 1.0) * (z - loss[r] as f64).exp().min(1.0) / t as f64 };
                            assert!(d <= 1e-5 * g64[c].abs() + 1e-6 * gmax.max(1e-30) + cancel + gs[c] + 1e-9, "{div:?} {isa:?} V={cols} T={t} loss {} {l64} grad[{r},{c}] {} vs {} zs {} zt {}", loss[r], grad[r * cols + c], g64[c], zs[r*cols+c], zt[r*cols+c]);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn simd_paths_agree_with_scalar_in_half_precision() {
    let (rows, cols) = (4, 3001);
    let (zs, zt) = pair(rows, cols, 3, 20.0);
    let bs: Vec<bf16> = zs.iter().map(|&x| bf16::from_f32(x)).collect();
    let bt: Vec<bf16> = zt.iter().map(|&x| bf16::from_f32(x)).collect();
    let hs: Vec<f16> = zs.iter().map(|&x| f16::from_f32(x / 10.0)).collect();
    let ht: Vec<f16> = zt.iter().map(|&x| f16::from_f32(x / 10.0)).collect();
    for div in DIVS {
        let (l0, g0) = run(div, &bs, &bt, rows, cols, 1.0, Isa::Scalar, 1);
        let (h0, k0) = run(div, &hs, &ht, rows, cols, 1.0, Isa::Scalar, 1);
        for isa in isas() {
            let (l1, g1) = run(div, &bs, &bt, rows, cols, 1.0, isa, 2);
            let (h1, k1) = run(div, &hs, &ht, rows, cols, 1.0, isa, 2);
            for r in 0..rows {
                assert!((l0[r] - l1[r]).abs() <= 1e-5 * l0[r].abs() + 1e-6, "{div:?} {isa:?}");
                assert!((h0[r] - h1[r]).abs() <= 1e-5 * h0[r].abs() + 1e-6, "{div:?} {isa:?}");
            }
            let close = |a: f32, b: f32| (a - b).abs() <= 8e-3 * a.abs().max(b.abs()) + 1e-7;
            assert!(g0.iter().zip(&g1).all(|(a, b)| close(a.to_f32(), b.to_f32())), "{div:?} {isa:?} bf16 grad");
            assert!(k0.iter().zip(&k1).all(|(a, b)| close(a.to_f32(), b.to_f32())), "{div:?} {isa:?} f16 grad");
        }
    }
}

#[test]
fn extreme_log_probs_give_no_nan() {
    // Both log-probabilities of column 1 are about -200 (naive f32 exp underflows), T < 1.
    let cols = 64;
    let mut zs = vec![0.0f32; cols];
    let mut zt = vec![1.0f32; cols];
    zs[1] = -100.0;
    zt[1] = -99.0;
    for div in DIVS {
        for isa in isas() {
            let (loss, grad) = run(div, &zs, &zt, 1, cols, 0.5, isa, 1);
            assert!(loss[0].is_finite(), "{div:?} {isa:?}");
            assert!(grad.iter().all(|g| g.is_finite()), "{div:?} {isa:?}");
        }
    }
}

#[test]
fn underflowing_student_probabilities_keep_their_gradient() {
    // q_1 = e^-147 underflows in f32, but with λ = 0 skew forward KL is forward KL and its
    // gradient at column 1 is q_1 − p_1 = −0.5, not 0.
    let (zs, zt) = (vec![6.164f32, -1.1737], vec![0.0f32, 0.0]);
    for div in [Divergence::ForwardKl, Divergence::SkewForwardKl { skew: 0.0 }] {
        for isa in isas() {
            let (_, grad) = run(div, &zs, &zt, 1, 2, 0.05, isa, 1);
            assert!((grad[1] + 10.0).abs() < 0.1, "{div:?} {isa:?}: {grad:?}");
        }
    }
}

#[test]
fn masked_rows_and_padding_columns() {
    let (rows, cols, grad_cols) = (3, 50, 53);
    let (zs, zt) = pair(rows, cols, 5, 4.0);
    let labels = [1i64, -100, 7];
    let cfg = DenseConfig { divergence: Divergence::Jsd { beta: 0.5 }, temperature: 1.0, t2_scale: true, grad_scale: 0.5, grad_cols };
    let (loss, grad) = call(&cfg, &zs, &zt, rows, Some((&labels, -100)), Isa::detect(), 2).unwrap();
    assert_eq!(loss[1], 0.0);
    assert!(grad[grad_cols..2 * grad_cols].iter().all(|&g| g == 0.0));
    for r in [0, 2] {
        assert!(loss[r] > 0.0);
        assert!(grad[r * grad_cols + cols..(r + 1) * grad_cols].iter().all(|&g| g == 0.0));
        let s: f32 = grad[r * grad_cols..r * grad_cols + cols].iter().sum();
        assert!(s.abs() < 1e-6, "gradient of a softmax input sums to 0, got {s}");
    }
}

#[test]
fn non_finite_rows_are_errors() {
    let zs = vec![f32::NEG_INFINITY; 8];
    let zt = vec![0.0f32; 8];
    let cfg = DenseConfig { divergence: Divergence::ForwardKl, temperature: 1.0, t2_scale: false, grad_scale: 1.0, grad_cols: 8 };
    let mut loss = vec![0.0; 1];
    let err = dense_loss(Rows::new(&zs, 1, 8, 8, "s").unwrap(), Rows::new(&zt, 1, 8, 8, "t").unwrap(), None, &cfg, &mut loss, None, Isa::detect(), 1);
    assert!(err.unwrap_err().to_string().contains("entirely -inf"));
}

#[test]
fn thread_count_does_not_change_results() {
    let (rows, cols) = (37, 700);
    let (zs, zt) = pair(rows, cols, 7, 10.0);
    let one = run(Divergence::Jsd { beta: 0.3 }, &zs, &zt, rows, cols, 1.3, Isa::detect(), 1);
    let two = run(Divergence::Jsd { beta: 0.3 }, &zs, &zt, rows, cols, 1.3, Isa::detect(), 2);
    assert_eq!(one, two);
}

#[test]
fn mass_against_minus_inf_is_an_infinite_row_with_zero_gradient() {
    // Row 1: the student's column 1 is alive (its q underflows: -2000) where the teacher is
    // -inf (reverse KL is +inf), or the converse (forward KL); rows 0 and 2 are ordinary.
    let ninf = f32::NEG_INFINITY;
    let alive = [0.0f32, -2000.0, 1.0];
    let dead = [0.0f32, ninf, 1.0];
    let other = [0.3f32, -0.2, 1.1];
    let cases = [
        (Divergence::ReverseKl, alive, dead),
        (Divergence::Jsd { beta: 1.0 }, alive, dead),
        (Divergence::SkewReverseKl { skew: 0.0 }, alive, dead),
        (Divergence::ForwardKl, dead, alive),
        (Divergence::Jsd { beta: 0.0 }, dead, alive),
        (Divergence::SkewForwardKl { skew: 0.0 }, dead, alive),
    ];
    for (div, s1, t1) in cases {
        let zs: Vec<f32> = other.iter().chain(&s1).chain(&other).copied().collect();
        let zt: Vec<f32> = other.iter().rev().chain(&t1).chain(other.iter().rev()).copied().collect();
        for isa in isas() {
            let (loss, grad) = run(div, &zs, &zt, 3, 3, 0.5, isa, 1);
            assert_eq!(loss[1], f32::INFINITY, "{div:?} {isa:?}: {loss:?}");
            assert!(grad[3..6].iter().all(|&g| g == 0.0), "{div:?} {isa:?}: {grad:?}");
            assert!(loss[0].is_finite() && loss[2].is_finite() && grad.iter().all(|g| g.is_finite()));
        }
    }
    // With a mixture weight in (0, 1) the same rows are finite.
    for div in [Divergence::Jsd { beta: 0.5 }, Divergence::SkewForwardKl { skew: 0.1 }, Divergence::SkewReverseKl { skew: 1e-4 }] {
        for (s1, t1) in [(alive, dead), (dead, alive)] {
            for isa in isas() {
                let (loss, grad) = run(div, &s1, &t1, 1, 3, 0.5, isa, 1);
                assert!(loss[0].is_finite() && grad.iter().all(|g| g.is_finite()), "{div:?} {isa:?}");
            }
        }
    }
}

#[test]
fn mixture_gradients_near_equal_distributions_have_no_cancellation() {
    // Nearly equal distributions at T = 10: every g is nearly constant, which `q (g − S)` with
    // the constant left in cancelled to ~5e-6 of the largest element (skew KLs at small λ).
    let (rows, cols) = (3, 4099);
    let zt = logits(rows, cols, 11, 4.0, 0);
    let noise = logits(rows, cols, 12, 0.5, 0);
    let zs: Vec<f32> = zt.iter().zip(&noise).map(|(a, b)| a + b).collect();
    let divs = [
        Divergence::SkewForwardKl { skew: 1e-7 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 1e-7 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
    ];
    for div in divs {
        for isa in isas() {
            let (_, grad) = run(div, &zs, &zt, rows, cols, 10.0, isa, 1);
            for r in 0..rows {
                let (_, g64) = reference(div, &zs[r * cols..(r + 1) * cols], &zt[r * cols..(r + 1) * cols], 10.0);
                let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let worst = g64.iter().zip(&grad[r * cols..]).fold(0.0f64, |m, (a, &b)| m.max((a - b as f64).abs()));
                // JSD's log(q/m) = −ln(β e^{−d} + 1 − β) still rounds as a difference of logs.
                let tol = if matches!(div, Divergence::Jsd { .. }) { 6e-6 } else { 1.5e-6 };
                assert!(worst <= tol * gmax, "{div:?} {isa:?} row {r}: {} of the max", worst / gmax);
            }
        }
    }
}
