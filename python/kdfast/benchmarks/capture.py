"""One ``kdfast capture`` batch with and without the teacher's ``[B, S, V]`` logits (issue 12).

A Llama-architecture teacher with random weights (hidden 256, 2 layers, V = 128256 by default)
scores one batch of ``B × S`` byte tokens (4 × 1024 by default) through
:func:`kdfast.capture.capture`, each path in a fresh process:

* ``logits`` — ``chunked_head=False``: the batch's logits materialised, then compressed row by row
  (the path before issue 12, and the fallback for heads that cannot be chunked);
* ``chunked`` — the default: the body to its final hidden states, the logits computed a chunk of
  rows at a time through the head straight into the compressor.

Reported per path: the extra peak memory of the capture call (resident-set high-water mark over
the resident size after the model was loaded and a small warm-up capture ran), its ratio to the
batch's float32 logits ``B·S·V·4`` bytes (target: chunked ≤ 25 %), tokens/s, and whether both
paths stored the same top-k ids / sampled draws (a hash of the stored targets). Run
``python -m kdfast.benchmarks.capture`` (``--help``); timings on a shared machine are noisy,
the memory is what the target is about.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import string
import sys
import tempfile
from typing import Any, Sequence

import torch

from .. import tiny
from . import harness, tables

MODULE = "kdfast.benchmarks.capture"
PATHS = ("logits", "chunked")
METHODS = ("topk", "sample")
TARGET = 0.25  # chunked extra peak / the batch's float32 logits


def _docs(n: int, length: int, seed: int = 0) -> list:
    """``n`` documents of ``length`` ASCII letters and spaces (``length`` byte tokens each)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(string.ascii_letters + " ") for _ in range(length - 1)) + "." for _ in range(n)]


def _stored_hash(path: str, method: str) -> str:
    """A hash of every stored id (and, sampled, weight) of the cache at ``path``."""
    from ..cache import TeacherCache

    h = hashlib.sha256()
    cache = TeacherCache(path)
    for i in range(len(cache)):
        t = cache[i]["targets"]
        h.update(t.indices.numpy().tobytes())
        if method == "sample":
            h.update(t.weights.numpy().tobytes())
    return h.hexdigest()[:16]


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One (path, method) case: extra peak memory and time of one capture batch."""
    from ..capture import capture, scoring

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    if spec.get("chunk_mib"):
        scoring.CHUNK_BYTES = int(spec["chunk_mib"] * 2**20)
    b, s, vocab, method = spec["batch"], spec["seq"], spec["vocab"], spec["method"]
    teacher = tiny.llama(spec.get("hidden", 256), vocab, 0, context=max(4096, s)).eval()
    kw = dict(method=method, k=spec.get("k", 64), num_samples=spec.get("k", 64), batch_size=b, max_length=s,
              tokenizer="bytes", chunked_head=spec["path"] == "chunked", encoding="raw",
              progress=False, verbose=False)
    out = tempfile.mkdtemp(prefix="kdfast-bench-capture-")
    capture(teacher, _docs(2, 64, seed=1), f"{out}/warmup", **kw)  # first-call costs, outside the peak
    docs, runs = _docs(b, s), iter(range(1 << 30))

    def one():
        return capture(teacher, docs, f"{out}/run{next(runs)}", **kw)

    stats, summary = harness.measure(one, repeats=spec.get("repeats", 1), warmup=0)
    logits_bytes = b * s * vocab * 4
    extra = stats.get("extra_peak_bytes")
    return {**stats, "tokens": summary.new_tokens, "tokens_per_s": summary.new_tokens / stats["time_s"],
            "logits_bytes": logits_bytes, "ratio": None if extra is None else extra / logits_bytes,
            "fallback": summary.fallback, "targets_hash": _stored_hash(summary.path, method),
            "chunk_bytes": scoring.CHUNK_BYTES}


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    what = f"{spec['path']} {spec['method']} {spec['batch']}x{spec['seq']}"
    if "error" in res:
        return f"{what}: {res['error']}"
    return f"{what}: {res['tokens_per_s']:.0f} tok/s, {tables.fmt_mib(res.get('extra_peak_bytes'))} MiB extra"


def format_table(results: list) -> str:
    """One row per (method, size): the logits' size, each path's extra peak (and its share of
    the logits) and tokens/s, the target check and whether the stored targets agree."""
    by = {(r["method"], r["batch"], r["seq"], r["path"]): r for r in results}
    keys = sorted({(r["method"], r["batch"], r["seq"]) for r in results})
    head = ["method", "B×S", "fp32 logits MiB"] + [f"{p} extra MiB (÷ logits)" for p in PATHS] + \
        [f"{p} tok/s" for p in PATHS] + [f"chunked ≤ {TARGET:.0%}", "same targets"]
    rows = []
    for method, b, s in keys:
        rs = [by.get((method, b, s, p), {}) for p in PATHS]
        ok = [r for r in rs if "time_s" in r]
        mem = [f"{tables.fmt_mib(r.get('extra_peak_bytes'))} ({r['ratio']:.1%})" if r.get("ratio") is not None
               else r.get("error", "—")[:30] for r in rs]
        rate = [f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "—" for r in rs]
        ratio = rs[1].get("ratio")
        target = "—" if ratio is None else ("✓" if ratio <= TARGET else "✗")
        same = "—" if len(ok) < 2 else ("✓" if ok[0]["targets_hash"] == ok[1]["targets_hash"] else "✗")
        logits = ok[0]["logits_bytes"] if ok else b * s * 4
        rows.append([method, f"{b}×{s}", tables.fmt_mib(logits), *mem, *rate, target, same])
    return "\n".join(tables.markdown_head(head) + [tables.markdown_row(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--sizes", type=tables.sizes("BxS", "4x1024"), default=[(4, 1024)])
    p.add_argument("--methods", type=tables.subset(METHODS, "--methods"), default=["topk"])
    p.add_argument("--paths", type=tables.subset(PATHS, "--paths"), default=list(PATHS))
    p.add_argument("--k", type=int, default=64, help="top-k ids / sampled draws per position")
    p.add_argument("--chunk-mib", type=float, default=None,
                   help="logits per chunk of the chunked path (default: kdfast.capture.scoring.CHUNK_BYTES)")
    p.add_argument("--repeats", type=int, default=1, help="timed captures per case (median time)")
    p.add_argument("--json", metavar="PATH")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    specs = [{"path": p, "method": m, "batch": b, "seq": s, "vocab": args.vocab, "hidden": args.hidden,
              "k": args.k, "chunk_mib": args.chunk_mib, "repeats": args.repeats}
             for m in args.methods for b, s in args.sizes for p in args.paths]
    results, run = harness.run_cases(specs, run_case, module=MODULE, describe=_describe, timeout=1800)
    print(format_table(results))
    print(f"(load average {run['load_average_before']} → {run['load_average_after']}: tokens/s are noisy on a "
          "shared machine; the extra peak memory is what the target is about)")
    tables.write_json(args.json, {"machine": harness.machine_info(), "run": run, "results": results})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_case, _parser, run_from_args)


if __name__ == "__main__":
    sys.exit(main())
