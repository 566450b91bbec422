//! A sparse loss's view of a student whose vocabulary is sharded across ranks: this rank's
//! slice of each row, read against the ids the targets list.
//!
//! A sparse loss reads the student's scaled logits `a = s / T` only through four row quantities
//! (`kdfast.reference_sparse.DenseStudent`): the row's log-sum-exp `L`, `a` at the listed ids,
//! the log-sum-exp `L_u` over the ids not listed, and how many ids are listed. On a slice:
//!
//! * [`listed_stats`]: the slice's `(max, Σ e^(a − max))` over all its ids and over its
//!   unlisted ids (one `exp` per element: a block's listed entries are taken out and merged back
//!   one by one), `a` at the listed ids it owns, and their count. The caller merges the stats
//!   over the ranks and adds the rest (each id is owned by one rank).
//! * [`listed_gradient`]: from the upstream gradients `c = ∂ℓ/∂L`, `c_u = ∂ℓ/∂L_u` and
//!   `g_j = ∂ℓ/∂a_{id_j}` (the same on every rank), the slice's
//!
//!   ```text
//!       ∂ℓ/∂s_v = (c·q_v + c_u·q^u_v·[v unlisted] + Σ_{j: id_j = v} g_j) / T
//!   ```
//!
//!   with `q = e^(a − L)` and `q^u = e^(a − L_u)`, one `exp` per element: an unlisted `v` takes
//!   `q^u_v·(c_u + c·e^(L_u − L))`.

use crate::dense::{Rows, BLOCK};
use crate::elem::Elem;
use crate::error::{check_len, check_temperature, KdError, Result};
use crate::isa::{Isa, Kernel};
use crate::math::Math;
use crate::stats::{merge_wide, BlockLse, LseStats, LANES};
use crate::threads;

/// Rows of one work item.
const CHUNK: usize = 16;

/// The listed ids of `s`'s rows: `ids` (`[rows, k]`) holds, per target slot, the id's column in
/// this slice, or −1 where the slot is unused or its id lives on another rank.
#[derive(Clone, Copy)]
pub struct Listed<'a> {
    pub ids: &'a [i64],
    pub k: usize,
}

impl Listed<'_> {
    fn check(&self, rows: usize, cols: usize) -> Result<()> {
        check_len("ids", self.ids.len(), rows * self.k)?;
        if let Some((i, &id)) = self.ids.iter().enumerate().find(|(_, &id)| id < -1 || id >= cols as i64) {
            return Err(KdError::InvalidArgument {
                name: "ids",
                expected: format!("columns in [0, {cols}) of the slice, or -1"),
                got: format!("{id} at row {}, slot {}", i / self.k.max(1), i % self.k.max(1)),
            });
        }
        Ok(())
    }

    /// Row `r`'s slots, and its distinct listed columns in increasing order (into `cols`).
    fn row(&self, r: usize, cols: &mut Vec<usize>) -> &[i64] {
        let slots = &self.ids[r * self.k..(r + 1) * self.k];
        cols.clear();
        cols.extend(slots.iter().filter(|&&c| c >= 0).map(|&c| c as usize));
        cols.sort_unstable();
        cols.dedup();
        slots
    }
}

/// Writes `stats` (`[rows, 4]`, f64): the slice's `(max, sum)` over all its ids, then over its
/// unlisted ids (`(−inf, 0)` where none; NaN or +inf make them non-finite); and `at`
/// (`[rows, k + 1]`, f32): `a` at each slot this slice owns (0 elsewhere), then the number of
/// distinct listed columns of the slice.
pub fn listed_stats<S: Elem>(s: Rows<S>, listed: Listed, temperature: f32, stats: &mut [f64], at: &mut [f32], isa: Isa, num_threads: usize) -> Result<()> {
    check_temperature(temperature)?;
    listed.check(s.rows, s.cols)?;
    check_len("stats", stats.len(), s.rows * 4)?;
    let k = listed.k;
    check_len("at", at.len(), s.rows * (k + 1))?;
    let inv_t = 1.0 / temperature;
    let mut items: Vec<_> = stats.chunks_mut(CHUNK * 4).zip(at.chunks_mut(CHUNK * (k + 1))).collect();
    threads::for_each_item(&mut items, num_threads, |i, (st, at)| {
        let (mut buf, mut cols) = ([0.0f32; BLOCK], Vec::new());
        for (j, (st, at)) in st.chunks_mut(4).zip(at.chunks_mut(k + 1)).enumerate() {
            let r = i * CHUNK + j;
            let row = s.row(r);
            let slots = listed.row(r, &mut cols);
            for (a, &c) in at.iter_mut().zip(slots) {
                *a = if c >= 0 { scaled(row[c as usize], inv_t) } else { 0.0 };
            }
            at[k] = cols.len() as f32;
            let (mut all, mut unlisted) = ((f64::NEG_INFINITY, 0.0), (f64::NEG_INFINITY, 0.0));
            let mut next = cols.iter().copied().peekable();
            for c0 in (0..s.cols).step_by(BLOCK) {
                let c1 = s.cols.min(c0 + BLOCK);
                let n = load_block(&row[c0..c1], inv_t, &mut buf);
                while let Some(c) = next.next_if(|&c| c < c1) {
                    let v = buf[c - c0];
                    all = merge_wide(all, one(v));
                    buf[c - c0] = f32::NEG_INFINITY;
                }
                let block = isa.run(BlockLse(&buf[..n]));
                (all, unlisted) = (merge_wide(all, block), merge_wide(unlisted, block));
            }
            st.copy_from_slice(&[all.0, all.1, unlisted.0, unlisted.1]);
        }
        Ok(())
    })
}

