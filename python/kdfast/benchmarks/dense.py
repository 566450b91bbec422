"""Dense distillation losses: kdfast against the PyTorch code users write, forward + backward.

For every (loss, N, V, dtype) this runs, each in a fresh subprocess so that its peak memory is
its own:

* ``eager``   - the PyTorch code users write (:mod:`.references`), in float32;
* ``compile`` - the same reference function wrapped in ``torch.compile`` (compile time excluded);
* ``kdfast``  - ``kdfast.<loss>(..., backend="rust")`` (loss and gradient in the forward call);
* ``kdfast-torch`` (opt-in) - ``kdfast.<loss>(..., backend="torch")``, the library's own reference;
* the peers (:mod:`.peers`: ``trl``, ``torchtune``, ``liger``), every one that is installed and
  can run here (``--peers``), for the losses it has; its value is mapped onto kdfast's
  convention (:func:`.peers.value_offset`, outside the timed step) before the agreement check;

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

from kdfast.benchmarks import harness, peers, plot, tables
from kdfast.benchmarks.dense_report import format_table, summarize
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

LOSSES = tuple(EAGER)
DEFAULT_LOSSES = ("forward_kl", "jsd")
OWN_IMPLS = ("eager", "compile", "kdfast", "kdfast-torch")
IMPLS = OWN_IMPLS + peers.NAMES
DEFAULT_IMPLS = ("eager", "compile", "kdfast")

# The sizes: N=2048 rows, Llama-2 and Llama-3 vocabularies.
FULL_SIZES = ((2048, 32000), (2048, 128256))
QUICK_SIZES = ((256, 32000),)



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
    if impl in peers.PEERS:
        return peers.loss_fn(impl, loss, temperature=TEMPERATURE, beta=JSD_BETA)
    raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")


# ----------------------------------------------------------------------------------------------
# One case, run inside a worker process.


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time forward+backward of one (loss, impl, n, v, dtype) and measure its extra peak memory."""
    student, teacher = random_logits(spec["n"], spec["v"], DTYPES[spec["dtype"]])
    student.requires_grad_(True)
    input_bytes = student.numel() * student.element_size()
    try:
        fn = make_loss_fn(spec["loss"], spec["impl"])
    except peers.PeerUnavailable as exc:  # installed but broken: a skip, not a failure
        return {"skipped": str(exc)}

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
    if spec["impl"] in peers.PEERS:  # its own value, then kdfast's convention
        result["peer_value"] = result["loss_value"]
        result["loss_value"] += peers.value_offset(spec["impl"], spec["loss"], teacher, temperature=TEMPERATURE)
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
    what = res.get("error") or (f"skipped: {res['skipped']}" if "skipped" in res else None) or (
        f"{res['time_s']:.4f} s, extra mem {res.get('extra_peak_inputs', float('nan')):.2f}x input")
    return f"{spec['loss']} {label} {spec['impl']}: {what}"


