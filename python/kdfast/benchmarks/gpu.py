"""The GPU benchmark of BENCHMARKS.md: kdfast's Triton kernels against PyTorch eager,
``torch.compile`` and Liger-Kernel, forward+backward time and peak memory on one CUDA device.

* dense ``jsd`` and ``forward_kl`` at BT=8192, V=128256, bf16: ``eager`` (the references of
  :mod:`kdfast.benchmarks.references`), ``compile`` (the same under ``torch.compile``), ``liger``
  (``LigerJSD`` / ``LigerKLDIVLoss`` through the adapter of :mod:`.peers`, fed ``log_softmax``
  of the logits, as its API requires; that ``log_softmax`` is part of the timed step) and ``kdfast`` (``backend="triton"``);
* fused linear (H=4096, V=128256, BT ∈ {1024, 4096, 8192}, bf16): :mod:`.fused_linear`.

Memory is ``torch.cuda.max_memory_allocated()`` over the timed runs minus what was allocated
before them (inputs), in MiB. Run ``python -m kdfast.benchmarks.gpu [--quick] [--json PATH]``;
``benches/gpu_check.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Callable

import torch

from kdfast.benchmarks import fused_linear, harness, peers, tables
from kdfast.benchmarks.references import DTYPES, EAGER, JSD_BETA, TEMPERATURE, kdfast_kwargs, random_logits

DENSE_SIZES = ((8192, 128256),)
QUICK_DENSE = ((1024, 32000),)
QUICK_FUSED = ((1024, 1024, 32000), (4096, 1024, 32000))
IMPLS = ("eager", "compile", "liger", "kdfast")


def dense_step(loss: str, impl: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if impl == "eager":
        return EAGER[loss]
    if impl == "compile":
        return torch.compile(EAGER[loss])
    if impl == "liger":
        return peers.loss_fn("liger", loss, temperature=TEMPERATURE, beta=JSD_BETA)
    import kdfast

    kwargs = kdfast_kwargs(loss, backend="triton")
    fn = getattr(kdfast, loss)
    return lambda s, t: fn(s, t, **kwargs)


def run_dense_case(loss: str, impl: str, n: int, v: int, dtype: str, repeats: int, warmup: int,
                   device: str = "cuda") -> dict[str, Any]:
    s, t = random_logits(n, v, DTYPES[dtype], device=device)
    s.requires_grad_(True)
    step = dense_step(loss, impl)

    def run():
        out = step(s, t)
        out.backward()
        return out

    def reset():
        s.grad = None

    timing, out = harness.measure(run, repeats=repeats, warmup=warmup, reset=reset, device=device)
    return {"loss": loss, "impl": impl, "n": n, "v": v, "dtype": dtype, **timing, "loss_value": float(out.detach()),
            "grad_norm": float(s.grad.float().norm()), "grad_dtype": str(s.grad.dtype)}


def dense_table(cases: list[dict[str, Any]]) -> str:
    impls = [i for i in IMPLS if any(c["impl"] == i for c in cases)]
    groups: dict[tuple, dict[str, dict]] = {}
    for c in cases:
        groups.setdefault((c["loss"], f"{c['n']}×{c['v']}", c["dtype"]), {})[c["impl"]] = c
    lines = tables.ratio_table(groups, impls, ["loss", "BT×V", "dtype"])
    lines += [f"- {c['loss']} {c['n']}×{c['v']} {c['impl']}: {c['error']}" for c in cases if "error" in c]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdfast.benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--parts", default="dense,fused", help="comma-separated subset of dense,fused")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kdfast.benchmarks.gpu: no CUDA device", file=sys.stderr)
        return 2
    impls = list(IMPLS)
    why = peers.skip_reason("liger", "cuda")
    if why:
        print(f"peer liger skipped: {why}", file=sys.stderr)
        impls.remove("liger")
    parts = set(args.parts.split(","))
    results: dict[str, Any] = {"machine": {**harness.machine_info(), "gpu": torch.cuda.get_device_name()}}
    status = 0
    if "dense" in parts:
        cases = []
        for n, v in (QUICK_DENSE if args.quick else DENSE_SIZES):
            for loss in ("jsd", "forward_kl"):
                for impl in impls:
                    try:
                        res = run_dense_case(loss, impl, n, v, "bf16", args.repeats, args.warmup)
                    except Exception as exc:  # noqa: BLE001 - one failed case does not end the run
                        res = {"loss": loss, "impl": impl, "n": n, "v": v, "dtype": "bf16",
                               "error": f"{type(exc).__name__}: {exc}"}
                        status = 1
                    torch.cuda.empty_cache()
                    cases.append(res)
                    print(f"dense {loss} {n}x{v} {impl}: {res.get('error') or tables.fmt_s(res['time_s'])}",
                          file=sys.stderr, flush=True)
        results["dense"] = cases
        print("## Dense losses (" + results["machine"]["gpu"] + ")\n\n" + dense_table(cases) + "\n")
    if "fused" in parts:
        sizes = QUICK_FUSED if args.quick else fused_linear.GPU_SIZES
        fused = fused_linear.run_benchmark(sizes, ["bf16"], ["jsd"], impls, device="cuda",
                                           repeats=args.repeats, warmup=args.warmup, subprocess=False)
        results["fused_linear"] = fused
        status |= any("error" in c for c in fused["cases"])
        print("## Fused linear JSD\n\n" + fused_linear.format_table(fused))
    tables.write_json(args.json, results)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
