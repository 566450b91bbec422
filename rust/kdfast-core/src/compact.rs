//! Compact, variable-length records of one sequence's sparse targets (cache format 2).
//!
//! [`crate::encode`] gives every position the same number of bytes, so a record can be found
//! by arithmetic; a cache needs random access only per sequence, so here each sequence is one
//! bit stream whose fields are Rice-coded with parameters chosen for that sequence (a 20-bit
//! header holds them). Bits are written least-significant first; the stream is padded with
//! zero bits to a whole byte.
//!
//! # Sampled targets (N draws)
//! The gradient of the sampled loss needs only the distinct ids and their exact counts; the
//! loss `Σ_i w_i (log p_i − log q_i)` needs the teacher's log-probs only through the one scalar
//! `c = Σ_i w_i log p_i` (since `Σ_i w_i = 1`). A position stores
//!
//! * `d`, its number of distinct ids (`Rice(k_d)`; 0 for a position without targets);
//! * the ids in increasing order as gaps `id_0`, `id_j − id_{j−1} − 1` (`Rice(k_gap)`);
//! * for `d ≥ 2`: the slot of the largest count (`ceil(log2 d)` bits), then every other count
//!   minus one (`Rice(k_count)`); the largest is `N −` the others, so the counts are exact;
//! * `round(−c · 2^16)` (`Rice(k_c)`): `c` within 2^-17 nat.
//!
//! It decodes as `d` slots `(id, log p = c, w = count / N)`, so that `Σ_i w_i log p_i = c`:
//! the loss value and its gradient are those of the stored targets.
//!
//! # Top-k targets
//! A position's used slots (id ≠ −1, finite log-prob) in decreasing log-prob order (ties keep
//! their slot order):
//!
//! * `k_row − d`, the unused slots (`Rice(k_unused)`; `k_row` is the sequence's largest `d`);
//! * the log-probs as codes `q = round(−lp · 128)` (log-probs above 0 count as 0): `q_0`
//!   (`Rice(k_first)`), then the non-negative steps `q_j − q_{j−1}` (`Rice(k_step)`); every
//!   log-prob decodes within 2^-8 nat ([`TOPK_MAX_ABS_ERROR`]) down to −2^33 / 128;
//! * the ids in the same order, `ceil(log2 V)` bits each;
//! * with a tail: `0` for `tail_logprob = −inf`, else `1 + round(−tail · 128)` (`Rice(k_tail)`).
//!
//! # Rice codes
//! `Rice(k)` of `v`: the quotient `v >> k` in unary (ones, then a zero), then the `k` low bits.
//! A quotient of [`ESCAPE`] or more is written as `ESCAPE` ones followed by `v` in
//! [`ESCAPE_BITS`] bits, so no value costs more than 80 bits and a reader never loops on a
//! corrupt stream. A decoder checks every field against the sequence's shape and the
//! vocabulary and that the stream ends exactly at its last byte: a damaged record is an error,
//! never a read outside the record or the outputs.

use crate::encode::id_bits;
use crate::error::{KdError, Result};

/// Top-k log-probs are stored in units of `2^-TOPK_QUANTUM_BITS` nat.
pub const TOPK_QUANTUM_BITS: u32 = 7;
/// Bound on `|decoded − lp|` for a stored top-k log-prob (half a unit).
pub const TOPK_MAX_ABS_ERROR: f32 = 1.0 / 256.0;
/// The sampled cross term `Σ w log p` is stored in units of `2^-CROSS_QUANTUM_BITS` nat.
pub const CROSS_QUANTUM_BITS: u32 = 16;
/// Unary quotients from this length on are escaped.
pub const ESCAPE: u64 = 32;
/// Bits of an escaped value.
pub const ESCAPE_BITS: u32 = 48;
const MAX_VALUE: u64 = (1 << ESCAPE_BITS) - 1;
/// The largest top-k code: log-probs below `−MAX_Q / 128` are stored as that value.
const MAX_Q: u64 = 1 << 40;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Top-k log-probs, with `tail_logprob` or not.
    TopK { has_tail: bool },
    /// Distinct ids and their counts out of `num_samples` draws.
    Sample { num_samples: u32 },
}

/// The codec of one cache: its scheme and vocabulary size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compact {
    pub scheme: Scheme,
    pub vocab: u64,
}

/// One sequence's targets: `rows` positions of `k` slots (row-major), `tail` for top-k with a tail.
pub struct Rows<'a> {
    pub rows: usize,
    pub k: usize,
    pub ids: &'a [i64],
    pub logprobs: &'a [f32],
    pub weights: Option<&'a [f32]>,
    pub tail: Option<&'a [f32]>,
}

