//! The distillation loss against sparse teacher targets (top-k or sampled ids with their
//! teacher log-probabilities), with its gradient w.r.t. the student logits, fused.
//!
//! Per row, with `a = z_s / T`, `lq = a − lse(a)` the student's full-vocabulary log-softmax,
//! `q = exp(lq)`, and the stored teacher `lp_i` (`p_i = exp(lp_i)`) for the listed ids, the
//! forward KL of `sparse_kl` ([`CatLoss::Full`]) is
//!
//! | mode | ℓ | `∂ℓ/∂a_j` |
//! |---|---|---|
//! | [`SparseMode::Bucket`] | `Σ_i p_i (lp_i − lq_i) + p_tail (lp_tail − lq_tail)` | `q_j M − p_j` (listed), `q_j M − p_tail q_j / q_tail` (others) |
//! | [`SparseMode::Renorm`] | `Σ_i p̃_i (log p̃_i − lq_i)`, `p̃ = p / Σ p` | `q_j − p̃_j [j listed]` |
//! | [`SparseMode::Sampled`] | `Σ_i w_i (lp_i − lq_i)` | `q_j Σ w − Σ_{i: id_i = j} w_i` |
//!
//! `p_tail = exp(tail_logprob)` (or `max(0, 1 − Σ p)` without one; 0 when every id of the
//! vocabulary is listed, so that rounding noise cannot put mass in an empty bucket), `lp_tail = ln p_tail`,
//! `M = Σ p + p_tail` (1 for consistent targets; kept so that the gradient is exactly that of
//! ℓ even when stored log-probs are rounded), and
//! `q_tail = Σ_{j unlisted} q_j` is computed without cancellation: pass 1 masks the listed ids
//! out of the student's online log-sum-exp, so it yields `lse_tail` directly, and
//! `lse = logaddexp(lse_listed, lse_tail)` (the listed `a_i` are O(k) gathers), `lq_tail =
//! lse_tail − lse`. The unlisted gradient is written as `exp(a_j − lse) − exp((a_j − lse_tail)
//! + lp_tail)`, finite even when `q_tail` underflows. Terms with zero teacher mass are 0.
//!
//! The other losses of top-k targets (`reverse_kl`, `jsd`, `tvd`; [`SparseConfig::divergence`])
//! are the dense divergence over the same categories — the k ids and the tail bucket, or the k
//! ids with the student renormalised over them too, `Q̃ = q_K / Σ_K q` — computed in
//! [`crate::categories`] from the same two statistics (`lse`, `lse_tail`) and the k gathers.
//!
//! Passes per row: (1) the student's log-sum-exp over blocks of [`BLOCK`] columns
//! (SIMD-dispatched, as in [`crate::dense`]); (2), only when a gradient is requested, one pass
//! writing `q_j · c` (or the bucket form) for every column, with the listed ids fixed up inside
//! the block before it is stored. The ids of a row are sorted once (O(k log k)).
//!
//! Conventions: slots with id −1 are ignored; an id outside `[0, V)` is an error. Duplicated ids
//! are an error for top-k targets (a category cannot have two teacher probabilities) and are
//! allowed for sampled targets, where each slot contributes its own term (equivalent to summing
//! their weights), so raw draws with weight `1/N` each may be passed as they are. Sampled slots
//! with weight 0 are ignored; a positive weight needs a finite log-probability. A renormalised
//! row whose listed teacher mass is 0 contributes 0 (and no gradient); one where the student
//! is `-inf` at every listed id (so `Q̃` is undefined) is an error for the losses that
//! renormalise the student. A row whose loss is `+inf` (a KL with mass against none, see
//! [`crate::categories`]; forward KL: a listed id or the tail with teacher mass where the
//! student has none) gets a zero gradient row, as in [`crate::dense`]. Masking by labels,
//! `t2_scale` and `grad_scale` are as in [`crate::dense`].

