//! The divergences of a sparse loss between category distributions (used by [`crate::sparse`]).
//!
//! Top-k targets give the teacher a distribution `P` over *categories*: the listed ids, plus
//! (tail bucket) one category for the rest of the vocabulary. The student's `Q` over the same
//! categories is `q_i` for a listed id and `q_tail = Σ_{unlisted} q_j` for the bucket
//! ([`SparseMode::Bucket`]), or the student renormalised over the listed ids,
//! `Q̃_i = q_i / Σ_listed q` ([`SparseMode::Renorm`]). The loss is the dense divergence applied
//! to these entries, `ℓ = Σ_c t_c`, with the per-element math of [`crate::divergence`]:
//! [`Div::terms`] on `lq_c`, `lp_c`, `d_c = lq_c − lp_c`, `Q_c`, `P_c`.
//!
//! **Gradient.** With `g_c = ∂ℓ/∂Q_c` and `a = z_s / T`, `∂ℓ/∂a_j = q_j (G_j − S)`,
//! `S = Σ_c g_c Q_c`, where `G_j = g_c` for `j` listed as `c` and `G_j = g_tail` for an unlisted
//! `j`. In the deviation form of [`crate::divergence`] (`g = c + h`, and `Σ_c Q_c = 1`) this is
//! `q_j (h_j − H)`, `H = Σ_c Q_c h_c = Σ_c qg_c`, so
//!
//! * a listed id gets `qg_c − Q_c H` ([`CatGrad::listed`]);
//! * every unlisted column gets `q_j (h_tail − H)`: one constant times `q_j`
//!   ([`CatGrad::tail_factor`]), which the kernel's gradient pass writes like the dense part of
//!   the forward-KL gradient;
//! * renormalised: `q̃_j (h_j − H̃)` over the listed ids and exactly 0 elsewhere.
//!
//! `h_tail` needs no division by a `q_tail` that may underflow: every [`Div::terms`] returns
//! `qg = Q · h(d)`, homogeneous of degree 1 in `(Q, P)` at fixed `d`, so `h(d)` is `qg` at
//! `(Q, P) = (1, e^{−d})`.
//!
//! **+inf.** As in [`crate::divergence`]: a KL whose first argument has mass on a category where
//! the second has none (forward: `P_c > 0 = Q_c`; reverse: `Q_c > 0 = P_c`, e.g. a tail
//! bucket with `tail_logprob = -inf` while the student has mass outside the listed ids) makes
//! the row `+inf`; the caller then writes a zero gradient row. Mixtures with `β ∈ (0, 1)` are
//! finite. Categories with no mass on either side contribute exactly 0.

use crate::divergence::{Div, Divergence, ForwardKl, Jsd, ReverseKl, Terms, Tvd};
use crate::error::{KdError, Result};
use crate::math::Math;
use crate::sparse::SparseMode;

/// What a sparse loss computes per row, as chosen from the loss name and the mode.
#[derive(Clone, Copy, Debug)]
pub enum CatLoss {
    /// `sparse_kl`: forward KL against the student's full-vocabulary `log q` (bucket, renorm,
    /// sampled). In bucket mode this is also forward KL over the k + 1 categories.
    Full,
    /// Forward KL over the renormalised categories, `KL(P̃‖Q̃)` (renorm `jsd` at β = 0).
    Forward,
    /// `KL(Q‖P)` over the categories (`reverse_kl`, `jsd` at β = 1).
    Reverse,
    /// `β KL(P‖M) + (1−β) KL(Q‖M)`, `M = βP + (1−β)Q`, for `0 < β < 1`.
    Jsd(Jsd),
    /// `½ Σ_c |P_c − Q_c|`.
    Tvd,
}

