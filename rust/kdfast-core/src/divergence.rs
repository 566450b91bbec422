//! The per-element math of each divergence, in terms of log-probabilities.
//!
//! For one row let `lq = log q` (student) and `lp = log p` (teacher) at temperature T. Every
//! loss here is `ℓ = Σ_i t_i` and its gradient w.r.t. the scaled student logits `a = z_s / T` is
//! the softmax Jacobian applied to `g_i = ∂ℓ/∂q_i`:
//!
//! ```text
//!     ∂ℓ/∂a_j = q_j (g_j − S),   S = Σ_i q_i g_i
//! ```
//!
//! **Deviation form.** Where `p ≈ q` the `g_i` of most losses are nearly one constant, and
//! `g_j − S` is a difference of nearly equal numbers. Writing `g_i = c + h_i` with a constant `c`
//! gives `g_j − S = h_j − Σ_i q_i h_i` (as `Σ q = 1`), so [`Div::terms`] returns `q_i h_i`
//! with the constant taken out, and `h` is formed from quantities that are small when `p ≈ q`:
//! `d = log q − log p` and `D = p − q`. `D` comes from [`p_minus_q`] as `−p·expm1(d)` or
//! `q·expm1(−d)`, the larger probability as the base, so it keeps its relative precision when
//! `p ≈ q` (the kernel forms `d` from the shifted logits, see [`crate::dense`]), is exactly `p`
//! or `−q` where the other side is 0, and never forms `∞ · 0`.
//!
//! [`Div::terms`] takes `lq`, `lp`, `d`, `q` and `p` (`d = 0` where both are `-inf`) and
//! returns `t_i` and `q_i h_i`; the kernel sums both in one pass and writes the gradient
//! `q_j h_j − q_j Σ q_i h_i` in a second one, or in the same pass when `S` is known in closed
//! form ([`Div::CLOSED`]). Mixture log-ratios are written in terms of `d` only (e.g. for
//! `m = βp + (1−β)q`, `log q − log m = −ln(β e^{−d} + 1 − β)`), formed in log space.
//!
//! Zero probabilities: entries with `q = 0` or `p = 0` (`-inf` logits, or log-probabilities
//! below the float32 `exp` range) contribute exactly 0 instead of `0 · ∞ = NaN`, except where
//! the loss is truly infinite: forward KL where the teacher is alive (`lp > -inf`) and the
//! student's logit is `-inf`, reverse KL where the student is alive and the teacher's is
//! `-inf`. This is decided on the log-probabilities (an alive entry may have a `q` that
//! underflowed to 0): its term is `+inf`, and the kernel then gives the row the loss `+inf`
//! and a zero gradient (there is no finite descent direction). Mixtures with a weight in
//! `(0, 1)` are always finite.

use crate::math::Math;

/// One element's contribution: loss term and `q·h` (`h = g − c`, see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    pub loss: f32,
    pub qg: f32,
}

/// The divergences whose loss and gradient follow from the per-block sums of pass 1, with no
/// per-element loss pass (see `crate::dense`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The general kernel: `terms` per element, then the gradient.
    No,
    /// Forward KL: `ℓ = Σ p (b − a) + (lse_a − lse_b)`, `∂/∂a = q − p`.
    Forward,
    /// Reverse KL: `ℓ = Σ q d`, `∂/∂a = q (d − ℓ)`, `d = log q − log p`.
    Reverse,
}