/// Writes `grad` (`[rows, cols]`, the student's type): `∂ℓ/∂s` of the slice (see the module
/// docs), from `softmax` (`[rows, 4]`: the whole rows' `M, ln Z` over all ids, then over the
/// unlisted ids; `M_u = −inf` where every id is listed), `coef` (`[rows, 2]`: `c`, `c_u`) and
/// `g_at` (`[rows, k]`: `g_j` per slot; slots this slice does not own are skipped).
#[allow(clippy::too_many_arguments)]
pub fn listed_gradient<S: Elem>(
    s: Rows<S>,
    listed: Listed,
    temperature: f32,
    softmax: &[f64],
    coef: &[f32],
    g_at: &[f32],
    grad: &mut [S],
    isa: Isa,
    num_threads: usize,
) -> Result<()> {
    check_temperature(temperature)?;
    listed.check(s.rows, s.cols)?;
    let (rows, cols, k) = (s.rows, s.cols, listed.k);
    check_len("softmax", softmax.len(), rows * 4)?;
    check_len("coef", coef.len(), rows * 2)?;
    check_len("g_at", g_at.len(), rows * k)?;
    check_len("grad", grad.len(), rows * cols)?;
    if cols == 0 {
        return Ok(());
    }
    let inv_t = 1.0 / temperature;
    let mut items: Vec<_> = grad.chunks_mut(CHUNK * cols).collect();
    threads::for_each_item(&mut items, num_threads, |i, grad| {
        let (mut buf, mut cols_of, mut out) = ([0.0f32; BLOCK], Vec::new(), [0.0f32; BLOCK]);
        for (j, gr) in grad.chunks_mut(cols).enumerate() {
            let r = i * CHUNK + j;
            let row = s.row(r);
            let slots = listed.row(r, &mut cols_of);
            let sm = &softmax[4 * r..4 * r + 4];
            let (c, c_u) = (coef[2 * r], coef[2 * r + 1]);
            let (m, ln_z) = (sm[0] as f32, sm[1] as f32);
            // Unlisted ids: q^u · (c_u + c·e^(L_u − L)); with none, they are all -inf logits.
            let (mu, ln_zu, w) = if sm[2] == f64::NEG_INFINITY {
                (m, ln_z, c)
            } else {
                (sm[2] as f32, sm[3] as f32, (c_u as f64 + c as f64 * ((sm[2] + sm[3]) - (sm[0] + sm[1])).exp()) as f32)
            };
            let mut next = cols_of.iter().copied().peekable();
            for c0 in (0..cols).step_by(BLOCK) {
                let c1 = cols.min(c0 + BLOCK);
                let n = load_block(&row[c0..c1], inv_t, &mut buf);
                isa.run(BlockGrad { a: &buf[..n], shift: mu, ln_z: ln_zu, w: w * inv_t, out: &mut out[..n] });
                while let Some(col) = next.next_if(|&col| col < c1) {
                    out[col - c0] = c * inv_t * ((buf[col - c0] - m) - ln_z).exp();
                }
                for (&slot, &g) in slots.iter().zip(&g_at[r * k..(r + 1) * k]) {
                    if (c0 as i64..c1 as i64).contains(&slot) {
                        out[slot as usize - c0] += g * inv_t;
                    }
                }
                S::store(&out[..c1 - c0], &mut gr[c0..c1]);
            }
        }
        Ok(())
    })
}

/// `x · inv_t` of one element, as the block loads compute it.
fn scaled<E: Elem>(x: E, inv_t: f32) -> f32 {
    let mut v = [0.0f32];
    E::load_scaled(&[x], &mut v, inv_t);
    v[0]
}

/// The stats of one value.
fn one(v: f32) -> LseStats {
    if v == f32::NEG_INFINITY {
        LseStats::EMPTY
    } else if v.is_nan() {
        LseStats { max: v, sum: f32::NAN }
    } else {
        LseStats { max: v, sum: 1.0 }
    }
}

/// `x` scaled into `buf`, padded with −inf to whole lanes; the padded length.
fn load_block<E: Elem>(x: &[E], inv_t: f32, buf: &mut [f32; BLOCK]) -> usize {
    let (n, padded) = (x.len(), x.len().div_ceil(LANES) * LANES);
    E::load_scaled(x, &mut buf[..n], inv_t);
    buf[n..padded].fill(f32::NEG_INFINITY);
    padded
}

