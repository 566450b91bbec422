"""Offline distillation: kdfast's sparse-target path against the PyTorch code users write.

Three parts, each case in a fresh subprocess (the helpers of :mod:`kdfast.benchmarks._measure`:
median wall time, resident-set high-water mark):

1. ``compress`` — turning teacher logits ``[N, V]`` into stored targets:

   * ``torch_topk``   — ``log_softmax(x.float())`` + ``topk(k)`` + the tail log-mass
     ``log1p(-Σ exp(top-k logprobs))``: the same fields as :func:`kdfast.compress_topk`
     (ids, full-vocabulary log-probs, tail log-prob; the tail is less accurate than kdfast's
     when the tail mass is tiny, never more);
   * ``kdfast_topk``  — :func:`kdfast.compress_topk` (Rust, one streaming pass per row);
   * ``torch_sample`` — ``log_softmax`` + ``torch.multinomial(p, N, replacement=True)`` + gather:
     raw draws of weight 1/N (which :func:`kdfast.sparse_kl` accepts as they are);
   * ``kdfast_sample`` — :func:`kdfast.compress_sample`;
   * ``read``         — one read of the logits, the bandwidth floor of any compressor: the
     smaller of ``x.sum()`` and ``out.copy_(x)`` into a preallocated tensor.

2. ``loss`` — forward + backward of :func:`kdfast.sparse_kl` on a student ``[N, V]`` against
   top-k (bucket tail) and sampled targets, with the Rust kernel and with kdfast's own pure-PyTorch
   reference (``backend="torch"``), beside the dense :func:`kdfast.forward_kl` (Rust) on the same
   student against the full teacher logits.

3. ``fidelity`` — storage and fidelity of the stored targets, on the logits of a *real* teacher (a
   byte-level GPT-2 trained here for about a minute on the text of Python's ``pydoc`` topics,
   V = 256, held-out text) and on a *synthetic* V = 32000 distribution (heavy-tailed, see
   :func:`zipf_logits`). Per method: bytes per token as stored by :func:`kdfast.encode_targets`,
   KL between the full teacher distribution and the one reconstructed from the decoded record,
   teacher mass covered, and the cosine between the sparse loss's gradient and the full
   forward-KL gradient for a student.

The teacher/student logits of parts 1 and 2 come from :func:`zipf_logits` (the same synthetic
distribution as part 3, mean entropy ≈ 2.2 nats at V = 32000, ≈ 12 distinct ids in 50 draws).

Run ``python -m kdfast.benchmarks.offline --help`` or ``python benches/bench_offline.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kdfast.benchmarks import _measure

MODULE = "kdfast.benchmarks.offline"

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("compress", "loss", "fidelity")

TOPK = 64
NUM_SAMPLES = 50

FULL_COMPRESS_SIZES = ((2048, 32000), (2048, 128256))
QUICK_COMPRESS_SIZES = ((256, 32000),)
FULL_LOSS_SIZES = ((2048, 32000),)  # add 2048x128256 with --loss-sizes (about 10 more minutes)
QUICK_LOSS_SIZES = ((256, 32000),)

COMPRESS_IMPLS = ("read", "torch_topk", "kdfast_topk", "torch_sample", "kdfast_sample")
LOSS_IMPLS = ("kdfast_topk", "torch_topk", "kdfast_sample", "torch_sample", "kdfast_dense")

FIDELITY_TOPK = (8, 32, 64, 128)
FIDELITY_SAMPLES = (16, 50, 100)

# Targets (✓/✗ in the tables).
TARGET_SPEEDUP_VS_TORCH = 3.0  # compress_topk at least 3x faster than log_softmax + topk
TARGET_VS_READ = 2.0  # compress_topk within 2x one read of the logits
TARGET_SAMPLE_BYTES = 40.0  # sampled targets, N = 50: at most 40 bytes per token


# ----------------------------------------------------------------------------------------------
# Synthetic teacher-like logits.


def zipf_logits(n: int, v: int, *, seed: int, dtype: torch.dtype = torch.float32,
                prior_seed: int = 1234) -> torch.Tensor:
    """Heavy-tailed, LLM-like logits ``[n, v]``.

    ``x = s_row · (−log(1 + rank_j) + ε + boost)``: a Zipf (α = 1) prior over a fixed random
    permutation of the ids (``prior_seed``; shared by every row and by teacher and student, like
    unigram frequencies), standard normal noise ε per element, and 64 "context" ids per row
    boosted by ``max(0, 13 + ln(V/32000) + 2·N(0,1) − 2·ln(1 + j))`` (j = 0..63), the row scaled
    by ``s_row ~ U(0.7, 1.4)``. At V = 32000: mean entropy ≈ 2.2 nats, top-1 probability ≈ 0.56,
    top-64 mass ≈ 0.92, ≈ 12 distinct ids among 50 draws (the Sparse Logit Sampling paper's
    figure for a real 8B teacher). Generated in float32 in 256-row chunks, then cast to ``dtype``.
    """
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(prior_seed))
    prior = torch.empty(v)
    prior[perm] = -torch.log1p(torch.arange(v, dtype=torch.float32))
    g = torch.Generator().manual_seed(seed)
    m = 64
    decay = 2.0 * torch.log1p(torch.arange(m, dtype=torch.float32))
    boost0 = 13.0 + math.log(v / 32000)
    out = torch.empty(n, v, dtype=dtype)
    for r0 in range(0, n, 256):
        r1 = min(n, r0 + 256)
        x = torch.randn(r1 - r0, v, generator=g)
        x += prior
        ids = torch.randint(0, v, (r1 - r0, m), generator=g)
        b = (boost0 + 2.0 * torch.randn(r1 - r0, m, generator=g) - decay).clamp_(min=0.0)
        x.scatter_add_(1, ids, b)
        x *= torch.empty(r1 - r0, 1).uniform_(0.7, 1.4, generator=g)
        out[r0:r1] = x
    return out


def distribution_stats(logits: torch.Tensor, rows: int = 512) -> dict[str, float]:
    """Mean entropy (nats), top-1 probability and top-64 mass of ``softmax`` of the first rows."""
    lp = torch.log_softmax(logits[:rows].double(), dim=-1)
    p = lp.exp()
    top = p.topk(min(64, p.shape[-1]), dim=-1).values
    return {
        "entropy_nats": float(-(p * lp).nansum(-1).mean()),
        "top1_prob": float(top[:, 0].mean()),
        "top64_mass": float(top.sum(-1).mean()),
    }


# ----------------------------------------------------------------------------------------------
# Measurement loop (inside a worker).


def _timed_with_peak(fn: Callable[[], Any], *, repeats: int, warmup: int,
                     before: Callable[[], None] | None = None) -> tuple[dict[str, Any], Any]:
    """Median time of ``fn()`` and the extra resident-memory peak of the timed runs (over the
    memory held before them), with the primitives of :mod:`_measure`. Returns the last output."""
    before = before or (lambda: None)
    hwm_before = _measure.read_status_kib("VmHWM")
    warm = []
    for _ in range(warmup):
        before()
        dt, out = _measure.time_call(fn)
        warm.append(dt)
        del out
    before()
    gc.collect()
    if _measure.reset_peak_rss():
        method, base = "clear_refs", _measure.read_status_kib("VmHWM")
    else:
        method, base = "hwm_before", hwm_before
    times, out = [], None
    for _ in range(repeats):
        before()
        out = None
        dt, out = _measure.time_call(fn)
        times.append(dt)
    peak = _measure.read_status_kib("VmHWM")
    res: dict[str, Any] = {"time_s": _measure.median(times), "times_s": times,
                           "warmup_times_s": warm, "peak_method": method}
    if base is not None and peak is not None:
        res["extra_peak_bytes"] = (peak - base) * 1024
    return res, out


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        dt, out = _measure.time_call(fn)
        ts.append(dt)
        del out
    return _measure.median(ts)


# ----------------------------------------------------------------------------------------------
# Part 1: compression.


def torch_topk(x: torch.Tensor, k: int):
    """What users write: full log-softmax, top-k of it, and the tail log-mass from the top-k."""
    lp = torch.log_softmax(x.float(), dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1.0))
    return ids, vals, tail


def torch_sample(x: torch.Tensor, n: int):
    """``n`` draws with replacement from softmax(x) with torch.multinomial, weight 1/n each."""
    lp = torch.log_softmax(x.float(), dim=-1)
    ids = torch.multinomial(lp.exp(), n, replacement=True)
    return ids, lp.gather(-1, ids), torch.full(ids.shape, 1.0 / n)


def run_compress(spec: dict[str, Any]) -> dict[str, Any]:
    import kdfast

    n, v, dtype, impl = spec["n"], spec["v"], DTYPES[spec["dtype"]], spec["impl"]
    x = zipf_logits(n, v, seed=1, dtype=dtype)
    input_bytes = x.numel() * x.element_size()
    res: dict[str, Any] = {"input_bytes": input_bytes, "threads": torch.get_num_threads()}
    if impl == "read":
        out = torch.empty_like(x)
        out.fill_(0)
        reps = max(5, spec["repeats"])
        res["sum_s"] = _median_time(lambda: x.sum(), reps)
        res["copy_s"] = _median_time(lambda: out.copy_(x), reps)
        res["time_s"] = min(res["sum_s"], res["copy_s"])
        return res
    k, ns = spec["k"], spec["num_samples"]
    fns = {
        "torch_topk": lambda: torch_topk(x, k),
        "kdfast_topk": lambda: kdfast.compress_topk(x, k),
        "torch_sample": lambda: torch_sample(x, ns),
        "kdfast_sample": lambda: kdfast.compress_sample(x, ns, seed=0),
    }
    timing, out = _timed_with_peak(fns[impl], repeats=spec["repeats"], warmup=spec["warmup"])
    res.update(timing)
    if "extra_peak_bytes" in res:
        res["extra_peak_inputs"] = res["extra_peak_bytes"] / input_bytes
    # Checks outside the timed region, on the first 64 rows, against float64.
    m = min(64, n)
    lp64 = torch.log_softmax(x[:m].double(), dim=-1)
    if impl.endswith("topk"):
        ids, lp, tail = ((out.indices, out.logprobs, out.tail_logprob) if impl == "kdfast_topk" else out)
        ids, lp, tail = ids[:m], lp[:m].double(), tail[:m].double()
        ref_lp = lp64.gather(-1, ids)
        res["max_abs_logprob_err"] = float((lp - ref_lp).abs().max())
        ref_tail = torch.log1p(-ref_lp.exp().sum(-1).clamp(max=1.0))
        res["max_abs_tail_err"] = float((tail - ref_tail).abs().max())
        res["topk_mass_vs_true_topk"] = float(
            (ref_lp.exp().sum(-1) / lp64.exp().topk(k, dim=-1).values.sum(-1)).min())
    else:
        if impl == "kdfast_sample":
            used = (out.indices >= 0).sum(-1).float()
            res["mean_distinct_ids"] = float(used.mean())
            w_sum = out.weights.sum(-1)
            ids, lp = out.indices[:m], out.logprobs[:m]
        else:
            res["mean_distinct_ids"] = float(torch.tensor(
                [len(torch.unique(r)) for r in out[0][:256]], dtype=torch.float).mean())
            w_sum = out[2].sum(-1)
            ids, lp = out[0][:m], out[1][:m]
        res["max_abs_weight_sum_err"] = float((w_sum - 1).abs().max())
        ok = ids >= 0
        res["max_abs_logprob_err"] = float(
            (lp.double() - lp64.gather(-1, ids.clamp(min=0)))[ok].abs().max())
    return res


# ----------------------------------------------------------------------------------------------
# Part 2: the loss.


def run_loss(spec: dict[str, Any]) -> dict[str, Any]:
    import kdfast

    n, v, dtype, impl = spec["n"], spec["v"], DTYPES[spec["dtype"]], spec["impl"]
    teacher = zipf_logits(n, v, seed=1)
    student = zipf_logits(n, v, seed=2, dtype=dtype)
    targets = None
    if impl.endswith("topk"):
        targets = kdfast.compress_topk(teacher, spec["k"])
    elif impl.endswith("sample"):
        targets = kdfast.compress_sample(teacher, spec["num_samples"], seed=0)
    if impl == "kdfast_dense":
        teacher = teacher.to(dtype)
    else:
        del teacher
        teacher = None
    gc.collect()
    student.requires_grad_(True)
    input_bytes = student.numel() * student.element_size()
    backend = "torch" if impl.startswith("torch") else "rust"

    if impl == "kdfast_dense":
        def step():
            loss = kdfast.forward_kl(student, teacher, reduction="mean", backend="rust")
            loss.backward()
            return loss
    else:
        def step():
            loss = kdfast.sparse_kl(student, targets, tail="bucket", reduction="mean", backend=backend)
            loss.backward()
            return loss

    def clear():
        student.grad = None

    timing, loss = _timed_with_peak(step, repeats=spec["repeats"], warmup=spec["warmup"], before=clear)
    res: dict[str, Any] = {"input_bytes": input_bytes, "threads": torch.get_num_threads(), **timing}
    if "extra_peak_bytes" in res:
        res["extra_peak_inputs"] = res["extra_peak_bytes"] / input_bytes
    # One more call from a clean gradient for the checks (gradients accumulate across calls).
    clear()
    loss = step()
    g = student.grad.float()
    res["loss_value"] = float(loss.detach())
    res["grad_norm"] = float(g.norm())
    res["grad_dtype"] = str(student.grad.dtype).replace("torch.", "")
    res["grad_finite"] = bool(torch.isfinite(g).all())
    if targets is not None:
        res["slots"] = targets.k
        res["mean_used_slots"] = float((targets.indices >= 0).sum(-1).float().mean())
    return res


# ----------------------------------------------------------------------------------------------
# Part 3: storage and fidelity.


def _pydoc_bytes() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def _tiny_gpt2(vocab: int, context: int, layers: int, embd: int, heads: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=embd, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     activation_function="gelu")
    return GPT2LMHeadModel(cfg)


def train_byte_teacher(seconds: float, *, context: int = 128, batch: int = 32, layers: int = 2,
                       embd: int = 128, heads: int = 4, lr: float = 3e-3, seed: int = 0,
                       log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Train a byte-level GPT-2 on 90 % of the pydoc topics text for about ``seconds``.

    The step count is fixed after timing the first steps (so the cosine schedule ends on time);
    the *student* is the same model's snapshot at one third of the steps."""
    data = _pydoc_bytes()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    model = _tiny_gpt2(256, context, layers, embd, heads, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)

    def step():
        starts = torch.randint(0, len(train) - context, (batch,), generator=g)
        x = torch.stack([train[s:s + context] for s in starts.tolist()])
        logits = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    model.train()
    t0 = time.perf_counter()
    probe = 5
    for _ in range(probe):
        step()
    per_step = (time.perf_counter() - t0) / probe
    steps = max(3 * probe, int(seconds / per_step))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))))
    student_state, student_step, last = None, None, float("nan")
    for i in range(probe, steps):
        last = step()
        sched.step()
        if student_state is None and i + 1 >= steps // 3:
            student_state, student_step = copy.deepcopy(model.state_dict()), i + 1
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"  teacher step {i + 1}/{steps}: train loss {last:.3f}")
    student = _tiny_gpt2(256, context, layers, embd, heads, seed)
    student.load_state_dict(student_state)
    return {"teacher": model.eval(), "student": student.eval(), "val": val, "steps": steps,
            "student_step": student_step, "train_s": time.perf_counter() - t0,
            "final_train_loss": last, "params": sum(p.numel() for p in model.parameters()),
            "config": {"context": context, "batch": batch, "layers": layers, "embd": embd,
                       "heads": heads, "lr": lr}}


