//! Compressing teacher logits into sparse targets: `kdfast-core`'s `compress` module.

use crate::error::Error;
use crate::sparse::TargetTensors;
use crate::tensor::{disjoint, dispatch_float, Tensor};
use crate::Runtime;
use kdfast_core::compress::{compress_sample as core_sample, compress_topk as core_topk, compress_topk_slice as core_topk_slice, merge_draws, sharded_draws, sharded_maxima, sharded_sums, VocabSlice};
use pyo3::prelude::*;

/// Top-k compression options: `k ≥ 1` slots per row (k > V pads), temperature T > 0.
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct TopK {
    #[pyo3(get)]
    k: usize,
    #[pyo3(get)]
    temperature: f32,
}

#[pymethods]
impl TopK {
    #[new]
    #[pyo3(signature = (k, temperature = 1.0))]
    fn new(k: usize, temperature: f32) -> Self {
        TopK { k, temperature }
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Sampling compression options: `num_samples` draws per row in `[1, 2^32)`, temperature T > 0,
/// the `seed`, and `row_offset`, the row index of the first row (keys its random streams).
#[pyclass(frozen, from_py_object, module = "kdfast._kdfast")]
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    #[pyo3(get)]
    num_samples: usize,
    #[pyo3(get)]
    temperature: f32,
    #[pyo3(get)]
    seed: u64,
    #[pyo3(get)]
    row_offset: u64,
}

#[pymethods]
impl Sampling {
    #[new]
    #[pyo3(signature = (num_samples, temperature = 1.0, seed = 0, row_offset = 0))]
    fn new(num_samples: usize, temperature: f32, seed: u64, row_offset: u64) -> Self {
        Sampling { num_samples, temperature, seed, row_offset }
    }

    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Top-k of every row of `teacher_logits` (`[N, V]`, unit column stride, float32/bfloat16/
/// float16) into `out = (ids int64 [N, k], logprobs float32 [N, k], None, tail float32 [N])`.
#[pyfunction]
#[pyo3(signature = (options, teacher_logits, out, runtime))]
pub fn compress_topk(py: Python<'_>, options: TopK, teacher_logits: Tensor, mut out: TargetTensors, runtime: Runtime) -> Result<(), Error> {
    let (rows, k) = (teacher_logits.shape().0, options.k);
    let o = out.outputs(rows, k, false, true, &[Some(&teacher_logits)])?;
    let (ids, lp, tail) = (o.ids, o.logprobs, o.tail.expect("checked by `outputs`"));
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        py.detach(|| core_topk(x, k, options.temperature, ids, lp, tail, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

/// `num_samples` draws per row of `teacher_logits` (as for [`compress_topk`]) into
/// `out = (ids int64, logprobs float32, weights float32, None)`, each `[N, num_samples]`.
#[pyfunction]
#[pyo3(signature = (options, teacher_logits, out, runtime))]
pub fn compress_sample(py: Python<'_>, options: Sampling, teacher_logits: Tensor, mut out: TargetTensors, runtime: Runtime) -> Result<(), Error> {
    let (rows, n) = (teacher_logits.shape().0, options.num_samples);
    let o = out.outputs(rows, n, true, false, &[Some(&teacher_logits)])?;
    let (ids, lp, w) = (o.ids, o.logprobs, o.weights.expect("checked by `outputs`"));
    let Sampling { temperature, seed, row_offset, .. } = options;
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        py.detach(|| core_sample(x, n, temperature, seed, row_offset, ids, lp, w, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}

// ------------------------------------------------------------- a vocabulary across ranks

/// The steps of [`compress_sample`] over a vocabulary sharded across ranks (kdfast-core
/// `compress::sharded`): `teacher_logits` is this rank's slice `[N, V_local]` of the ids
/// `offset .. offset + V_local` of a vocabulary of `vocab` ids; the caller reduces the outputs of
/// each step over the ranks (maximum) before the next. `B` = ⌈vocab / 4096⌉.
///
/// `step` 1 writes `maxima` (float32 `[N, B + 1]`); step 2 reads `maxima` and `carry_in`
/// (float64 `[N]`) and writes `out = (sums, carry_out)` (float64 `[N, 2B]`, `[N]`) and
/// `checkpoints` (float64 `[N, C]`, `C` = `VocabSlice::checkpoint_len`: 256 per local block); step 3 reads `maxima`, `sums`, `carry_in`, `checkpoints` and writes
/// `out = (picked, lse)` (float64 `[N, 2 · num_samples]`, `[N]`). Arguments a step does not use
/// are `None`.
#[pyfunction]
#[pyo3(signature = (step, options, teacher_logits, offset, vocab, maxima, carry_in, sums, checkpoints, out, runtime))]
#[allow(clippy::too_many_arguments)]
pub fn sharded_sample(
    py: Python<'_>,
    step: u8,
    options: Sampling,
    teacher_logits: Tensor,
    offset: usize,
    vocab: usize,
    mut maxima: Tensor,
    carry_in: Option<Tensor>,
    sums: Option<Tensor>,
    checkpoints: Option<Tensor>,
    out: Option<(Tensor, Tensor)>,
    runtime: Runtime,
) -> Result<(), Error> {
    let (rows, len) = teacher_logits.shape();
    let slice = VocabSlice::new(offset, len, vocab)?;
    let (nb, ncp) = (slice.blocks(), slice.checkpoint_len());
    let Sampling { num_samples, temperature, seed, row_offset } = options;
    let (isa, threads) = (runtime.isa, runtime.num_threads);
    let missing = |name: &'static str| Error::arg(name, "a tensor for this step", "None");
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        match step {
            1 => {
                disjoint(&[("maxima", Some(&maxima))], &[Some(&teacher_logits)])?;
                let m = maxima.matrix_mut::<f32>("maxima", rows, nb + 1)?;
                py.detach(|| sharded_maxima(x, slice, temperature, m, isa, threads))?;
            }
            2 | 3 => {
                let carry_in = carry_in.ok_or_else(|| missing("carry_in"))?;
                let (mut a, mut b) = out.ok_or_else(|| missing("out"))?;
                let mut cps = checkpoints.ok_or_else(|| missing("checkpoints"))?;
                let inputs = [Some(&teacher_logits), Some(&maxima), Some(&carry_in), sums.as_ref()];
                if step == 2 {
                    disjoint(&[("out", Some(&a)), ("out", Some(&b)), ("checkpoints", Some(&cps))], &inputs)?;
                } else {
                    disjoint(&[("out", Some(&a)), ("out", Some(&b))], &[inputs[0], inputs[1], inputs[2], inputs[3], Some(&cps)])?;
                }
                let m = maxima.matrix::<f32>("maxima", rows, nb + 1)?;
                let c = carry_in.vector::<f64>("carry_in", rows)?;
                if step == 2 {
                    let (s, c_out) = (a.matrix_mut::<f64>("sums", rows, 2 * nb)?, b.vector_mut::<f64>("carry_out", rows)?);
                    let cps = cps.matrix_mut::<f64>("checkpoints", rows, ncp)?;
                    py.detach(|| sharded_sums(x, slice, temperature, m, c, s, c_out, cps, isa, threads))?;
                } else {
                    let sums = sums.as_ref().ok_or_else(|| missing("sums"))?.matrix::<f64>("sums", rows, 2 * nb)?;
                    let (picked, lse) = (a.matrix_mut::<f64>("picked", rows, 2 * num_samples)?, b.vector_mut::<f64>("lse", rows)?);
                    let cps = cps.matrix::<f64>("checkpoints", rows, ncp)?;
                    py.detach(|| sharded_draws(x, slice, num_samples, temperature, seed, row_offset, m, sums, c, cps, picked, lse, isa, threads))?;
                }
            }
            _ => return Err(Error::arg("step", "1, 2 or 3", &step.to_string())),
        }
    });
    Ok(())
}

/// What this rank's slice needs of the sampling steps: `(blocks B of the vocabulary,
/// checkpoints per row of step 2 — 256 per block it has a part of —, whether it receives a
/// carry from the previous rank, whether it hands one to the next)`.
#[pyfunction]
pub fn sharded_slice_plan(offset: usize, len: usize, vocab: usize) -> Result<(usize, usize, bool, bool), Error> {
    let slice = VocabSlice::new(offset, len, vocab)?;
    Ok((slice.blocks(), slice.checkpoint_len(), slice.receives_carry(), slice.sends_carry()))
}

/// The targets from the draws of every rank: `picked` (float64 `[N, 2m]`, the ranks' step-3
/// outputs side by side) and `lse` (float64 `[N]`) into `out = (ids, logprobs, weights, None)`,
/// each `[N, num_samples]`.
#[pyfunction]
#[pyo3(signature = (num_samples, picked, lse, out))]
pub fn merge_sample_draws(py: Python<'_>, num_samples: usize, picked: Tensor, lse: Tensor, mut out: TargetTensors) -> Result<(), Error> {
    let rows = lse.shape().1;
    let (width, n) = (picked.shape().1, num_samples);
    let o = out.outputs(rows, n, true, false, &[Some(&picked), Some(&lse)])?;
    let (ids, lp, w) = (o.ids, o.logprobs, o.weights.expect("checked by `outputs`"));
    let picked = picked.matrix::<f64>("picked", rows, width)?;
    let lse = lse.vector::<f64>("lse", rows)?;
    py.detach(|| merge_draws(picked, lse, n, ids, lp, w))?;
    Ok(())
}

/// This rank's part of a top-k over a vocabulary sharded across ranks (kdfast-core
/// `TopKStream::finish_slice`): `teacher_logits` holds the ids `offset ..`; `out = (ids int64
/// [N, k] (global ids), values float32 [N, k] (scaled logits), stats float64 [N, 3] (the tail's
/// max and sum, a status: 1 = +inf, 2 = NaN))`.
#[pyfunction]
#[pyo3(signature = (options, teacher_logits, offset, out, runtime))]
pub fn compress_topk_slice(py: Python<'_>, options: TopK, teacher_logits: Tensor, offset: usize, mut out: (Tensor, Tensor, Tensor), runtime: Runtime) -> Result<(), Error> {
    let (rows, k) = (teacher_logits.shape().0, options.k);
    let (ids, xs, stats) = &mut out;
    disjoint(&[("ids", Some(&*ids)), ("values", Some(&*xs)), ("stats", Some(&*stats))], &[Some(&teacher_logits)])?;
    let ids = ids.matrix_mut::<i64>("ids", rows, k)?;
    let xs = xs.matrix_mut::<f32>("values", rows, k)?;
    let stats = stats.matrix_mut::<f64>("stats", rows, 3)?;
    dispatch_float!(E = (teacher_logits, "teacher_logits") => {
        let x = teacher_logits.rows::<E>("teacher_logits")?;
        py.detach(|| core_topk_slice(x, k, options.temperature, offset, ids, xs, stats, runtime.isa, runtime.num_threads))?;
    });
    Ok(())
}
