"""Dense distillation losses: kdfast against the PyTorch code users write, forward + backward.

For every (loss, N, V, dtype) this runs, each in a fresh subprocess so that its peak memory is
its own:

* ``eager``   - the PyTorch code users write (:mod:`.references`), in float32;
* ``compile`` - the same reference function wrapped in ``torch.compile`` (compile time excluded);
* ``kdfast``  - ``kdfast.<loss>(..., backend="rust")`` (loss and gradient in the forward call);
* ``kdfast-torch`` (opt-in) - ``kdfast.<loss>(..., backend="torch")``, the library's own reference;

plus the memory-bandwidth floor of the device: the time of ``torch.add(student, teacher)`` into a
fresh tensor, i.e. one read of both inputs and one write of a gradient-sized tensor, which is the
least traffic any forward+backward must do. (A plain ``clone`` of one input is timed too; the
floor shown is the smaller of the add time and 1.5 x the clone time.)

Reported per case: median wall time of ``loss = f(s, t); loss.backward()`` over ``--repeats``
runs after ``--warmup`` runs, and the extra peak resident memory of those timed runs over the
memory held once the inputs exist (the gradient itself included), as a multiple of one input
tensor's size.

Run ``python -m kdfast.benchmarks.dense --help``, ``python benches/bench_dense.py`` or
``kdfast bench``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch

from kdfast.benchmarks import harness, tables
from kdfast.benchmarks.references import (
    DTYPES,
    EAGER,
    JSD_BETA,
    LOGIT_SCALE,
    TEMPERATURE,
    kdfast_kwargs,
    random_logits,
)

MODULE = "kdfast.benchmarks.dense"

LOSSES = ("forward_kl", "jsd")
IMPLS = ("eager", "compile", "kdfast", "kdfast-torch")
DEFAULT_IMPLS = ("eager", "compile", "kdfast")

# The sizes: N=2048 rows, Llama-2 and Llama-3 vocabularies.
FULL_SIZES = ((2048, 32000), (2048, 128256))
QUICK_SIZES = ((256, 32000),)

# The goals kdfast's CPU kernels are held to (see BENCHMARKS.md).
TARGET_VS_COMPILE = 0.5
TARGET_VS_EAGER = 0.1
TARGET_VS_FLOOR = 2.0
TARGET_EXTRA_MEM = 1.1


def make_loss_fn(loss: str, impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(student, teacher) -> scalar loss`` for one loss and implementation."""
    if loss not in EAGER:
        raise ValueError(f"loss must be one of {list(EAGER)}, got {loss!r}")
    if impl == "eager":
        return EAGER[loss]
    if impl == "compile":
        return torch.compile(EAGER[loss])
    if impl in ("kdfast", "kdfast-torch"):
        import kdfast

        fn = getattr(kdfast, loss)
        kwargs = kdfast_kwargs(loss, reduction="mean", backend="rust" if impl == "kdfast" else "torch")
        return lambda student, teacher: fn(student, teacher, **kwargs)
    raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")


