"""Fused linear distillation: ``kdfast.fused_linear_distill_loss`` against materialised logits.

For each (N, H, V, dtype) this times forward+backward of one distillation step through the LM
head (student hidden ``[N, H]`` and head ``[V, H]`` with gradients; the teacher as hidden
states and head of the same shape, no gradient) and measures its extra peak memory:

* ``unfused`` - ``z = h Wᵀ`` materialised, then the kdfast dense loss on it (the best a user can
  do without fusing: the loss itself is already the fused kernel);
* ``eager``   - ``z = h Wᵀ`` then the plain PyTorch loss (``log_softmax`` + ``kl_div`` / TRL's
  JSD), as in :mod:`kdfast.benchmarks.references`;
* ``compile`` - ``eager`` under ``torch.compile`` (compile time excluded);
* ``kdfast``  - ``kdfast.fused_linear_distill_loss`` (chunked; no ``[N, V]`` tensor);
* ``liger``   - ``liger_kernel``'s ``LigerFusedLinearJSD`` (CUDA, when installed; jsd only).

On CPU each case runs in a fresh subprocess and memory is the resident-set high-water mark; on
CUDA cases run in-process, timed with CUDA events, memory is ``torch.cuda.max_memory_allocated``
over the timed runs minus what the inputs hold. Memory is reported in MiB and as a multiple of
one ``[N, V]`` float32 logits tensor, the thing fusing avoids: flat in N is the goal.

Run ``python -m kdfast.benchmarks.fused_linear --help`` or ``python benches/bench_fused_linear.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Callable

import torch

from kdfast.benchmarks import harness, tables
from kdfast.benchmarks.references import DTYPES, EAGER, JSD_BETA, TEMPERATURE, kdfast_kwargs

MODULE = "kdfast.benchmarks.fused_linear"
IMPLS = ("unfused", "eager", "compile", "kdfast", "liger")
LOSSES = ("forward_kl", "jsd")
# (N, H, V): CPU sizes that take seconds, not minutes, on 2 cores; the GPU sizes.
CPU_SIZES = ((256, 512, 32000), (1024, 512, 32000), (4096, 512, 32000))
QUICK_SIZES = ((256, 256, 8000),)
GPU_SIZES = ((1024, 4096, 128256), (4096, 4096, 128256), (8192, 4096, 128256))


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Student hidden/head (requiring grad) and teacher hidden/head, scaled so logits spread over
    a few units as an LLM's do."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: a V×H head is large
    mk = (lambda *s, std: (torch.randn(*s, generator=g, device=device) * std).to(dtype))
    sh, sw = mk(n, h, std=1.0), mk(v, h, std=2.0 / h**0.5)
    th, tw = mk(n, h, std=1.0), mk(v, h, std=2.0 / h**0.5)
    return sh.requires_grad_(True), sw.requires_grad_(True), th, tw


def make_step(loss: str, impl: str) -> Callable[..., torch.Tensor]:
    """``step(sh, sw, th, tw) -> loss`` (forward only; the caller runs backward)."""
    import kdfast

    kwargs = kdfast_kwargs(loss)
    if impl == "kdfast":
        return lambda sh, sw, th, tw: kdfast.fused_linear_distill_loss(
            sh, sw, teacher_hidden=th, teacher_weight=tw, loss=loss, **kwargs)
    if impl == "unfused":
        fn = getattr(kdfast, loss)

        def unfused(sh, sw, th, tw):
            with torch.no_grad():
                t_logits = th @ tw.t()
            return fn(sh @ sw.t(), t_logits, **kwargs)

        return unfused
    if impl in ("eager", "compile"):
        ref = EAGER[loss]

        def eager(sh, sw, th, tw):
            with torch.no_grad():
                t_logits = th @ tw.t()
            return ref(sh @ sw.t(), t_logits)

        return torch.compile(eager) if impl == "compile" else eager
    if impl == "liger":
        if loss != "jsd":
            raise ValueError("liger: only the fused linear JSD exists (LigerFusedLinearJSD)")
        from liger_kernel.transformers import LigerFusedLinearJSD

        # Liger's JSD weighs the *teacher* by beta in the mixture; 0.5 is the symmetric case.
        mod = LigerFusedLinearJSD(jsd_beta=JSD_BETA, temperature=TEMPERATURE)
        return lambda sh, sw, th, tw: mod(sh, sw, th, tw, None)  # shift_labels has no default
    raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time forward+backward of one case and measure its extra peak memory."""
    n, h, v = spec["n"], spec["h"], spec["v"]
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    sh, sw, th, tw = make_inputs(n, h, v, dtype, device)
    step = make_step(spec["loss"], spec["impl"])

    def run():
        out = step(sh, sw, th, tw)
        out.backward()
        return out

    def reset():
        sh.grad = sw.grad = None

    timing, out = harness.measure(run, repeats=spec["repeats"], warmup=spec["warmup"], reset=reset, device=device)
    return {
        **timing,
        "logits_bytes": n * v * 4,
        "loss_value": float(out.detach()),
        "grad_hidden_norm": float(sh.grad.float().norm()),
        "grad_weight_norm": float(sw.grad.float().norm()),
    }


