"""Part 1 of the offline benchmark: turning teacher logits ``[N, V]`` into stored targets.

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
"""

from __future__ import annotations

from typing import Any

import torch

from kdfast.benchmarks import harness, tables
from kdfast.benchmarks.offline.logits import NUM_SAMPLES, zipf_logits
from kdfast.benchmarks.references import DTYPES

FULL_SIZES = ((2048, 32000), (2048, 128256))
QUICK_SIZES = ((256, 32000),)
IMPLS = ("read", "torch_topk", "kdfast_topk", "torch_sample", "kdfast_sample")

# Targets (✓/✗ in the table).
TARGET_SPEEDUP_VS_TORCH = 3.0  # compress_topk at least 3x faster than log_softmax + topk
TARGET_VS_READ = 2.0  # compress_topk within 2x one read of the logits


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


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    import kdfast

    n, v, dtype, impl = spec["n"], spec["v"], DTYPES[spec["dtype"]], spec["impl"]
    x = zipf_logits(n, v, seed=1, dtype=dtype)
    input_bytes = x.numel() * x.element_size()
    res: dict[str, Any] = {"input_bytes": input_bytes, "threads": torch.get_num_threads()}
    if impl == "read":
        out = torch.empty_like(x)
        out.fill_(0)
        reps = max(5, spec["repeats"])
        res["sum_s"] = harness.median_time(lambda: x.sum(), reps)
        res["copy_s"] = harness.median_time(lambda: out.copy_(x), reps)
        res["time_s"] = min(res["sum_s"], res["copy_s"])
        return res
    k, ns = spec["k"], spec["num_samples"]
    fns = {
        "torch_topk": lambda: torch_topk(x, k),
        "kdfast_topk": lambda: kdfast.compress_topk(x, k),
        "torch_sample": lambda: torch_sample(x, ns),
        "kdfast_sample": lambda: kdfast.compress_sample(x, ns, seed=0),
    }
    timing, out = harness.measure(fns[impl], repeats=spec["repeats"], warmup=spec["warmup"])
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


def format_table(results: list[dict[str, Any]]) -> str:
    groups = tables.group_cases(results, "compress")
    if not groups:
        return ""
    head = ["N×V", "dtype", "one read (sum / copy)", "torch lsm+topk", "kdfast compress_topk",
            "speed-up vs torch (≥3)", "kdfast / read (≤2)", "torch multinomial", "kdfast compress_sample",
            "speed-up", "sample / read", "extra mem torch / kdfast (top-k)"]
    lines = tables.markdown_head(head)
    notes = []
    for (n, v, dt), c in groups.items():
        t = {impl: (r.get("time_s") if "error" not in r else None) for impl, r in c.items()}
        rd = c.get("read", {})
        read_cell = (f"{tables.fmt_s(rd.get('sum_s'))} / {tables.fmt_s(rd.get('copy_s'))}" if "error" not in rd else "error")
        mem = " / ".join(
            "-" if c.get(i, {}).get("extra_peak_inputs") is None else f"{c[i]['extra_peak_inputs']:.2f}×"
            for i in ("torch_topk", "kdfast_topk"))
        lines.append(tables.markdown_row([
            f"{n}×{v}", dt, read_cell, tables.fmt_s(t.get("torch_topk")), tables.fmt_s(t.get("kdfast_topk")),
            tables.fmt_x(tables.ratio(t.get("torch_topk"), t.get("kdfast_topk")), at_least=TARGET_SPEEDUP_VS_TORCH),
            tables.fmt_x(tables.ratio(t.get("kdfast_topk"), t.get("read")), at_most=TARGET_VS_READ),
            tables.fmt_s(t.get("torch_sample")), tables.fmt_s(t.get("kdfast_sample")),
            tables.fmt_x(tables.ratio(t.get("torch_sample"), t.get("kdfast_sample"))),
            tables.fmt_x(tables.ratio(t.get("kdfast_sample"), t.get("read"))), mem]))
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