def _val_windows(val: torch.Tensor, positions: int, context: int) -> torch.Tensor:
    """Non-overlapping held-out windows, ``positions`` predicted bytes in all."""
    per = context - 1
    count = max(1, math.ceil(positions / per))
    stride = max(context, (len(val) - context) // count)
    return torch.stack([val[i * stride:i * stride + context] for i in range(count)])


def _row_chunks(n: int, size: int = 256) -> Iterable[slice]:
    for r0 in range(0, n, size):
        yield slice(r0, min(n, r0 + size))


def reconstruct(targets, v: int) -> torch.Tensor:
    """The distribution a stored record stands for, float64 ``[rows, V]``.

    * top-k: each listed id gets its stored probability, the stored tail mass is spread uniformly
      over the unlisted ids; renormalised to sum 1 (the 16-bit log-prob codes leave a ≤ 0.025 %
      error per probability);
    * sampled: ``p̂ = weights`` (count / N) on the drawn ids, 0 elsewhere.
    """
    ids = targets.indices
    rows = ids.shape[0]
    used = ids >= 0
    safe = ids.clamp(min=0)
    if targets.method == "sample":
        p = torch.zeros(rows, v, dtype=torch.float64)
        p.scatter_add_(1, safe, torch.where(used, targets.weights.double(), torch.zeros((), dtype=torch.float64)))
        return p
    listed = torch.where(used, targets.logprobs.double().exp(), torch.zeros((), dtype=torch.float64))
    n_listed = used.sum(-1, keepdim=True)
    tail = targets.tail_logprob.double().exp().unsqueeze(-1)
    fill = torch.where(n_listed < v, tail / (v - n_listed).clamp(min=1), torch.zeros_like(tail))
    p = fill.expand(rows, v).clone()
    p.scatter_(1, safe, torch.where(used, listed, fill.expand_as(listed)))
    return p / p.sum(-1, keepdim=True)


def _kl_rows(p_log: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row; ``p_log`` log-probs (float64), ``q`` probabilities (0 allowed → inf)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q.log()), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1)


