"""The timing and memory harness of kdfast's benchmarks (and of ``kdfast demo``'s phases).

* **Timing**: :func:`measure` (median of timed runs after warm-up runs, synchronised on CUDA,
  with the extra peak memory of the timed runs), :func:`median_time` (bandwidth floors),
  :class:`Phase` (wall time, CPU time and peak memory of one phase of a longer job).
* **Memory**: the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``).
  Where the kernel allows it, writing ``5`` to ``/proc/self/clear_refs`` resets that mark to the
  current resident size (:func:`reset_peak_rss`), so a case can measure the peak of its timed
  runs alone; elsewhere the baseline is the high-water mark taken before the timed runs. On CUDA
  the peak is ``torch.cuda.max_memory_allocated``.
* **Cases in fresh processes**: :func:`run_cases` runs every spec (a JSON-able dict) in
  ``python -m <module> --worker <spec>`` (:func:`run_worker`; the module's ``main`` hands that
  call to :func:`worker_main`) or in this process, and never lets one failed case end a run.
* **The machine**: :func:`machine_info`, :func:`load_average`. Tables and options are in
  :mod:`kdfast.benchmarks.tables`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

from kdfast import gradient_pool_bytes

RESULT_PREFIX = "KDFAST_BENCH_RESULT "

# ----------------------------------------------------------------------------------------------
# Memory and time primitives.


def proc_field(path: str, field: str) -> str | None:
    """The value after ``field:`` on its line of a ``/proc`` file, or None (off Linux, absent)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(field) and line[len(field):].lstrip().startswith(":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def read_status_kib(field: str) -> int | None:
    """A ``kB`` field (``VmHWM``, ``VmRSS``) of ``/proc/self/status``, or None off Linux."""
    value = proc_field("/proc/self/status", field)
    return None if value is None else int(value.split()[0])


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


def peak_rss_mib() -> float:
    """The resident-set high-water mark in MiB (``VmHWM``; ``getrusage`` where there is none)."""
    hwm = read_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call in seconds, and what it returned (kept alive until timed)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int, reset: Callable[[], None] | None = None,
            device: str = "cpu") -> tuple[dict[str, Any], Any]:
    """Time ``fn()``: ``warmup`` untimed runs (compilation included), then ``repeats`` timed ones.

    ``reset()`` runs before every call, outside the timed region (it drops old gradients).
    Returns ``({"time_s": median, "times_s", "warmup_times_s", "peak_method",
    "pooled_bytes", "extra_peak_bytes"}, last output)``; ``extra_peak_bytes`` is the peak memory of
    the timed runs over what was held before them, plus the pooled gradient buffers they reuse
    (``pooled_bytes``; absent where it cannot be read)."""
    reset = reset or (lambda: None)
    cuda = device.startswith("cuda")
    hwm_before = read_status_kib("VmHWM")
    warm = []
    for _ in range(warmup):
        reset()
        _sync(device)
        dt, out = time_call(fn)
        _sync(device)
        warm.append(dt)
        del out
    reset()
    gc.collect()
    # Memory the timed runs will reuse (kdfast's pooled CPU gradients) is theirs: count it.
    held = 0 if cuda else gradient_pool_bytes()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        method, base = "cuda_max_memory_allocated", torch.cuda.memory_allocated()
    elif reset_peak_rss():
        method, base = "clear_refs", _kib_bytes(read_status_kib("VmHWM"))
    else:  # the high-water mark before the warm-up runs (they count towards the peak)
        method, base = "hwm_before", _kib_bytes(hwm_before)
    times, out = [], None
    for _ in range(repeats):
        reset()
        out = None  # the previous output is freed before the next call
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _kib_bytes(read_status_kib("VmHWM"))
    res: dict[str, Any] = {"time_s": median(times), "times_s": times, "warmup_times_s": warm,
                           "peak_method": method, "pooled_bytes": held}
    if base is not None and peak is not None:
        res["extra_peak_bytes"] = peak - base + held
    return res, out