/// A divergence between the teacher `p` and the student `q`.
pub trait Div: Copy + Send + Sync {
    /// Whether the kernel may use a closed form instead of [`Div::terms`].
    const CLOSED: Closed = Closed::No;
    /// Whether [`Div::terms`] reads `lq`, `lp` or `d` (else the kernel passes 0 and does not
    /// read the logits again).
    const USES_D: bool = true;
    /// Whether the loss's teacher is not the teacher input itself but [`Div::teacher`] of
    /// both inputs (TAID's mixture).
    const MIXED_TEACHER: bool = false;
    fn terms<M: Math>(&self, lq: f32, lp: f32, d: f32, q: f32, p: f32) -> Terms;
    /// The scaled teacher logit the loss compares with, from the scaled student logit `a` and
    /// teacher logit `b` (called only when [`Div::MIXED_TEACHER`]).
    #[inline(always)]
    fn teacher(&self, _a: f32, b: f32) -> f32 {
        b
    }
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

/// `D = p − q` from `d = log q − log p`, relative to the larger side:
/// `−p·expm1(d)` where `q ≤ p` (`d ≤ 0`), `q·expm1(−d)` where `q > p`. The `expm1` argument is
/// `−|d| ∈ [−∞, 0]`, so the factor lies in `[−1, 0]`: no overflow, `D = p` exactly where
/// `q = 0`, `D = −q` where `p = 0`, and no cancellation where `p ≈ q`.
#[inline(always)]
pub fn p_minus_q<M: Math>(d: f32, q: f32, p: f32) -> f32 {
    let e = M::expm1(-d.abs());
    if d <= 0.0 {
        -p * e
    } else {
        q * e
    }
}

/// `ln(e^x + e^y)` for `x`, `y` not both infinite, split as `(hi, E, y_is_hi)` with `hi = max(x, y)` and
/// `E = e^{−|x−y|} ∈ [0, 1]`, so `ln(e^x + e^y) = hi + ln(1 + E)`: the mixtures need both the
/// log-ratio and a probability ratio, and the ratio is `1/(1+E)` or `E/(1+E)` times a
/// constant, without a second `exp`. An infinite side gives `E = 0`.
#[inline(always)]
fn lae_parts<M: Math>(x: f32, y: f32) -> (f32, f32, bool) {
    let y_hi = y >= x;
    let (hi, lo) = if y_hi { (y, x) } else { (x, y) };
    (hi, M::exp(lo - hi), y_hi)
}

/// `KL(p‖q) = Σ p (log p − log q)`; `g = −p/q`, `S = −1`, so `∂/∂a = q − p`.
#[derive(Clone, Copy, Debug)]
pub struct ForwardKl;

impl Div for ForwardKl {
    const CLOSED: Closed = Closed::Forward;
    /// Unused by the fused kernel (which needs no per-element `g`); kept for completeness with
    /// the `+inf` rule (`d = −inf`: teacher alive, student `-inf`).
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, p: f32) -> Terms {
        let loss = if d == f32::NEG_INFINITY { f32::INFINITY } else { xmul(p, -d) };
        Terms { loss, qg: -p_minus_q::<M>(d, q, p) }
    }
}

/// `KL(q‖p) = Σ q (log q − log p)`; `g = d + 1`: `c = 1`, `h = d`.
#[derive(Clone, Copy, Debug)]
pub struct ReverseKl;

impl Div for ReverseKl {
    const CLOSED: Closed = Closed::Reverse;
    /// The dense kernel uses the closed form; the sparse category losses use these terms.
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, _p: f32) -> Terms {
        // d = +inf: the student is alive where the teacher is -inf (q may have underflowed).
        let t = xmul(q, d);
        let loss = if d == f32::INFINITY { f32::INFINITY } else { t };
        Terms { loss, qg: t }
    }
}

/// Generalised JSD for `0 < β < 1`: `β KL(p‖m) + (1−β) KL(q‖m)`, `m = βp + (1−β)q`;
/// `g = (1−β)(log q − log m)`: `c = 0`, and `log q − log m = O(d)` is small when `p ≈ q`.
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
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, p: f32) -> Terms {
        // log q − log m = −lae(ln β − d, ln(1−β)) = −(hi + L), and log p − log m = that − d,
        // taken without cancelling d: where ln β − d is the larger term, −ln β − L (an f32
        // `rq − d` there loses ulp(d), 1 % of the loss at |d| ~ 1e5); −ln β where q = 0.
        let (hi, e, c_hi) = lae_parts::<M>(self.ln_beta - d, self.ln_1m_beta);
        let l = M::ln_1p(e);
        let rq = -(hi + l);
        let rp = if d == f32::NEG_INFINITY {
            -self.ln_beta
        } else if c_hi {
            rq - d
        } else {
            -self.ln_beta - l
        };
        let tq = xmul(q, rq);
        let tp = xmul(p, rp);
        let w = 1.0 - self.beta;
        Terms { loss: self.beta * tp + w * tq, qg: w * tq }
    }
}

