"""The teacher cache on disk and back (issue 12): bytes per token, fidelity, decode throughput.

Per case (vocabulary V, method and size, encoding), in a fresh process: the targets of
``--sequences`` synthetic teacher sequences of ``--seq`` positions (:func:`.offline.logits.zipf_logits`,
LLM-like: ≈ 12 distinct ids among 50 draws) are compressed (``compress_topk`` / ``compress_sample``)
and written ``--copies`` times (other ``seq_id``) through :class:`kdfast.cache.CacheWriter`, with
random input ids. Reported:

* **bytes/token** — the shard files' size over the tokens stored (input ids included), and the
  share of the targets alone;
* **fidelity** on the first sequence, from the *decoded* cache: ``KL(p‖p̂)`` of the teacher
  against the distribution the record stands for (:func:`.offline.fidelity.reconstruct`; infinite
  for sampled targets, whose p̂ is 0 off the drawn ids), the angle between the summed gradient of
  ``sparse_kl`` and that of the full forward KL against a student of other logits, and
  ``|Δ loss|`` against the targets as compressed (the encoding's own error);
* **decode throughput** — tokens/s a ``DataLoader`` with one worker delivers (``batch_size=8``,
  :class:`kdfast.cache.Collator`), after a warm-up epoch, and tokens/s of ``cache[i]`` in this
  process. Target: ≥ 500 k tokens/s of N = 50 targets with one worker.

Run ``python -m kdfast.benchmarks.cache_io`` (``--help``).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

from . import harness, tables

MODULE = "kdfast.benchmarks.cache_io"
ENCODINGS = ("compact", "packed")
CONFIGS = ("sample50", "topk50", "topk128")
TARGET_BYTES = {"sample50": 30.0, "topk50": 114.0, "topk128": 300.0}  # issue 12 (topk128 at V = 128256)
TARGET_TOKENS_PER_S = 500_000


def _config(name: str) -> tuple[str, int]:
    return ("sample", int(name[6:])) if name.startswith("sample") else ("topk", int(name[4:]))


def _compress(x: torch.Tensor, method: str, size: int, offset: int):
    import kdfast

    if method == "sample":
        return kdfast.compress_sample(x, size, seed=1, row_offset=offset)
    return kdfast.compress_topk(x, size)


def _fidelity(cache, first, teacher: torch.Tensor, v: int) -> dict[str, Any]:
    """KL(p‖p̂), the summed-gradient angle against full KD and |Δ loss| of the stored targets."""
    import kdfast

    from .offline.fidelity import reconstruct
    from .offline.logits import zipf_logits

    stored = cache[0]["targets"]
    t_log = torch.log_softmax(teacher.double(), -1)
    q = reconstruct(stored, v)
    terms = torch.where(t_log.exp() > 0, t_log.exp() * (t_log - q.log()), torch.zeros((), dtype=torch.float64))
    kl = float(terms.sum(-1).mean())
    student = zipf_logits(teacher.shape[0], v, seed=10_000, prior_seed=1234)

    def grad(loss_fn):
        z = student.clone().requires_grad_(True)
        loss = loss_fn(z)
        loss.backward()
        return float(loss), z.grad.double()

    _, g_full = grad(lambda z: kdfast.forward_kl(z, teacher, reduction="sum"))
    loss, g = grad(lambda z: kdfast.sparse_kl(z, stored, reduction="sum"))
    loss_first, _ = grad(lambda z: kdfast.sparse_kl(z, first, reduction="sum"))
    c = float(torch.nn.functional.cosine_similarity(g.sum(0), g_full.sum(0), dim=0))
    return {"kl_p_phat": kl if math.isfinite(kl) else None,
            "grad_angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, c)))),
            "loss_error_per_token": abs(loss - loss_first) / teacher.shape[0]}


def _throughput(cache, epochs: int) -> dict[str, Any]:
    from ..cache import Collator

    t0 = time.perf_counter()
    for i in range(len(cache)):
        cache[i]
    getitem = cache.num_tokens / (time.perf_counter() - t0)
    loader = torch.utils.data.DataLoader(cache, batch_size=8, num_workers=1, collate_fn=Collator(),
                                         persistent_workers=True, prefetch_factor=4)
    collections.deque(loader, maxlen=0)  # warm-up: the worker starts and maps the shards
    t0 = time.perf_counter()
    for _ in range(epochs):
        collections.deque(loader, maxlen=0)  # every batch, none kept
    return {"getitem_tokens_per_s": getitem,
            "loader_tokens_per_s": epochs * cache.num_tokens / (time.perf_counter() - t0)}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One (V, config, encoding) case: write the cache, then measure it."""
    from ..cache import CacheWriter, TeacherCache
    from .offline.logits import zipf_logits

    torch.set_num_threads(1)
    v, (method, size), encoding = spec["vocab"], _config(spec["config"]), spec["encoding"]
    n, s = spec["sequences"], spec["seq"]
    g = torch.Generator().manual_seed(0)
    teacher0, seqs = None, []
    t0 = time.perf_counter()
    for i in range(n):
        x = zipf_logits(s, v, seed=i)
        seqs.append((torch.randint(0, v, (s,), generator=g), _compress(x, method, size, i * s)))
        if i == 0:
            teacher0 = x
        del x
    t_compress = time.perf_counter() - t0
    path = tempfile.mkdtemp(prefix="kdfast-bench-cache-")
    try:
        kw = {"num_samples": size} if method == "sample" else {"k": size}
        t0 = time.perf_counter()
        with CacheWriter(path, method=method, temperature=1.0, vocab_size=v, encoding=encoding, **kw) as w:
            for c in range(spec["copies"]):
                for ids, t in seqs:
                    w.append(ids, t)
        t_write = time.perf_counter() - t0
        cache = TeacherCache(path)
        files = sum(os.path.getsize(f) for f in cache.shard_files)
        input_bytes = cache.num_tokens * (2 if v <= 1 << 16 else 4)
        out = {"tokens": cache.num_tokens, "bytes_per_token": files / cache.num_tokens,
               "target_bytes_per_token": (files - input_bytes) / cache.num_tokens,
               "compress_s": t_compress, "write_tokens_per_s": cache.num_tokens / t_write}
        out.update(_fidelity(cache, seqs[0][1], teacher0, v))
        out.update(_throughput(cache, spec["epochs"]))
        return out
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    what = f"V={spec['vocab']} {spec['config']} {spec['encoding']}"
    if "error" in res:
        return f"{what}: {res['error']}"
    return f"{what}: {res['bytes_per_token']:.1f} B/token, {res['loader_tokens_per_s'] / 1e3:.0f} k tok/s"