def _kib_bytes(kib: int | None) -> int | None:
    return None if kib is None else kib * 1024


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (outputs freed
    outside the timed region)."""
    fn()
    ts = []
    for _ in range(repeats):
        dt, out = time_call(fn)
        ts.append(dt)
        del out
    return median(ts)


class Phase:
    """``with Phase(device) as ph:`` — wall time, CPU time and peak memory of one phase.

    After the block: ``seconds``, ``cpu_seconds``, ``peak_mib`` (resident-set high-water mark),
    ``growth_mib`` (that peak over the resident size at the start, NaN where the mark could not
    be reset for the phase), ``peak_is_phase`` and, on CUDA, ``cuda_peak_mib``."""

    def __init__(self, device):
        self.device = device
        self.seconds = self.cpu_seconds = 0.0
        self.peak_mib = self.growth_mib = float("nan")
        self.peak_is_phase = False
        self.cuda_peak_mib: float | None = None

    def __enter__(self) -> Phase:
        import torch

        gc.collect()
        self.peak_is_phase = reset_peak_rss()
        rss = read_status_kib("VmRSS")
        self._start_mib = float("nan") if rss is None else rss / 1024
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0, self._cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> bool:
        import torch

        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = cpu_seconds() - self._cpu0
        self.peak_mib = peak_rss_mib()
        self.growth_mib = self.peak_mib - self._start_mib if self.peak_is_phase else float("nan")
        if self.device.type == "cuda":
            self.cuda_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        return False


# ----------------------------------------------------------------------------------------------
# The machine.


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem_kib = proc_field("/proc/meminfo", "MemTotal")
    mem_gib = None if mem_kib is None else round(int(mem_kib.split()[0]) / 2**20, 1)
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    import torch

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
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


# ----------------------------------------------------------------------------------------------
# Cases, each in a fresh process.


def run_worker(module: str, spec: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m <module> --worker <spec-json>`` in a fresh interpreter and return the
    result dict it prints. Failures (crash, out-of-memory kill, timeout) come back as
    ``{"error": ...}`` instead of raising, so one bad case does not end a long run."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    # The child must import the same kdfast as this process, installed or from a source tree.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = f"exit status {proc.returncode}"
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    return {"error": why + (": " + " | ".join(tail) if tail else "")}


def main(argv: Sequence[str] | None, run_spec: Callable[[dict[str, Any]], dict[str, Any]],
         parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int]) -> int:
    """A benchmark's ``main``: one case when :func:`run_worker` called it (``--worker SPEC``),
    else ``run(parser().parse_args(argv))``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--worker":
        return worker_main(argv[1], run_spec)
    return run(parser().parse_args(argv))


def _run_one(run_spec: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**spec, **run_spec(json.loads(json.dumps(spec)))}
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one failed case does not end the run
        return {**spec, "error": f"{type(exc).__name__}: {exc}"}


def worker_main(spec_json: str, run_spec: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Worker side of :func:`run_worker`: run one spec, print its result as one tagged JSON line."""
    result = _run_one(run_spec, json.loads(spec_json))
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def run_cases(specs: Sequence[dict[str, Any]], run_spec: Callable[[dict[str, Any]], dict[str, Any]], *,
              module: str, subprocess: bool = True, timeout: float = 1800.0,
              describe: Callable[[dict[str, Any], dict[str, Any]], str] = lambda spec, res: str(spec),
              log: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every spec, in a fresh ``python -m module`` each (``subprocess``) or in this process,
    logging ``[i/n] describe(spec, result) (seconds, load)`` to stderr. Returns the results,
    ``{**spec, **result, "load_average"}`` per spec (``"error"`` for a failed case), and the
    run's ``{"wall_s", "load_average_before", "load_average_after"}``."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    load_before, t_start = load_average(), time.perf_counter()
    results = []
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        if subprocess:
            res = {**spec, **run_worker(module, spec, timeout=timeout)}
        else:
            res = _run_one(run_spec, spec)
            import torch

            torch.cuda.empty_cache()  # a no-op unless this process uses CUDA
        res["load_average"] = load_average()
        results.append(res)
        log(f"[{i}/{len(specs)}] {describe(spec, res)} ({time.perf_counter() - t0:.0f} s, "
            f"load {res['load_average']})")
    return results, {"wall_s": time.perf_counter() - t_start, "load_average_before": load_before,
                     "load_average_after": load_average()}
