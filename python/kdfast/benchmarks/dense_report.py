"""The report of :mod:`.dense`: one row per (loss, N, V, dtype) with every implementation's time,
kdfast's ratios to each of them, extra peak memory, and the agreement check.

**Agreement.** Every implementation sees the same inputs, so after the peers' values are mapped
onto kdfast's convention (:mod:`.peers`) the loss, the gradient norm and ⟨gradient, teacher⟩
must match the reference — eager (float32 arithmetic), else kdfast — within :data:`TOLERANCE`
(relative), or :data:`HALF_TOLERANCE` for a peer that computes in bf16/fp16 when the inputs are
half. A miss is a *mismatch*: marked ✗ in the ``agree`` column, listed under the table, and the
benchmark exits with status 1.
"""

from __future__ import annotations

import math
from typing import Any

from kdfast.benchmarks import peers, tables
from kdfast.benchmarks.references import DTYPES

TOLERANCE = {"loss_value": 1e-3, "grad_norm": 1e-2, "grad_dot_teacher": 1e-2}
# bf16 keeps 8 significant bits (rounding alone moves a loss by up to 0.4 %).
HALF_TOLERANCE = {"loss_value": 2e-2, "grad_norm": 5e-2, "grad_dot_teacher": 5e-2}

# The goals kdfast's CPU kernels are held to (see BENCHMARKS.md).
TARGET_VS_COMPILE = 0.4
TARGET_VS_EAGER = 0.1
#: kdfast's time over floor+alloc (one read of the inputs, one fresh gradient): forward KL needs
#: the fewest operations per element, so its bound is the tightest.
TARGET_VS_FLOOR_ALLOC = {"forward_kl": 1.3}
TARGET_VS_FLOOR_ALLOC_OTHERS = 2.0
TARGET_EXTRA_MEM = 1.1


def floor_alloc_target(loss: str) -> float:
    return TARGET_VS_FLOOR_ALLOC.get(loss, TARGET_VS_FLOOR_ALLOC_OTHERS)


def tolerance(impl: str, dtype: str) -> dict[str, float]:
    """The relative tolerances ``impl``'s values are held to for inputs of ``dtype``."""
    half = dtype != "fp32" and impl in peers.PEERS and peers.PEERS[impl].half_arithmetic
    return HALF_TOLERANCE if half else TOLERANCE


def _ok(case: dict[str, Any] | None) -> bool:
    return case is not None and "error" not in case and "skipped" not in case