/// Skew forward KL (DistiLLM) for `0 < λ < 1`: `KL(p ‖ m)`, `m = λp + (1−λ)q`.
///
/// `g = −(1−λ) p/m`, and `p/m = 1 + (1−λ)(p − q)/m`, so `c = −(1−λ)` and
/// `q h = −(1−λ)² (q/m) D`. With `log p − log m = −ln(λ + (1−λ)e^d) = −(hi + ln(1+E))`
/// ([`lae_parts`] of `ln λ` and `ln(1−λ) + d`), `q/m = {1 or E} / ((1−λ)(1+E))`, which is at
/// most `1/(1−λ)`. (λ = 0 is forward KL, which `dense_loss` runs instead.)
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
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, p: f32) -> Terms {
        let (hi, e, y_hi) = lae_parts::<M>(self.ln_skew, self.ln_1m_skew + d);
        let rp = -(hi + M::ln_1p(e));
        let q_over_m = if y_hi { 1.0 } else { e } / (self.one_m_skew * (1.0 + e));
        let qh = -(self.one_m_skew * self.one_m_skew) * q_over_m * p_minus_q::<M>(d, q, p);
        Terms { loss: xmul(p, rp), qg: qh }
    }
}

/// Skew reverse KL for `0 < λ < 1`: `KL(q ‖ m)`, `m = λq + (1−λ)p`.
///
/// `g = log q − log m + 1 − λq/m`, and `λq/m = λ + λ(1−λ)(q − p)/m`, so `c = 1 − λ` and
/// `q h = q r_q + (1−λ)(λq/m) D` with `r_q = log q − log m = −(hi + ln(1+E))` ([`lae_parts`]
/// of `ln λ` and `ln(1−λ) − d`) and `λq/m = {1 or E}/(1+E) ≤ 1`. (λ = 0 is reverse KL, which
/// `dense_loss` runs instead.)
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
    #[inline(always)]
    fn terms<M: Math>(&self, _lq: f32, _lp: f32, d: f32, q: f32, p: f32) -> Terms {
        let (hi, e, y_hi) = lae_parts::<M>(self.ln_skew, self.ln_1m_skew - d);
        let rq = -(hi + M::ln_1p(e));
        let t = xmul(q, rq);
        let lam_q_over_m = if y_hi { e } else { 1.0 } / (1.0 + e);
        let qh = t + (1.0 - self.skew) * lam_q_over_m * p_minus_q::<M>(d, q, p);
        Terms { loss: t, qg: qh }
    }
}

/// Total variation distance `½ Σ |p − q|`; `g = ½ sign(q − p)`.
#[derive(Clone, Copy, Debug)]
pub struct Tvd;

