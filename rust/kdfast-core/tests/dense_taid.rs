//! TAID beyond the shared reference test (tests/dense.rs): its edges, the +inf rules,
//! half-precision inputs, masking.

mod common;
use common::dense::{call, pair, reference, run};
use common::{isas, logits};
use half::{bf16, f16};
use kdfast_core::{DenseConfig, Divergence, Elem, Isa};

const NINF: f32 = f32::NEG_INFINITY;

fn taid(t: f32) -> Divergence {
    Divergence::Taid { t }
}

/// Row 1 of three is `+inf` with a zero gradient row; rows 0 and 2 are finite.
fn assert_middle_row_infinite(loss: &[f32], grad: &[f32], what: &str) {
    let cols = grad.len() / 3;
    assert_eq!(loss[1], f32::INFINITY, "{what}: {loss:?}");
    assert!(grad[cols..2 * cols].iter().all(|&g| g == 0.0), "{what}: {grad:?}");
    assert!(loss[0].is_finite() && loss[2].is_finite() && grad.iter().all(|g| g.is_finite()), "{what}");
}

/// Loss and gradient of every row against the f64 reference, within `rel` (loss) and a
/// gradient error of `grad_tol` of the row's largest gradient entry plus `grad_abs`.
#[allow(clippy::too_many_arguments)]
fn assert_reference<E: Elem>(div: Divergence, zs: &[E], zt: &[E], rows: usize, cols: usize, t: f32, rel: f64, grad_tol: f64, grad_abs: f64) {
    let f = |z: &[E]| -> Vec<f32> {
        let mut out = vec![0.0; z.len()];
        E::load(z, &mut out);
        out
    };
    let (fs, ft) = (f(zs), f(zt));
    for isa in isas() {
        let (loss, grad) = run(div, zs, zt, rows, cols, t, isa, 2);
        let grad = f(&grad);
        for r in 0..rows {
            let (s_row, t_row) = (&fs[r * cols..(r + 1) * cols], &ft[r * cols..(r + 1) * cols]);
            let (l64, g64) = reference(div, s_row, t_row, t as f64);
            assert!((loss[r] as f64 - l64).abs() <= rel * l64.abs() + 1e-6, "{div:?} {isa:?} V={cols} row {r}: {} vs {l64}", loss[r]);
            let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for c in 0..cols {
                let d = (grad[r * cols + c] as f64 - g64[c]).abs();
                assert!(d <= grad_tol * gmax + grad_abs, "{div:?} {isa:?} V={cols} grad[{r},{c}] {} vs {}", grad[r * cols + c], g64[c]);
            }
        }
    }
}

#[test]
fn taid_edges_are_exact() {
    let (rows, cols) = (3, 1500);
    let (zs, zt) = pair(rows, cols, 21, 8.0);
    for isa in isas() {
        // t = 1 is forward KL to the bit; t = 0 is exactly 0.
        assert_eq!(run(taid(1.0), &zs, &zt, rows, cols, 0.7, isa, 1), run(Divergence::ForwardKl, &zs, &zt, rows, cols, 0.7, isa, 1), "{isa:?}");
        let (loss, grad) = run(taid(0.0), &zs, &zt, rows, cols, 0.7, isa, 1);
        assert!(loss.iter().all(|&l| l == 0.0) && grad.iter().all(|&g| g == 0.0), "{isa:?}");
    }
    // Near t = 0 the gradient q − p_t is a small difference of probabilities rounded to f32
    // (as forward KL's): an absolute error of a few ulp of q.
    for (t, grad_abs) in [(1e-6f32, 1e-7), (0.3, 1e-9), (0.999_999, 1e-9)] {
        assert_reference(taid(t), &zs, &zt, rows, cols, 1.3, 2e-5, 1e-5, grad_abs);
    }
}

#[test]
fn taid_minus_inf_on_either_side() {
    // -inf on one side only, at different places: the mixture is -inf where either is.
    let (rows, cols) = (4, 1100);
    let zs = logits(rows, cols, 31, 6.0, 7);
    let zt = logits(rows, cols, 32, 6.0, 5);
    for t in [0.3f32, 0.7] {
        assert_reference(taid(t), &zs, &zt, rows, cols, 1.0, 2e-5, 1e-5, 1e-9);
    }
    // t = 1 keeps forward KL's rule: teacher mass where the student is -inf is an infinite row.
    let (loss, grad) = run(taid(1.0), &zs, &zt, rows, cols, 1.0, Isa::detect(), 1);
    assert!(loss.iter().all(|&l| l == f32::INFINITY) && grad.iter().all(|&g| g == 0.0));
}