def run_benchmark(
    sizes: Iterable[tuple[int, int]] = FULL_SIZES,
    dtypes: Iterable[str] = ("fp32", "bf16"),
    losses: Iterable[str] = DEFAULT_LOSSES,
    impls: Iterable[str] = DEFAULT_IMPLS,
    *,
    repeats: int = 3,
    warmup: int = 1,
    subprocess: bool = True,
    timeout: float = 1800.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every case and the floors; returns ``{"machine", "config", "peers", "floors",
    "cases"}``. A peer in ``impls`` runs for the losses it has (see :func:`.peers.supports`)."""
    sizes, dtypes, losses, impls = list(sizes), list(dtypes), list(losses), list(impls)
    specs: list[dict[str, Any]] = []
    for n, v in sizes:
        for dt in dtypes:
            specs.append({"kind": "floor", "n": n, "v": v, "dtype": dt, "repeats": repeats})
            specs += [{"kind": "case", "loss": loss, "impl": impl, "n": n, "v": v, "dtype": dt,
                       "repeats": repeats, "warmup": warmup} for loss in losses for impl in impls
                      if impl not in peers.PEERS or peers.supports(impl, loss)]
    results, run = harness.run_cases(specs, run_spec, module=MODULE, subprocess=subprocess, timeout=timeout,
                                describe=_describe, log=log)
    return {
        "machine": harness.machine_info(),
        "config": {
            "sizes": [list(s) for s in sizes], "dtypes": dtypes, "losses": losses, "impls": impls,
            "repeats": repeats, "warmup": warmup, "subprocess": subprocess,
            "temperature": TEMPERATURE, "jsd_beta": JSD_BETA, "logit_std": LOGIT_SCALE, **run,
        },
        "peers": peers.report("cpu"),
        "floors": [r for r in results if r["kind"] == "floor"],
        "cases": [r for r in results if r["kind"] == "case"],
    }


def add_arguments(parser: argparse.ArgumentParser, *, default_sizes: Sequence[tuple[int, int]] | None = FULL_SIZES) -> None:
    """The benchmark's options, shared by this module's CLI and ``kdfast bench``."""
    parser.add_argument("--sizes", type=tables.sizes(), default=None,
                        help="comma-separated NxV (default: "
                        + ",".join(f"{n}x{v}" for n, v in (default_sizes or FULL_SIZES)) + ")")
    parser.add_argument("--dtypes", type=tables.subset(tuple(DTYPES), "--dtypes"), default=["fp32", "bf16"],
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16)")
    parser.add_argument("--losses", type=tables.subset(LOSSES, "--losses"), default=list(DEFAULT_LOSSES),
                        help="'all' or a comma-separated subset of " + ",".join(LOSSES)
                        + " (default: " + ",".join(DEFAULT_LOSSES) + ")")
    parser.add_argument("--impls", type=tables.subset(IMPLS, "--impls"), default=list(DEFAULT_IMPLS),
                        help="comma-separated subset of " + ",".join(IMPLS)
                        + " (default: " + ",".join(DEFAULT_IMPLS) + ", plus --peers)")
    parser.add_argument("--peers", type=peers.selection, default="auto",
                        help="peer libraries to add to --impls: 'auto' (default: every one of "
                        + ",".join(peers.NAMES) + " that is installed and can run here; the others "
                        "are listed with the reason), 'none', or a comma-separated subset")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also plot time and extra peak memory against V, one line per "
                        "implementation (needs matplotlib: pip install 'kdfast[demo]'); pass several "
                        "sizes, e.g. --sizes 1024x8000,1024x32000,1024x128256")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case; the median is shown (default: 3, 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, compilation included (default: 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all results as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ",".join(f"{n}x{v}" for n, v in QUICK_SIZES) + ", 1 repeat")
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (faster start; memory numbers then not isolated)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it is abandoned")


def with_peers(impls: Sequence[str], selection: str | Sequence[str], device: str = "cpu"
               ) -> tuple[list[str], dict[str, str]]:
    """``impls`` plus the selected peers (:func:`.peers.select`), less the peers that cannot run
    on ``device``; and those, with the reason."""
    chosen, skipped = peers.select(selection, device)
    for name in impls:  # a peer named in --impls is held to the same check
        if name in peers.PEERS and name not in chosen and name not in skipped:
            why = peers.skip_reason(name, device)
            if why:
                skipped[name] = why
    out = [i for i in impls if i not in skipped]
    return out + [p for p in chosen if p not in out], skipped


def run_from_args(args: argparse.Namespace, *, default_sizes: Sequence[tuple[int, int]] = FULL_SIZES) -> int:
    """Run with parsed options, print the table, write JSON; exit status 1 when a case failed."""
    sizes = args.sizes or (list(QUICK_SIZES) if args.quick else list(default_sizes))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1 or args.warmup < 1:
        print("error: --repeats and --warmup must be at least 1", file=sys.stderr)
        return 2
    if args.plot:
        problem = plot.missing_matplotlib()
        if problem:
            print(f"error: --plot: {problem}", file=sys.stderr)
            return 2
    impls, skipped = with_peers(args.impls, args.peers)
    for name, why in skipped.items():
        print(f"peer {name} skipped: {why}", file=sys.stderr, flush=True)
    results = run_benchmark(sizes, args.dtypes, args.losses, impls, repeats=repeats,
                            warmup=args.warmup, subprocess=not args.in_process, timeout=args.timeout)
    results["config"]["command"] = " ".join(sys.argv)
    results["config"]["peers_skipped"] = skipped
    results["rows"] = summarize(results)
    print(format_table(results))
    tables.write_json(args.json, results)
    if args.plot:
        plot.plot_dense(results, args.plot)
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