use crate::categories::{category_loss, CatGrad, CatLoss, Category};
use crate::dense::{Rows, BLOCK};
use crate::divergence::Divergence;
use crate::elem::Elem;
use crate::error::{check_temperature, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{LseStats, LANES};
use crate::threads;

/// How the teacher mass outside the listed ids is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparseMode {
    /// Top-k targets, KL over k + 1 categories (the listed ids plus one tail bucket).
    Bucket,
    /// Top-k targets renormalised to sum to 1.
    Renorm,
    /// Sampled targets with weights (Random-Sampling KD).
    Sampled,
}

impl SparseMode {
    /// `"bucket" | "renorm" | "sampled"`.
    pub fn from_name(name: &str) -> Result<SparseMode> {
        Ok(match name {
            "bucket" => SparseMode::Bucket,
            "renorm" => SparseMode::Renorm,
            "sampled" | "sample" => SparseMode::Sampled,
            _ => {
                return Err(KdError::InvalidArgument {
                    name: "tail",
                    expected: "\"bucket\", \"renorm\" (top-k targets) or \"sampled\"".into(),
                    got: format!("{name:?}"),
                })
            }
        })
    }
}

/// Sparse teacher targets of `rows` rows with `k` slots each, all contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Targets<'a> {
    /// `[rows, k]` vocabulary ids, −1 for an unused slot.
    pub ids: &'a [i64],
    /// `[rows, k]` teacher log-probabilities (normalised over the full vocabulary).
    pub logprobs: &'a [f32],
    /// `[rows, k]` weights of sampled targets (required for [`SparseMode::Sampled`] only).
    pub weights: Option<&'a [f32]>,
    /// `[rows]` log of the teacher mass outside the listed ids (used by [`SparseMode::Bucket`]).
    pub tail_logprob: Option<&'a [f32]>,
    pub rows: usize,
    pub k: usize,
}

/// Options of a sparse loss call.
#[derive(Clone, Copy, Debug)]
pub struct SparseConfig {
    pub mode: SparseMode,
    /// The loss between the category distributions: [`Divergence::ForwardKl`] (`sparse_kl`, every
    /// mode), or for top-k targets [`Divergence::ReverseKl`], [`Divergence::Jsd`] or
    /// [`Divergence::Tvd`] (see [`CatLoss::new`]).
    pub divergence: Divergence,
    /// The student's temperature T > 0.
    pub temperature: f32,
    /// Multiply the loss (and gradient) by T².
    pub t2_scale: bool,
    /// Extra factor on the gradient only (e.g. 1 / D of a mean reduction).
    pub grad_scale: f32,
    /// Columns of the student's gradient row (≥ V); the excess is zero-filled.
    pub grad_cols: usize,
}

/// Per-row losses (and optionally the student-logit gradient) against sparse targets; the
/// arguments are as in [`crate::dense::dense_loss`].
#[allow(clippy::too_many_arguments)]
pub fn sparse_loss<S: Elem>(
    student: Rows<S>,
    targets: &Targets,
    labels: Option<(&[i64], i64)>,
    cfg: &SparseConfig,
    loss_out: &mut [f32],
    grad_out: Option<&mut [S]>,
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    validate(&student, targets, labels, cfg, loss_out, grad_out.as_deref())?;
    let cat = CatLoss::new(cfg.divergence, cfg.mode)?;
    let t = cfg.temperature;
    let loss_scale = if cfg.t2_scale { t * t } else { 1.0 };
    let p = RowParams { mode: cfg.mode, cat, inv_t: 1.0 / t, loss_scale, grad_scale: cfg.grad_scale * loss_scale / t };
    let masked = |r: usize| labels.is_some_and(|(l, ig)| l[r] == ig);
    let body = |r: usize, loss: &mut f32, grad: Option<&mut [S]>| -> Result<()> {
        if masked(r) {
            *loss = 0.0;
            if let Some(g) = grad {
                g.fill(S::zero());
            }
            return Ok(());
        }
        let s_row = student.row(r);
        let Some(rt) = RowTargets::new(targets, r, cfg.mode, s_row, p.inv_t)? else {
            // No teacher mass to match (renormalised row with Σ p = 0).
            *loss = 0.0;
            if let Some(g) = grad {
                g.fill(S::zero());
            }
            return Ok(());
        };
        *loss = isa.run(RowJob { p, s_row, rt: &rt, grad, row: r })?;
        Ok(())
    };
    threads::for_each_row(loss_out, grad_out, cfg.grad_cols, num_threads, body)
}