#[test]
fn taid_mixture_minus_inf_everywhere_is_an_infinite_row() {
    // Row 1: no id finite in both inputs; rows 0 and 2 are ordinary.
    let zs = [0.5f32, 1.0, -1.0, 0.0, NINF, 2.0, 0.3, 0.1, 0.2];
    let zt = [0.1f32, 0.2, 0.3, NINF, 1.0, NINF, 1.0, -2.0, 0.0];
    for isa in isas() {
        for t in [0.3f32, 0.5] {
            let (loss, grad) = run(taid(t), &zs, &zt, 3, 3, 0.5, isa, 1);
            assert_middle_row_infinite(&loss, &grad, &format!("{isa:?} t={t}"));
        }
    }
}

/// The error of a one-row call, as text.
fn error_of(div: Divergence, zs: &[f32], zt: &[f32]) -> String {
    let cfg = DenseConfig { divergence: div, temperature: 1.0, t2_scale: false, grad_scale: 1.0, grad_cols: zs.len() };
    call(&cfg, zs, zt, 1, None, Isa::detect(), 1).unwrap_err().to_string()
}

#[test]
fn bad_rows_are_errors_that_name_the_input() {
    let ok = [0.0f32, 1.0, 2.0];
    for t in [0.0f32, 0.3, 1.0] {
        // A +inf teacher against a -inf student mixes to NaN: the error still names the +inf
        // (t = 1 is forward KL, whose check reports a +inf row as NaN).
        let e = error_of(taid(t), &[NINF, 0.0, 1.0], &[f32::INFINITY, 0.0, 1.0]);
        assert!(e.contains("teacher_logits") && (t == 1.0 || e.contains("+inf")), "t={t}: {e}");
        let e = error_of(taid(t), &ok, &[NINF; 3]);
        assert!(e.contains("teacher_logits") && e.contains("entirely -inf"), "t={t}: {e}");
        let e = error_of(taid(t), &[0.0, f32::NAN, 1.0], &ok);
        assert!(e.contains("student_logits") && e.contains("NaN"), "t={t}: {e}");
    }
    for div in [taid(-0.1), taid(1.01), taid(f32::NAN)] {
        assert!(error_of(div, &ok, &ok).starts_with("t:"), "{div:?}");
    }
    assert!(Divergence::from_name("taid", 2.0).unwrap_err().to_string().starts_with("t:"));
    assert_eq!(Divergence::from_name("taid", 0.25).unwrap(), taid(0.25));
    assert!(Divergence::from_name("kl", 0.0).unwrap_err().to_string().contains("tvd, taid"));
}

#[test]
fn half_precision_inputs_match_reference() {
    let (rows, cols) = (3, 1301);
    let (zs, zt) = pair(rows, cols, 71, 10.0);
    let bs: Vec<bf16> = zs.iter().map(|&x| bf16::from_f32(x)).collect();
    let bt: Vec<bf16> = zt.iter().map(|&x| bf16::from_f32(x)).collect();
    let hs: Vec<f16> = zs.iter().map(|&x| f16::from_f32(x)).collect();
    let ht: Vec<f16> = zt.iter().map(|&x| f16::from_f32(x)).collect();
    // The gradient is rounded to the input's precision.
    for div in [taid(0.3), taid(0.85)] {
        assert_reference(div, &bs, &bt, rows, cols, 1.0, 2e-5, 8e-3, 1e-9);
        assert_reference(div, &hs, &ht, rows, cols, 1.0, 2e-5, 1e-3, 1e-9);
    }
}

#[test]
fn masked_rows_padding_columns_scales_and_threads() {
    let (rows, cols, grad_cols) = (5, 1030, 1040);
    let (zs, zt) = pair(rows, cols, 81, 6.0);
    let labels = [1i64, -100, 7, -100, 3];
    for div in [taid(0.6)] {
        let (l0, g0) = run(div, &zs, &zt, rows, cols, 2.0, Isa::detect(), 1);
        for threads in [1, 2] {
            let cfg = DenseConfig { divergence: div, temperature: 2.0, t2_scale: true, grad_scale: 0.5, grad_cols };
            let (loss, grad) = call(&cfg, &zs, &zt, rows, Some((&labels, -100)), Isa::detect(), threads).unwrap();
            for r in 0..rows {
                let g = &grad[r * grad_cols..(r + 1) * grad_cols];
                assert!(g[cols..].iter().all(|&x| x == 0.0), "{div:?}");
                if labels[r] == -100 {
                    assert!(loss[r] == 0.0 && g.iter().all(|&x| x == 0.0), "{div:?}");
                    continue;
                }
                // t2_scale multiplies both by T² = 4, grad_scale the gradient by 0.5.
                assert!((loss[r] - 4.0 * l0[r]).abs() <= 1e-6 * loss[r], "{div:?} row {r}");
                for c in 0..cols {
                    assert!((g[c] - 2.0 * g0[r * cols + c]).abs() <= 1e-6 * g[c].abs() + 1e-12, "{div:?} row {r} col {c}");
                }
            }
        }
    }
}

