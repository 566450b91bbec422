"""Dense distillation losses: kdfast against the PyTorch code users write, forward + backward.

For every (loss, N, V, dtype) this runs, each in a fresh subprocess so that its peak memory is
its own:

* ``eager``   - the naive PyTorch reference below (what users write), in float32;
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

MODULE = "kdfast.benchmarks.dense"

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
LOSSES = ("forward_kl", "jsd")
IMPLS = ("eager", "compile", "kdfast", "kdfast-torch")
DEFAULT_IMPLS = ("eager", "compile", "kdfast")

# The sizes: N=2048 rows, Llama-2 and Llama-3 vocabularies.
FULL_SIZES = ((2048, 32000), (2048, 128256))
QUICK_SIZES = ((256, 32000),)

TEMPERATURE = 1.0
JSD_BETA = 0.5
LOGIT_SCALE = 2.0  # std of the random logits; LLM logits spread over a few units

# The goals kdfast's CPU kernels are held to (see BENCHMARKS.md).
TARGET_VS_COMPILE = 0.5
TARGET_VS_EAGER = 0.1
TARGET_VS_FLOOR = 2.0
TARGET_EXTRA_MEM = 1.1


# ----------------------------------------------------------------------------------------------
# The references: plain PyTorch as users write it (upcast to float32 first, as users do).


def eager_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || q_student), batchmean: the usual ``log_softmax`` + ``kl_div``."""
    T = TEMPERATURE
    student_log_probs = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")