fn validate<S: Elem>(
    student: &Rows<S>,
    targets: &Targets,
    labels: Option<(&[i64], i64)>,
    cfg: &SparseConfig,
    loss_out: &[f32],
    grad_out: Option<&[S]>,
) -> Result<()> {
    check_temperature(cfg.temperature)?;
    let n = student.rows;
    let mismatch = |what: String| Err(KdError::ShapeMismatch { what });
    if student.cols == 0 {
        return mismatch("student_logits has an empty vocabulary".into());
    }
    if targets.rows != n || loss_out.len() != n {
        return mismatch(format!("student has {n} rows, targets {}, loss output {}", targets.rows, loss_out.len()));
    }
    let slots = n.checked_mul(targets.k);
    for (name, len) in [("indices", Some(targets.ids.len())), ("logprobs", Some(targets.logprobs.len())), ("weights", targets.weights.map(<[f32]>::len))] {
        if let Some(len) = len {
            if Some(len) != slots {
                return mismatch(format!("targets.{name} has {len} elements for {n} rows of {} slots", targets.k));
            }
        }
    }
    if let Some(t) = targets.tail_logprob {
        if t.len() != n {
            return mismatch(format!("targets.tail_logprob has {} entries for {n} rows", t.len()));
        }
    }
    if (cfg.mode == SparseMode::Sampled) != targets.weights.is_some() {
        return Err(KdError::InvalidArgument {
            name: "targets.weights",
            expected: "weights exactly for sampled targets".into(),
            got: format!("{} with mode {:?}", if targets.weights.is_some() { "weights" } else { "no weights" }, cfg.mode),
        });
    }
    if let Some((l, _)) = labels {
        if l.len() != n {
            return mismatch(format!("labels has {} entries for {n} rows", l.len()));
        }
    }
    if let Some(g) = grad_out {
        if cfg.grad_cols < student.cols || Some(g.len()) != n.checked_mul(cfg.grad_cols) {
            return mismatch(format!("gradient buffer of {} elements for {n} rows of {} columns (≥ {})", g.len(), cfg.grad_cols, student.cols));
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct RowParams {
    mode: SparseMode,
    cat: CatLoss,
    inv_t: f32,
    loss_scale: f32,
    grad_scale: f32,
}

/// One listed id of a row.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: usize,
    /// Target mass in the gradient: p_i (bucket), p̃_i (renorm) or w_i (sampled).
    t: f64,
    /// Its log (`log p̃_i` for renorm); for sampled, the teacher's `lp_i`.
    lp: f64,
    /// The student's scaled logit `a_id` (gathered).
    a: f32,
}

/// The validated targets of one row, sorted by id.
struct RowTargets {
    slots: Vec<Slot>,
    /// The factor of `q_j` in the gradient: Σ p + p_tail (bucket), 1 (renorm), Σ w (sampled).
    q_factor: f32,
    /// Bucket only: teacher tail mass and its log.
    p_tail: f64,
    lp_tail: f64,
}

impl RowTargets {
    /// `None` when the row has no teacher mass to match (renorm with Σ p = 0).
    fn new<S: Elem>(tg: &Targets, r: usize, mode: SparseMode, s_row: &[S], inv_t: f32) -> Result<Option<RowTargets>> {
        let (k, v) = (tg.k, s_row.len());
        let range = r * k..(r + 1) * k;
        let (ids, lps) = (&tg.ids[range.clone()], &tg.logprobs[range.clone()]);
        let ws = tg.weights.map(|w| &w[range]);
        let mut slots = Vec::with_capacity(k);
        for i in 0..k {
            let id = ids[i];
            if id == -1 {
                continue;
            }
            if id < -1 || id as u64 >= v as u64 {
                return Err(KdError::InvalidArgument {
                    name: "targets.indices",
                    expected: format!("vocabulary ids in [0, {v}) (the student's vocabulary size) or -1 for an unused slot"),
                    got: format!("{id} at row {r}, slot {i}"),
                });
            }
            let lp = lps[i];
            if lp.is_nan() || lp == f32::INFINITY {
                return Err(KdError::InvalidArgument {
                    name: "targets.logprobs",
                    expected: "log-probabilities (finite or -inf) at every used slot".into(),
                    got: format!("{lp} at row {r}, slot {i}"),
                });
            }
            let (t, lp) = match ws {
                Some(ws) => {
                    let w = ws[i];
                    if !(w.is_finite() && w >= 0.0) {
                        return Err(KdError::InvalidArgument {
                            name: "targets.weights",
                            expected: "finite weights ≥ 0".into(),
                            got: format!("{w} at row {r}, slot {i}"),
                        });
                    }
                    if w == 0.0 {
                        continue;
                    }
                    if lp == f32::NEG_INFINITY {
                        return Err(KdError::InvalidArgument {
                            name: "targets.logprobs",
                            expected: "a finite log-probability at every slot with a positive weight".into(),
                            got: format!("-inf at row {r}, slot {i} (weight {w})"),
                        });
                    }
                    (w as f64, lp as f64)
                }
                None => ((lp as f64).exp(), lp as f64),
            };
            let id = id as usize;
            let mut a = [0.0f32];
            S::load(&s_row[id..id + 1], &mut a);
            slots.push(Slot { id, t, lp, a: a[0] * inv_t });
        }
        slots.sort_unstable_by_key(|s| s.id);
        if mode != SparseMode::Sampled {
            if let Some(w) = slots.windows(2).find(|w| w[0].id == w[1].id) {
                return Err(KdError::InvalidArgument {
                    name: "targets.indices",
                    expected: "distinct ids within a row of top-k targets".into(),
                    got: format!("id {} twice in row {r}", w[0].id),
                });
            }
        }
        let mass: f64 = slots.iter().map(|s| s.t).sum();
        let (mut q_factor, mut p_tail, mut lp_tail) = (1.0f32, 0.0f64, f64::NEG_INFINITY);
        match mode {
            SparseMode::Bucket => {
                (p_tail, lp_tail) = match tg.tail_logprob {
                    Some(tl) => {
                        let tl = tl[r];
                        if tl.is_nan() || tl == f32::INFINITY {
                            return Err(KdError::InvalidArgument {
                                name: "targets.tail_logprob",
                                expected: "a log-probability (finite or -inf)".into(),
                                got: format!("{tl} at row {r}"),
                            });
                        }
                        ((tl as f64).exp(), tl as f64)
                    }
                    None => {
                        let pt = (1.0 - mass).max(0.0);
                        (pt, pt.ln())
                    }
                };
                if slots.len() == v {
                    // Every id is listed: the bucket is empty, whatever rounding left in 1 − Σp.
                    (p_tail, lp_tail) = (0.0, f64::NEG_INFINITY);
                }
            }
            SparseMode::Renorm => {
                if mass == 0.0 {
                    return Ok(None);
                }
                let ln_mass = mass.ln();
                for s in slots.iter_mut() {
                    s.t /= mass;
                    s.lp -= ln_mass;
                }
            }
            SparseMode::Sampled => q_factor = mass as f32,
        }
        if mode == SparseMode::Bucket {
            q_factor = (mass + p_tail) as f32;
        }
        Ok(Some(RowTargets { slots, q_factor, p_tail, lp_tail }))
    }
}

struct RowJob<'a, S> {
    p: RowParams,
    s_row: &'a [S],
    rt: &'a RowTargets,
    grad: Option<&'a mut [S]>,
    row: usize,
}

impl<S: Elem> Kernel for RowJob<'_, S> {
    type Output = Result<f32>;
    #[inline(always)]
    fn run<M: Math>(self) -> Result<f32> {
        row_kernel::<M, S>(self.p, self.s_row, self.rt, self.grad, self.row)
    }
}