impl CatLoss {
    /// The row computation of `divergence` in `mode`: `jsd` at β ∈ {0, 1} is exactly forward /
    /// reverse KL over the same categories; sampled targets allow forward KL only (the one
    /// unbiased estimate); the skew losses have no sparse form.
    pub fn new(divergence: Divergence, mode: SparseMode) -> Result<CatLoss> {
        divergence.validate()?;
        let bad = |expected: &str| {
            Err(KdError::InvalidArgument { name: "loss", expected: expected.into(), got: format!("{divergence:?} with mode {mode:?}") })
        };
        Ok(match (divergence, mode) {
            (Divergence::ForwardKl, _) => CatLoss::Full,
            (_, SparseMode::Sampled) => {
                return bad("forward_kl for sampled targets (Σ w (log p − log q) is the only unbiased estimate)")
            }
            (Divergence::Jsd { beta: 0.0 }, SparseMode::Bucket) => CatLoss::Full,
            (Divergence::Jsd { beta: 0.0 }, SparseMode::Renorm) => CatLoss::Forward,
            (Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 }, _) => CatLoss::Reverse,
            (Divergence::Jsd { beta }, _) => CatLoss::Jsd(Jsd::new(beta)),
            (Divergence::Tvd, _) => CatLoss::Tvd,
            _ => return bad("forward_kl, reverse_kl, jsd or tvd for sparse targets"),
        })
    }
}

/// One category of a row: the student's and the teacher's log-probabilities, and `P_c`.
#[derive(Clone, Copy, Debug)]
pub struct Category {
    pub lq: f64,
    pub lp: f64,
    pub p: f64,
}

/// The loss of a row's categories and the pieces of its gradient w.r.t. `a = z_s / T`.
#[derive(Clone, Debug)]
pub struct CatGrad {
    /// `Σ_c t_c` (`+inf` under the +inf rule).
    pub loss: f64,
    /// `h_tail − H = h_tail Σ_listed Q − Σ_listed qg`: the factor of `q_j` on every unlisted
    /// column (0 without a tail bucket, or when the student has no mass outside the listed ids).
    pub tail_factor: f32,
    /// `qg_c − Q_c H` for each listed category, in order.
    pub listed: Vec<f64>,
}

/// Loss and gradient pieces of `cat` (not [`CatLoss::Full`]) over the `listed` categories and
/// an optional tail bucket.
pub fn category_loss<M: Math>(cat: CatLoss, listed: &[Category], tail: Option<Category>) -> CatGrad {
    match cat {
        CatLoss::Full | CatLoss::Forward => run::<M, _>(ForwardKl, listed, tail),
        CatLoss::Reverse => run::<M, _>(ReverseKl, listed, tail),
        CatLoss::Jsd(j) => run::<M, _>(j, listed, tail),
        CatLoss::Tvd => run::<M, _>(Tvd, listed, tail),
    }
}

/// `d = lq − lp`, 0 where both are `-inf`.
fn deviation(lq: f64, lp: f64) -> f64 {
    let d = lq - lp;
    if d.is_nan() {
        0.0
    } else {
        d
    }
}

fn terms<M: Math, D: Div>(div: &D, c: &Category) -> Terms {
    let d = deviation(c.lq, c.lp);
    div.terms::<M>(c.lq as f32, c.lp as f32, d as f32, c.lq.exp() as f32, c.p as f32)
}

fn run<M: Math, D: Div>(div: D, listed: &[Category], tail: Option<Category>) -> CatGrad {
    let mut loss = 0.0f64;
    let (mut qg_listed, mut q_listed) = (0.0f64, 0.0f64);
    let mut qg = Vec::with_capacity(listed.len());
    for c in listed {
        let t = terms::<M, D>(&div, c);
        loss += t.loss as f64;
        qg_listed += t.qg as f64;
        q_listed += c.lq.exp();
        qg.push(t.qg as f64);
    }
    // The tail's share of H is Q_tail · h_tail with the h_tail written to the unlisted columns,
    // so that h_tail − H = h_tail · Σ_listed Q − Σ_listed qg: no cancellation when Q_tail ≈ 1.
    let (mut h_sum, mut tail_factor) = (qg_listed, 0.0f32);
    if let Some(c) = tail {
        loss += terms::<M, D>(&div, &c).loss as f64;
        if c.lq > f64::NEG_INFINITY {
            let d = deviation(c.lq, c.lp);
            let h = div.terms::<M>(0.0, -d as f32, d as f32, 1.0, (-d).exp() as f32).qg as f64;
            h_sum += c.lq.exp() * h;
            tail_factor = (h * q_listed - qg_listed) as f32;
        }
    }
    let listed = listed.iter().zip(qg).map(|(c, qg)| qg - c.lq.exp() * h_sum).collect();
    CatGrad { loss, tail_factor, listed }
}