/// Writable outputs of [`Compact::decode`]: `rows × k_row` slots, weights iff sampled, tail iff present.
pub struct RowsMut<'a> {
    pub ids: &'a mut [i64],
    pub logprobs: &'a mut [f32],
    pub weights: Option<&'a mut [f32]>,
    pub tail: Option<&'a mut [f32]>,
}

fn bad<T>(name: &'static str, expected: impl Into<String>, got: String) -> Result<T> {
    Err(KdError::InvalidArgument { name, expected: expected.into(), got })
}

fn early<T>() -> Result<T> {
    corrupt("ends before its last position")
}

fn corrupt<T>(what: &str) -> Result<T> {
    bad("data", "a compact record of this cache", format!("{what} (corrupt record?)"))
}

impl Compact {
    pub fn new(scheme: Scheme, vocab: u64) -> Result<Compact> {
        if vocab == 0 || vocab > 1 << 32 {
            return bad("vocab_size", "an integer in [1, 2^32]", vocab.to_string());
        }
        if scheme == (Scheme::Sample { num_samples: 0 }) {
            return bad("num_samples", "an integer ≥ 1", "0".into());
        }
        Ok(Compact { scheme, vocab })
    }

    /// The record of `t` and its `k_row` (the largest number of slots a position uses, ≥ 1).
    pub fn encode(&self, t: &Rows) -> Result<(Vec<u8>, usize)> {
        check_inputs(t, matches!(self.scheme, Scheme::Sample { .. }), matches!(self.scheme, Scheme::TopK { has_tail: true }))?;
        let mut fields = Fields::default();
        let k_row = match self.scheme {
            Scheme::Sample { num_samples } => self.gather_sampled(t, num_samples, &mut fields)?,
            Scheme::TopK { has_tail } => self.gather_topk(t, has_tail, &mut fields)?,
        };
        if let Scheme::TopK { .. } = self.scheme {
            fields.a = fields.used.iter().map(|&d| (k_row - d) as u64).collect(); // unused slots
        }
        Ok((fields.write(self.scheme, id_bits(self.vocab)), k_row))
    }

    #[allow(clippy::needless_range_loop)] // j indexes ids, weights and logprobs alike
    fn gather_sampled(&self, t: &Rows, n: u32, f: &mut Fields) -> Result<usize> {
        let w = t.weights.expect("checked");
        let mut slots: Vec<(i64, u64, f64)> = Vec::with_capacity(t.k);
        let mut k_row = 1;
        for r in 0..t.rows {
            slots.clear();
            for j in r * t.k..(r + 1) * t.k {
                let id = self.check_id(t.ids[j], r, j % t.k)?;
                let x = w[j] as f64 * n as f64;
                let c = x.round();
                if !(x.is_finite() && c >= 0.0 && c <= n as f64 && (x - c).abs() <= 1e-4 * c.max(1.0)) {
                    return bad("targets.weights", format!("multiples of 1/{n} (count / num_samples)"), format!("{} at row {r}, slot {}", w[j], j % t.k));
                }
                if id < 0 || c == 0.0 {
                    continue; // an unused slot, or an id never drawn: no part in loss or gradient
                }
                let lp = t.logprobs[j];
                if !lp.is_finite() {
                    return bad("targets.logprobs", "finite log-probabilities of sampled ids", format!("{lp} at row {r}, slot {}", j % t.k));
                }
                slots.push((id, c as u64, lp as f64));
            }
            slots.sort_unstable_by_key(|s| s.0);
            slots.dedup_by(|b, a| {
                // the same id twice: one slot with both counts (log-probs weighted by count)
                let same = a.0 == b.0;
                if same {
                    a.2 = (a.2 * a.1 as f64 + b.2 * b.1 as f64) / (a.1 + b.1) as f64;
                    a.1 += b.1;
                }
                same
            });
            let total: u64 = slots.iter().map(|s| s.1).sum();
            if !slots.is_empty() && total != n as u64 {
                return bad("targets.weights", format!("counts summing to num_samples = {n} (weights summing to 1)"), format!("{total} draws at row {r}"));
            }
            let d = slots.len();
            k_row = k_row.max(d);
            f.a.push(d as u64);
            let mut prev = -1i64;
            for s in &slots {
                f.b.push((s.0 - prev - 1) as u64);
                prev = s.0;
            }
            if d >= 2 {
                let m = (0..d).max_by_key(|&i| (slots[i].1, std::cmp::Reverse(i))).expect("d ≥ 2");
                f.c.extend(slots.iter().enumerate().filter(|&(i, _)| i != m).map(|(_, s)| s.1 - 1));
                f.argmax.push(m as u64);
            }
            if d > 0 {
                let cross: f64 = slots.iter().map(|s| s.1 as f64 * s.2).sum::<f64>() / n as f64;
                f.d.push(((-cross).max(0.0) * (1u64 << CROSS_QUANTUM_BITS) as f64).round().min(MAX_VALUE as f64) as u64);
            }
        }
        Ok(k_row)
    }