/// `ln(e^x + e^y)` in f64; −inf when both are.
fn log_add_exp(x: f64, y: f64) -> f64 {
    let (hi, lo) = if x > y { (x, y) } else { (y, x) };
    if hi == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// How pass 2 writes a row's gradient: `q_j · factor` on every column (bucket forward KL: minus
/// the tail term), then the listed ids fixed up.
enum Plan {
    /// `sparse_kl`'s forward KL: the listed ids get `q_j M − t_j` (sampled: `− w_i` per slot).
    Full,
    /// Another divergence over the categories: the listed ids get the precomputed values.
    Categories(CatGrad),
}

#[inline(always)]
fn row_kernel<M: Math, S: Elem>(p: RowParams, s_row: &[S], rt: &RowTargets, grad: Option<&mut [S]>, row: usize) -> Result<f32> {
    let v = s_row.len();
    let slots = &rt.slots;
    let bucket = p.mode == SparseMode::Bucket;
    let mut a = [0.0f32; BLOCK];
    let mut g = [0.0f32; BLOCK];

    // Pass 1: the student's log-sum-exp; for the bucket, of the unlisted columns only.
    let mut stats = LseStats::EMPTY;
    let mut next = 0;
    for start in (0..v).step_by(BLOCK) {
        let end = v.min(start + BLOCK);
        let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
        if bucket {
            while next < slots.len() && slots[next].id < end {
                a[slots[next].id - start] = f32::NEG_INFINITY;
                next += 1;
            }
        }
        stats = stats.merge(LseStats::of_block::<M>(&a[..n]));
    }
    let non_finite = |detail| Err(KdError::NonFiniteRow { tensor: "student_logits", row, detail });
    if stats.max.is_nan() || stats.sum.is_nan() || slots.iter().any(|s| s.a.is_nan()) {
        return non_finite("contains NaN");
    }
    if stats.max == f32::INFINITY || slots.iter().any(|s| s.a == f32::INFINITY) {
        return non_finite("contains +inf");
    }
    // In f64: an f32 log-sum-exp would carry ulp(max) of absolute error into every q_j.
    let lse_stats = stats.max as f64 + (stats.sum as f64).ln();
    let lse_listed = slots.iter().fold(f64::NEG_INFINITY, |acc, s| log_add_exp(acc, s.a as f64));
    let (lse, lse_tail) = if bucket { (log_add_exp(lse_listed, lse_stats), lse_stats) } else { (lse_stats, f64::NEG_INFINITY) };
    if lse == f64::NEG_INFINITY {
        return non_finite("is entirely -inf");
    }

    // The loss, in f64.
    let (loss, plan) = match p.cat {
        CatLoss::Full => {
            let mut loss = 0.0f64;
            for s in slots.iter().filter(|s| s.t > 0.0) {
                loss += s.t * (s.lp - (s.a as f64 - lse));
            }
            if bucket && rt.p_tail > 0.0 {
                loss += rt.p_tail * (rt.lp_tail - (lse_tail - lse));
            }
            (loss, Plan::Full)
        }
        cat => {
            // The student over the categories: log q_i (bucket) or log q̃_i = a_i − lse_listed.
            let lse_c = if bucket { lse } else { lse_listed };
            if lse_c == f64::NEG_INFINITY {
                return Err(KdError::InvalidArgument {
                    name: "student_logits",
                    expected: "a finite logit at some listed id (tail='renorm' renormalises the student over the listed ids)".into(),
                    got: format!("-inf at every listed id of row {row}"),
                });
            }
            let listed: Vec<Category> = slots.iter().map(|s| Category { lq: s.a as f64 - lse_c, lp: s.lp, p: s.t }).collect();
            // The bucket, unless it is empty on both sides (every id listed).
            let tail = (bucket && (rt.p_tail > 0.0 || lse_tail > f64::NEG_INFINITY))
                .then_some(Category { lq: lse_tail - lse, lp: rt.lp_tail, p: rt.p_tail });
            let r = category_loss::<M>(cat, &listed, tail);
            (r.loss, Plan::Categories(r))
        }
    };

    if let Some(gr) = grad {
        if loss == f64::INFINITY {
            // The +inf rule: no finite descent direction; a zero row keeps the update finite.
            gr.fill(S::zero());
            return Ok(f32::INFINITY);
        }
        // Pass 2: the gradient.
        // q_j = exp((a_j − hi) − lo) with lse = hi + lo split into an f32 and its f32
        // remainder: a_j − hi is exact near the top of the row, so q_j keeps f32 relative
        // precision whatever |lse| is.
        let (hi, lo) = split(lse);
        let gs = p.grad_scale;
        // Bucket forward KL, unlisted columns: q_j M − exp((a_j − lse_tail) + lp_tail), split likewise.
        let (qf, thi, tlo) = match &plan {
            Plan::Full if bucket && rt.p_tail > 0.0 && lse_tail > f64::NEG_INFINITY => {
                let thi = lse_tail as f32;
                (rt.q_factor, thi, (rt.lp_tail - (lse_tail - thi as f64)) as f32)
            }
            Plan::Full => (rt.q_factor, 0.0, f32::NEG_INFINITY),
            Plan::Categories(r) => (r.tail_factor, 0.0, f32::NEG_INFINITY),
        };
        let mut next = 0;
        for start in (0..v).step_by(BLOCK) {
            let end = v.min(start + BLOCK);
            let n = load_scaled(&s_row[start..end], &mut a, p.inv_t);
            if bucket {
                for (ca, cg) in a[..n].chunks_exact(LANES).zip(g.chunks_exact_mut(LANES)) {
                    for l in 0..LANES {
                        cg[l] = (M::exp((ca[l] - hi) - lo) * qf - M::exp((ca[l] - thi) + tlo)) * gs;
                    }
                }
            } else {
                let c = qf * gs;
                for (ca, cg) in a[..n].chunks_exact(LANES).zip(g.chunks_exact_mut(LANES)) {
                    for l in 0..LANES {
                        cg[l] = M::exp((ca[l] - hi) - lo) * c;
                    }
                }
            }
            while next < slots.len() && slots[next].id < end {
                let s = &slots[next];
                let j = s.id - start;
                g[j] = match &plan {
                    Plan::Full if p.mode == SparseMode::Sampled => g[j] - (s.t * gs as f64) as f32,
                    Plan::Full => (((s.a as f64 - lse).exp() * qf as f64 - s.t) * gs as f64) as f32,
                    Plan::Categories(r) => (r.listed[next] * gs as f64) as f32,
                };
                next += 1;
            }
            S::store(&g[..end - start], &mut gr[start..end]);
        }
        gr[v..].fill(S::zero());
    }
    Ok(loss as f32 * p.loss_scale)
}

/// `x = hi + lo` with `hi = x` rounded to f32 and `lo` the f32 remainder (`hi = 0, lo = x`
/// when `x` is not finite).
fn split(x: f64) -> (f32, f32) {
    let hi = x as f32;
    if hi.is_finite() {
        (hi, (x - hi as f64) as f32)
    } else {
        (0.0, hi)
    }
}

/// Convert `src` into `dst[..src.len()]` times `scale`, pad with `-inf` up to a multiple of
/// [`LANES`], and return the padded length.
#[inline(always)]
fn load_scaled<E: Elem>(src: &[E], dst: &mut [f32; BLOCK], scale: f32) -> usize {
    let n = src.len();
    E::load(src, &mut dst[..n]);
    for x in dst[..n].iter_mut() {
        *x *= scale;
    }
    let padded = n.div_ceil(LANES) * LANES;
    dst[n..padded].fill(f32::NEG_INFINITY);
    padded
}
