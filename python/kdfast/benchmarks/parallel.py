"""Vocabulary-parallel losses on gloo ranks of this machine (issue 11): time and communication.

For W ranks (forked, gloo on loopback, one thread each), each holding ``V / W`` columns of
``N × V`` logits: the median time of each dense loss (forward + backward), ``sparse_kl`` against
top-64 targets (forward + backward), ``compress_topk(k=64)`` and ``compress_sample(N=50)`` with ``process_group`` (the
slowest rank), beside the unsharded call in one process (kdfast's Rust kernels, all threads),
and per row the bytes each rank sends into the collectives and their number (counted by
wrapping ``torch.distributed``; the sampler's point-to-point carry counts as one), beside what all-gathering the logits would move
(``(W − 1) / W · V`` elements of each gathered tensor). Run ``python -m kdfast.benchmarks.parallel``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import time
from typing import Sequence

import torch

from . import harness, tables

MODULE = "kdfast.benchmarks.parallel"
#: The dense losses with the option each runs at.
DENSE = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "skew_forward_kl": {"skew": 0.1},
         "skew_reverse_kl": {"skew": 0.1}, "tvd": {}, "akl": {"head_mass": 0.5}, "taid": {"t": 0.5}}
OPS = (*DENSE, "sparse_kl", "compress_topk", "compress_sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Counts the collectives of ``torch.distributed`` and the bytes this rank puts into them."""

    def __init__(self, dist):
        self.calls, self.bytes = 0, 0
        self._dist, self._saved = dist, {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "send"):
            real = getattr(dist, name)
            self._saved[name] = real

            def wrapped(*args, _real=real, _name=name, **kwargs):
                tensor = args[0] if _name in ("all_reduce", "send") else args[1]
                self.calls += 1
                self.bytes += tensor.numel() * tensor.element_size()
                return _real(*args, **kwargs)

            setattr(dist, name, wrapped)

    def reset(self):
        self.calls, self.bytes = 0, 0


def _op(name, s, t, group, targets):
    import kdfast

    if name == "compress_topk":
        return lambda: kdfast.compress_topk(t, 64, process_group=group)
    if name == "compress_sample":
        return lambda: kdfast.compress_sample(t, 50, process_group=group)
    if name in DENSE:
        return lambda: getattr(kdfast, name)(s, t, process_group=group, **DENSE[name]).backward()
    return lambda: kdfast.sparse_kl(s, targets, process_group=group).backward()


def _rank(rank, world, port, spec, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import kdfast

    n, v, dtype = spec["n"], spec["v"], DTYPES[spec["dtype"]]
    width = v // world + (1 if rank < v % world else 0)
    g = torch.Generator().manual_seed(rank)
    s = (torch.randn(n, width, generator=g) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, width, generator=g) * 3).to(dtype)
    group = dist.group.WORLD
    targets = kdfast.compress_topk(t, 64, process_group=group)
    counter = _Counter(dist)
    results = {}
    for name in spec["ops"]:
        fn = _op(name, s, t, group, targets)
        fn()  # warm-up
        counter.reset()
        times = []
        for _ in range(spec["repeats"]):
            s.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
        results[name] = {"time_s": harness.median(times), "calls": counter.calls // spec["repeats"] - 1,
                         "bytes_per_row": (counter.bytes // spec["repeats"] - 4) / n}  # minus the timing's own
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run_parallel(world: int, spec: dict) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = f"/tmp/kdfast-bench-parallel-{os.getpid()}-{world}.json"
    port = _port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, spec, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        return {"error": f"exit codes {[p.exitcode for p in procs]}"}
    with open(out) as f:
        res = json.load(f)
    os.remove(out)
    return res


def run_single(spec: dict) -> dict:
    import kdfast

    n, v, dtype = spec["n"], spec["v"], DTYPES[spec["dtype"]]
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    targets = kdfast.compress_topk(t, 64)
    ops = {name: (lambda name=name: getattr(kdfast, name)(s, t, **DENSE[name]).backward()) for name in DENSE}
    ops |= {"sparse_kl": lambda: kdfast.sparse_kl(s, targets).backward(),
           "compress_topk": lambda: kdfast.compress_topk(t, 64),
           "compress_sample": lambda: kdfast.compress_sample(t, 50)}
    out = {}
    for name in spec["ops"]:
        ops[name]()
        out[name] = {"time_s": harness.median_time(ops[name], spec["repeats"])}
    return out


def format_table(rows: list, v: int) -> str:
    head = ["op", "dtype", "ranks", "time", "÷ unsharded", "collectives", "bytes/row sent", "gather logits bytes/row"]
    lines = tables.markdown_head(head)
    for r in rows:
        gathered = None
        if r["ranks"] > 1:
            per = (r["ranks"] - 1) / r["ranks"] * v * (2 if r["dtype"] == "bf16" else 4)
            gathered = per * (1 if r["op"].startswith("compress") else 2)
        lines.append(tables.markdown_row([
            r["op"], r["dtype"], str(r["ranks"]) if r["ranks"] > 1 else "1 (unsharded)", tables.fmt_s(r.get("time_s")),
            tables.fmt_x(r.get("ratio")), "—" if r["ranks"] == 1 else str(r.get("calls")),
            "—" if r["ranks"] == 1 else f"{r.get('bytes_per_row', 0):.0f}",
            "—" if gathered is None else f"{gathered:.0f}"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--v", type=int, default=128256)
    p.add_argument("--ranks", type=lambda x: [int(w) for w in x.split(",")], default=[2, 4])
    p.add_argument("--dtypes", type=tables.subset(tuple(DTYPES), "--dtypes"), default=list(DTYPES))
    p.add_argument("--ops", type=tables.subset(OPS, "--ops"), default=list(OPS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = []
    for dtype in args.dtypes:
        spec = {"n": args.n, "v": args.v, "dtype": dtype, "ops": args.ops, "repeats": args.repeats}
        base = run_single(spec)
        for op in args.ops:
            rows.append({"op": op, "dtype": dtype, "ranks": 1, **base[op], "ratio": 1.0})
        for world in args.ranks:
            res = run_parallel(world, spec)
            for op in args.ops:
                r = res.get(op, {"error": res.get("error")})
                rows.append({"op": op, "dtype": dtype, "ranks": world, **r,
                             "ratio": tables.ratio(r.get("time_s"), base[op]["time_s"])})
            print(f"{dtype} {world} ranks done", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (OPS.index(r["op"]), r["dtype"], r["ranks"]))
    print(format_table(rows, args.v))
    tables.write_json(args.json, {"machine": harness.machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
