"""Part 2 of the offline benchmark: forward + backward of :func:`kdfast.sparse_kl`.

A student ``[N, V]`` against top-k (bucket tail) and sampled targets of a teacher, with the Rust
kernel (``kdfast_*``) and with kdfast's own pure-PyTorch reference (``torch_*``,
``backend="torch"``), beside the dense :func:`kdfast.forward_kl` (Rust, ``kdfast_dense``) on the
same student against the full teacher logits.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from kdfast.benchmarks import harness, tables
from kdfast.benchmarks.offline.logits import NUM_SAMPLES, TOPK, zipf_logits
from kdfast.benchmarks.references import DTYPES

FULL_SIZES = ((2048, 32000),)  # add 2048x128256 with --loss-sizes (about 10 more minutes)
QUICK_SIZES = ((256, 32000),)
IMPLS = ("kdfast_topk", "torch_topk", "kdfast_sample", "torch_sample", "kdfast_dense")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    import kdfast

    n, v, dtype, impl = spec["n"], spec["v"], DTYPES[spec["dtype"]], spec["impl"]
    teacher = zipf_logits(n, v, seed=1)
    student = zipf_logits(n, v, seed=2, dtype=dtype)
    targets = None
    if impl.endswith("topk"):
        targets = kdfast.compress_topk(teacher, spec["k"])
    elif impl.endswith("sample"):
        targets = kdfast.compress_sample(teacher, spec["num_samples"], seed=0)
    if impl == "kdfast_dense":
        teacher = teacher.to(dtype)
    else:
        del teacher
        teacher = None
    gc.collect()
    student.requires_grad_(True)
    input_bytes = student.numel() * student.element_size()
    backend = "torch" if impl.startswith("torch") else "rust"

    if impl == "kdfast_dense":
        def step():
            loss = kdfast.forward_kl(student, teacher, reduction="mean", backend="rust")
            loss.backward()
            return loss
    else:
        def step():
            loss = kdfast.sparse_kl(student, targets, tail="bucket", reduction="mean", backend=backend)
            loss.backward()
            return loss

    def clear():
        student.grad = None

    timing, loss = harness.measure(step, repeats=spec["repeats"], warmup=spec["warmup"], reset=clear)
    res: dict[str, Any] = {"input_bytes": input_bytes, "threads": torch.get_num_threads(), **timing}
    if "extra_peak_bytes" in res:
        res["extra_peak_inputs"] = res["extra_peak_bytes"] / input_bytes
    # One more call from a clean gradient for the checks (gradients accumulate across calls).
    clear()
    loss = step()
    g = student.grad.float()
    res["loss_value"] = float(loss.detach())
    res["grad_norm"] = float(g.norm())
    res["grad_dtype"] = str(student.grad.dtype).replace("torch.", "")
    res["grad_finite"] = bool(torch.isfinite(g).all())
    if targets is not None:
        res["slots"] = targets.k
        res["mean_used_slots"] = float((targets.indices >= 0).sum(-1).float().mean())
    return res


def format_table(results: list[dict[str, Any]]) -> str:
    groups = tables.group_cases(results, "loss")
    if not groups:
        return ""
    head = ["N×V", "dtype", "targets", "kdfast sparse_kl", "torch reference", "speed-up",
            "kdfast dense forward_kl", "sparse / dense", "extra mem kdfast / torch ref / dense",
            "loss kdfast vs ref"]
    lines = tables.markdown_head(head)
    notes = []
    for (n, v, dt), c in groups.items():
        dense = c.get("kdfast_dense", {})
        td = dense.get("time_s") if "error" not in dense else None
        for kind, label in (("topk", f"top-{TOPK} bucket"), ("sample", f"sampled N={NUM_SAMPLES}")):
            kd, ref = c.get(f"kdfast_{kind}", {}), c.get(f"torch_{kind}", {})
            tk = kd.get("time_s") if "error" not in kd else None
            tr = ref.get("time_s") if "error" not in ref else None
            mem = " / ".join("-" if r.get("extra_peak_inputs") is None else f"{r['extra_peak_inputs']:.2f}×"
                             for r in (kd, ref, dense))
            agree = "-"
            if tk is not None and tr is not None:
                rel = abs(kd["loss_value"] - ref["loss_value"]) / max(abs(ref["loss_value"]), 1e-12)
                grel = abs(kd["grad_norm"] - ref["grad_norm"]) / max(abs(ref["grad_norm"]), 1e-12)
                agree = f"{rel:.0e} (‖g‖ {grel:.0e})"
                if rel > 1e-3 or grel > 1e-2:
                    notes.append(f"- {n}×{v} {dt} {label}: MISMATCH loss {kd['loss_value']} vs "
                                 f"{ref['loss_value']}, |grad| {kd['grad_norm']} vs {ref['grad_norm']}")
            lines.append(tables.markdown_row([
                f"{n}×{v}", dt, label, tables.fmt_s(tk), tables.fmt_s(tr), tables.fmt_x(tables.ratio(tr, tk)), tables.fmt_s(td),
                tables.fmt_x(tables.ratio(tk, td)), mem, agree]))
        for impl, r in c.items():
            if "error" in r:
                notes.append(f"- {n}×{v} {dt} {impl}: {r['error']}")
    return "\n".join(lines + ([""] + notes if notes else []))