def _rev_kl_rows(p_log: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per row (q may have zeros: 0 · log 0 = 0)."""
    terms = torch.where(q > 0, q * (q.log() - p_log), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


def fidelity_table(teacher: torch.Tensor, student: torch.Tensor, *, ks: Sequence[int],
                   ns: Sequence[int], seed: int = 0,
                   param_grads: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None
                   ) -> list[dict[str, Any]]:
    """Storage and fidelity of each method on teacher logits ``[P, V]`` and a student ``[P, V]``.

    ``param_grads(loss_fn)``, when given, returns the student model's flattened parameter
    gradient of ``loss_fn(student_logits)`` (the cosine the Sparse Logit Sampling paper
    reports)."""
    import kdfast
    from kdfast import _native

    t = teacher.float()
    s = student.float()
    rows, v = t.shape
    t_log = torch.log_softmax(t.double(), dim=-1)

    s_leaf = s.clone().requires_grad_(True)
    kdfast.forward_kl(s_leaf, t, reduction="sum").backward()
    g_full = s_leaf.grad.clone()
    pg_full = param_grads(lambda z: kdfast.forward_kl(z, t, reduction="mean")) if param_grads else None

    methods = [("topk", k) for k in ks] + [("sample", n) for n in ns]
    out = []
    for method, size in methods:
        if method == "topk":
            tg = kdfast.compress_topk(t, size)
            enc = kdfast.encode_targets(tg, v)
        else:
            tg = kdfast.compress_sample(t, size, seed=seed)
            enc = kdfast.encode_targets(tg, v, num_samples=size)
        dec = kdfast.decode_targets(enc)
        used = (dec.indices >= 0).sum(-1)
        ns_ = size if method == "sample" else None
        has_tail = method == "topk"
        kmax = int(used.max())
        row_bytes_used = {u: _native.encoded_row_bytes(max(1, u), v, has_tail, ns_)
                          for u in used.unique().tolist()}
        var_bytes = float(sum(row_bytes_used[u] for u in used.tolist()) / rows)
        # What-if for sampled targets: a variable-length record of ids and counts only (the
        # gradient does not need the stored log-probs): ceil(u · (id bits + count bits) / 8).
        lean_bytes = None
        if method == "sample":
            bits = max(1, math.ceil(math.log2(v))) + math.ceil(math.log2(size + 1))
            lean_bytes = float(((used * bits + 7) // 8).float().mean())

        kl, rkl, mass = [], [], []
        for sl in _row_chunks(rows):
            sub = kdfast.SparseTargets(
                indices=dec.indices[sl], logprobs=dec.logprobs[sl],
                weights=None if dec.weights is None else dec.weights[sl],
                tail_logprob=None if dec.tail_logprob is None else dec.tail_logprob[sl],
                temperature=dec.temperature, method=dec.method)
            q = reconstruct(sub, v)
            kl.append(_kl_rows(t_log[sl], q))
            rkl.append(_rev_kl_rows(t_log[sl], q))
            ok = sub.indices >= 0
            mass.append(torch.where(ok, t_log[sl].gather(-1, sub.indices.clamp(min=0)).exp(),
                                    torch.zeros((), dtype=torch.float64)).sum(-1))
        kl_t, rkl_t, mass_t = torch.cat(kl), torch.cat(rkl), torch.cat(mass)
        finite = torch.isfinite(kl_t)

        s_leaf = s.clone().requires_grad_(True)
        kdfast.sparse_kl(s_leaf, dec, tail="bucket", reduction="sum").backward()
        g_sp = s_leaf.grad
        cos = _cos_rows(g_sp, g_full)
        row: dict[str, Any] = {
            "method": method, "size": size,
            "mean_used_slots": float(used.float().mean()), "max_used_slots": kmax,
            "bytes_record": enc.row_bytes,
            "bytes_trimmed": _native.encoded_row_bytes(kmax, v, has_tail, ns_),
            "bytes_variable": var_bytes,
            "bytes_lean_ids_counts": lean_bytes,
            "kl_full_recon": float(kl_t.mean()) if bool(finite.all()) else float("inf"),
            "kl_full_recon_finite_rows": float(finite.float().mean()),
            "kl_recon_full": float(rkl_t.mean()),
            "mass_covered": float(mass_t.mean()),
            "grad_cos_mean": float(cos.mean()),
            "grad_cos_median": float(cos.median()),
            "grad_cos_flat": float(_cos_rows(g_sp.reshape(1, -1), g_full.reshape(1, -1))[0]),
        }
        # Summed over positions (the gradient w.r.t. an output bias over the vocabulary): noise
        # that differs between positions cancels, a systematic bias does not.
        c = float(_cos_rows(g_sp.double().sum(0, keepdim=True), g_full.double().sum(0, keepdim=True))[0])
        row["bias_grad_angle_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, c))))
        if param_grads is not None:
            pg = param_grads(lambda z, dec=dec: kdfast.sparse_kl(z, dec, tail="bucket", reduction="mean"))
            c = float(_cos_rows(pg.reshape(1, -1), pg_full.reshape(1, -1))[0])
            row["param_grad_cos"] = c
            row["param_grad_angle_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, c))))
        out.append(row)
    return out


def run_fidelity(spec: dict[str, Any]) -> dict[str, Any]:
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if spec["source"] == "zipf":
        n, v = spec["positions"], spec["v"]
        teacher = zipf_logits(n, v, seed=1)
        # A "less-trained student": partly agrees with the teacher, softer, own noise.
        student = 0.6 * teacher + 0.4 * zipf_logits(n, v, seed=2)
        rows = fidelity_table(teacher, student, ks=spec["ks"], ns=spec["ns"])
        return {"v": v, "positions": n, "teacher_stats": distribution_stats(teacher),
                "student_stats": distribution_stats(student), "rows": rows}

    trained = train_byte_teacher(spec["train_seconds"], log=log)
    teacher_m, student_m = trained["teacher"], trained["student"]
    ctx = trained["config"]["context"]
    windows = _val_windows(trained["val"], spec["positions"], ctx)
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        t_logits = teacher_m(input_ids=windows).logits[:, :-1].reshape(-1, 256).float()
        s_logits_ng = student_m(input_ids=windows).logits[:, :-1].reshape(-1, 256).float()
    val_t = float(F.cross_entropy(t_logits, y.reshape(-1)))
    val_s = float(F.cross_entropy(s_logits_ng, y.reshape(-1)))
    del x

    params = [p for p in student_m.parameters()]

    def param_grads(loss_fn):
        z = student_m(input_ids=windows).logits[:, :-1].reshape(-1, 256)
        grads = torch.autograd.grad(loss_fn(z), params)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    rows = fidelity_table(t_logits, s_logits_ng, ks=spec["ks"], ns=spec["ns"], param_grads=param_grads)
    return {"v": 256, "positions": t_logits.shape[0], "train_s": trained["train_s"],
            "steps": trained["steps"], "student_step": trained["student_step"],
            "params": trained["params"], "model_config": trained["config"],
            "teacher_val_nats_per_byte": val_t, "student_val_nats_per_byte": val_s,
            "teacher_stats": distribution_stats(t_logits), "student_stats": distribution_stats(s_logits_ng),
            "rows": rows}


# ----------------------------------------------------------------------------------------------
# Worker entry point and driver.


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["kind"]
    if kind == "compress":
        return run_compress(spec)
    if kind == "loss":
        return run_loss(spec)
    if kind == "fidelity":
        return run_fidelity(spec)
    raise ValueError(f"unknown case kind {kind!r}")


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = {**spec, **run_spec(spec)}
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the parent keeps going
        result = {**spec, "error": f"{type(exc).__name__}: {exc}"}
    _measure.emit_result(result)
    return 0


def build_specs(parts: Sequence[str], *, compress_sizes, loss_sizes, dtypes, repeats: int, warmup: int,
                train_seconds: float, positions: int, zipf_positions: int, zipf_v: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    common = {"repeats": repeats, "warmup": warmup, "k": TOPK, "num_samples": NUM_SAMPLES}
    if "compress" in parts:
        for n, v in compress_sizes:
            for dt in dtypes:
                for impl in COMPRESS_IMPLS:
                    specs.append({"kind": "compress", "impl": impl, "n": n, "v": v, "dtype": dt, **common})
    if "loss" in parts:
        for n, v in loss_sizes:
            for dt in dtypes:
                for impl in LOSS_IMPLS:
                    specs.append({"kind": "loss", "impl": impl, "n": n, "v": v, "dtype": dt, **common})
    if "fidelity" in parts:
        specs.append({"kind": "fidelity", "source": "gpt2", "train_seconds": train_seconds,
                      "positions": positions, "ks": list(FIDELITY_TOPK), "ns": list(FIDELITY_SAMPLES)})
        specs.append({"kind": "fidelity", "source": "zipf", "positions": zipf_positions, "v": zipf_v,
                      "ks": list(FIDELITY_TOPK), "ns": list(FIDELITY_SAMPLES)})
    return specs


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    if spec["kind"] == "fidelity":
        label = f"fidelity {spec['source']}"
        if "error" in res:
            return f"{label}: {res['error']}"
        extra = ""
        if spec["source"] == "gpt2":
            extra = (f", teacher {res['teacher_val_nats_per_byte']:.3f} / student "
                     f"{res['student_val_nats_per_byte']:.3f} nats/byte after {res['steps']} steps")
        return f"{label}: {len(res['rows'])} methods{extra}"
    label = f"{spec['kind']} {spec['n']}x{spec['v']} {spec['dtype']} {spec['impl']}"
    if "error" in res:
        return f"{label}: {res['error']}"
    mem = res.get("extra_peak_inputs")
    return f"{label}: {res['time_s']:.4f} s" + (f", extra mem {mem:.2f}x input" if mem is not None else "")


def run_benchmark(specs: Sequence[dict[str, Any]], *, subprocess: bool = True, timeout: float = 900.0,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = []
    load_before = _measure.load_average()
    t_start = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        if subprocess:
            res = {**spec, **_measure.run_worker(MODULE, spec, timeout=timeout)}
        else:
            try:
                res = {**spec, **run_spec(json.loads(json.dumps(spec)))}
            except Exception as exc:  # noqa: BLE001 - one failed case must not end the run
                res = {**spec, "error": f"{type(exc).__name__}: {exc}"}
        res["load_average"] = _measure.load_average()
        results.append(res)
        log(f"[{i}/{len(specs)}] {_describe(spec, res)} ({time.perf_counter() - t0:.0f} s, "
            f"load {res['load_average']})")
    return {
        "machine": _measure.machine_info(),
        "config": {"topk": TOPK, "num_samples": NUM_SAMPLES, "subprocess": subprocess,
                   "wall_s": time.perf_counter() - t_start, "load_average_before": load_before,
                   "load_average_after": _measure.load_average()},
        "results": results,
    }


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt_s(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_x(x: float | None, *, at_least: float | None = None, at_most: float | None = None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    mark = ""
    if at_least is not None:
        mark = " ✓" if x >= at_least else " ✗"
    if at_most is not None:
        mark = " ✓" if x <= at_most else " ✗"
    return f"{x:.2f}×{mark}"


def _div(a, b):
    return a / b if a is not None and b else None


def _by(results, kind):
    table: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r["kind"] == kind:
            table.setdefault((r["n"], r["v"], r["dtype"]), {})[r["impl"]] = r
    return table


def format_compress(results: list[dict[str, Any]]) -> str:
    groups = _by(results, "compress")
    if not groups:
        return ""
    head = ["N×V", "dtype", "one read (sum / copy)", "torch lsm+topk", "kdfast compress_topk",
            "speed-up vs torch (≥3)", "kdfast / read (≤2)", "torch multinomial", "kdfast compress_sample",
            "speed-up", "sample / read", "extra mem torch / kdfast (top-k)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for (n, v, dt), c in groups.items():
        t = {impl: (r.get("time_s") if "error" not in r else None) for impl, r in c.items()}
        rd = c.get("read", {})
        read_cell = (f"{_fmt_s(rd.get('sum_s'))} / {_fmt_s(rd.get('copy_s'))}" if "error" not in rd else "error")
        mem = " / ".join(
            "-" if c.get(i, {}).get("extra_peak_inputs") is None else f"{c[i]['extra_peak_inputs']:.2f}×"
            for i in ("torch_topk", "kdfast_topk"))
        lines.append("| " + " | ".join([
            f"{n}×{v}", dt, read_cell, _fmt_s(t.get("torch_topk")), _fmt_s(t.get("kdfast_topk")),
            _fmt_x(_div(t.get("torch_topk"), t.get("kdfast_topk")), at_least=TARGET_SPEEDUP_VS_TORCH),
            _fmt_x(_div(t.get("kdfast_topk"), t.get("read")), at_most=TARGET_VS_READ),
            _fmt_s(t.get("torch_sample")), _fmt_s(t.get("kdfast_sample")),
            _fmt_x(_div(t.get("torch_sample"), t.get("kdfast_sample"))),
            _fmt_x(_div(t.get("kdfast_sample"), t.get("read"))), mem]) + " |")
        for impl, r in c.items():
            if "error" in r:
                notes.append(f"- {n}×{v} {dt} {impl}: {r['error']}")
        kt, ks = c.get("kdfast_topk", {}), c.get("kdfast_sample", {})
        if "max_abs_logprob_err" in kt:
            notes.append(f"- {n}×{v} {dt}: kdfast top-k vs float64: max |Δ logprob| "
                         f"{kt['max_abs_logprob_err']:.1e}, max |Δ tail| {kt['max_abs_tail_err']:.1e}; "
                         f"compress_sample: {ks.get('mean_distinct_ids', float('nan')):.1f} distinct ids of "
                         f"{NUM_SAMPLES} draws, torch multinomial "
                         f"{c.get('torch_sample', {}).get('mean_distinct_ids', float('nan')):.1f}")
    return "\n".join(lines + ([""] + notes if notes else []))


def format_loss(results: list[dict[str, Any]]) -> str:
    groups = _by(results, "loss")
    if not groups:
        return ""
    head = ["N×V", "dtype", "targets", "kdfast sparse_kl", "torch reference", "speed-up",
            "kdfast dense forward_kl", "sparse / dense", "extra mem kdfast / torch ref / dense",
            "loss kdfast vs ref"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for (n, v, dt), c in groups.items():
        dense = c.get("kdfast_dense", {})
        td = dense.get("time_s") if "error" not in dense else None
        for kind, label in (("topk", f"top-{TOPK} bucket"), ("sample", f"sampled N={NUM_SAMPLES}")):
            kd, ref = c.get(f"kdfast_{kind}", {}), c.get(f"torch_{kind}", {})
            tk = kd.get("time_s") if "error" not in kd else None
            tr = ref.get("time_s") if "error" not in ref else None
            mem = " / ".join("-" if r.get("extra_peak_inputs") is None else f"{r['extra_peak_inputs']:.2f}×"
                             for r in (kd, ref, dense))
            agree = "-"
            if tk is not None and tr is not None:
                rel = abs(kd["loss_value"] - ref["loss_value"]) / max(abs(ref["loss_value"]), 1e-12)
                grel = abs(kd["grad_norm"] - ref["grad_norm"]) / max(abs(ref["grad_norm"]), 1e-12)
                agree = f"{rel:.0e} (‖g‖ {grel:.0e})"
                if rel > 1e-3 or grel > 1e-2:
                    notes.append(f"- {n}×{v} {dt} {label}: MISMATCH loss {kd['loss_value']} vs "
                                 f"{ref['loss_value']}, |grad| {kd['grad_norm']} vs {ref['grad_norm']}")
            lines.append("| " + " | ".join([
                f"{n}×{v}", dt, label, _fmt_s(tk), _fmt_s(tr), _fmt_x(_div(tr, tk)), _fmt_s(td),
                _fmt_x(_div(tk, td)), mem, agree]) + " |")
        for impl, r in c.items():
            if "error" in r:
                notes.append(f"- {n}×{v} {dt} {impl}: {r['error']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def _fmt_g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def format_fidelity(results: list[dict[str, Any]]) -> str:
    parts = []
    for r in results:
        if r["kind"] != "fidelity":
            continue
        if "error" in r:
            parts.append(f"fidelity {r['source']}: {r['error']}")
            continue
        v = r["v"]
        ts = r["teacher_stats"]
        if r["source"] == "gpt2":
            title = (f"**Real teacher, V = 256 (bytes)**: GPT-2 {r['model_config']['layers']}×"
                     f"{r['model_config']['embd']} ({r['params'] / 1e6:.2f} M params), {r['steps']} steps in "
                     f"{r['train_s']:.0f} s on pydoc topics; held-out {r['positions']} positions; teacher "
                     f"{r['teacher_val_nats_per_byte']:.3f} nats/byte, student (same model at step "
                     f"{r['student_step']}) {r['student_val_nats_per_byte']:.3f} nats/byte.")
        else:
            title = (f"**Synthetic, V = {v}** (`zipf_logits`, not a real model): {r['positions']} positions; "
                     f"student = 0.6·teacher + 0.4·(another draw).")
        title += (f" Teacher: mean entropy {ts['entropy_nats']:.2f} nats, top-1 p {ts['top1_prob']:.2f}, "
                  f"top-64 mass {ts['top64_mass']:.2f}. Full logits: {4 * v} B/token fp32, {2 * v} bf16.")
        has_param = any("param_grad_cos" in row for row in r["rows"])
        head = ["method", "ids used (mean / max)", "B/token record", "B/token trimmed", "B/token variable",
                "B/token ids+counts",
                "KL(p‖p̂)", "KL(p̂‖p)", "mass covered", "grad cos/position (mean / median)", "grad cos (all logits)", "Σ-positions grad angle"]
        if has_param:
            head += ["param-grad angle"]
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in r["rows"]:
            name = f"top-{row['size']} bucket" if row["method"] == "topk" else f"sample N={row['size']}"
            rec = f"{row['bytes_record']}"
            if row["method"] == "sample" and row["size"] == NUM_SAMPLES:
                rec += " ✓" if row["bytes_record"] <= TARGET_SAMPLE_BYTES else " ✗"
            kl = _fmt_g(row["kl_full_recon"], 4)
            if math.isinf(row["kl_full_recon"]):
                kl = f"∞ ({100 * (1 - row['kl_full_recon_finite_rows']):.0f}% rows)"
            cells = [name, f"{row['mean_used_slots']:.1f} / {row['max_used_slots']}", rec,
                     str(row["bytes_trimmed"]), f"{row['bytes_variable']:.1f}",
                     "-" if row.get("bytes_lean_ids_counts") is None else f"{row['bytes_lean_ids_counts']:.1f}", kl,
                     _fmt_g(row["kl_recon_full"], 4), f"{row['mass_covered']:.4f}",
                     f"{row['grad_cos_mean']:.3f} / {row['grad_cos_median']:.3f}", f"{row['grad_cos_flat']:.3f}",
                     f"{row['bias_grad_angle_deg']:.1f}°"]
            if has_param:
                cells.append(f"{row['param_grad_angle_deg']:.1f}°" if "param_grad_angle_deg" in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def format_report(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    sections = []
    for title, text in (
        (f"Compression, k={TOPK}, N={NUM_SAMPLES} draws (median wall time)", format_compress(results["results"])),
        ("sparse_kl forward+backward vs its torch reference and dense forward_kl", format_loss(results["results"])),
        ("Storage and fidelity", format_fidelity(results["results"])),
    ):
        if text:
            sections.append(f"### {title}\n\n{text}")
    footer = (f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, torch {m.get('torch')} "
              f"({m.get('torch_threads')} threads), kdfast {m.get('kdfast')}; load average before/after: "
              f"{cfg.get('load_average_before')}/{cfg.get('load_average_after')}; wall {cfg['wall_s']:.0f} s.")
    return "\n\n".join(sections + [footer])


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n, v = (int(p) for p in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size must look like NxV (e.g. 2048x32000), got {item!r}")
        if n <= 0 or v <= 0:
            raise argparse.ArgumentTypeError(f"size must be positive, got {item!r}")
        out.append((n, v))
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _subset(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in allowed for x in items):
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=_subset(PARTS, "--parts"), default=list(PARTS),
                        help="comma-separated subset of compress,loss,fidelity (default: all)")
    parser.add_argument("--compress-sizes", type=_sizes, default=None,
                        help="NxV list for part 1 (default: 2048x32000,2048x128256)")
    parser.add_argument("--loss-sizes", type=_sizes, default=None,
                        help="NxV list for part 2 (default: 2048x32000)")
    parser.add_argument("--dtypes", type=_subset(tuple(DTYPES), "--dtypes"), default=["fp32", "bf16"],
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="teacher training time for part 3 (default 90, quick 15)")
    parser.add_argument("--positions", type=int, default=None,
                        help="held-out positions of the real teacher (default 4096, quick 1024)")
    parser.add_argument("--zipf-positions", type=int, default=None,
                        help="positions of the synthetic V=32000 fidelity case (default 1024, quick 256)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, 1 repeat, short training")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all results as JSON here")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (memory numbers then not isolated)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case before it is abandoned")


def run_from_args(args: argparse.Namespace) -> int:
    q = args.quick
    repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    if repeats < 1 or args.warmup < 0:
        print("error: --repeats must be ≥ 1 and --warmup ≥ 0", file=sys.stderr)
        return 2
    specs = build_specs(
        args.parts,
        compress_sizes=args.compress_sizes or (QUICK_COMPRESS_SIZES if q else FULL_COMPRESS_SIZES),
        loss_sizes=args.loss_sizes or (QUICK_LOSS_SIZES if q else FULL_LOSS_SIZES),
        dtypes=args.dtypes, repeats=repeats, warmup=args.warmup,
        train_seconds=args.train_seconds if args.train_seconds is not None else (15.0 if q else 90.0),
        positions=args.positions or (1024 if q else 4096),
        zipf_positions=args.zipf_positions or (256 if q else 1024), zipf_v=32000)
    results = run_benchmark(specs, subprocess=not args.in_process, timeout=args.timeout)
    results["config"]["command"] = " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv)
    print(format_report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    failed = any("error" in r for r in results["results"])
    failed = failed or "MISMATCH" in format_loss(results["results"])
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m kdfast.benchmarks.offline",
        description="kdfast offline distillation (compress_topk/compress_sample, sparse_kl, storage "
                    "and fidelity) against PyTorch, on the CPU.")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