    fn gather_topk(&self, t: &Rows, has_tail: bool, f: &mut Fields) -> Result<usize> {
        let mut used: Vec<usize> = Vec::with_capacity(t.k);
        let mut k_row = 1;
        let scale = (1u64 << TOPK_QUANTUM_BITS) as f32;
        for r in 0..t.rows {
            used.clear();
            for j in r * t.k..(r + 1) * t.k {
                let id = self.check_id(t.ids[j], r, j % t.k)?;
                let lp = t.logprobs[j];
                if id >= 0 && lp.is_nan() {
                    return bad("targets.logprobs", "log-probabilities (finite or -inf)", format!("NaN at row {r}, slot {}", j % t.k));
                }
                if id >= 0 && lp != f32::NEG_INFINITY {
                    used.push(j);
                }
            }
            if !used.windows(2).all(|p| t.logprobs[p[0]] >= t.logprobs[p[1]]) {
                used.sort_by(|&a, &b| t.logprobs[b].total_cmp(&t.logprobs[a])); // stable
            }
            k_row = k_row.max(used.len());
            f.used.push(used.len());
            let mut prev = 0u64;
            for (i, &j) in used.iter().enumerate() {
                // -lp · 128 is exact (power-of-two scale); the code saturates far below any real log-prob
                let q = ((-t.logprobs[j]).max(0.0) * scale).round().min(MAX_Q as f32) as u64;
                let q = q.max(prev); // monotone even if rounding ties disagree with the sort
                if i == 0 {
                    f.b.push(q);
                } else {
                    f.c.push(q - prev);
                }
                prev = q;
                f.ids.push(t.ids[j] as u64);
            }
            if has_tail {
                let tail = t.tail.expect("checked")[r];
                if tail.is_nan() || tail > 0.0 {
                    return bad("targets.tail_logprob", "a log-probability ≤ 0 (or -inf)", format!("{tail} at row {r}"));
                }
                f.d.push(if tail == f32::NEG_INFINITY { 0 } else { 1 + ((-tail * scale).round().min(MAX_Q as f32) as u64) });
            }
        }
        Ok(k_row)
    }

    fn check_id(&self, id: i64, row: usize, slot: usize) -> Result<i64> {
        if id < -1 || (id >= 0 && id as u64 >= self.vocab) {
            return bad("targets.indices", format!("ids in [0, {}) or -1 for an unused slot", self.vocab), format!("{id} at row {row}, slot {slot}"));
        }
        Ok(id)
    }

    /// Decode a record of `rows` positions and `k_row` slots into `out` (unused slots: id −1,
    /// log-prob −inf, weight 0).
    pub fn decode(&self, data: &[u8], rows: usize, k_row: usize, out: RowsMut) -> Result<()> {
        self.decode_into(data, rows, k_row, k_row, out)
    }

