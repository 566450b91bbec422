//! The dense-loss helpers shared by the integration tests: inputs, a call, the f64 reference.

use super::logits;
use kdfast_core::{dense_loss, DenseConfig, Divergence, Elem, Isa, Rows};

/// Student and teacher logits with `-inf` at the same places (so every divergence is finite).
pub fn pair(rows: usize, cols: usize, seed: u64, spread: f32) -> (Vec<f32>, Vec<f32>) {
    let mut zs = logits(rows, cols, seed, spread, 53);
    let mut zt = logits(rows, cols, seed + 100, spread, 53);
    for (a, b) in zs.iter_mut().zip(zt.iter_mut()) {
        if *a == f32::NEG_INFINITY || *b == f32::NEG_INFINITY {
            (*a, *b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        }
    }
    (zs, zt)
}

/// f64 reference of one row: (loss, gradient w.r.t. z_s), by the closed forms.
pub fn reference(div: Divergence, zs: &[f32], zt: &[f32], t: f64) -> (f64, Vec<f64>) {
    let lsm = |a: &[f64]| {
        let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + a.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        a.iter().map(|x| x - l).collect::<Vec<f64>>()
    };
    let a_s: Vec<f64> = zs.iter().map(|&x| x as f64 / t).collect();
    let a_t: Vec<f64> = zt.iter().map(|&x| x as f64 / t).collect();
    // TAID's teacher: the mixture (1 − t)·a_s + t·a_t (-inf where either side is).
    let a_t = match div {
        Divergence::Taid { t: 0.0 } => a_s.clone(),
        Divergence::Taid { t: w } if w < 1.0 => {
            let w = w as f64;
            a_s.iter().zip(&a_t).map(|(&x, &y)| if x == f64::NEG_INFINITY || y == f64::NEG_INFINITY { f64::NEG_INFINITY } else { (1.0 - w) * x + w * y }).collect()
        }
        _ => a_t,
    };
    if a_t.iter().all(|&x| x == f64::NEG_INFINITY) {
        return (f64::INFINITY, vec![0.0; zs.len()]);
    }
    let (lq, lp) = (lsm(&a_s), lsm(&a_t));
    let q: Vec<f64> = lq.iter().map(|x| x.exp()).collect();
    let p: Vec<f64> = lp.iter().map(|x| x.exp()).collect();
    let xlog = |a: f64, la: f64, lb: f64| if a == 0.0 { 0.0 } else { a * (la - lb) };
    let lae = |x: f64, y: f64| {
        let m = x.max(y);
        if m == f64::NEG_INFINITY { m } else { m + ((x - m).exp() + (y - m).exp()).ln() }
    };
    let v = zs.len();
    // g_i = dℓ/dq_i (entries with q_i = 0 get no gradient anyway).
    let (loss, g): (f64, Vec<f64>) = match div {
        Divergence::ForwardKl | Divergence::Taid { .. } => ((0..v).map(|i| xlog(p[i], lp[i], lq[i])).sum(), (0..v).map(|i| if q[i] == 0.0 { 0.0 } else { -p[i] / q[i] }).collect()),
        Divergence::ReverseKl => ((0..v).map(|i| xlog(q[i], lq[i], lp[i])).sum(), (0..v).map(|i| if q[i] == 0.0 { 0.0 } else { lq[i] - lp[i] }).collect()),
        Divergence::Jsd { beta } => {
            let b = beta as f64;
            let lm: Vec<f64> = (0..v).map(|i| lae(lp[i] + b.ln(), lq[i] + (1.0 - b).ln())).collect();
            ((0..v).map(|i| b * xlog(p[i], lp[i], lm[i]) + (1.0 - b) * xlog(q[i], lq[i], lm[i])).sum(),
             (0..v).map(|i| if q[i] == 0.0 { 0.0 } else { (1.0 - b) * (lq[i] - lm[i]) }).collect())
        }
        Divergence::SkewForwardKl { skew } => {
            let l = skew as f64;
            let lm: Vec<f64> = (0..v).map(|i| lae(lp[i] + l.ln(), lq[i] + (1.0 - l).ln())).collect();
            ((0..v).map(|i| xlog(p[i], lp[i], lm[i])).sum(), (0..v).map(|i| if q[i] == 0.0 || p[i] == 0.0 { 0.0 } else { -(1.0 - l) * (lp[i] - lm[i]).exp() }).collect())
        }
        Divergence::SkewReverseKl { skew } => {
            let l = skew as f64;
            let lm: Vec<f64> = (0..v).map(|i| lae(lq[i] + l.ln(), lp[i] + (1.0 - l).ln())).collect();
            ((0..v).map(|i| xlog(q[i], lq[i], lm[i])).sum(), (0..v).map(|i| if q[i] == 0.0 { 0.0 } else { lq[i] - lm[i] - l * (lq[i] - lm[i]).exp() }).collect())
        }
        Divergence::Akl { head_mass } => {
            // The head from the f32 probabilities (the kernels' precision): a stable sort by p
            // descending, the cumulative mass in f64 against head_mass + 2^-20 (the whole row
            // from 1 up).
            let pf: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&i, &j| pf[j].partial_cmp(&pf[i]).unwrap());
            let h = head_mass as f64 + 2f64.powi(-20);
            let (mut head, mut c) = (vec![false; v], 0.0f64);
            for (k, &i) in order.iter().enumerate() {
                c += pf[i] as f64;
                head[i] = c <= h || k == 0 || h >= 1.0;
            }
            let gh: f64 = (0..v).filter(|&i| head[i]).map(|i| (p[i] - q[i]).abs()).sum();
            let gt: f64 = (0..v).filter(|&i| !head[i]).map(|i| (p[i] - q[i]).abs()).sum();
            let (wh, wt) = if gh + gt > 0.0 { (gh / (gh + gt), gt / (gh + gt)) } else { (0.5, 0.5) };
            let part = |w: f64, x: f64| if w == 0.0 { 0.0 } else { w * x };
            let fwd: f64 = (0..v).map(|i| xlog(p[i], lp[i], lq[i])).sum();
            let rev: f64 = (0..v).map(|i| xlog(q[i], lq[i], lp[i])).sum();
            ((part(wh, fwd) + part(wt, rev)),
             (0..v).map(|i| if q[i] == 0.0 { 0.0 } else { -wh * p[i] / q[i] + part(wt, lq[i] - lp[i] + 1.0) }).collect())
        }
        Divergence::Tvd => ((0..v).map(|i| 0.5 * (p[i] - q[i]).abs()).sum(), (0..v).map(|i| 0.5 * (q[i] - p[i]).signum() * ((q[i] - p[i]) != 0.0) as i32 as f64).collect()),
    };
    if loss == f64::INFINITY {
        return (loss, vec![0.0; v]);
    }
    let s: f64 = (0..v).map(|i| q[i] * g[i]).sum();
    (loss, (0..v).map(|i| q[i] * (g[i] - s) / t).collect())
}

