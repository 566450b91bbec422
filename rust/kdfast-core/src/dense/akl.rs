//! The row kernel of Adaptive KL ([`Akl`]): `w_h·KL(p‖q) + w_t·KL(q‖p)`.
//!
//! Passes per row:
//! 1. reverse KL's pass 1 (exponentials and the row's statistics);
//! 2. over the inputs: both KLs' terms, and `q`, `p`, `q·d` into three scratch rows; each
//!    block's `p`, still in L1, goes into the head's histogram ([`Head::add_block`]);
//! 3. the head ([`Head::select`]: one to three filter passes over the `p` row), then the gaps
//!    `g_H`, `g_T` ([`gaps`]: one pass over `q` and `p`) and the weights;
//! 4. the gradient `(w_h·(q − p) + w_t·(q·d − q·S))·grad_scale` from the scratch.
//!
//! Here `q = exp(a − M_a) / Z_a` and `p = exp(b − M_b) / Z_b`, functions of each logit alone,
//! rather than the other kernels' `e · exp(m_k − M) / Z` from pass 1 (which rounds differently
//! in blocks with different maxima `m_k`): equal teacher logits anywhere in the row give
//! bit-equal `p`, so the head's "lower id first" rule sees them as the ties they are (as
//! PyTorch's softmax does), and a student equal to the teacher gives `p == q` exactly, so both
//! gaps are 0 and the weights are ½ (with a zero gradient). It costs two `exp`s per element.

use super::head::{gaps, Head};
use super::pointwise::{infinite_row, load_pair, log_ratio, pass1, Scratch};
use super::{RowLoss, RowParams, BLOCK};
use crate::divergence::{Akl, Closed, ReverseKl};
use crate::elem::Elem;
use crate::error::Result;
use crate::math::Math;
use crate::stats::LANES;

impl RowLoss for Akl {
    const SCRATCH_ROWS: usize = 3;

    #[inline(always)]
    fn row<M: Math, S: Elem, T: Elem>(self, p: RowParams, s_row: &[S], t_row: &[T], grad: Option<&mut [S]>, row: usize, scratch: &mut [f32]) -> Result<f32> {
        let v = s_row.len();
        let mut sc = Scratch::split(scratch, v, Self::SCRATCH_ROWS);
        // Reverse KL's pass 1: not fused, the teacher as it is (so never `None`).
        let Some(st) = pass1::<M, ReverseKl, S, T>(&ReverseKl, Closed::No, p.inv_t, s_row, t_row, row, &mut sc)? else {
            return Ok(infinite_row(grad));
        };
        let mut a = [0.0f32; BLOCK];
        let mut b = [0.0f32; BLOCK];
        let (inv_za, inv_zb) = (1.0 / st.sa.sum, 1.0 / st.sb.sum);

        // Pass 2 (d from the shifted logits, as in the pointwise kernel).
        let mut head = Head::new(self.head_mass, v);
        let (mut fwd, mut rev) = (0.0f64, 0.0f64);
        for (k, start) in (0..v).step_by(BLOCK).enumerate() {
            let n = load_pair(&ReverseKl, &s_row[start..v.min(start + BLOCK)], &t_row[start..v.min(start + BLOCK)], &mut a, &mut b, p.inv_t);
            let cols = k * BLOCK..k * BLOCK + n;
            let (xq, xp, xd) = (&mut sc.ea[cols.clone()], &mut sc.eb[cols.clone()], &mut sc.ex[cols]);
            let mut acc_f = [0.0f32; LANES];
            let mut acc_r = [0.0f32; LANES];
            for ((((ca, cb), xq), xp), xd) in a[..n]
                .chunks_exact(LANES)
                .zip(b[..n].chunks_exact(LANES))
                .zip(xq.chunks_exact_mut(LANES))
                .zip(xp.chunks_exact_mut(LANES))
                .zip(xd.chunks_exact_mut(LANES))
            {
                for l in 0..LANES {
                    let (x, y) = (ca[l] - st.sa.max, cb[l] - st.sb.max);
                    let q = M::exp(x) * inv_za;
                    let pp = M::exp(y) * inv_zb;
                    let t = self.terms(log_ratio(x, y, st.c_z), q, pp);
                    acc_f[l] += t.fwd;
                    acc_r[l] += t.rev;
                    xq[l] = q;
                    xp[l] = pp;
                    xd[l] = t.qd;
                }
            }
            fwd += acc_f.iter().map(|&x| x as f64).sum::<f64>();
            rev += acc_r.iter().map(|&x| x as f64).sum::<f64>();
            head.add_block(&sc.eb[k * BLOCK..k * BLOCK + n]);
        }

        // Pass 3: the head and the weights, w_h = w_t = ½ when both gaps are 0.
        let cut = head.select(sc.eb, v);
        let (gh, gt) = gaps(sc.ea, sc.eb, v, cut);
        let (wh, wt) = if gh + gt > 0.0 { (gh / (gh + gt), gt / (gh + gt)) } else { (0.5, 0.5) };
        // A weight of exactly 0 removes its KL even where that KL is +inf.
        let part = |w: f64, kl: f64| if w == 0.0 { 0.0 } else { w * kl };
        let loss = part(wh, fwd) + part(wt, rev);
        if loss == f64::INFINITY {
            return Ok(infinite_row(grad));
        }

        // Pass 4: the gradient. With w_t = 0 the reverse part is skipped, not multiplied by 0
        // (its q·d may be +inf).
        if let Some(gr) = grad {
            let (ch, ct, s) = ((wh as f32) * p.grad_scale, (wt as f32) * p.grad_scale, rev as f32);
            let use_rev = wt != 0.0;
            let mut g = [0.0f32; BLOCK];
            for (k, start) in (0..v).step_by(BLOCK).enumerate() {
                let end = v.min(start + BLOCK);
                let n = (end - start).div_ceil(LANES) * LANES;
                let cols = k * BLOCK..k * BLOCK + n;
                let (xq, xp, xd) = (&sc.ea[cols.clone()], &sc.eb[cols.clone()], &sc.ex[cols]);
                for (((g, &q), &pp), &qd) in g[..n].iter_mut().zip(xq).zip(xp).zip(xd) {
                    let r = if use_rev { ct * (qd - q * s) } else { 0.0 };
                    *g = ch * (q - pp) + r;
                }
                S::store(&g[..end - start], &mut gr[start..end]);
            }
        }
        Ok(loss as f32 * p.loss_scale)
    }
}
