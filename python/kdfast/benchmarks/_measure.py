"""Measurement helpers shared by kdfast's benchmarks: peak resident memory, timing, worker
subprocesses and a description of the machine.

Peak memory is the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``).
Where the kernel allows it, writing ``5`` to ``/proc/self/clear_refs`` resets that mark to the
current resident size, so a case can measure the peak of its timed runs alone; elsewhere the
baseline is the high-water mark taken right after the inputs were created.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

RESULT_PREFIX = "KDFAST_BENCH_RESULT "


def read_status_kib(field: str) -> int | None:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of ``/proc/self/status``, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = read_status_kib("VmHWM"), read_status_kib("VmRSS")
    # The reset worked when the mark now sits at (about) the current size.
    return hwm is not None and rss is not None and hwm <= rss + 1024


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call in seconds, and what it returned (kept alive until timed)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        import kdfast

        info["kdfast"] = getattr(kdfast, "__version__", None)
    except Exception as exc:  # noqa: BLE001 - the library may not be built yet
        info["kdfast"] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on the machine skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def emit_result(result: dict[str, Any]) -> None:
    """Worker side: print the result as one tagged JSON line on stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(module: str, spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec-json>`` in a fresh interpreter and return the
    result dict it prints. Failures (crash, out-of-memory kill, timeout) come back as
    ``{"error": ...}`` instead of raising, so one bad case does not end a long run."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    # The child must import the same kdfast as this process, installed or from a source tree.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = f"exit status {proc.returncode}"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (
            " (out of memory?)" if proc.returncode == -9 else ""
        )
    return {"error": why + (": " + " | ".join(tail) if tail else "")}
