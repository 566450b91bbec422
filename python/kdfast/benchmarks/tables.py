"""Markdown tables and command-line options shared by kdfast's benchmarks."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, Callable


def fmt_s(x: float | None) -> str:
    """Seconds for a table: ``"812 µs"``, ``"46.4 ms"``, ``"2.68 s"``; ``"-"`` for none."""
    if x is None or not math.isfinite(x):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_x(x: float | None, *, at_least: float | None = None, at_most: float | None = None,
          sign: str = "×") -> str:
    """A ratio, with ✓/✗ against a target (``at_least`` or ``at_most``); ``"-"`` for none."""
    if x is None or not math.isfinite(x):
        return "-"
    mark = ""
    if at_least is not None:
        mark = " ✓" if x >= at_least else " ✗"
    if at_most is not None:
        mark = " ✓" if x <= at_most else " ✗"
    return (f"{x:.2f}" if x < 100 else f"{x:.0f}") + sign + mark


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def markdown_head(head: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def ratio_table(groups: dict[tuple, dict[str, dict]], impls: Sequence[str], label_head: Sequence[str]) -> list[str]:
    """Markdown rows: per group (its label cells, then ``{impl: case}``) the time of every
    implementation, kdfast's time over each other's, and the extra peak memory in MiB."""
    others = [i for i in impls if i != "kdfast"]
    lines = markdown_head(list(label_head) + [f"time {i}" for i in impls] + [f"kd/{i}" for i in others]
                          + [f"MiB {i}" for i in impls])
    for label, by in groups.items():
        ok = {i: c for i, c in by.items() if "error" not in c}
        kd = ok.get("kdfast", {}).get("time_s")
        cells = list(label)
        cells += [fmt_s(ok[i]["time_s"]) if i in ok else ("error" if i in by else "-") for i in impls]
        cells += [f"{kd / ok[i]['time_s']:.2f}" if (kd and i in ok) else "-" for i in others]
        cells += [fmt_mib(ok[i].get("extra_peak_bytes")) if i in ok else "-" for i in impls]
        lines.append(markdown_row(cells))
    return lines


def fmt_mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def sizes(shape: str = "NxV", example: str = "2048x32000") -> Callable[[str], list[tuple[int, ...]]]:
    """An ``argparse`` type: ``"2048x32000,2048x128256"`` -> ``[(2048, 32000), (2048, 128256)]``,
    each item with as many positive integers as ``shape`` has parts."""
    dims = len(shape.split("x"))

    def parse(text: str) -> list[tuple[int, ...]]:
        out = []
        for item in filter(None, (x.strip().lower() for x in text.split(","))):
            try:
                size = tuple(int(x) for x in item.split("x"))
            except ValueError:
                size = ()
            if len(size) != dims:
                raise argparse.ArgumentTypeError(f"size must look like {shape} (e.g. {example}), got {item!r}")
            if min(size) <= 0:
                raise argparse.ArgumentTypeError(f"size must be positive, got {item!r}")
            out.append(size)
        if not out:
            raise argparse.ArgumentTypeError("no sizes given")
        return out

    return parse


def subset(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An ``argparse`` type: a comma-separated, non-empty subset of ``allowed`` (``all``: every one)."""
    def parse(text: str) -> list[str]:
        if text.strip() == "all":
            return list(allowed)
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in allowed for x in items):
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items

    return parse


def group_cases(results: Sequence[dict[str, Any]], kind: str) -> dict[tuple, dict[str, dict]]:
    """The results of one ``kind``, by ``(n, v, dtype)``, then by ``impl``, in run order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r["kind"] == kind:
            groups.setdefault((r["n"], r["v"], r["dtype"]), {})[r["impl"]] = r
    return groups


def write_json(path: str | None, results: dict[str, Any]) -> None:
    """All results as JSON at ``path`` (nothing when None), and a note on stderr."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {path}", file=sys.stderr)