def run_benchmark(sizes, dtypes, losses, impls, *, device: str, repeats: int, warmup: int,
                  subprocess: bool, timeout: float = 1800.0) -> dict[str, Any]:
    specs = [{"n": n, "h": h, "v": v, "dtype": dt, "loss": loss, "impl": impl, "device": device,
              "repeats": repeats, "warmup": warmup}
             for n, h, v in sizes for dt in dtypes for loss in losses for impl in impls
             if not (impl == "liger" and (loss != "jsd" or device != "cuda"))]
    cases, run = harness.run_cases(specs, run_case, module=MODULE, subprocess=subprocess, timeout=timeout,
                              describe=_describe)
    machine = harness.machine_info()
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return {"machine": machine, "cases": cases,
            "config": {"device": device, "impls": list(impls), "repeats": repeats, "warmup": warmup,
                       "temperature": TEMPERATURE, "jsd_beta": JSD_BETA,
                       "command": " ".join(sys.argv), **run}}


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    what = res.get("error") or f"{res['time_s']:.4f} s, extra {tables.fmt_mib(res.get('extra_peak_bytes'))} MiB"
    return f"{spec['loss']} {spec['n']}x{spec['h']}x{spec['v']} {spec['dtype']} {spec['impl']}: {what}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: time and extra peak memory per implementation, kdfast's ratios to the others."""
    impls = [i for i in results["config"]["impls"] if any(c["impl"] == i for c in results["cases"])]
    groups: dict[tuple, dict[str, dict]] = {}
    for c in results["cases"]:
        label = (c["loss"], f"{c['n']}×{c['h']}×{c['v']}", c["dtype"])
        groups.setdefault(label, {})[c["impl"]] = c
    lines = tables.ratio_table(groups, impls, ["loss", "N×H×V", "dtype"])
    notes = []
    for (loss, size, dt), by in groups.items():
        notes += [f"- {loss} {size} {dt} {i}: {c['error']}" for i, c in by.items() if "error" in c]
        ok = {i: c for i, c in by.items() if "error" not in c}
        if "kdfast" in ok and "unfused" in ok:
            a, b = ok["kdfast"]["loss_value"], ok["unfused"]["loss_value"]
            if abs(a - b) > 1e-2 * max(abs(b), 1e-3):
                notes.append(f"- {loss} {size} {dt}: MISMATCH kdfast loss {a} vs unfused {b}")
    m, cfg = results["machine"], results["config"]
    where = m.get("gpu") or f"{m.get('cpu')}, {m.get('logical_cpus')} logical CPUs"
    lines += ["", f"Device: {where}; torch {m.get('torch')}; forward+backward through the LM head, median of "
              f"{cfg['repeats']} after {cfg['warmup']} warmup; MiB = extra peak memory of the timed runs "
              f"(gradients included) beyond the inputs. kd/x = kdfast time / x time."]
    if notes:
        lines += ["", "Problems:"] + notes
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=tables.sizes("NxHxV", "2048x1024x32000"), default=None,
                   help="comma-separated NxHxV (default: the CPU or GPU sizes of BENCHMARKS.md)")
    p.add_argument("--dtypes", type=tables.subset(tuple(DTYPES), "--dtypes"), default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--losses", type=tables.subset(LOSSES, "--losses"), default=["jsd"])
    p.add_argument("--impls", type=tables.subset(IMPLS, "--impls"), default=None,
                   help="default: unfused,eager,kdfast on CPU; eager,compile,liger,kdfast on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="one small size, 1 repeat")
    p.add_argument("--json", metavar="PATH")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    sizes = args.sizes or (list(QUICK_SIZES) if args.quick else list(GPU_SIZES if cuda else CPU_SIZES))
    dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    impls = args.impls or (["eager", "compile", "liger", "kdfast"] if cuda else ["unfused", "eager", "kdfast"])
    if cuda and "liger" in impls:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            print("liger_kernel is not installed: skipping it", file=sys.stderr)
            impls = [i for i in impls if i != "liger"]
    results = run_benchmark(sizes, dtypes, args.losses, impls, device=args.device,
                            repeats=1 if args.quick else args.repeats, warmup=args.warmup,
                            subprocess=not cuda)
    print(format_table(results))
    tables.write_json(args.json, results)
    return 1 if any("error" in c for c in results["cases"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_case, _parser, run_from_args)


if __name__ == "__main__":
    sys.exit(main())