    /// Decode many records into one padded batch: record `b` (`data[offsets[b]..offsets[b+1]]`,
    /// `rows[b]` positions of `k_rows[b]` slots) fills rows `b·stride ..` of `out`, which has
    /// `records · stride` rows of `width ≥ k_rows[b]` slots; every other slot is unused (id −1,
    /// log-prob −inf, weight 0) and a padded position's tail log-prob is 0. Errors name the record.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_many(&self, data: &[u8], offsets: &[i64], rows: &[i64], k_rows: &[i64], stride: usize, width: usize, out: RowsMut) -> Result<()> {
        let records = rows.len();
        if offsets.len() != records + 1 || k_rows.len() != records {
            return Err(KdError::ShapeMismatch { what: format!("offsets of {} records, rows and k_rows of {records}", offsets.len().saturating_sub(1)) });
        }
        let RowsMut { ids, logprobs, mut weights, mut tail } = out;
        let n = records * stride * width;
        if ids.len() != n || logprobs.len() != n || weights.as_ref().is_some_and(|w| w.len() != n) || tail.as_ref().is_some_and(|t| t.len() != records * stride) {
            return Err(KdError::ShapeMismatch { what: format!("outputs of {records} records × {stride} positions × {width} slots") });
        }
        for b in 0..records {
            let (start, end, r, k) = (offsets[b], offsets[b + 1], rows[b], k_rows[b]);
            if start < 0 || end < start || end as usize > data.len() || r < 0 || r as usize > stride || k < 1 || k as usize > width {
                return bad("records", "offsets inside the data, rows ≤ stride and 1 ≤ k_rows ≤ width", format!("record {b}: bytes {start}..{end} of {}, {r} rows, k_row {k}", data.len()));
            }
            let (r, k) = (r as usize, k as usize);
            let span = b * stride * width..(b + 1) * stride * width;
            let split = r * width;
            let (ids_b, lps_b) = (&mut ids[span.clone()], &mut logprobs[span.clone()]);
            let mut w_b = weights.as_deref_mut().map(|w| &mut w[span.clone()]);
            let mut t_b = tail.as_deref_mut().map(|t| &mut t[b * stride..(b + 1) * stride]);
            let outputs = RowsMut {
                ids: &mut ids_b[..split],
                logprobs: &mut lps_b[..split],
                weights: w_b.as_deref_mut().map(|w| &mut w[..split]),
                tail: t_b.as_deref_mut().map(|t| &mut t[..r]),
            };
            self.decode_into(&data[start as usize..end as usize], r, k, width, outputs).map_err(|e| match e {
                KdError::InvalidArgument { got, .. } => KdError::InvalidArgument { name: "data", expected: "compact records of this cache".into(), got: format!("record {b}: {got}") },
                other => other,
            })?;
            ids_b[split..].fill(-1); // padded positions
            lps_b[split..].fill(f32::NEG_INFINITY);
            if let Some(w) = w_b {
                w[split..].fill(0.0);
            }
            if let Some(t) = t_b {
                t[r..].fill(0.0);
            }
        }
        Ok(())
    }

    /// [`Self::decode`] into rows of `width ≥ k_row` slots.
    fn decode_into(&self, data: &[u8], rows: usize, k_row: usize, width: usize, out: RowsMut) -> Result<()> {
        let RowsMut { ids, logprobs, mut weights, mut tail } = out;
        let n = rows * width;
        let sampled = matches!(self.scheme, Scheme::Sample { .. });
        let has_tail = matches!(self.scheme, Scheme::TopK { has_tail: true });
        if ids.len() != n || logprobs.len() != n || weights.as_ref().map_or(sampled, |w| w.len() == n) != sampled
            || tail.as_ref().map_or(has_tail, |t| t.len() == rows) != has_tail || k_row > width
        {
            return Err(KdError::ShapeMismatch { what: format!("outputs of a record of {rows} positions × {k_row} slots") });
        }
        if k_row == 0 {
            return corrupt("0 slots per position");
        }
        ids.fill(-1);
        logprobs.fill(f32::NEG_INFINITY);
        if let Some(w) = weights.as_deref_mut() {
            w.fill(0.0);
        }
        let mut rd = BitReader::new(data);
        let ks: Vec<u32> = (0..4).map(|_| rd.get(5).map(|k| k as u32)).collect::<Option<_>>().map_or_else(|| corrupt("no header"), Ok)?;
        let bits = id_bits(self.vocab);
        let inv = 1.0 / (1u64 << TOPK_QUANTUM_BITS) as f64;
        for r in 0..rows {
            let slot = r * width..r * width + k_row;
            let (ids, lps) = (&mut ids[slot.clone()], &mut logprobs[slot.clone()]);
            let word = rd.rice(ks[0]).map_or_else(early, Ok)?;
            match self.scheme {
                Scheme::Sample { num_samples } => {
                    let d = word as usize;
                    if d > k_row || d > num_samples as usize {
                        return corrupt(&format!("{d} ids at position {r}, more than {k_row} slots"));
                    }
                    let w = &mut weights.as_deref_mut().expect("checked")[slot];
                    let mut id = -1i64;
                    for out in ids.iter_mut().take(d) {
                        id += 1 + rd.rice(ks[1]).map_or_else(early, Ok)? as i64;
                        if id as u64 >= self.vocab {
                            return corrupt(&format!("id {id} at position {r} outside the vocabulary of {}", self.vocab));
                        }
                        *out = id;
                    }
                    let m = if d >= 2 { rd.get(ceil_log2(d)).map_or_else(early, Ok)? as usize } else { 0 };
                    if d >= 2 && m >= d {
                        return corrupt("count slot out of range");
                    }
                    let mut rest = num_samples as u64;
                    for (j, wj) in w.iter_mut().enumerate().take(d) {
                        if j != m {
                            let c = 1 + rd.rice(ks[2]).map_or_else(early, Ok)?;
                            if c >= rest {
                                return corrupt(&format!("counts at position {r} exceed num_samples"));
                            }
                            rest -= c;
                            *wj = c as f32 / num_samples as f32;
                        }
                    }
                    if d > 0 {
                        w[m] = rest as f32 / num_samples as f32;
                        let x = rd.rice(ks[3]).map_or_else(early, Ok)?;
                        let lp = -(x as f64 / (1u64 << CROSS_QUANTUM_BITS) as f64) as f32;
                        lps[..d].fill(lp);
                    }
                }
                Scheme::TopK { has_tail } => {
                    if word > k_row as u64 {
                        return corrupt(&format!("{word} unused slots at position {r} of {k_row}"));
                    }
                    let d = k_row - word as usize;
                    let mut q = 0u64;
                    for (j, lp) in lps.iter_mut().enumerate().take(d) {
                        let step = rd.rice(ks[if j == 0 { 1 } else { 2 }]).map_or_else(early, Ok)?;
                        q = q.saturating_add(step);
                        if q > MAX_Q {
                            return corrupt("log-prob code out of range");
                        }
                        *lp = -((q as f64) * inv) as f32;
                    }
                    for id in ids.iter_mut().take(d) {
                        let v = rd.get(bits).map_or_else(early, Ok)?;
                        if v >= self.vocab {
                            return corrupt(&format!("id {v} at position {r} outside the vocabulary of {}", self.vocab));
                        }
                        *id = v as i64;
                    }
                    if has_tail {
                        let v = rd.rice(ks[3]).map_or_else(early, Ok)?;
                        if v > MAX_Q + 1 {
                            return corrupt("tail code out of range");
                        }
                        tail.as_deref_mut().expect("checked")[r] = if v == 0 { f32::NEG_INFINITY } else { -(((v - 1) as f64) * inv) as f32 };
                    }
                }
            }
        }
        if !rd.at_end() {
            return corrupt(&format!("{} bytes, more than its {rows} positions use", data.len()));
        }
        Ok(())
    }
}

