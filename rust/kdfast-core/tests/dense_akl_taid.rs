//! AKL and TAID beyond the shared reference test (tests/dense.rs): their edges, the head's tie
//! rule, the +inf rules, half-precision inputs, masking.

mod common;
use common::dense::{akl_slack, call, pair, reference, run};
use common::{isas, logits};
use half::{bf16, f16};
use kdfast_core::{DenseConfig, Divergence, Elem, Isa};

const NINF: f32 = f32::NEG_INFINITY;

fn akl(head_mass: f32) -> Divergence {
    Divergence::Akl { head_mass }
}

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
            let (ls, gs) = if let Divergence::Akl { .. } = div { akl_slack(s_row, t_row, t as f64) } else { (0.0, vec![0.0; cols]) };
            assert!((loss[r] as f64 - l64).abs() <= rel * l64.abs() + 1e-6 + ls, "{div:?} {isa:?} V={cols} row {r}: {} vs {l64}", loss[r]);
            let gmax = g64.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for c in 0..cols {
                let d = (grad[r * cols + c] as f64 - g64[c]).abs();
                assert!(d <= grad_tol * gmax + gs[c] + grad_abs, "{div:?} {isa:?} V={cols} grad[{r},{c}] {} vs {}", grad[r * cols + c], g64[c]);
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
    for h in [0.0f32, 0.5, 1.0] {
        let e = error_of(akl(h), &ok, &[0.0, f32::NAN, 1.0]);
        assert!(e.contains("teacher_logits") && e.contains("NaN"), "{e}");
    }
    for (div, name) in [(akl(1.5), "head_mass"), (akl(f32::NAN), "head_mass"), (taid(-0.1), "t"), (taid(1.01), "t")] {
        assert!(error_of(div, &ok, &ok).starts_with(name), "{div:?}");
        assert!(Divergence::from_name(if name == "t" { "taid" } else { "akl" }, 2.0).unwrap_err().to_string().starts_with(name));
    }
    assert_eq!(Divergence::from_name("akl", 0.25).unwrap(), akl(0.25));
    assert_eq!(Divergence::from_name("taid", 0.25).unwrap(), taid(0.25));
    assert!(Divergence::from_name("kl", 0.0).unwrap_err().to_string().contains("akl, taid"));
}

#[test]
fn akl_ties_lower_id_first() {
    // Uniform teachers and teachers of a few repeated values, across several blocks (ties in
    // different blocks must stay ties), against the stable sort of the reference.
    let cols = 2500;
    let zs = logits(2, cols, 41, 3.0, 0);
    let uniform = vec![0.25f32; 2 * cols];
    let repeated: Vec<f32> = (0..2 * cols).map(|i| ((i * 7919) % 5) as f32 * 0.7).collect();
    for zt in [&uniform, &repeated] {
        for h in [0.0f32, 0.013, 0.3, 0.5, 0.77] {
            assert_reference(akl(h), &zs, zt, 2, cols, 1.0, 2e-5, 1e-5, 1e-9);
        }
    }
    // With a uniform teacher and head_mass 0 the head is id 0 alone: moving the student's
    // mass between ids 0 and 1 changes the loss, between ids 1 and 2 it does not.
    let zt = vec![0.0f32; 3];
    let l = |zs: [f32; 3]| run(akl(0.0), &zs, &zt, 1, 3, 1.0, Isa::Scalar, 1).0[0];
    assert!((l([3.0, 0.0, 0.0]) - l([0.0, 0.0, 3.0])).abs() > 1e-3);
    assert!((l([0.0, 3.0, 0.0]) - l([0.0, 0.0, 3.0])).abs() < 1e-6);
}

