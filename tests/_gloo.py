"""Fork ``world`` gloo ranks on loopback, run checks in each, and report their failures.

Each check is ``check(rank, world, split, group)``; a rank runs them all (a barrier after each,
so one failing check does not leave the others waiting in a collective) and writes its
tracebacks to ``rank{r}.txt``; :func:`run_ranks` asserts that every rank exited cleanly with
none."""

import multiprocessing
import os
import socket
import traceback

import torch
import torch.distributed as dist


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out, checks, split):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    failures = []
    try:
        for check in checks:
            try:
                check(rank, world, split, dist.group.WORLD)
            except Exception:  # noqa: BLE001 - reported to the test process
                failures.append(f"rank {rank}, {check.__name__}: {traceback.format_exc()}")
            dist.barrier()
    finally:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        dist.destroy_process_group()


def fork(target, world, *args, timeout=300):
    """Fork ``world`` processes ``target(rank, *args)``; their exit codes (one left waiting past
    ``timeout``, e.g. by a dead peer, is killed, as torchrun would)."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def run_ranks(tmp_path, world, checks, split, timeout=300):
    """Run ``checks`` in ``world`` forked ranks, rank r holding ``split[r]`` vocabulary ids."""
    codes = fork(_rank_main, world, world, free_port(), str(tmp_path), checks, split, timeout=timeout)
    assert all(c == 0 for c in codes), codes
    reports = [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)]
    assert reports == [""] * world, "\n".join(reports)