fn check_inputs(t: &Rows, sampled: bool, has_tail: bool) -> Result<()> {
    let n = t.rows * t.k;
    let len = |name: &'static str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(KdError::ShapeMismatch { what: format!("{name} has {got} elements, expected {want}") })
        }
    };
    len("targets.indices", t.ids.len(), n)?;
    len("targets.logprobs", t.logprobs.len(), n)?;
    match (sampled, t.weights) {
        (true, Some(w)) => len("targets.weights", w.len(), n)?,
        (true, None) => return bad("targets.weights", "weights for sampled targets", "None".into()),
        _ => {}
    }
    match (has_tail, t.tail) {
        (true, Some(x)) => len("targets.tail_logprob", x.len(), t.rows)?,
        (true, None) => return bad("targets.tail_logprob", "a tail (the cache stores one)", "None".into()),
        _ => {}
    }
    Ok(())
}

fn ceil_log2(d: usize) -> u32 {
    usize::BITS - (d - 1).leading_zeros()
}

/// A sequence's values, field by field (the four Rice-coded fields `a`–`d`, in header order:
/// sampled `d`, gaps, counts, cross terms; top-k unused slots, first codes, steps, tails),
/// written interleaved per position by [`Fields::write`].
#[derive(Default)]
struct Fields {
    a: Vec<u64>,
    b: Vec<u64>,
    c: Vec<u64>,
    d: Vec<u64>,
    argmax: Vec<u64>,
    ids: Vec<u64>,
    /// Top-k: the used slots of each position.
    used: Vec<usize>,
}

impl Fields {
    fn write(&self, scheme: Scheme, id_bits: u32) -> Vec<u8> {
        let ks = [best_k(&self.a), best_k(&self.b), best_k(&self.c), best_k(&self.d)];
        let mut w = BitWriter::default();
        for &k in &ks {
            w.put(k as u64, 5);
        }
        let (mut b, mut c, mut d, mut m, mut ids) = (0, 0, 0, 0, 0);
        for (pos, &word) in self.a.iter().enumerate() {
            w.rice(word, ks[0]);
            match scheme {
                Scheme::Sample { .. } => {
                    let n = word as usize;
                    (b..b + n).for_each(|i| w.rice(self.b[i], ks[1]));
                    b += n;
                    if n >= 2 {
                        w.put(self.argmax[m], ceil_log2(n));
                        m += 1;
                        (c..c + n - 1).for_each(|i| w.rice(self.c[i], ks[2]));
                        c += n - 1;
                    }
                    if n > 0 {
                        w.rice(self.d[d], ks[3]);
                        d += 1;
                    }
                }
                Scheme::TopK { has_tail } => {
                    let n = self.used[pos];
                    if n > 0 {
                        w.rice(self.b[b], ks[1]);
                        b += 1;
                        (c..c + n - 1).for_each(|i| w.rice(self.c[i], ks[2]));
                        c += n - 1;
                    }
                    (ids..ids + n).for_each(|i| w.put(self.ids[i], id_bits));
                    ids += n;
                    if has_tail {
                        w.rice(self.d[d], ks[3]);
                        d += 1;
                    }
                }
            }
        }
        w.finish()
    }
}

