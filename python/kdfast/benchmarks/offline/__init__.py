"""Offline distillation: kdfast's sparse-target path against the PyTorch code users write.

Three parts, each case in a fresh subprocess (:mod:`kdfast.benchmarks.harness`: median wall
time, resident-set high-water mark), one module each:

1. ``compress`` (:mod:`.compress`) — turning teacher logits ``[N, V]`` into stored targets:
   :func:`kdfast.compress_topk` / :func:`kdfast.compress_sample` against ``log_softmax`` +
   ``topk`` / ``multinomial``, and one read of the logits;
2. ``loss`` (:mod:`.loss`) — forward + backward of :func:`kdfast.sparse_kl` against top-k and
   sampled targets, beside its pure-PyTorch reference and the dense :func:`kdfast.forward_kl`;
3. ``fidelity`` (:mod:`.fidelity`, with the record sizes of :mod:`.storage`) — storage and
   fidelity of the stored targets, on the logits of a *real* teacher (a byte-level GPT-2 of
   :mod:`kdfast.tiny` trained here for about a minute on Python's ``pydoc`` topics, V = 256,
   held-out text) and on a *synthetic* V = 32000 distribution.

The teacher/student logits of parts 1 and 2 and the synthetic case of part 3 come from
:func:`.logits.zipf_logits` (mean entropy ≈ 2.2 nats at V = 32000, ≈ 12 distinct ids in 50 draws).

Run ``python -m kdfast.benchmarks.offline --help`` or ``python benches/bench_offline.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Callable

from kdfast.benchmarks import harness, tables
from kdfast.benchmarks.offline import compress, fidelity, loss
from kdfast.benchmarks.offline.logits import NUM_SAMPLES, TOPK
from kdfast.benchmarks.references import DTYPES

MODULE = "kdfast.benchmarks.offline"

PARTS = ("compress", "loss", "fidelity")
RUN = {"compress": compress.run_case, "loss": loss.run_case, "fidelity": fidelity.run_case}


# ----------------------------------------------------------------------------------------------
# Worker entry point and driver.


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """One case, in a worker or in this process."""
    if spec["kind"] not in RUN:
        raise ValueError(f"unknown case kind {spec['kind']!r}")
    return RUN[spec["kind"]](spec)


def build_specs(parts: Sequence[str], *, compress_sizes, loss_sizes, dtypes, repeats: int, warmup: int,
                train_seconds: float, positions: int, zipf_positions: int, zipf_v: int) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    common = {"repeats": repeats, "warmup": warmup, "k": TOPK, "num_samples": NUM_SAMPLES}
    if "compress" in parts:
        for n, v in compress_sizes:
            for dt in dtypes:
                for impl in compress.IMPLS:
                    specs.append({"kind": "compress", "impl": impl, "n": n, "v": v, "dtype": dt, **common})
    if "loss" in parts:
        for n, v in loss_sizes:
            for dt in dtypes:
                for impl in loss.IMPLS:
                    specs.append({"kind": "loss", "impl": impl, "n": n, "v": v, "dtype": dt, **common})
    if "fidelity" in parts:
        specs.append({"kind": "fidelity", "source": "gpt2", "train_seconds": train_seconds,
                      "positions": positions, "ks": list(fidelity.TOPK), "ns": list(fidelity.SAMPLES)})
        specs.append({"kind": "fidelity", "source": "zipf", "positions": zipf_positions, "v": zipf_v,
                      "ks": list(fidelity.TOPK), "ns": list(fidelity.SAMPLES)})
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
    results, run = harness.run_cases(specs, run_spec, module=MODULE, subprocess=subprocess, timeout=timeout,
                                describe=_describe, log=log)
    return {
        "machine": harness.machine_info(),
        "config": {"topk": TOPK, "num_samples": NUM_SAMPLES, "subprocess": subprocess, **run},
        "results": results,
    }


def format_report(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    sections = []
    for title, text in (
        (f"Compression, k={TOPK}, N={NUM_SAMPLES} draws (median wall time)", compress.format_table(results["results"])),
        ("sparse_kl forward+backward vs its torch reference and dense forward_kl", loss.format_table(results["results"])),
        ("Storage and fidelity", fidelity.format_table(results["results"])),
    ):
        if text:
            sections.append(f"### {title}\n\n{text}")
    footer = (f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, torch {m.get('torch')} "
              f"({m.get('torch_threads')} threads), kdfast {m.get('kdfast')}; load average before/after: "
              f"{cfg.get('load_average_before')}/{cfg.get('load_average_after')}; wall {cfg['wall_s']:.0f} s.")
    return "\n\n".join(sections + [footer])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", type=tables.subset(PARTS, "--parts"), default=list(PARTS),
                        help="comma-separated subset of compress,loss,fidelity (default: all)")
    parser.add_argument("--compress-sizes", type=tables.sizes(), default=None,
                        help="NxV list for part 1 (default: 2048x32000,2048x128256)")
    parser.add_argument("--loss-sizes", type=tables.sizes(), default=None,
                        help="NxV list for part 2 (default: 2048x32000)")
    parser.add_argument("--dtypes", type=tables.subset(tuple(DTYPES), "--dtypes"), default=["fp32", "bf16"],
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
        compress_sizes=args.compress_sizes or (compress.QUICK_SIZES if q else compress.FULL_SIZES),
        loss_sizes=args.loss_sizes or (loss.QUICK_SIZES if q else loss.FULL_SIZES),
        dtypes=args.dtypes, repeats=repeats, warmup=args.warmup,
        train_seconds=args.train_seconds if args.train_seconds is not None else (15.0 if q else 90.0),
        positions=args.positions or (1024 if q else 4096),
        zipf_positions=args.zipf_positions or (256 if q else 1024), zipf_v=32000)
    results = run_benchmark(specs, subprocess=not args.in_process, timeout=args.timeout)
    results["config"]["command"] = " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv)
    print(format_report(results))
    tables.write_json(args.json, results)
    failed = any("error" in r for r in results["results"])
    failed = failed or "MISMATCH" in loss.format_table(results["results"])
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdfast.benchmarks.offline",
        description="kdfast offline distillation (compress_topk/compress_sample, sparse_kl, storage "
                    "and fidelity) against PyTorch, on the CPU.")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_spec, _parser, run_from_args)
