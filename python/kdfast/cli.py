"""The ``kdfast`` command line.

Each subcommand is one ``_register_<name>(subparsers)`` function that adds its parser and sets
``func`` (called with the parsed arguments, returns the exit status); add new ones to
``SUBCOMMANDS``. Heavy imports happen inside the handlers so ``kdfast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Callable

# ``kdfast bench`` default: about 3 minutes on a 2-core CPU, mostly process start-up (the peers'
# imports: TRL's takes 5-10 s), the eager JSD and torch.compile compilation (Inductor caches it
# on disk, so later runs are quicker).
BENCH_SIZES = ((1024, 32000),)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kdfast")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


# ---------------------------------------------------------------------------------------------
# kdfast bench


def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    from kdfast.benchmarks import dense  # light: torch is imported by kdfast anyway

    p = subparsers.add_parser(
        "bench",
        help="time kdfast's losses against PyTorch eager, torch.compile and the peer libraries on this machine",
        description=(
            "kdfast against PyTorch eager and torch.compile (the same reference code) and the "
            "installed peers (TRL's generalized_jsd_loss, torchtune's KD losses; Liger-Kernel "
            "with --gpu), forward+backward on the same inputs, each case in a fresh process; "
            "prints one table of times, kdfast's ratios to each, the memory-bandwidth floor, "
            "extra peak memory and whether every value agrees with eager after mapping the "
            "peers' conventions onto kdfast's (exit status 1 when one does not). Default sizes: "
            + ",".join(f"{n}x{v}" for n, v in BENCH_SIZES)
            + "; --full runs the sizes recorded in BENCHMARKS.md."
        ),
    )
    dense.add_arguments(p, default_sizes=BENCH_SIZES)
    p.add_argument("--full", action="store_true",
                   help="the full sizes: " + ",".join(f"{n}x{v}" for n, v in dense.FULL_SIZES)
                   + " (about 20 minutes on 2 cores)")
    p.add_argument("--all", action="store_true",
                   help="also run the offline benchmarks (compress_topk/compress_sample and sparse_kl "
                   "against PyTorch, at the small sizes of `python -m kdfast.benchmarks.offline --quick`) "
                   "and the fused-linear one (`python -m kdfast.benchmarks.fused_linear`); "
                   "their own tables follow (about 2 more minutes)")
    # The dense table alone is the default now; the old flag still parses.
    p.add_argument("--dense-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gpu", action="store_true",
                   help="run the GPU benchmark instead (Triton kernels vs eager, torch.compile and "
                   "Liger-Kernel on the current CUDA device: `python -m kdfast.benchmarks.gpu`)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from kdfast.benchmarks import dense

    if args.gpu:
        from kdfast.benchmarks import gpu

        return gpu.main((["--json", args.json] if args.json else []) + ([] if args.full else ["--quick"]))
    if args.full and (args.sizes or args.quick):
        print("kdfast bench: error: --full cannot be combined with --sizes or --quick", file=sys.stderr)
        return 2
    default_sizes = dense.FULL_SIZES if args.full else BENCH_SIZES
    status = dense.run_from_args(args, default_sizes=default_sizes)
    if not args.all:
        return status
    from kdfast.benchmarks import fused_linear, offline

    offline_argv = ["--parts", "compress,loss"] + ([] if args.full else ["--quick"])
    fused_argv = ["--device", "cpu"] + ([] if args.full else ["--quick"])
    if args.json:
        stem = args.json.rsplit(".json", 1)[0]
        offline_argv += ["--json", stem + ".offline.json"]
        fused_argv += ["--json", stem + ".fused_linear.json"]
    status = status or offline.main(offline_argv)
    return status or fused_linear.main(fused_argv)


# ---------------------------------------------------------------------------------------------
# kdfast capture (defined in kdfast.capture.cli)


def _register_capture(subparsers: argparse._SubParsersAction) -> None:
    from kdfast.capture import cli as capture_cli

    capture_cli.add_parser(subparsers)


# ---------------------------------------------------------------------------------------------
# kdfast demo (defined in kdfast.demo)


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    from kdfast import demo

    demo.add_parser(subparsers)


# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_register_bench, _register_capture, _register_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdfast", description="kdfast: fast knowledge-distillation losses."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kdfast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