# ----------------------------------------------------------------------------------------------
# One case, run inside a worker process.


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time forward+backward of one (loss, impl, n, v, dtype) and measure its extra peak memory."""
    student, teacher = random_logits(spec["n"], spec["v"], DTYPES[spec["dtype"]])
    student.requires_grad_(True)
    input_bytes = student.numel() * student.element_size()
    fn = make_loss_fn(spec["loss"], spec["impl"])

    def step():
        loss = fn(student, teacher)
        loss.backward()
        return loss

    def reset():  # the gradient is freed outside the timed region and allocated again inside it
        student.grad = None

    timing, loss = harness.measure(step, repeats=spec["repeats"], warmup=spec["warmup"], reset=reset)
    result: dict[str, Any] = {**timing, "input_bytes": input_bytes, "threads": torch.get_num_threads()}
    if "extra_peak_bytes" in result:
        result["extra_peak_inputs"] = result["extra_peak_bytes"] / input_bytes
    # Checks (outside the measured window): every implementation should agree on these.
    grad = student.grad
    result["loss_value"] = float(loss.detach())
    result["loss_dtype"] = str(loss.dtype).replace("torch.", "")
    result["grad_dtype"] = None
    if grad is not None:
        g32 = grad.float()
        result["grad_dtype"] = str(grad.dtype).replace("torch.", "")
        result["grad_norm"] = float(g32.norm())
        result["grad_dot_teacher"] = float((g32 * teacher.float()).sum())
        result["grad_finite"] = bool(torch.isfinite(g32).all())
    return result


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory-bandwidth floor: read both inputs, write one gradient-sized tensor."""
    student, teacher = random_logits(spec["n"], spec["v"], DTYPES[spec["dtype"]])
    reps = max(3, spec["repeats"])
    out = torch.empty_like(student)
    out.fill_(0)  # touch every page once, so the preallocated timings are pure bandwidth
    add_s = harness.median_time(lambda: torch.add(student, teacher, out=out), reps)
    copy_s = harness.median_time(lambda: out.copy_(student), reps)
    # Into a fresh tensor, as a gradient is: adds the cost of faulting its pages in.
    add_fresh_s = harness.median_time(lambda: torch.add(student, teacher), reps)
    return {
        "add_s": add_s,
        "copy_s": copy_s,
        "add_fresh_s": add_fresh_s,
        "floor_s": min(add_s, 1.5 * copy_s),
        "input_bytes": student.numel() * student.element_size(),
        "threads": torch.get_num_threads(),
    }


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return run_floor(spec) if spec["kind"] == "floor" else run_case(spec)


# ----------------------------------------------------------------------------------------------
# Driver.


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    label = f"{spec['n']}x{spec['v']} {spec['dtype']}"
    if spec["kind"] == "floor":
        what = res.get("error") or (f"add {res['add_s']:.4f} s, copy {res['copy_s']:.4f} s, "
                                    f"add into fresh {res['add_fresh_s']:.4f} s")
        return f"floor {label}: {what}"
    what = res.get("error") or (
        f"{res['time_s']:.4f} s, extra mem {res.get('extra_peak_inputs', float('nan')):.2f}x input")
    return f"{spec['loss']} {label} {spec['impl']}: {what}"