impl Div for Tvd {
    const USES_D: bool = false;
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

/// TAID (Shing et al., ICLR 2025) for `0 < t < 1`: forward KL against the mixed teacher
/// `p_t = softmax(m / T)`, `m = (1 − t)·sg(z_s) + t·z_t`, so `∂/∂a = q − p_t` (the student
/// inside `m` is a constant). The kernel forms `m / T = (1 − t)·a + t·b` from each loaded block
/// of the scaled logits (no `[N, V]` mixture), in f32, the same operations on every
/// instruction set. With both weights positive a `-inf` on either side gives `-inf` and never
/// NaN (`0 · (−inf)` would need `t ∈ {0, 1}`, which `dense_loss` runs as a zero loss and as
/// forward KL). Where the student is `-inf` so is `m`: the row is always finite, except when
/// `m` is `-inf` everywhere (no id finite in both inputs), which the kernel makes an `+inf` row.
#[derive(Clone, Copy, Debug)]
pub struct Taid {
    pub t: f32,
    pub one_m_t: f32,
}

impl Taid {
    pub fn new(t: f32) -> Self {
        Taid { t, one_m_t: 1.0 - t }
    }
}

impl Div for Taid {
    const CLOSED: Closed = Closed::Forward;
    const MIXED_TEACHER: bool = true;
    #[inline(always)]
    fn terms<M: Math>(&self, lq: f32, lp: f32, d: f32, q: f32, p: f32) -> Terms {
        ForwardKl.terms::<M>(lq, lp, d, q, p)
    }
    #[inline(always)]
    fn teacher(&self, a: f32, b: f32) -> f32 {
        self.one_m_t * a + self.t * b
    }
}

/// Adaptive KL (Wu et al., 2024): `ℓ = w_h·KL(p‖q) + w_t·KL(q‖p)`, with `w_h`, `w_t` the
/// shares of `Σ|p − q|` on the teacher's head and tail (the head: the ids in order of `p`
/// descending, lower id first, whose cumulative mass up to and including themselves is at most
/// `head_mass`, and always the first). The weights are constants for the gradient:
///
/// ```text
///     ∂ℓ/∂a = w_h·(q − p) + w_t·q·(d − S),   d = log q − log p,   S = Σ q d = KL(q‖p)
/// ```
///
/// which is the forward KL gradient (`S = −1`, in closed form) plus the reverse KL one
/// (`h = d`), each as in its own kernel. The head is found by the kernel (`dense::head`);
/// [`Akl::terms`] gives an element's share of the rest. A component whose weight is exactly 0
/// contributes exactly 0, so an infinite KL with a zero weight leaves the row finite.
#[derive(Clone, Copy, Debug)]
pub struct Akl {
    pub head_mass: f32,
}

/// One element's contribution to [`Akl`]: the terms of both KLs and `q·d` (the reverse part's
/// `q h`, stored for the gradient).
#[derive(Clone, Copy, Debug)]
pub struct AklTerms {
    pub fwd: f32,
    pub rev: f32,
    pub qd: f32,
}

impl Akl {
    #[inline(always)]
    pub fn terms(&self, d: f32, q: f32, p: f32) -> AklTerms {
        // The +inf of each KL is decided on d (see the module docs): d = −inf where the teacher
        // is alive and the student -inf, d = +inf for the converse (q or p may have underflowed).
        let fwd = if d == f32::NEG_INFINITY { f32::INFINITY } else { xmul(p, -d) };
        let qd = xmul(q, d);
        let rev = if d == f32::INFINITY { f32::INFINITY } else { qd };
        AklTerms { fwd, rev, qd }
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
    /// Adaptive KL with the head's teacher mass `head_mass ∈ [0, 1]`.
    Akl { head_mass: f32 },
    /// TAID with the interpolation `t ∈ [0, 1]`: `t = 1` is forward KL exactly, `t = 0` gives 0.
    Taid { t: f32 },
}

impl Divergence {
    /// Parse a loss name (`"forward_kl"`, `"jsd"`, ...) with its parameter (β, skew,
    /// head_mass or t).
    pub fn from_name(name: &str, param: f32) -> crate::Result<Self> {
        use crate::KdError::InvalidArgument;
        let d = match name {
            "forward_kl" => Divergence::ForwardKl,
            "reverse_kl" => Divergence::ReverseKl,
            "jsd" => Divergence::Jsd { beta: param },
            "skew_forward_kl" => Divergence::SkewForwardKl { skew: param },
            "skew_reverse_kl" => Divergence::SkewReverseKl { skew: param },
            "tvd" => Divergence::Tvd,
            "akl" => Divergence::Akl { head_mass: param },
            "taid" => Divergence::Taid { t: param },
            other => {
                return Err(InvalidArgument {
                    name: "loss",
                    expected: "one of forward_kl, reverse_kl, jsd, skew_forward_kl, \
                               skew_reverse_kl, tvd, akl, taid"
                        .into(),
                    got: format!("{other:?}"),
                })
            }
        };
        d.validate()?;
        Ok(d)
    }

    /// Check the parameter ranges: β ∈ [0, 1], skew ∈ [0, 1), head_mass ∈ [0, 1], t ∈ [0, 1].
    pub fn validate(&self) -> crate::Result<()> {
        // (argument, value, whether 1 is allowed)
        let (name, x, closed) = match *self {
            Divergence::Jsd { beta } => ("beta", beta, true),
            Divergence::SkewForwardKl { skew } | Divergence::SkewReverseKl { skew } => ("skew", skew, false),
            Divergence::Akl { head_mass } => ("head_mass", head_mass, true),
            Divergence::Taid { t } => ("t", t, true),
            Divergence::ForwardKl | Divergence::ReverseKl | Divergence::Tvd => return Ok(()),
        };
        // NaN is in neither range.
        if (0.0..=1.0).contains(&x) && (closed || x < 1.0) {
            return Ok(());
        }
        Err(crate::KdError::InvalidArgument {
            name,
            expected: (if closed { "a number in [0, 1]" } else { "a number in [0, 1)" }).into(),
            got: format!("{x}"),
        })
    }
}
