"""Smoke tests of the benchmark code paths that also run on a GPU machine (tiny sizes, CPU;
the Triton kernels under the interpreter): a broken benchmark script would waste a GPU lease."""

import pytest
import torch

from kdfast import _triton
from kdfast.benchmarks import fused_linear, gpu


def _triton_here():
    if not _triton.usable(torch.device("cpu")):
        pytest.skip("Triton's interpreter is off")


@pytest.mark.parametrize("loss", ["jsd", "forward_kl"])
def test_gpu_dense_case_runs_and_agrees(loss):
    _triton_here()
    cases = [gpu.run_dense_case(loss, impl, 6, 37, "bf16", repeats=1, warmup=1, device="cpu")
             for impl in ("eager", "kdfast")]
    eager, kd = cases
    assert kd["loss_value"] == pytest.approx(eager["loss_value"], rel=1e-2)
    assert kd["grad_norm"] == pytest.approx(eager["grad_norm"], rel=5e-2)
    assert "| jsd" in gpu.dense_table(cases) or "| forward_kl" in gpu.dense_table(cases)


def test_fused_linear_benchmark_runs_in_process():
    res = fused_linear.run_benchmark([(8, 16, 33)], ["fp32"], ["jsd"], ["unfused", "eager", "kdfast"],
                                     device="cpu", repeats=1, warmup=1, subprocess=False)
    by = {c["impl"]: c for c in res["cases"]}
    assert not any("error" in c for c in res["cases"]), res["cases"]
    assert by["kdfast"]["loss_value"] == pytest.approx(by["unfused"]["loss_value"], rel=1e-4)
    assert by["kdfast"]["grad_weight_norm"] == pytest.approx(by["eager"]["grad_weight_norm"], rel=1e-3)
    table = fused_linear.format_table(res)
    assert "MISMATCH" not in table and "8×16×33" in table