def format_table(results: list) -> str:
    head = ["V", "targets", "encoding", "B/token (targets)", "target", "KL(p‖p̂)", "grad angle vs full KD",
            "|Δ loss| / token", "DataLoader 1 worker tok/s", "cache[i] tok/s", "write tok/s"]
    rows = []
    for r in sorted(results, key=lambda r: (r["vocab"], CONFIGS.index(r["config"]), ENCODINGS.index(r["encoding"]))):
        if "error" in r:
            rows.append([str(r["vocab"]), r["config"], r["encoding"], r["error"][:60]] + ["—"] * 7)
            continue
        goal = TARGET_BYTES[r["config"]]
        applies = r["config"] != "topk128" or r["vocab"] >= 128256
        check = ("✓" if r["bytes_per_token"] <= goal else "✗") + f" ≤ {goal:.0f}" if applies else "—"
        rate = r["loader_tokens_per_s"]
        rate_s = f"{rate / 1e3:.0f} k" + ((" ✓" if rate >= TARGET_TOKENS_PER_S else " ✗")
                                         if r["config"] == "sample50" else "")
        kl = "∞" if r["kl_p_phat"] is None else f"{r['kl_p_phat']:.4f}"
        rows.append([str(r["vocab"]), r["config"], r["encoding"],
                     f"{r['bytes_per_token']:.1f} ({r['target_bytes_per_token']:.1f})", check, kl,
                     f"{r['grad_angle_deg']:.2f}°", f"{r['loss_error_per_token']:.1e}", rate_s,
                     f"{r['getitem_tokens_per_s'] / 1e3:.0f} k", f"{r['write_tokens_per_s'] / 1e3:.0f} k"])
    return "\n".join(tables.markdown_head(head) + [tables.markdown_row(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--vocabs", type=lambda s: [int(x) for x in s.split(",")], default=[32000, 128256])
    p.add_argument("--configs", type=tables.subset(CONFIGS, "--configs"), default=list(CONFIGS))
    p.add_argument("--encodings", type=tables.subset(ENCODINGS, "--encodings"), default=list(ENCODINGS))
    p.add_argument("--sequences", type=int, default=4, help="distinct teacher sequences")
    p.add_argument("--seq", type=int, default=1024, help="positions per sequence")
    p.add_argument("--copies", type=int, default=16, help="times each sequence is stored")
    p.add_argument("--epochs", type=int, default=3, help="timed DataLoader epochs")
    p.add_argument("--json", metavar="PATH")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    specs = [{"vocab": v, "config": c, "encoding": e, "sequences": args.sequences, "seq": args.seq,
              "copies": args.copies, "epochs": args.epochs}
             for v in args.vocabs for c in args.configs for e in args.encodings]
    results, run = harness.run_cases(specs, run_case, module=MODULE, describe=_describe, timeout=1800)
    print(format_table(results))
    print(f"(load average {run['load_average_before']} → {run['load_average_after']}; wall {run['wall_s']:.0f} s)")
    tables.write_json(args.json, {"machine": harness.machine_info(), "run": run, "results": results})
    return 1 if any("error" in r for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_case, _parser, run_from_args)


if __name__ == "__main__":
    sys.exit(main())
