"""The border between Python and Rust: typed arguments, the exception of each error, and no
input that can kill the interpreter (oversized k / num_samples, odd strides, aliasing)."""

import ast
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdfast
from kdfast import _kdfast, _native

PYTHON_DIR = Path(kdfast.__file__).resolve().parent.parent


def run_isolated(code: str, timeout: float = 120):
    """Run ``code`` in a fresh interpreter (a crash there fails the test instead of pytest)."""
    env = dict(os.environ, PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               KDFAST_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_survived(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


# ------------------------------------------------------------------------- oversized sizes

def test_num_samples_2_pow_31_is_a_value_error_not_an_abort():
    out = assert_survived(run_isolated("""
        import torch, kdfast
        try:
            kdfast.compress_sample(torch.randn(1, 10), 2**31)
        except ValueError as e:
            print("ValueError", e)
    """))
    assert out.startswith("ValueError num_samples:"), out
    assert "bytes" in out


HUGE_CALLS = [
    ("kdfast.compress_topk(torch.randn(1, 10), 2**28)", "k"),
    ("kdfast.compress_sample(torch.randn(1, 10), 2**26)", "num_samples"),
    ("kdfast.compress_topk(torch.randn(64, 10), 2**28)", "k"),
    ("kdfast.compress_sample(torch.randn(64, 10), 2**26)", "num_samples"),
]


def test_huge_outputs_under_an_8_gib_address_space_limit():
    """Either the outputs fit (and are well formed) or a ValueError names the argument."""
    out = assert_survived(run_isolated(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
        import torch, kdfast
        for call in {[c for c, _ in HUGE_CALLS]!r}:
            try:
                t = eval(call)
                assert (t.indices[:, 10:] == -1).all()  # V = 10: every later slot is padding
                print("ok", tuple(t.indices.shape))
            except ValueError as e:
                print("ValueError", e)
            t = None
    """, timeout=600)).splitlines()
    assert len(out) == len(HUGE_CALLS), out
    for line, (_, name) in zip(out, HUGE_CALLS):
        assert line.startswith("ok") or line.startswith(f"ValueError {name}:"), line


def test_rust_buffers_are_allocated_fallibly():
    """Outputs that fit (256 MiB), but the sampler's buffers of num_samples draws (≥ 256 MiB
    more) that do not: the Rust side reports the failed allocation as a ValueError naming
    num_samples."""
    out = assert_survived(run_isolated("""
        import resource, torch, kdfast
        x = torch.randn(1, 8 * 4096)  # 8 vocabulary blocks
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        limit = vm + (384 << 20)  # room for the 256 MiB of outputs, not for the draws' buffers
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            kdfast.compress_sample(x, 2**24)
            print("ok")
        except ValueError as e:
            print("ValueError", e)
    """))
    assert out.startswith("ValueError num_samples:") and "could not be allocated" in out, out


@pytest.mark.parametrize("value", [2**32, 2**62, 2**64, 2**100])
def test_k_out_of_range_is_a_value_error_naming_k(value):
    with pytest.raises(ValueError, match="^k: "):
        _native.compress_topk(torch.randn(2, 10), value, 1.0)
    with pytest.raises(ValueError, match="^k: "):
        kdfast.compress_topk(torch.randn(2, 10), value)


@pytest.mark.parametrize("value", [2**32, 2**64])
def test_num_samples_out_of_range_is_a_value_error(value):
    with pytest.raises(ValueError, match="^num_samples: "):
        _native.compress_sample(torch.randn(2, 10), value, 1.0, 0, 0)
    with pytest.raises(ValueError, match="^num_samples: "):
        kdfast.compress_sample(torch.randn(2, 10), value)


def test_k_above_vocabulary_pads():
    t = kdfast.compress_topk(torch.randn(3, 127), 200)
    assert t.indices.shape == (3, 200)
    assert (t.indices[:, 127:] == -1).all() and torch.isneginf(t.logprobs[:, 127:]).all()
    assert sorted(t.indices[0, :127].tolist()) == list(range(127))


# ------------------------------------------------------------------------- typed border

def _dense(student, teacher=None, labels=None, loss_out=None, grad_out=None):
    teacher = student.float() if teacher is None else teacher
    loss_out = torch.empty(len(student)) if loss_out is None else loss_out
    _kdfast.dense_loss(_kdfast.DenseConfig("forward_kl"), student, teacher, labels, loss_out, grad_out,
                       _kdfast.Runtime())
    return loss_out


def test_dense_loss_runs_on_every_dtype_pair():
    x = torch.randn(4, 33)
    want = _dense(x, x + 1)
    for s_dt in _native.NATIVE_DTYPES:
        for t_dt in _native.NATIVE_DTYPES:
            got = _dense(x.to(s_dt), (x + 1).to(t_dt))
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


def test_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        _dense([[1.0, 2.0]], torch.zeros(1, 2))


def test_wrong_dtype_is_a_dtype_error_naming_the_argument():
    with pytest.raises(kdfast.DtypeError, match="^student_logits: expected dtype float32, bfloat16 or float16, got int64"):
        _dense(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3))
    with pytest.raises(kdfast.DtypeError, match="grad_out: expected dtype float32, got bfloat16"):
        _dense(torch.zeros(2, 3), grad_out=torch.empty(2, 3, dtype=torch.bfloat16))
    with pytest.raises(kdfast.DtypeError, match="^student_logits: expected dtype float32, bfloat16 or float16, got float64"):
        _dense(torch.zeros(2, 3, dtype=torch.float64))
    err = kdfast.DtypeError
    assert issubclass(err, TypeError) and issubclass(err, ValueError)


@pytest.mark.parametrize("student,words", [
    (torch.zeros(2, 3, 4), "1-D or 2-D"),
    (torch.zeros(3, 2).t(), "unit stride"),
    (torch.zeros(2, 3, device="meta"), "CPU"),
    (torch.zeros(6), "2-D"),
])
def test_bad_layout_is_a_value_error(student, words):
    with pytest.raises(ValueError, match=words):
        _dense(student, torch.zeros(2, 3), loss_out=torch.empty(1 if student.dim() == 1 else 2))


def test_outputs_must_not_alias_inputs_or_each_other():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="shares no memory"):
        _dense(x, grad_out=x)
    buf = torch.empty(8)
    with pytest.raises(ValueError, match="shares no memory"):
        _dense(x, loss_out=buf[:2], grad_out=buf[:6].view(2, 3))


def test_output_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="loss_out"):
        _dense(torch.randn(2, 3), loss_out=torch.empty(3))
    with pytest.raises(ValueError, match="labels"):
        _dense(torch.randn(2, 3), labels=torch.zeros(2, 1, dtype=torch.int64))


def test_configs_are_validated_when_built():
    with pytest.raises(ValueError, match="loss"):
        _kdfast.DenseConfig("kl")
    with pytest.raises(ValueError, match="beta"):
        _kdfast.DenseConfig("jsd", 2.0)
    with pytest.raises(ValueError, match="tail"):
        _kdfast.SparseConfig("nope")
    with pytest.raises(ValueError, match="isa"):
        _kdfast.Runtime("sse9")
    with pytest.raises(ValueError, match="num_threads"):
        _kdfast.Runtime("auto", 0)
    with pytest.raises(ValueError, match="vocab_size"):
        _kdfast.Layout(4, 0, True)
    assert _kdfast.Layout(4, 10, True).row_bytes == _native.encoded_row_bytes(4, 10, True, None)


def test_stub_matches_the_extension():
    stub = ast.parse((Path(kdfast.__file__).parent / "_kdfast.pyi").read_text())
    declared = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    declared |= {n.target.id for n in stub.body if isinstance(n, ast.AnnAssign)}
    exported = {name for name in dir(_kdfast) if not name.startswith("__")} | {"__version__"}
    assert declared == exported


# ------------------------------------------------------------------------- fuzzing

def test_hostile_layouts_never_crash():
    """Odd tensors through every `_native` entry point: each call returns or raises."""
    out = assert_survived(run_isolated("""
        import torch
        from kdfast import _native
        g = torch.Generator().manual_seed(0)
        base = torch.randn(4096, generator=g)

        def layouts(dtype):
            yield torch.zeros(0, 5, dtype=dtype)
            yield torch.zeros(3, 0, dtype=dtype)
            yield torch.zeros(0, 0, dtype=dtype)
            yield base[:7].to(dtype)                                  # 1-D
            yield base[:12].to(dtype).view(3, 4).t()                  # transposed
            yield base[:5].to(dtype).expand(4, 5)                     # stride-0 rows
            yield base[:1].to(dtype).expand(3, 6)                     # stride 0 everywhere
            yield base.to(dtype).as_strided((3, 5), (1000, 1))        # huge row stride
            yield base.to(dtype).as_strided((4, 5), (2, 1))           # overlapping rows
            yield base.to(dtype).as_strided((2, 3), (4095, 0))        # zero column stride
            yield base[1:].to(dtype)[:30].view(5, 6)                  # offset start
            yield base[:40].to(dtype).view(5, 8)[:, 1:7]              # sliced columns

        calls = 0
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64):
            for x in layouts(dt):
                rows = x.shape[0] if x.dim() == 2 else 1
                v = x.shape[-1]
                attempts = [
                    lambda: _native.compress_topk(x, 3, 1.0),
                    lambda: _native.compress_topk(x, 200, 0.5),
                    lambda: _native.compress_sample(x, 4, 1.0, 1, 2),
                    lambda: _native.dense_call("jsd", 0.5, x, x, None, -100, 1.0, False, 1.0,
                                               torch.empty(rows), None),
                    lambda: _native.dense_call("forward_kl", 0.0, x, x, torch.zeros(rows, dtype=torch.int64),
                                               -100, 2.0, True, 1.0, torch.empty(rows),
                                               torch.empty(rows, max(v, 1), dtype=x.dtype)),
                    lambda: _native.sparse_call("bucket", x, torch.zeros(rows, 2, dtype=torch.int64),
                                                torch.full((rows, 2), -1.0), None, torch.full((rows,), -1.0),
                                                None, -100, 1.0, False, 1.0, torch.empty(rows),
                                                torch.empty(rows, max(v, 1), dtype=x.dtype)),
                    lambda: _native.encode_targets(x.long(), x.float(), None, torch.zeros(rows), 50, None),
                    lambda: _native.decode_targets(x.to(torch.uint8), 2, 50, None, True),
                ]
                for attempt in attempts:
                    calls += 1
                    try:
                        attempt()
                    except (ValueError, TypeError, RuntimeError, IndexError):
                        pass
        print("done", calls)
    """))
    assert out.startswith("done"), out


def test_sharded_sampling_steps_check_their_arguments():
    x = torch.randn(3, 10)
    m = torch.empty(3, 2)
    step = functools.partial(_native.sharded_sample, x2=x, num_samples=4, temperature=1.0, seed=0, row_offset=0,
                             offset=5, vocab=15)
    step(1, maxima=m)
    with pytest.raises(ValueError, match="^step: expected 1, 2 or 3"):
        step(4, maxima=m)
    with pytest.raises(ValueError, match="teacher_logits: expected a slice inside a vocabulary of 12 ids"):
        _native.sharded_sample(1, x, 4, 1.0, 0, 0, 5, 12, m)
    with pytest.raises(ValueError, match="maxima"):
        step(1, maxima=torch.empty(3, 3))
    with pytest.raises(ValueError, match="^carry_in: expected a tensor for this step"):
        step(2, maxima=m)
    c, s = torch.zeros(3, dtype=torch.float64), torch.empty(3, 2, dtype=torch.float64)
    cps = _native.checkpoints_buffer(x, 5, 15)
    assert cps.shape == (3, 256)
    with pytest.raises(ValueError, match="^checkpoints: expected a tensor for this step"):
        step(2, maxima=m, carry_in=c, out=(s, torch.empty(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="out: expected an output tensor that shares no memory"):
        step(2, maxima=m, carry_in=c, checkpoints=cps, out=(s, c))
    with pytest.raises(ValueError, match="out: expected an output tensor that shares no memory"):
        step(2, maxima=m, carry_in=c, checkpoints=cps, out=(s, cps[0, :3]))
    with pytest.raises(kdfast.DtypeError, match="carry_in: expected dtype float64, got float32"):
        step(2, maxima=m, carry_in=c.float(), checkpoints=cps, out=(s, torch.empty(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="checkpoints"):
        step(2, maxima=m, carry_in=c, checkpoints=cps[:, :10], out=(s, torch.empty(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="^sums: expected a tensor for this step"):
        step(3, maxima=m, carry_in=c, checkpoints=cps,
             out=(_native.draws_buffer(3, 4), torch.empty(3, dtype=torch.float64)))
    with pytest.raises(kdfast.DtypeError, match="^teacher_logits: expected dtype float32, bfloat16 or float16, got float64"):
        _native.sharded_sample(1, x.double(), 4, 1.0, 0, 0, 5, 15, m)
    picked = torch.tensor([[0.5, 3.0, -1.0, -1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="^picked: expected 2 draws in row 0 over the ranks, got 1"):
        _native.merge_sample_draws(picked, torch.zeros(1, dtype=torch.float64), 2)
    ids, lp, w = _native.merge_sample_draws(picked, torch.zeros(1, dtype=torch.float64), 1)
    assert ids.tolist() == [[3]] and lp.tolist() == [[0.5]] and w.tolist() == [[1.0]]


def test_sliced_dense_steps_check_their_arguments():
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    f64 = functools.partial(torch.zeros, dtype=torch.float64)
    step = functools.partial(_native.slice_dense, s2=s, t2=t, temperature=1.0)
    step(1, "jsd", 0.5, out=f64(3, 6))
    with pytest.raises(ValueError, match="^step: expected 1, 2 or 3"):
        step(4, "jsd", 0.5, out=f64(3, 6))
    with pytest.raises(ValueError, match="^out: expected a tensor for this step"):
        step(1, "jsd", 0.5)
    with pytest.raises(ValueError, match="out"):
        step(1, "jsd", 0.5, out=f64(3, 4))
    with pytest.raises(ValueError, match="^loss: expected a loss other than akl"):
        step(1, "akl", 0.5, out=f64(3, 6))
    with pytest.raises(ValueError, match="^beta"):
        step(1, "jsd", 1.5, out=f64(3, 6))
    with pytest.raises(ValueError, match="^softmax: expected a tensor for this step"):
        step(2, "tvd", 0.0, out=f64(3, 2))
    with pytest.raises(ValueError, match="^sums: expected a tensor for this step"):
        step(3, "tvd", 0.0, softmax=f64(3, 4), grad=torch.empty(3, 10))
    with pytest.raises(ValueError, match="^grad_out: expected a tensor for this step"):
        step(3, "tvd", 0.0, softmax=f64(3, 4), sums=f64(3, 2))
    with pytest.raises(kdfast.DtypeError, match="^softmax: expected dtype float64, got float32"):
        step(2, "tvd", 0.0, out=f64(3, 2), softmax=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="grad_out: expected an output tensor that shares no memory"):
        step(2, "forward_kl", 0.0, out=f64(3, 2), softmax=f64(3, 4), grad=s)
    with pytest.raises(ValueError, match="student slice \\[3, 10\\], teacher slice \\[3, 9\\]"):
        _native.slice_dense(1, "tvd", 0.0, s, t[:, :9], 1.0, out=f64(3, 6))
    with pytest.raises(ValueError, match="^temperature"):
        step(1, "tvd", 0.0, out=f64(3, 6), temperature=0.0)


def test_sharded_student_steps_check_their_arguments():
    s = torch.randn(3, 10)
    ids = torch.tensor([[0, 4, -1], [9, -1, -1], [-1, -1, -1]])
    stats, at = _native.listed_stats(s, ids, 2.0)
    assert at[:, 3].tolist() == [2.0, 1.0, 0.0] and at[0, 1] == s[0, 4] / 2
    for bad in (10, -2):
        with pytest.raises(ValueError, match="^ids: expected columns in \\[0, 10\\) of the slice, or -1"):
            _native.listed_stats(s, torch.tensor([[0, bad, -1]] * 3), 1.0)
    with pytest.raises(ValueError, match="^temperature"):
        _native.listed_stats(s, ids, -1.0)
    with pytest.raises(ValueError, match="ids"):
        _native.listed_stats(s, ids[:2], 1.0)
    softmax = torch.zeros(3, 4, dtype=torch.float64)
    coef, g_at, grad = torch.zeros(3, 2), torch.zeros(3, 3), torch.empty(3, 10)
    _native.listed_gradient(s, ids, 1.0, softmax, coef, g_at, grad)
    assert torch.equal(grad, torch.zeros(3, 10))
    with pytest.raises(kdfast.DtypeError, match="^coef: expected dtype float32, got float64"):
        _native.listed_gradient(s, ids, 1.0, softmax, coef.double(), g_at, grad)
    with pytest.raises(ValueError, match="g_at"):
        _native.listed_gradient(s, ids, 1.0, softmax, coef, g_at[:, :2], grad)
    with pytest.raises(ValueError, match="grad_out: expected an output tensor that shares no memory"):
        _native.listed_gradient(s, ids, 1.0, softmax, coef, g_at, s)