def run_benchmark(
    sizes: Iterable[tuple[int, int]] = FULL_SIZES,
    dtypes: Iterable[str] = ("fp32", "bf16"),
    losses: Iterable[str] = LOSSES,
    impls: Iterable[str] = DEFAULT_IMPLS,
    *,
    repeats: int = 3,
    warmup: int = 1,
    subprocess: bool = True,
    timeout: float = 1800.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case and the floors; returns ``{"machine", "config", "floors", "cases"}``."""
    sizes, dtypes, losses, impls = list(sizes), list(dtypes), list(losses), list(impls)
    specs: list[dict[str, Any]] = []
    for n, v in sizes:
        for dt in dtypes:
            specs.append({"kind": "floor", "n": n, "v": v, "dtype": dt, "repeats": repeats})
            specs += [{"kind": "case", "loss": loss, "impl": impl, "n": n, "v": v, "dtype": dt,
                       "repeats": repeats, "warmup": warmup} for loss in losses for impl in impls]
    results, run = harness.run_cases(specs, run_spec, module=MODULE, subprocess=subprocess, timeout=timeout,
                                describe=_describe, log=log)
    return {
        "machine": harness.machine_info(),
        "config": {
            "sizes": [list(s) for s in sizes], "dtypes": dtypes, "losses": losses, "impls": impls,
            "repeats": repeats, "warmup": warmup, "subprocess": subprocess,
            "temperature": TEMPERATURE, "jsd_beta": JSD_BETA, "logit_std": LOGIT_SCALE, **run,
        },
        "floors": [r for r in results if r["kind"] == "floor"],
        "cases": [r for r in results if r["kind"] == "case"],
    }


# ----------------------------------------------------------------------------------------------
# Report.


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (loss, n, v, dtype): times per impl, floor, ratios, memory, agreement."""
    floors = {(f["n"], f["v"], f["dtype"]): f for f in results["floors"]}
    groups: dict[tuple, dict[str, dict]] = {}
    for c in results["cases"]:
        groups.setdefault((c["loss"], c["n"], c["v"], c["dtype"]), {})[c["impl"]] = c
    rows = []
    for (loss, n, v, dt), by_impl in groups.items():
        fl = floors.get((n, v, dt), {})
        row: dict[str, Any] = {"loss": loss, "n": n, "v": v, "dtype": dt,
                               "floor_s": fl.get("floor_s"), "add_s": fl.get("add_s"),
                               "copy_s": fl.get("copy_s"), "add_fresh_s": fl.get("add_fresh_s"),
                               "time_s": {}, "extra_mem": {},
                               "errors": {}, "mismatch": []}
        for impl, c in by_impl.items():
            if "error" in c:
                row["errors"][impl] = c["error"]
                continue
            row["time_s"][impl] = c["time_s"]
            row["extra_mem"][impl] = c.get("extra_peak_inputs")
        # Every implementation sees the same inputs: losses and gradients must agree with eager.
        ref = by_impl.get("eager")
        if ref is not None and "error" not in ref:
            for impl, c in by_impl.items():
                if impl == "eager" or "error" in c:
                    continue
                for key, tol in (("loss_value", 1e-3), ("grad_norm", 1e-2), ("grad_dot_teacher", 1e-2)):
                    a, b = c.get(key), ref.get(key)
                    if a is None or b is None or not (abs(a - b) <= tol * max(abs(b), 1e-6)):
                        row["mismatch"].append(f"{impl}.{key}={a} vs eager {b}")
                if c.get("grad_dtype") not in (None, str(DTYPES[dt]).replace("torch.", "")):
                    row["mismatch"].append(f"{impl} grad dtype {c.get('grad_dtype')}")
                if c.get("grad_finite") is False:
                    row["mismatch"].append(f"{impl} grad has NaN/inf")
        rows.append(row)
    return rows


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table (pasteable into BENCHMARKS.md) plus notes on errors and mismatches."""
    rows = summarize(results)
    impls = [i for i in results["config"]["impls"]]
    head = ["loss", "N×V", "dtype"] + impls + ["floor", "floor+alloc"]
    have_kd = "kdfast" in impls
    if have_kd:
        head += ["kd/compile", "kd/eager", "kd/floor"]
    head += [f"mem {i}" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        t = r["time_s"]
        cells = [r["loss"], f"{r['n']}×{r['v']}", r["dtype"]]
        cells += [tables.fmt_s(t.get(i)) if i not in r["errors"] else "error" for i in impls]
        cells += [tables.fmt_s(r["floor_s"]), tables.fmt_s(r["add_fresh_s"])]
        if have_kd:
            kd = t.get("kdfast")
            cells += [
                tables.fmt_x(tables.ratio(kd, t.get("compile")), at_most=TARGET_VS_COMPILE, sign=""),
                tables.fmt_x(tables.ratio(kd, t.get("eager")), at_most=TARGET_VS_EAGER, sign=""),
                tables.fmt_x(tables.ratio(kd, r["floor_s"]), at_most=TARGET_VS_FLOOR, sign=""),
            ]
        for i in impls:
            m = r["extra_mem"].get(i)
            if m is None:
                cells.append("-")
            else:
                mark = (" ✓" if m <= TARGET_EXTRA_MEM else " ✗") if i == "kdfast" else ""
                cells.append(f"{m:.2f}×{mark}")
        lines.append("| " + " | ".join(cells) + " |")
        tag = f"{r['loss']} {r['n']}×{r['v']} {r['dtype']}"
        notes += [f"- {tag} {impl}: {err}" for impl, err in r["errors"].items()]
        notes += [f"- {tag}: MISMATCH {m}" for m in r["mismatch"]]
    m = results["machine"]
    cfg = results["config"]
    footer = [
        "",
        (f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, torch {m.get('torch')} "
         f"({m.get('torch_threads')} threads), kdfast {m.get('kdfast')}."),
        (f"Forward+backward, median of {cfg['repeats']} after {cfg['warmup']} warmup run(s) "
         f"(compile time excluded); each case in a fresh subprocess: {cfg['subprocess']}; "
         f"load average before/after: {cfg.get('load_average_before')}/{cfg.get('load_average_after')}."),
        ("floor = min(torch.add(s, t, out=g), 1.5 × g.copy_(s)) into a preallocated g: one read "
         "of both inputs and one write of a gradient-sized tensor at memory bandwidth; floor+alloc "
         "= torch.add(s, t) into a fresh tensor (adds the page faults of a new gradient). "
         "mem = extra peak RSS of the timed runs (gradient included) in units of one input tensor."),
        (f"Targets (✓/✗): kdfast ≤ {TARGET_VS_COMPILE}× compile, ≤ {TARGET_VS_EAGER}× eager, "
         f"≤ {TARGET_VS_FLOOR}× floor, extra memory ≤ {TARGET_EXTRA_MEM}× one input."),
    ]
    if notes:
        footer += ["", "Problems:"] + notes
    return "\n".join(lines + footer)


def add_arguments(parser: argparse.ArgumentParser, *, default_sizes: Sequence[tuple[int, int]] | None = FULL_SIZES) -> None:
    """The benchmark's options, shared by this module's CLI and ``kdfast bench``."""
    parser.add_argument("--sizes", type=tables.sizes(), default=None,
                        help="comma-separated NxV (default: "
                        + ",".join(f"{n}x{v}" for n, v in (default_sizes or FULL_SIZES)) + ")")
    parser.add_argument("--dtypes", type=tables.subset(tuple(DTYPES), "--dtypes"), default=["fp32", "bf16"],
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16)")
    parser.add_argument("--losses", type=tables.subset(LOSSES, "--losses"), default=list(LOSSES),
                        help="comma-separated subset of forward_kl,jsd (default: both)")
    parser.add_argument("--impls", type=tables.subset(IMPLS, "--impls"), default=list(DEFAULT_IMPLS),
                        help="comma-separated subset of " + ",".join(IMPLS)
                        + " (default: " + ",".join(DEFAULT_IMPLS) + ")")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case; the median is shown (default: 3, 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, compilation included (default: 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ",".join(f"{n}x{v}" for n, v in QUICK_SIZES) + ", 1 repeat")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (faster start; memory numbers then not isolated)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is abandoned")


def run_from_args(args: argparse.Namespace, *, default_sizes: Sequence[tuple[int, int]] = FULL_SIZES) -> int:
    """Run with parsed options, print the table, write JSON; exit status 1 when a case failed."""
    sizes = args.sizes or (list(QUICK_SIZES) if args.quick else list(default_sizes))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or args.warmup < 1:
        print("error: --repeats and --warmup must be at least 1", file=sys.stderr)
        return 2
    results = run_benchmark(sizes, args.dtypes, args.losses, args.impls, repeats=repeats,
                            warmup=args.warmup, subprocess=not args.in_process, timeout=args.timeout)
    results["config"]["command"] = " ".join(sys.argv)
    results["rows"] = summarize(results)
    print(format_table(results))
    tables.write_json(args.json, results)
    failed = any("error" in c for c in results["cases"] + results["floors"])
    failed = failed or any(r["mismatch"] for r in results["rows"])
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdfast.benchmarks.dense",
        description="kdfast dense losses vs PyTorch eager and torch.compile, forward+backward.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_spec, _parser, run_from_args)


if __name__ == "__main__":
    sys.exit(main())