/// `out = w · e^((a − shift) − ln_z)` over one padded block.
struct BlockGrad<'a> {
    a: &'a [f32],
    shift: f32,
    ln_z: f32,
    w: f32,
    out: &'a mut [f32],
}

impl Kernel for BlockGrad<'_> {
    type Output = ();
    #[inline(always)]
    fn run<M: Math>(self) {
        let BlockGrad { a, shift, ln_z, w, out } = self;
        for (ca, co) in a.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
            for l in 0..LANES {
                co[l] = w * M::exp((ca[l] - shift) - ln_z);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lse(x: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = x.collect();
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return m;
        }
        m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    #[test]
    fn stats_and_gradient_of_a_listed_slice() {
        let (rows, cols, k, t) = (2, 2600, 4, 0.7f32);
        let s: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 50.0) - 10.0).collect();
        // Row 0: ids in three blocks, one twice, one slot elsewhere; row 1: every slot elsewhere.
        let ids = vec![5, 2000, -1, 5, -1, -1, -1, -1];
        let listed = Listed { ids: &ids, k };
        let rs = Rows::new(&s, rows, cols, cols, "s").unwrap();
        let (mut st, mut at) = (vec![0.0; rows * 4], vec![0.0f32; rows * (k + 1)]);
        listed_stats(rs, listed, t, &mut st, &mut at, Isa::detect(), 2).unwrap();
        let a = |r: usize, c: usize| (s[r * cols + c] * (1.0 / t)) as f64;
        for r in 0..rows {
            let all = lse((0..cols).map(|c| a(r, c)));
            let unl = lse((0..cols).filter(|&c| r == 1 || (c != 5 && c != 2000)).map(|c| a(r, c)));
            assert!((st[4 * r] + st[4 * r + 1].ln() - all).abs() < 1e-5, "row {r}");
            assert!((st[4 * r + 2] + st[4 * r + 3].ln() - unl).abs() < 1e-5, "row {r}");
        }
        assert_eq!(&at[..5], &[a(0, 5) as f32, a(0, 2000) as f32, 0.0, a(0, 5) as f32, 2.0]);
        assert_eq!(at[9], 0.0);
        // The gradient against its definition.
        let softmax: Vec<f64> = (0..rows).flat_map(|r| [st[4 * r], st[4 * r + 1].ln(), st[4 * r + 2], st[4 * r + 3].ln()]).collect();
        let coef = vec![0.3f32, -0.7, 1.1, 0.4];
        let g_at = vec![0.5f32, -0.25, 9.0, 2.0, 1.0, 1.0, 1.0, 1.0];
        let mut grad = vec![0.0f32; rows * cols];
        listed_gradient(rs, listed, t, &softmax, &coef, &g_at, &mut grad, Isa::detect(), 2).unwrap();
        for r in 0..rows {
            let (l, lu) = (softmax[4 * r] + softmax[4 * r + 1], softmax[4 * r + 2] + softmax[4 * r + 3]);
            for c in 0..cols {
                let is_listed = r == 0 && (c == 5 || c == 2000);
                let mut want = coef[2 * r] as f64 * (a(r, c) - l).exp();
                if !is_listed {
                    want += coef[2 * r + 1] as f64 * (a(r, c) - lu).exp();
                }
                want += match (r, c) {
                    (0, 5) => 0.5 + 2.0,
                    (0, 2000) => -0.25,
                    _ => 0.0,
                };
                want /= t as f64;
                let got = grad[r * cols + c] as f64;
                assert!((got - want).abs() < 1e-6 + 1e-4 * want.abs(), "row {r} col {c}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn every_id_listed_and_bad_ids() {
        let s = vec![1.0f32, 2.0, f32::NEG_INFINITY];
        let ids = vec![0, 1, 2];
        let rs = Rows::new(&s, 1, 3, 3, "s").unwrap();
        let (mut st, mut at) = (vec![0.0; 4], vec![0.0f32; 4]);
        listed_stats(rs, Listed { ids: &ids, k: 3 }, 1.0, &mut st, &mut at, Isa::detect(), 1).unwrap();
        assert_eq!((st[2], st[3]), (f64::NEG_INFINITY, 0.0));
        assert_eq!(at[3], 3.0);
        let softmax = [st[0], st[1].ln(), f64::NEG_INFINITY, f64::NEG_INFINITY];
        let mut grad = vec![0.0f32; 3];
        listed_gradient(rs, Listed { ids: &ids, k: 3 }, 1.0, &softmax, &[1.0, 5.0], &[0.0; 3], &mut grad, Isa::detect(), 1).unwrap();
        let l = (1.0f64.exp() + 2.0f64.exp()).ln();
        assert!((grad[0] as f64 - (1.0 - l).exp()).abs() < 1e-6 && grad[2] == 0.0, "{grad:?}");
        for bad in [3i64, -2] {
            let ids = vec![0, bad, 1];
            assert!(listed_stats(rs, Listed { ids: &ids, k: 3 }, 1.0, &mut st, &mut at, Isa::detect(), 1).is_err());
        }
    }
}