/// The Rice parameter that codes `vals` in the fewest bits.
fn best_k(vals: &[u64]) -> u32 {
    if vals.is_empty() {
        return 0;
    }
    let mean = vals.iter().sum::<u64>() / vals.len() as u64;
    let guess = 63u32.saturating_sub(mean.max(1).leading_zeros());
    let cost = |k: u32| vals.iter().map(|&v| rice_bits(v, k)).sum::<u64>();
    (guess.saturating_sub(2)..=(guess + 1).min(31)).min_by_key(|&k| (cost(k), k)).expect("non-empty")
}

fn rice_bits(v: u64, k: u32) -> u64 {
    let q = v >> k;
    if q < ESCAPE {
        q + 1 + k as u64
    } else {
        ESCAPE + ESCAPE_BITS as u64
    }
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// The low `bits` bits of `v` (the rest must be 0).
    fn put(&mut self, mut v: u64, mut bits: u32) {
        while bits > 32 {
            self.put32(v & 0xFFFF_FFFF, 32);
            v >>= 32;
            bits -= 32;
        }
        self.put32(v, bits);
    }

    fn put32(&mut self, v: u64, bits: u32) {
        self.acc |= v << self.n; // n < 8 and bits ≤ 32: fits
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn rice(&mut self, v: u64, k: u32) {
        let v = v.min(MAX_VALUE);
        let q = v >> k;
        if q < ESCAPE {
            self.put((1u64 << q) - 1, q as u32 + 1); // q ones, then the zero
            self.put(v & ((1u64 << k) - 1), k);
        } else {
            self.put((1u64 << ESCAPE) - 1, ESCAPE as u32);
            self.put(v, ESCAPE_BITS);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0, acc: 0, n: 0 }
    }

    /// Top the buffer up to at least 57 bits (fewer only at the end of the data).
    #[inline]
    fn refill(&mut self) {
        if self.pos + 8 <= self.data.len() {
            let word = u64::from_le_bytes(self.data[self.pos..self.pos + 8].try_into().expect("8 bytes"));
            self.acc |= word << self.n; // the bits that do not fit are read again next time
            let take = (63 - self.n) / 8;
            self.pos += take as usize;
            self.n += take * 8;
            return;
        }
        while self.n <= 56 && self.pos < self.data.len() {
            self.acc |= (self.data[self.pos] as u64) << self.n;
            self.pos += 1;
            self.n += 8;
        }
    }

    /// The next `bits ≤ 56` bits, or None past the end.
    fn get(&mut self, bits: u32) -> Option<u64> {
        if self.n < bits {
            self.refill();
            if self.n < bits {
                return None;
            }
        }
        let v = if bits == 0 { 0 } else { self.acc & (u64::MAX >> (64 - bits)) };
        self.skip(bits);
        Some(v)
    }

    fn skip(&mut self, bits: u32) {
        self.acc = if bits >= 64 { 0 } else { self.acc >> bits };
        self.n -= bits;
    }

    #[inline]
    fn rice(&mut self, k: u32) -> Option<u64> {
        if self.n < 57 {
            self.refill();
        }
        // The common case: the quotient and its terminating zero are in the buffer.
        let ones = self.acc.trailing_ones();
        if (ones as u64) < ESCAPE && ones < self.n && ones + 1 + k <= self.n {
            self.skip(ones + 1);
            let r = if k == 0 { 0 } else { self.acc & (u64::MAX >> (64 - k)) };
            self.skip(k);
            return Some(((ones as u64) << k) | r);
        }
        self.rice_slow(k)
    }

    fn rice_slow(&mut self, k: u32) -> Option<u64> {
        let mut q = 0u64;
        loop {
            if self.n == 0 {
                self.refill();
                if self.n == 0 {
                    return None;
                }
            }
            let avail = self.n.min((ESCAPE - q) as u32);
            let ones = self.acc.trailing_ones().min(avail);
            self.skip(ones);
            q += ones as u64;
            if q == ESCAPE {
                return self.get(ESCAPE_BITS);
            }
            if ones < avail {
                self.skip(1); // the terminating zero
                break;
            }
        }
        Some((q << k) | self.get(k)?)
    }

    /// Whether every byte was read and the padding bits are zero.
    fn at_end(&self) -> bool {
        self.pos == self.data.len() && self.n < 8 && self.acc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (xorshift), so the tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn sampled(rng: &mut Rng, rows: usize, k: usize, n: u32, vocab: u64) -> (Vec<i64>, Vec<f32>, Vec<f32>) {
        let (mut ids, mut lps, mut ws) = (vec![-1i64; rows * k], vec![f32::NEG_INFINITY; rows * k], vec![0f32; rows * k]);
        for r in 0..rows {
            if r % 7 == 3 {
                continue; // a position without targets
            }
            let mut counts = std::collections::BTreeMap::new();
            for _ in 0..n {
                // a few frequent ids and a long tail, like an LLM teacher
                let id = if rng.below(2) == 0 { rng.below(4.min(vocab)) } else { rng.below(vocab) };
                *counts.entry(id as i64).or_insert(0u32) += 1;
            }
            for (j, (id, c)) in counts.into_iter().enumerate().take(k) {
                ids[r * k + j] = id;
                lps[r * k + j] = -(rng.below(1000) as f32) / 97.0;
                ws[r * k + j] = c as f32 / n as f32;
            }
        }
        (ids, lps, ws)
    }

    #[test]
    fn sampled_round_trip_keeps_ids_counts_and_the_cross_term() {
        let mut rng = Rng(7);
        for &(vocab, n) in &[(2u64, 1u32), (5, 3), (300, 50), (128_256, 50), (1 << 32, 200)] {
            let (rows, k) = (23, n as usize);
            let (ids, lps, ws) = sampled(&mut rng, rows, k, n, vocab);
            // drop rows whose draws did not fit k slots (counts must sum to n)
            let codec = Compact::new(Scheme::Sample { num_samples: n }, vocab).unwrap();
            let t = Rows { rows, k, ids: &ids, logprobs: &lps, weights: Some(&ws), tail: None };
            let (data, k_row) = codec.encode(&t).unwrap();
            let (mut di, mut dl, mut dw) = (vec![0i64; rows * k_row], vec![0f32; rows * k_row], vec![0f32; rows * k_row]);
            codec.decode(&data, rows, k_row, RowsMut { ids: &mut di, logprobs: &mut dl, weights: Some(&mut dw), tail: None }).unwrap();
            for r in 0..rows {
                let used: Vec<(i64, f32)> = (0..k).map(|j| (ids[r * k + j], ws[r * k + j])).filter(|s| s.0 >= 0).collect();
                let got: Vec<(i64, f32)> = (0..k_row).map(|j| (di[r * k_row + j], dw[r * k_row + j])).filter(|s| s.0 >= 0).collect();
                assert_eq!(used, got, "row {r}");
                let cross: f64 = (0..k).filter(|&j| ids[r * k + j] >= 0).map(|j| ws[r * k + j] as f64 * lps[r * k + j] as f64).sum();
                let back: f64 = (0..k_row).filter(|&j| di[r * k_row + j] >= 0).map(|j| dw[r * k_row + j] as f64 * dl[r * k_row + j] as f64).sum();
                assert!((cross - back).abs() <= 1e-5 + 1e-6 * cross.abs(), "row {r}: {cross} vs {back}");
            }
        }
    }

    #[test]
    fn topk_round_trip_within_the_bound() {
        let mut rng = Rng(11);
        for &(vocab, k) in &[(1u64, 1usize), (3, 3), (1000, 8), (128_256, 128)] {
            let rows = 19;
            let mut ids = vec![-1i64; rows * k];
            let mut lps = vec![f32::NEG_INFINITY; rows * k];
            let mut tail = vec![0f32; rows];
            for r in 0..rows {
                let used = if r % 5 == 2 { k / 2 } else { k };
                for j in 0..used {
                    ids[r * k + j] = rng.below(vocab) as i64;
                    lps[r * k + j] = -(rng.below(1 << 20) as f32) / 4096.0; // unsorted on purpose
                }
                tail[r] = if r % 4 == 1 { f32::NEG_INFINITY } else { -(rng.below(5000) as f32) / 300.0 };
            }
            lps[0] = -1e9; // saturates far below any real log-prob
            let codec = Compact::new(Scheme::TopK { has_tail: true }, vocab).unwrap();
            let t = Rows { rows, k, ids: &ids, logprobs: &lps, weights: None, tail: Some(&tail) };
            let (data, k_row) = codec.encode(&t).unwrap();
            let (mut di, mut dl, mut dt) = (vec![0i64; rows * k_row], vec![0f32; rows * k_row], vec![0f32; rows]);
            codec.decode(&data, rows, k_row, RowsMut { ids: &mut di, logprobs: &mut dl, weights: None, tail: Some(&mut dt) }).unwrap();
            for r in 0..rows {
                let mut want: Vec<(i64, f32)> = (0..k).map(|j| (ids[r * k + j], lps[r * k + j])).filter(|s| s.0 >= 0).collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1));
                let got: Vec<(i64, f32)> = (0..k_row).map(|j| (di[r * k_row + j], dl[r * k_row + j])).filter(|s| s.0 >= 0).collect();
                assert_eq!(want.len(), got.len());
                for (w, g) in want.iter().zip(&got) {
                    let bound = if w.1 < -(MAX_Q as f32) / 128.0 { f32::INFINITY } else { TOPK_MAX_ABS_ERROR };
                    assert!((w.1 - g.1).abs() <= bound, "row {r}: {w:?} vs {g:?}");
                }
                assert!(got.windows(2).all(|p| p[0].1 >= p[1].1));
                let (tw, tg) = (tail[r], dt[r]);
                assert!(tw == tg || (tw - tg).abs() <= TOPK_MAX_ABS_ERROR, "tail {tw} vs {tg}");
            }
        }
    }

    #[test]
    fn escaped_values_round_trip() {
        let mut w = BitWriter::default();
        let vals = [0u64, 1, 31, 32, 1 << 20, MAX_VALUE, 5];
        for &v in &vals {
            w.rice(v, 0);
            w.rice(v, 3);
        }
        let data = w.finish();
        let mut r = BitReader::new(&data);
        for &v in &vals {
            assert_eq!(r.rice(0), Some(v));
            assert_eq!(r.rice(3), Some(v));
        }
        assert!(r.at_end());
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        let mut rng = Rng(3);
        let (rows, k, n, vocab) = (9, 50, 50u32, 32_000u64);
        let (ids, lps, ws) = sampled(&mut rng, rows, k, n, vocab);
        let codec = Compact::new(Scheme::Sample { num_samples: n }, vocab).unwrap();
        let (data, k_row) = codec.encode(&Rows { rows, k, ids: &ids, logprobs: &lps, weights: Some(&ws), tail: None }).unwrap();
        let mut out = (vec![0i64; rows * k_row], vec![0f32; rows * k_row], vec![0f32; rows * k_row]);
        let mut run = |d: &[u8], rows: usize| {
            let m = RowsMut { ids: &mut out.0[..rows * k_row], logprobs: &mut out.1[..rows * k_row], weights: Some(&mut out.2[..rows * k_row]), tail: None };
            codec.decode(d, rows, k_row, m)
        };
        for cut in 0..data.len() {
            assert!(run(&data[..cut], rows).is_err(), "truncated at {cut}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(run(&longer, rows).is_err());
        assert!(run(&data, rows - 1).is_err());
        for bit in 0..data.len() * 8 {
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            let _ = run(&d, rows); // any result but a panic
        }
    }

    #[test]
    fn bad_targets_are_named() {
        let codec = Compact::new(Scheme::Sample { num_samples: 4 }, 10).unwrap();
        let err = |ids: &[i64], w: &[f32], lp: &[f32]| {
            codec.encode(&Rows { rows: 1, k: ids.len(), ids, logprobs: lp, weights: Some(w), tail: None }).unwrap_err().to_string()
        };
        assert!(err(&[10, 1], &[0.5, 0.5], &[-1.0, -1.0]).contains("targets.indices"));
        assert!(err(&[0, 1], &[0.5, 0.25], &[-1.0, -1.0]).contains("targets.weights"));
        assert!(err(&[0, 1], &[0.5, 0.3], &[-1.0, -1.0]).contains("targets.weights"));
        assert!(err(&[0, 1], &[0.5, 0.5], &[f32::NAN, -1.0]).contains("targets.logprobs"));
        let topk = Compact::new(Scheme::TopK { has_tail: true }, 10).unwrap();
        let e = topk.encode(&Rows { rows: 1, k: 1, ids: &[1], logprobs: &[-1.0], weights: None, tail: Some(&[0.5]) }).unwrap_err();
        assert!(e.to_string().contains("targets.tail_logprob"));
    }
}
