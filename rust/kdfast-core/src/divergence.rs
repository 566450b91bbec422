//! The per-element math of each divergence, in terms of log-probabilities.
//!
//! For one row let `lq = log q` (student) and `lp = log p` (teacher) at temperature T. Every
//! loss here is `ℓ = Σ_i t_i` and its gradient w.r.t. the scaled student logits `a = z_s / T` is
//!
//! ```text
//!     ∂ℓ/∂a_j = q_j g_j − q_j S,   S = Σ_i q_i g_i,   g_i = ∂ℓ/∂q_i
//! ```
//!
//! (the softmax Jacobian). [`Div::terms`] takes `lq`, `lp`, `d = log q − log p`, `q` and `p`;
//! mixture log-ratios are written in terms of `d` only (e.g. for
//! `m = βp + (1−β)q`, `log q − log m = −ln(β e^{−d} + 1 − β)`).
//! [`Div::terms`] returns `t_i`, `q_i g_i` and `q_i`; the kernel sums
//! `t` and `q g` in one pass and writes the gradient in a second one, or in the same pass when
//! `S` is known in closed form ([`Div::KNOWN_S`]). Every term is guarded so that entries with
//! zero probability (`-inf` logits, or log-probabilities below the float32 `exp` range)
//! contribute exactly 0 instead of `0 · ∞ = NaN`; mixtures are formed in log space.

use crate::math::Math;

/// One element's contribution: loss term and `q·g`.
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    pub loss: f32,
    pub qg: f32,
}

/// A divergence between the teacher `p` and the student `q`.
pub trait Div: Copy + Send + Sync {
    /// `S = Σ q_i g_i` when it is a constant (so the gradient is written in the loss pass).
    const KNOWN_S: Option<f32>;
    fn terms<M: Math>(&self, lq: f32, lp: f32, d: f32, q: f32, p: f32) -> Terms;
}

/// `a · b` with `a = 0 ⇒ 0` (so `0 · ±∞` and `0 · NaN` from `-inf − -inf` vanish).
#[inline(always)]
fn xmul(a: f32, b: f32) -> f32 {
    if a == 0.0 {
        0.0
    } else {
        a * b
    }
}

/// `KL(p‖q) = Σ p (log p − log q)`; `∂/∂a = q − p`.
#[derive(Clone, Copy, Debug)]
pub struct ForwardKl;

impl Div for ForwardKl {
    const KNOWN_S: Option<f32> = Some(-1.0);
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, _q: f32, p: f32) -> Terms {
        Terms { loss: xmul(p, -d), qg: -p }
    }
}

/// `KL(q‖p) = Σ q (log q − log p)`; `g = log q − log p + 1`, so `S = ℓ (+1, which cancels)`.
#[derive(Clone, Copy, Debug)]
pub struct ReverseKl;

impl Div for ReverseKl {
    const KNOWN_S: Option<f32> = None;
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, _p: f32) -> Terms {
        let t = xmul(q, d);
        Terms { loss: t, qg: t }
    }
}

/// Generalised JSD for `0 < β < 1`: `β KL(p‖m) + (1−β) KL(q‖m)`, `m = βp + (1−β)q`;
/// `g = (1−β)(log q − log m)`.
#[derive(Clone, Copy, Debug)]
pub struct Jsd {
    pub beta: f32,
    pub ln_beta: f32,
    pub ln_1m_beta: f32,
}

impl Jsd {
    pub fn new(beta: f32) -> Self {
        Jsd { beta, ln_beta: beta.ln(), ln_1m_beta: (1.0 - beta).ln() }
    }
}

impl Div for Jsd {
    const KNOWN_S: Option<f32> = None;
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, p: f32) -> Terms {
        // log q − log m, and log p − log m = (log q − log m) − d (−ln β where q = 0).
        let rq = -M::log_add_exp(self.ln_beta - d, self.ln_1m_beta);
        let rp = if d == f32::NEG_INFINITY { -self.ln_beta } else { rq - d };
        let tq = xmul(q, rq);
        let tp = xmul(p, rp);
        let w = 1.0 - self.beta;
        Terms { loss: self.beta * tp + w * tq, qg: w * tq }
    }
}

/// Skew forward KL (DistiLLM): `KL(p ‖ λp + (1−λ)q)`; `g = −(1−λ) p / m`.
#[derive(Clone, Copy, Debug)]
pub struct SkewForwardKl {
    pub ln_skew: f32,
    pub one_m_skew: f32,
    pub ln_1m_skew: f32,
}

impl SkewForwardKl {
    pub fn new(skew: f32) -> Self {
        SkewForwardKl { ln_skew: skew.ln(), one_m_skew: 1.0 - skew, ln_1m_skew: (1.0 - skew).ln() }
    }
}