/// How far AKL may be from [`reference`] because its weights come from the gaps `|p − q|` of
/// f32 probabilities (as defined): each f32 `p`, `q` is off by a few ulp, ≲ 2e-7·(p + q), so
/// the weights are off by up to `δw ≈ (4e-7 + 2e-6·G) / G` (`G = Σ|p − q|`, the second term for
/// f32 lane sums), which moves the loss by `δw·|KL(p‖q) − KL(q‖p)|` and the gradient by
/// `δw·|∇KL(p‖q) − ∇KL(q‖p)|`. Rows where `p ≈ q` to f32 precision (G ~ 1e-7) have weights
/// that are rounding noise, and this slack is then the whole difference of the two KLs (small
/// in absolute terms, as both KLs are).
pub fn akl_slack(zs: &[f32], zt: &[f32], t: f64) -> (f64, Vec<f64>) {
    let (f, gf) = reference(Divergence::ForwardKl, zs, zt, t);
    let (r, gr) = reference(Divergence::ReverseKl, zs, zt, t);
    // G = 2 · TVD.
    let g = 2.0 * reference(Divergence::Tvd, zs, zt, t).0;
    let dw = if g == 0.0 { 0.0 } else { ((4e-7 + 2e-6 * g) / g).min(1.0) };
    let slack = if f.is_finite() && r.is_finite() { dw * (f - r).abs() } else { 0.0 };
    (slack, gf.iter().zip(&gr).map(|(a, b)| dw * (a - b).abs()).collect())
}

/// One `dense_loss` call on contiguous rows; the outputs start as 9 (loss) and 7 (gradient),
/// so every entry must be written.
pub fn call<E: Elem>(cfg: &DenseConfig, zs: &[E], zt: &[E], rows: usize, labels: Option<(&[i64], i64)>, isa: Isa, threads: usize) -> kdfast_core::Result<(Vec<f32>, Vec<E>)> {
    let cols = zs.len() / rows;
    let mut loss = vec![9.0; rows];
    let mut seven = [E::zero()];
    E::store(&[7.0], &mut seven);
    let mut grad = vec![seven[0]; rows * cfg.grad_cols];
    let (s, t) = (Rows::new(zs, rows, cols, cols, "student")?, Rows::new(zt, rows, cols, cols, "teacher")?);
    dense_loss(s, t, labels, cfg, &mut loss, Some(&mut grad), isa, threads)?;
    Ok((loss, grad))
}

/// Losses and gradients of `div` at temperature `t`, without masking or scaling.
#[allow(clippy::too_many_arguments)]
pub fn run<E: Elem>(div: Divergence, zs: &[E], zt: &[E], rows: usize, cols: usize, t: f32, isa: Isa, threads: usize) -> (Vec<f32>, Vec<E>) {
    let cfg = DenseConfig { divergence: div, temperature: t, t2_scale: false, grad_scale: 1.0, grad_cols: cols };
    call(&cfg, zs, zt, rows, None, isa, threads).unwrap()
}
