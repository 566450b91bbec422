"""The report of a ``kdfast demo`` run: the table, the plot of the validation curves, the JSON."""

from __future__ import annotations

import json
import math
from typing import Dict, List


def table(rows: List[dict], unit: str) -> str:
    head = ["model", "params", "steps", f"val loss (nats/{unit})", "perplexity", "gap closed",
            "time", "peak RSS", "cache"]
    lines = []
    for r in rows:
        gap = "" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f} %"
        cache = "" if r.get("cache_bytes_per_token") is None else f"{r['cache_bytes_per_token']:.1f} B/{unit}"
        peak = f"{r['peak_rss_mib']:.0f} MiB"
        if r.get("rss_growth_mib") is not None and math.isfinite(r["rss_growth_mib"]):
            peak += f" (+{max(0.0, r['rss_growth_mib']):.0f})"
        if r.get("cuda_peak_mib") is not None:
            peak += f" (GPU {r['cuda_peak_mib']:.0f} MiB)"
        if r.get("val_loss") is None:  # a capture
            lines.append([r["name"], "", "", "", "", "", f"{r['train_seconds']:.1f} s", peak, cache])
            continue
        lines.append([r["name"], f"{r['params'] / 1e6:.2f} M", str(r["steps"] or "-"), f"{r['val_loss']:.4f}",
                      f"{r['perplexity']:.3f}", gap, f"{r['train_seconds']:.1f} s", peak, cache])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *(fmt(line) for line in lines)])


def plot(path: str, curves: Dict[str, list], labels: Dict[str, str], teacher_loss: float, unit: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for kind, curve in curves.items():
        xs, ys = zip(*curve)
        ax.plot(xs, ys, marker="o", markersize=3, label=labels[kind])
    ax.axhline(teacher_loss, color="black", linestyle="--", linewidth=1, label="teacher")
    finals = [c[-1][1] for c in curves.values()]
    lo = min(min(finals), teacher_loss)
    hi = max(c[min(1, len(c) - 1)][1] for c in curves.values())
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("student training step")
    ax.set_ylabel(f"validation loss (nats/{unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finite(x):
    """``x`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: str, results: dict) -> None:
    """``results`` as strict JSON (NaN and inf written as null)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(finite(results), f, indent=1)