impl Div for SkewForwardKl {
    const KNOWN_S: Option<f32> = None;
    #[inline(always)]
    fn terms<M: Math>(&self, lq: f32, _lp: f32, d: f32, _q: f32, p: f32) -> Terms {
        // log p − log m = −ln(λ + (1−λ) e^d).
        let rp = -M::log_add_exp(self.ln_skew, self.ln_1m_skew + d);
        // q p / m ≤ p / (1−λ): bounded, computed in log space. Not negligible where q underflows
        // but m ≈ (1−λ) q (small λ), so only a q that is exactly 0 (-inf logit) is skipped.
        let qpm = M::exp(lq + rp);
        let qg = if lq == f32::NEG_INFINITY { 0.0 } else { -self.one_m_skew * qpm };
        Terms { loss: xmul(p, rp), qg }
    }
}

/// Skew reverse KL: `KL(q ‖ λq + (1−λ)p)`; `g = log q − log m + 1 − λ q / m`.
#[derive(Clone, Copy, Debug)]
pub struct SkewReverseKl {
    pub skew: f32,
    pub ln_skew: f32,
    pub ln_1m_skew: f32,
}

impl SkewReverseKl {
    pub fn new(skew: f32) -> Self {
        SkewReverseKl { skew, ln_skew: skew.ln(), ln_1m_skew: (1.0 - skew).ln() }
    }
}

impl Div for SkewReverseKl {
    const KNOWN_S: Option<f32> = None;
    #[inline(always)]
    fn terms<M: Math>(&self, lq: f32, _lp: f32, d: f32, q: f32, _p: f32) -> Terms {
        // log q − log m = −ln(λ + (1−λ) e^{−d}).
        let rq = -M::log_add_exp(self.ln_skew, self.ln_1m_skew - d);
        let t = xmul(q, rq);
        // q² / m ≤ q / λ: bounded, in log space; zero when λ = 0.
        let q2m = if q == 0.0 || self.skew == 0.0 { 0.0 } else { M::exp(lq + rq) };
        Terms { loss: t, qg: t - self.skew * q2m }
    }
}

/// Total variation distance `½ Σ |p − q|`; `g = ½ sign(q − p)`.
#[derive(Clone, Copy, Debug)]
pub struct Tvd;

impl Div for Tvd {
    const KNOWN_S: Option<f32> = None;
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, _d: f32, q: f32, p: f32) -> Terms {
        let diff = q - p;
        let half_sign = if diff > 0.0 {
            0.5
        } else if diff < 0.0 {
            -0.5
        } else {
            0.0
        };
        Terms { loss: 0.5 * diff.abs(), qg: q * half_sign }
    }
}

/// The divergences, with their parameters, as chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    /// β = 0 and β = 1 are forward and reverse KL exactly (the GKD/TRL convention).
    Jsd { beta: f32 },
    SkewForwardKl { skew: f32 },
    SkewReverseKl { skew: f32 },
    Tvd,
}

impl Divergence {
    /// Parse a loss name (`"forward_kl"`, `"jsd"`, ...) with its parameter (β or skew).
    pub fn from_name(name: &str, param: f32) -> crate::Result<Self> {
        use crate::KdError::InvalidArgument;
        let d = match name {
            "forward_kl" => Divergence::ForwardKl,
            "reverse_kl" => Divergence::ReverseKl,
            "jsd" => Divergence::Jsd { beta: param },
            "skew_forward_kl" => Divergence::SkewForwardKl { skew: param },
            "skew_reverse_kl" => Divergence::SkewReverseKl { skew: param },
            "tvd" => Divergence::Tvd,
            other => {
                return Err(InvalidArgument {
                    name: "loss",
                    expected: "one of forward_kl, reverse_kl, jsd, skew_forward_kl, \
                               skew_reverse_kl, tvd"
                        .into(),
                    got: format!("{other:?}"),
                })
            }
        };
        d.validate()?;
        Ok(d)
    }

    /// Check the parameter ranges: β ∈ [0, 1], skew ∈ [0, 1).
    pub fn validate(&self) -> crate::Result<()> {
        use crate::KdError::InvalidArgument;
        match *self {
            Divergence::Jsd { beta } if !(0.0..=1.0).contains(&beta) => Err(InvalidArgument {
                name: "beta",
                expected: "a number in [0, 1]".into(),
                got: format!("{beta}"),
            }),
            Divergence::SkewForwardKl { skew } | Divergence::SkewReverseKl { skew }
                if !(0.0..1.0).contains(&skew) =>
            {
                Err(InvalidArgument {
                    name: "skew",
                    expected: "a number in [0, 1)".into(),
                    got: format!("{skew}"),
                })
            }
            _ => Ok(()),
        }
    }
}