#[test]
fn akl_head_mass_extremes() {
    let (rows, cols) = (3, 1700);
    let (zs, zt) = pair(rows, cols, 51, 8.0);
    for h in [0.0f32, 1e-9, 0.999] {
        assert_reference(akl(h), &zs, &zt, rows, cols, 0.8, 2e-5, 1e-5, 1e-9);
    }
    // head_mass 1 is the whole row (the bound 1 + 2^-20 is never left to the rounding of Σ p):
    // w_t = 0 and AKL is forward KL, finite even where the student is alive and the teacher
    // -inf. Here the f32 probabilities are exact (uniform over 2^10 ids, the rest -inf).
    let cols = 2048;
    let zt: Vec<f32> = (0..cols).map(|i| if i < 1024 { 0.0 } else { NINF }).collect();
    let zs = logits(1, cols, 52, 4.0, 0);
    let (zs3, zt3) = (logits(3, 3001, 53, 8.0, 0), logits(3, 3001, 54, 8.0, 0));
    for isa in isas() {
        for (zs, zt, rows, cols) in [(&zs, &zt, 1, cols), (&zs3, &zt3, 3, 3001)] {
            let (l_akl, g_akl) = run(akl(1.0), zs, zt, rows, cols, 1.0, isa, 1);
            let (l_fkl, g_fkl) = run(Divergence::ForwardKl, zs, zt, rows, cols, 1.0, isa, 1);
            assert!(l_akl.iter().zip(&l_fkl).all(|(a, b)| (a - b).abs() <= 1e-6 * b), "{isa:?}: {l_akl:?} vs {l_fkl:?}");
            assert!(g_akl.iter().zip(&g_fkl).all(|(a, b)| (a - b).abs() <= 1e-7), "{isa:?}");
        }
        // A smaller head leaves teacher-dead, student-alive ids in the tail: KL(q‖p) = +inf.
        // (1023/1024 = 0.99902 > 0.999 + 2^-20: the head ends two ids before the -inf ones.)
        let (loss, grad) = run(akl(0.999), &zs, &zt, 1, cols, 1.0, isa, 1);
        assert!(loss[0] == f32::INFINITY && grad.iter().all(|&g| g == 0.0), "{isa:?}");
    }
}

#[test]
fn akl_equal_distributions_and_one_column() {
    // p == q: both gaps are 0, the weights ½, the loss and gradient exactly 0.
    let (rows, cols) = (3, 2100);
    let (zs, _) = pair(rows, cols, 61, 8.0);
    let zt1 = vec![0.0f32; rows];
    for isa in isas() {
        for h in [0.0f32, 0.5, 1.0] {
            let (loss, grad) = run(akl(h), &zs, &zs, rows, cols, 0.9, isa, 2);
            assert!(loss.iter().all(|&l| l == 0.0) && grad.iter().all(|&g| g == 0.0), "{isa:?} h={h}");
            // V = 1: p = q = 1.
            let (loss, grad) = run(akl(h), &zt1, &zt1, rows, 1, 1.0, isa, 1);
            assert!(loss.iter().all(|&l| l == 0.0) && grad.iter().all(|&g| g == 0.0), "{isa:?}");
        }
        let (loss, grad) = run(taid(0.4), &zt1, &zt1, rows, 1, 1.0, isa, 1);
        assert!(loss.iter().all(|&l| l == 0.0) && grad.iter().all(|&g| g == 0.0), "{isa:?}");
    }
}

#[test]
fn akl_mass_against_minus_inf() {
    // Row 1 of each case has one KL infinite (the student -inf where the teacher is alive, or
    // the converse) with a positive weight: +inf with a zero gradient row.
    let other = [0.3f32, -0.2, 1.1, 0.4];
    let alive = [0.0f32, -2000.0, 1.0, 0.5];
    let dead = [0.0f32, NINF, 1.0, 0.5];
    for (s1, t1) in [(dead, alive), (alive, dead)] {
        let zs: Vec<f32> = other.iter().chain(&s1).chain(&other).copied().collect();
        let zt: Vec<f32> = other.iter().rev().chain(&t1).chain(other.iter().rev()).copied().collect();
        for isa in isas() {
            for h in [0.0f32, 0.5] {
                let (loss, grad) = run(akl(h), &zs, &zt, 3, 4, 0.5, isa, 1);
                assert_middle_row_infinite(&loss, &grad, &format!("{isa:?} h={h}"));
            }
        }
    }
}

#[test]
fn half_precision_inputs_match_reference() {
    let (rows, cols) = (3, 1301);
    let (zs, zt) = pair(rows, cols, 71, 10.0);
    let bs: Vec<bf16> = zs.iter().map(|&x| bf16::from_f32(x)).collect();
    let bt: Vec<bf16> = zt.iter().map(|&x| bf16::from_f32(x)).collect();
    let hs: Vec<f16> = zs.iter().map(|&x| f16::from_f32(x)).collect();
    let ht: Vec<f16> = zt.iter().map(|&x| f16::from_f32(x)).collect();
    // bf16 logits hold many ties in p; the gradient is rounded to the input's precision.
    for div in [akl(0.5), akl(0.2), taid(0.3), taid(0.85)] {
        assert_reference(div, &bs, &bt, rows, cols, 1.0, 2e-5, 8e-3, 1e-9);
        assert_reference(div, &hs, &ht, rows, cols, 1.0, 2e-5, 1e-3, 1e-9);
    }
}

#[test]
fn masked_rows_padding_columns_scales_and_threads() {
    let (rows, cols, grad_cols) = (5, 1030, 1040);
    let (zs, zt) = pair(rows, cols, 81, 6.0);
    let labels = [1i64, -100, 7, -100, 3];
    for div in [akl(0.5), taid(0.6)] {
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