def _check(row: dict[str, Any], impl: str, case: dict[str, Any], ref_name: str, ref: dict[str, Any]) -> None:
    tol = tolerance(impl, row["dtype"])
    rel = {}
    for key, limit in tol.items():
        a, b = case.get(key), ref.get(key)
        rel[key] = abs(a - b) / max(abs(b), 1e-6) if a is not None and b is not None else math.inf
        if not rel[key] <= limit:  # NaN fails too
            row["mismatch"].append(f"{impl}.{key}={a} vs {ref_name} {b} (relative {rel[key]:.1e} > {limit:g})")
    problems = len(row["mismatch"])
    if case.get("grad_dtype") not in (None, str(DTYPES[row["dtype"]]).replace("torch.", "")):
        row["mismatch"].append(f"{impl} grad dtype {case.get('grad_dtype')}")
    if case.get("grad_finite") is False:
        row["mismatch"].append(f"{impl} grad has NaN/inf")
    ok = all(rel[k] <= tol[k] for k in tol) and len(row["mismatch"]) == problems
    row["agreement"][impl] = {"reference": ref_name, "relative": rel, "tolerance": tol, "ok": ok}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (loss, n, v, dtype): times per impl, floor, memory, agreement with the
    reference (``agreement[impl]``: relative differences, tolerances, ok) and the mismatches."""
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
                               "time_s": {}, "extra_mem": {}, "extra_peak_bytes": {},
                               "errors": {}, "skipped": {}, "agreement": {}, "mismatch": []}
        for impl, c in by_impl.items():
            if "error" in c:
                row["errors"][impl] = c["error"]
            elif "skipped" in c:
                row["skipped"][impl] = c["skipped"]
            else:
                row["time_s"][impl] = c["time_s"]
                row["extra_mem"][impl] = c.get("extra_peak_inputs")
                row["extra_peak_bytes"][impl] = c.get("extra_peak_bytes")
        ref_name = next((i for i in ("eager", "kdfast") if _ok(by_impl.get(i))), None)
        row["reference"] = ref_name
        if ref_name is not None:
            for impl, c in by_impl.items():
                if impl != ref_name and _ok(c):
                    _check(row, impl, c, ref_name, by_impl[ref_name])
        rows.append(row)
    return rows


def _time_cell(r: dict[str, Any], impl: str) -> str:
    if impl in r["errors"]:
        return "error"
    if impl in r["skipped"]:
        return "skipped"
    if impl in peers.PEERS and not peers.supports(impl, r["loss"]):
        return "n/a"
    return tables.fmt_s(r["time_s"].get(impl))


def _per_core(r: dict[str, Any], results: dict[str, Any]) -> str:
    kd = r["time_s"].get("kdfast")
    threads = results["machine"].get("torch_threads") or 1
    return "-" if not kd else f"{r['n'] * r['v'] / (kd * threads) / 1e9:.2f}"


def _agree_cell(r: dict[str, Any]) -> str:
    if r["reference"] is None:
        return "-"
    bad = [i for i, a in r["agreement"].items() if not a["ok"]]
    return "✗ " + ",".join(bad) if bad or r["mismatch"] else "✓"


def _peer_lines(results: dict[str, Any], impls: list[str], rows: list[dict[str, Any]]) -> list[str]:
    report = results.get("peers") or peers.report()
    lines = []
    for name, info in report.items():
        if name in impls:
            maps = "; ".join(f"{loss}: {how}" for loss, how in info["losses"].items())
            lines.append(f"- {name} {info['version']} ({info['where']}): {maps}.")
    skipped = dict(results["config"].get("peers_skipped") or {})
    for r in rows:
        skipped.update(r["skipped"])
    lines += [f"- {name} skipped: {why}." for name, why in skipped.items()]
    return lines


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table (pasteable into BENCHMARKS.md) plus notes on the peers, errors and
    mismatches."""
    rows = results.get("rows") or summarize(results)
    impls = list(results["config"]["impls"])
    peer_impls = [i for i in impls if i in peers.PEERS]
    head = ["loss", "N×V", "dtype"] + impls + ["floor", "floor+alloc"]
    have_kd = "kdfast" in impls
    if have_kd:
        head += ["kd/compile", "kd/eager", "kd/floor", "kd/(floor+alloc)", "kd Gelem/s/core"]
        head += [f"kd/{p}" for p in peer_impls]
    head += [f"mem {i}" for i in impls] + ["agree"]
    lines = tables.markdown_head(head)
    notes = []
    for r in rows:
        t = r["time_s"]
        cells = [r["loss"], f"{r['n']}×{r['v']}", r["dtype"]]
        cells += [_time_cell(r, i) for i in impls]
        cells += [tables.fmt_s(r["floor_s"]), tables.fmt_s(r["add_fresh_s"])]
        if have_kd:
            kd = t.get("kdfast")
            cells += [
                tables.fmt_x(tables.ratio(kd, t.get("compile")), at_most=TARGET_VS_COMPILE, sign=""),
                tables.fmt_x(tables.ratio(kd, t.get("eager")), at_most=TARGET_VS_EAGER, sign=""),
                tables.fmt_x(tables.ratio(kd, r["floor_s"]), sign=""),
                tables.fmt_x(tables.ratio(kd, r["add_fresh_s"]), at_most=floor_alloc_target(r["loss"]), sign=""),
                _per_core(r, results),
            ]
            cells += [tables.fmt_x(tables.ratio(kd, t.get(p)), sign="") for p in peer_impls]
        for i in impls:
            m = r["extra_mem"].get(i)
            if m is None:
                cells.append("-")
            else:
                mark = (" ✓" if m <= TARGET_EXTRA_MEM else " ✗") if i == "kdfast" else ""
                cells.append(f"{m:.2f}×{mark}")
        cells.append(_agree_cell(r))
        lines.append(tables.markdown_row(cells))
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
         "mem = extra peak RSS of the timed runs (gradient included) in units of one input tensor. "
         "kd/x = kdfast's time / x's (below 1: kdfast is faster)."),
        (f"Targets (✓/✗): kdfast ≤ {TARGET_VS_COMPILE}× compile, ≤ {TARGET_VS_EAGER}× eager, "
         f"≤ {TARGET_VS_FLOOR_ALLOC['forward_kl']}× floor+alloc for forward KL and "
         f"≤ {TARGET_VS_FLOOR_ALLOC_OTHERS}× for the others, extra memory ≤ {TARGET_EXTRA_MEM}× one input. "
         "kd Gelem/s/core = N·V / (kdfast's time × threads): forward + backward throughput per core."),
        (f"agree: loss, ‖grad‖ and ⟨grad, teacher⟩ within relative {TOLERANCE['loss_value']:g} / "
         f"{TOLERANCE['grad_norm']:g} of eager (peers computing in bf16/fp16: {HALF_TOLERANCE['loss_value']:g} / "
         f"{HALF_TOLERANCE['grad_norm']:g}), after mapping the peers' values onto kdfast's convention."),
    ]
    peer_lines = _peer_lines(results, impls, rows)
    if peer_lines:
        footer += ["", "Peers (n/a: the peer has no such loss):"] + peer_lines
    if notes:
        footer += ["", "Problems:"] + notes
    return "\n".join(lines + footer)