def eager_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Generalized JSD as TRL's ``generalized_jsd_loss`` computes it, batchmean."""
    T, beta = TEMPERATURE, JSD_BETA
    student_log_probs = F.log_softmax(student_logits.float() / T, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
    mixture_log_probs = torch.logsumexp(
        torch.stack(
            [student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]
        ),
        dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum() / jsd.size(0)


EAGER = {"forward_kl": eager_forward_kl, "jsd": eager_jsd}


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

        backend = "rust" if impl == "kdfast" else "torch"
        fn = getattr(kdfast, loss)
        kwargs: dict[str, Any] = {"temperature": TEMPERATURE, "reduction": "mean", "backend": backend}
        if loss == "jsd":
            kwargs["beta"] = JSD_BETA

        def kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
            return fn(student, teacher, **kwargs)

        return kd
    raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")


def make_inputs(n: int, v: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``[n, v]``; the same values for every implementation."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=dtype).mul_(LOGIT_SCALE)
    teacher = torch.randn(n, v, generator=g, dtype=dtype).mul_(LOGIT_SCALE)
    return student, teacher


# ----------------------------------------------------------------------------------------------
# One case, run inside a worker process.


def _step(fn: Callable, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    loss = fn(student, teacher)
    loss.backward()
    return loss


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time forward+backward of one (loss, impl, n, v, dtype) and measure its extra peak memory."""
    loss_name, impl = spec["loss"], spec["impl"]
    n, v, dtype = spec["n"], spec["v"], DTYPES[spec["dtype"]]
    repeats, warmup = spec["repeats"], spec["warmup"]

    student, teacher = make_inputs(n, v, dtype)
    student.requires_grad_(True)
    input_bytes = student.numel() * student.element_size()
    gc.collect()
    hwm_after_inputs = _measure.read_status_kib("VmHWM")

    fn = make_loss_fn(loss_name, impl)
    warm_times = []
    for _ in range(warmup):  # includes torch.compile's compilation; not reported as run time
        student.grad = None
        dt, _loss = _measure.time_call(lambda: _step(fn, student, teacher))
        warm_times.append(dt)
        del _loss

    student.grad = None
    gc.collect()
    if _measure.reset_peak_rss():
        peak_method = "clear_refs"
        baseline_kib = _measure.read_status_kib("VmHWM")
    else:  # the baseline is the high-water mark once the inputs existed (warmup included in peak)
        peak_method = "hwm_after_inputs"
        baseline_kib = hwm_after_inputs

    times = []
    loss = None
    for _ in range(repeats):
        student.grad = None  # freed outside the timed region; allocated again inside it
        loss = None
        dt, loss = _measure.time_call(lambda: _step(fn, student, teacher))
        times.append(dt)
    peak_kib = _measure.read_status_kib("VmHWM")

    result: dict[str, Any] = {
        **spec,
        "time_s": _measure.median(times),
        "times_s": times,
        "warmup_times_s": warm_times,
        "input_bytes": input_bytes,
        "peak_method": peak_method,
        "threads": torch.get_num_threads(),
    }
    if baseline_kib is not None and peak_kib is not None:
        extra = (peak_kib - baseline_kib) * 1024
        result["extra_peak_bytes"] = extra
        result["extra_peak_inputs"] = extra / input_bytes
    # Checks (outside the measured window): every implementation should agree on these.
    grad = student.grad
    result["loss_value"] = float(loss.detach()) if loss is not None else None
    result["loss_dtype"] = str(loss.dtype).replace("torch.", "") if loss is not None else None
    if grad is not None:
        g32 = grad.float()
        result["grad_dtype"] = str(grad.dtype).replace("torch.", "")
        result["grad_norm"] = float(g32.norm())
        result["grad_dot_teacher"] = float((g32 * teacher.float()).sum())
        result["grad_finite"] = bool(torch.isfinite(g32).all())
    else:
        result["grad_dtype"] = None
    return result


def run_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Memory-bandwidth floor: read both inputs, write one gradient-sized tensor."""
    n, v, dtype = spec["n"], spec["v"], DTYPES[spec["dtype"]]
    student, teacher = make_inputs(n, v, dtype)
    reps = max(3, spec["repeats"])

    def timed(fn: Callable[[], torch.Tensor]) -> list[float]:
        fn()  # warmup
        ts = []
        for _ in range(reps):
            dt, res = _measure.time_call(fn)
            ts.append(dt)
            del res  # freeing a fresh result is not timed
        return ts

    out = torch.empty_like(student)
    out.fill_(0)  # touch every page once, so the preallocated timings are pure bandwidth
    add_s = _measure.median(timed(lambda: torch.add(student, teacher, out=out)))
    copy_s = _measure.median(timed(lambda: out.copy_(student)))
    # Into a fresh tensor, as a gradient is: adds the cost of faulting its pages in.
    add_fresh_s = _measure.median(timed(lambda: torch.add(student, teacher)))
    return {
        **spec,
        "add_s": add_s,
        "copy_s": copy_s,
        "add_fresh_s": add_fresh_s,
        "floor_s": min(add_s, 1.5 * copy_s),
        "input_bytes": student.numel() * student.element_size(),
        "threads": torch.get_num_threads(),
    }


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = run_floor(spec) if spec["kind"] == "floor" else run_case(spec)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the parent keeps going
        result = {**spec, "error": f"{type(exc).__name__}: {exc}"}
    _measure.emit_result(result)
    return 0


# ----------------------------------------------------------------------------------------------
# Driver.


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"2048x32000,2048x128256"`` -> ``[(2048, 32000), (2048, 128256)]``."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            n_s, v_s = item.split("x")
            n, v = int(n_s), int(v_s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"size must look like NxV (e.g. 2048x32000), got {item!r}")
        if n <= 0 or v <= 0:
            raise argparse.ArgumentTypeError(f"size must be positive, got {item!r}")
        sizes.append((n, v))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return items

    return parse


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
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    specs: list[dict[str, Any]] = []
    for n, v in sizes:
        for dt in dtypes:
            specs.append({"kind": "floor", "n": n, "v": v, "dtype": dt, "repeats": repeats})
            for loss in losses:
                for impl in impls:
                    specs.append(
                        {"kind": "case", "loss": loss, "impl": impl, "n": n, "v": v, "dtype": dt,
                         "repeats": repeats, "warmup": warmup}
                    )
    floors, cases = [], []
    load_before = _measure.load_average()
    t_start = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        if subprocess:
            res = _measure.run_worker(MODULE, spec, timeout=timeout)
            res = {**spec, **res}
        else:
            res = json.loads(json.dumps(spec))
            try:
                res = run_floor(spec) if spec["kind"] == "floor" else run_case(spec)
            except Exception as exc:  # noqa: BLE001 - one failed case does not end the run
                res = {**spec, "error": f"{type(exc).__name__}: {exc}"}
        res["load_average"] = _measure.load_average()  # other work on the machine skews timings
        (floors if spec["kind"] == "floor" else cases).append(res)
        label = f"{spec['n']}x{spec['v']} {spec['dtype']}"
        if spec["kind"] == "floor":
            label = f"floor {label}"
            what = (f"add {res['add_s']:.4f} s, copy {res['copy_s']:.4f} s, "
                    f"add into fresh {res['add_fresh_s']:.4f} s"
                    if "error" not in res else res["error"])
        else:
            label = f"{spec['loss']} {label} {spec['impl']}"
            what = res.get("error") or (
                f"{res['time_s']:.4f} s, extra mem {res.get('extra_peak_inputs', float('nan')):.2f}x input"
            )
        log(f"[{i}/{len(specs)}] {label}: {what} ({time.perf_counter() - t0:.0f} s)")
    return {
        "machine": _measure.machine_info(),
        "config": {
            "sizes": [list(s) for s in sizes], "dtypes": dtypes, "losses": losses, "impls": impls,
            "repeats": repeats, "warmup": warmup, "subprocess": subprocess,
            "temperature": TEMPERATURE, "jsd_beta": JSD_BETA, "logit_std": LOGIT_SCALE,
            "wall_s": time.perf_counter() - t_start,
            "load_average_before": load_before, "load_average_after": _measure.load_average(),
        },
        "floors": floors,
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt_s(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_ratio(a: float | None, b: float | None, target: float | None = None) -> str:
    if a is None or b is None or not b:
        return "-"
    r = a / b
    mark = ""
    if target is not None:
        mark = " ✓" if r <= target else " ✗"
    return f"{r:.2f}{mark}" if r < 100 else f"{r:.0f}{mark}"


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
        cells += [_fmt_s(t.get(i)) if i not in r["errors"] else "error" for i in impls]
        cells += [_fmt_s(r["floor_s"]), _fmt_s(r["add_fresh_s"])]
        if have_kd:
            kd = t.get("kdfast")
            cells += [
                _fmt_ratio(kd, t.get("compile"), TARGET_VS_COMPILE),
                _fmt_ratio(kd, t.get("eager"), TARGET_VS_EAGER),
                _fmt_ratio(kd, r["floor_s"], TARGET_VS_FLOOR),
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
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="comma-separated NxV (default: "
                        + ",".join(f"{n}x{v}" for n, v in (default_sizes or FULL_SIZES)) + ")")
    parser.add_argument("--dtypes", type=_choices(tuple(DTYPES), "--dtypes"), default=["fp32", "bf16"],
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16)")
    parser.add_argument("--losses", type=_choices(LOSSES, "--losses"), default=list(LOSSES),
                        help="comma-separated subset of forward_kl,jsd (default: both)")
    parser.add_argument("--impls", type=_choices(IMPLS, "--impls"), default=list(DEFAULT_IMPLS),
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
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    failed = any("error" in c for c in results["cases"] + results["floors"])
    failed = failed or any(r["mismatch"] for r in results["rows"])
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"] and len(argv) == 2:
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m kdfast.benchmarks.dense",
        description="kdfast dense losses vs PyTorch eager and torch.compile, forward+backward.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
