"""Thread-count independence, concurrent Python threads, and use after fork()."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import LOSSES, extra_kwargs, loss_fn, make_logits

ROWS, VOCAB = 384, 3001

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import kdfast

    losses = {losses!r}
    g = torch.Generator().manual_seed(0)
    student = torch.randn({rows}, {vocab}, generator=g) * 4
    teacher = torch.randn({rows}, {vocab}, generator=g) * 4
    labels = torch.randint(0, 5, ({rows},), generator=g)
    labels[::7] = -100
    results = {{}}
    for name in losses:
        extra = {extras!r}[name]
        for dtype in (torch.float32, torch.bfloat16):
            for reduction in ("mean", "none"):
                leaf = student.to(dtype).detach().clone().requires_grad_()
                loss = getattr(kdfast, name)(
                    leaf, teacher.to(dtype), labels=labels, reduction=reduction,
                    temperature=1.5, backend="rust", **extra)
                loss.sum().backward()
                results[(name, str(dtype), reduction)] = (loss.detach(), leaf.grad)
    torch.save(results, sys.argv[1])
    """
).format(losses=LOSSES, rows=ROWS, vocab=VOCAB, extras={n: extra_kwargs(n, beta=0.3, skew=0.2) for n in LOSSES})


def _run_script(tmp_path, tag, threads):
    env = dict(os.environ)
    env.pop("KDFAST_NUM_THREADS", None)
    if threads is not None:
        env["KDFAST_NUM_THREADS"] = str(threads)
    out = tmp_path / f"{tag}.pt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(out)


def test_results_identical_for_any_thread_count(tmp_path):
    default = _run_script(tmp_path, "default", None)
    for threads in (1, 3):
        other = _run_script(tmp_path, f"threads{threads}", threads)
        assert default.keys() == other.keys()
        for key, (loss, grad) in default.items():
            other_loss, other_grad = other[key]
            assert torch.equal(loss, other_loss), (threads, key)
            assert torch.equal(grad, other_grad), (threads, key)


def _compute_all(student, teacher):
    out = {}
    for name in LOSSES:
        leaf = student.detach().clone().requires_grad_()
        loss = loss_fn(name)(leaf, teacher, temperature=1.5, backend="rust", reduction="none",
                             **extra_kwargs(name))
        loss.sum().backward()
        out[name] = (loss.detach(), leaf.grad)
    return out


def _child(conn, student, teacher, expected):
    try:
        # As DataLoader workers do: PyTorch's own OpenMP pool (GNU libgomp) is not fork-safe,
        # so a forked child that uses it after the parent did hangs whatever kdfast does.
        torch.set_num_threads(1)
        got = _compute_all(student, teacher)
        bad = [name for name, (loss, grad) in expected.items()
               if not (torch.equal(got[name][0], loss) and torch.equal(got[name][1], grad))]
        conn.send(("ok", bad))
    except BaseException as exc:  # report anything to the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX only")
def test_loss_in_forked_child_after_parent_used_it():
    student, teacher = make_logits((ROWS, 1024), seed=3, scale=4.0)
    parent = _compute_all(student, teacher)  # the parent's thread pool is now running
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python ≥ 3.12 warns on fork
        proc = ctx.Process(target=_child, args=(send, student, teacher, parent))
        proc.start()
    send.close()
    try:
        if not recv.poll(120):
            pytest.fail("the forked child hung computing the loss (thread pool after fork?)")
        status, payload = recv.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert status == "ok", payload
    assert payload == [], f"forked child got different results for {payload}"
    assert proc.exitcode == 0


FORK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    import torch
    import kdfast

    torch.set_num_threads(1)  # keep PyTorch's (fork-unsafe) OpenMP pool out of the picture
    losses = {losses!r}

    def compute():
        g = torch.Generator().manual_seed(1)
        student = torch.randn(512, 2048, generator=g) * 4
        teacher = torch.randn(512, 2048, generator=g) * 4
        out = []
        for name in losses:
            leaf = student.clone().requires_grad_()
            loss = getattr(kdfast, name)(leaf, teacher, reduction="none", backend="rust", **{extras!r}[name])
            loss.sum().backward()
            out.append((loss.detach(), leaf.grad))
        return out

    def child(conn, expected):
        got = compute()
        conn.send(all(torch.equal(a, c) and torch.equal(b, d)
                      for (a, b), (c, d) in zip(got, expected)))
        conn.close()

    if __name__ == "__main__":
        expected = compute()  # kdfast's pool (KDFAST_NUM_THREADS=2) runs in the parent
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(send, expected))
        proc.start()
        send.close()
        if not recv.poll(90):
            proc.kill()
            sys.exit("child hung")
        ok = recv.recv()
        proc.join(30)
        sys.exit(0 if ok and proc.exitcode == 0 else "child got a different result")
    """
).format(losses=LOSSES, extras={n: extra_kwargs(n) for n in LOSSES})


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX only")
def test_multithreaded_pool_survives_fork(tmp_path):
    """kdfast's own pool at 2 threads in the parent, then used (at 2 threads) in a fork child."""
    script = tmp_path / "fork_check.py"
    script.write_text(FORK_SCRIPT)
    env = dict(os.environ, KDFAST_NUM_THREADS="2")
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=200)
    except subprocess.TimeoutExpired:
        pytest.fail("fork check timed out")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_concurrent_python_threads_agree_with_serial():
    student, teacher = make_logits((64, 2048), seed=9, scale=4.0)
    serial = _compute_all(student, teacher)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: _compute_all(student, teacher), range(8)))
    for result in results:
        for name, (loss, grad) in serial.items():
            assert torch.equal(result[name][0], loss), name
            assert torch.equal(result[name][1], grad), name
