"""``kdfast bench --plot FILE.png``: forward+backward time and extra peak memory against the
vocabulary size V, one line per implementation (two panels, log-log).

With several losses or dtypes in one run each (implementation, loss, dtype) is its own line:
the colour is the implementation, the line style the loss, the marker the dtype. Points of one
line that share V (several N) are drawn at the largest N; a memory of 0 (below what the
resident-set size resolves) is left off the log axis. matplotlib is optional (the ``demo``
extra); :func:`missing_matplotlib` says so before a run starts.
"""

from __future__ import annotations

import sys
from typing import Any

INSTALL_HINT = "pip install 'kdfast[demo]' (or pip install matplotlib)"
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def missing_matplotlib() -> str | None:
    """None when matplotlib can be imported, else what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}): {INSTALL_HINT}"
    return None


def series(results: dict[str, Any]) -> dict[tuple[str, str, str], list[tuple[int, float, float | None]]]:
    """``{(impl, loss, dtype): [(V, seconds, extra peak MiB or None), ...]}`` sorted by V, from
    the cases that ran (errors and skips left out)."""
    best: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for c in results["cases"]:
        if "time_s" not in c:
            continue
        key = (c["impl"], c["loss"], c["dtype"], c["v"])
        if key not in best or c["n"] > best[key]["n"]:
            best[key] = c
    out: dict[tuple[str, str, str], list[tuple[int, float, float | None]]] = {}
    for (impl, loss, dtype, v), c in sorted(best.items(), key=lambda kv: kv[0][3]):
        mib = c.get("extra_peak_bytes")
        out.setdefault((impl, loss, dtype), []).append((v, c["time_s"], None if mib is None else mib / 2**20))
    return out


def plot_dense(results: dict[str, Any], path: str) -> str:
    """Write the two-panel figure of ``results`` (from :func:`.dense.run_benchmark`) to ``path``
    (PNG, or any format matplotlib infers from the suffix); returns ``path``."""
    problem = missing_matplotlib()
    if problem:
        raise RuntimeError(problem)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = series(results)
    impls = list(dict.fromkeys(k[0] for k in lines))
    losses = list(dict.fromkeys(k[1] for k in lines))
    dtypes = list(dict.fromkeys(k[2] for k in lines))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.subplots(1, 2)
    for (impl, loss, dtype), pts in lines.items():
        style = {"color": f"C{impls.index(impl) % 10}", "linestyle": _STYLES[losses.index(loss) % len(_STYLES)],
                 "marker": _MARKERS[dtypes.index(dtype) % len(_MARKERS)]}
        label = " ".join([impl] + ([loss] if len(losses) > 1 else []) + ([dtype] if len(dtypes) > 1 else []))
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        mem = [p for p in pts if p[2] is not None and p[2] > 0]  # log axis: 0 (below the RSS resolution) left out
        ax_m.plot([p[0] for p in mem], [p[2] for p in mem], label=label, **style)
    ns = sorted({c["n"] for c in results["cases"]})
    what = (f"{losses[0]}, {dtypes[0]}, " if len(losses) == 1 and len(dtypes) == 1 else "")
    ax_t.set(xscale="log", yscale="log", xlabel="vocabulary size V", ylabel="forward+backward time (s)",
             title=f"time ({what}N={','.join(map(str, ns))})")
    any_mem = any(line.get_ydata().size for line in ax_m.get_lines())
    ax_m.set(xscale="log", yscale="log" if any_mem else "linear", xlabel="vocabulary size V", ylabel="extra peak memory (MiB)",
             title="extra peak memory of the timed runs (gradient included)")
    vs = sorted({v for pts in lines.values() for v, _, _ in pts})
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(vs, [str(v) for v in vs], minor=False)
        ax.set_xticks([], minor=True)
    if lines:
        ax_m.legend(fontsize="small", loc="upper left")
    machine = results.get("machine", {})
    fig.suptitle(f"kdfast bench: {machine.get('cpu')}, {machine.get('logical_cpus')} CPUs, torch {machine.get('torch')}",
                 fontsize="medium")
    fig.savefig(path, dpi=110)
    if len(vs) < 2:
        print("--plot: only one vocabulary size ran; pass several with --sizes for lines "
              "(e.g. --sizes 1024x8000,1024x32000,1024x128256)", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return path
