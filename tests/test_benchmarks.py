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


# ---------------------------------------------------------------------------------------------
# kdfast bench against the peers (kdfast.benchmarks.peers): the adapters' values in kdfast's
# convention, the table, the JSON, the plot and the skip reasons.

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from conftest import make_logits, run_loss  # noqa: E402
from kdfast import cli  # noqa: E402
from kdfast.benchmarks import dense, dense_report, peers, plot  # noqa: E402

# What each adapter imports: importorskip on it skips a peer that is absent or does not import.
PEER_IMPORTS = {"trl": "trl", "torchtune": "torchtune.modules.loss", "liger": "liger_kernel.transformers"}
PEER_CASES = [(name, loss) for name, peer in peers.PEERS.items() for loss in peer.losses]


@pytest.mark.parametrize("name,loss", PEER_CASES)
def test_peer_agrees_with_kdfast_after_mapping(name, loss):
    """Each peer's loss, mapped onto kdfast's convention, is kdfast's value and gradient (fp32,
    T=2, β=0.3, correlated logits with a wide spread)."""
    pytest.importorskip(PEER_IMPORTS[name], exc_type=ImportError, reason=f"{name} is not installed or does not import")
    if peers.PEERS[name].needs_cuda and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip(f"{name} needs CUDA or Triton's interpreter")
        if loss == "forward_kl":
            pytest.skip("LigerKLDIVLoss does not run in Triton's interpreter (its kernel calls .to on a float)")
    device = "cuda" if torch.cuda.is_available() and peers.PEERS[name].needs_cuda else "cpu"
    student, teacher = make_logits((6, 37), scale=3.0)
    kwargs = {"beta": 0.3} if loss == "jsd" else {}
    leaf = student.clone().to(device).requires_grad_(True)
    with warnings.catch_warnings():
        # Triton's interpreter evaluates masked-off lanes too (-inf - -inf there): numpy warns.
        warnings.simplefilter("ignore", RuntimeWarning)
        got = peers.kdfast_loss(name, loss, leaf, teacher.to(device), temperature=2.0, beta=0.3)
        got.backward()
    want, want_grad = run_loss(loss, student, teacher, temperature=2.0, **kwargs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.detach().cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.cpu(), want_grad, rtol=1e-4, atol=1e-6)


def test_torchtune_forward_kl_is_the_cross_entropy_form():
    """The one mapping that is not the identity: torchtune's ForwardKLLoss = kdfast + H(p)."""
    pytest.importorskip("torchtune.modules.loss", exc_type=ImportError, reason="torchtune does not import")
    student, teacher = make_logits((5, 29), scale=3.0)
    raw = float(peers.loss_fn("torchtune", "forward_kl")(student, teacher))
    offset = peers.value_offset("torchtune", "forward_kl", teacher)
    logp = torch.log_softmax(teacher.double(), -1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    assert offset == pytest.approx(-entropy, rel=1e-6)
    assert raw + offset == pytest.approx(float(run_loss("forward_kl", student, teacher)[0]), rel=1e-5)


def _bench(argv, capsys):
    status = cli.main(["bench", "--in-process", "--repeats", "1", "--warmup", "1", *argv])
    return status, capsys.readouterr()


def test_bench_table_and_json_contain_the_installed_peers(tmp_path, capsys):
    runnable, _ = peers.select("auto")
    if not runnable:
        pytest.skip("no peer is installed (pip install 'kdfast[peers]')")
    path = tmp_path / "bench.json"
    status, out = _bench(["--sizes", "8x300", "--dtypes", "fp32", "--impls", "eager,kdfast", "--peers",
                          ",".join(runnable), "--json", str(path)], capsys)
    assert status == 0, out.out + out.err
    head = out.out.splitlines()[0]
    results = json.loads(path.read_text())
    for name in runnable:
        assert f" {name} |" in head and f"kd/{name}" in head and f"mem {name}" in head
        assert results["peers"][name]["version"] == peers.version(name)
        cases = [c for c in results["cases"] if c["impl"] == name]
        assert cases and all("time_s" in c for c in cases), cases
        assert all(r["agreement"][name]["ok"] for r in results["rows"] if name in r["agreement"])
    rows = out.out.split("\n\n")[0].splitlines()[2:]
    assert head.endswith("| agree |") and rows and all(r.endswith("| ✓ |") for r in rows), rows


def test_an_absent_peer_is_skipped_with_its_reason(monkeypatch, capsys):
    """Absence is simulated by the adapter's import check (a module name that does not exist)."""
    for name, peer in peers.PEERS.items():
        monkeypatch.setitem(peers.PEERS, name, dataclasses.replace(peer, module="kdfast_no_such_peer_" + name))
    assert peers.skip_reason("trl") == "trl is not installed (pip install trl (or kdfast[peers]))"
    status, out = _bench(["--sizes", "4x50", "--dtypes", "fp32", "--losses", "jsd", "--impls", "eager,kdfast,trl"],
                         capsys)
    assert status == 0, out.out + out.err
    for name, peer in peers.PEERS.items():
        assert f"peer {name} skipped: {peer.distribution} is not installed" in out.err
        assert f"- {name} skipped: {peer.distribution} is not installed" in out.out
        assert f" {name} |" not in out.out.splitlines()[0]


def test_a_peer_that_does_not_import_is_a_skip_not_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchtune.modules.loss", None)  # import raises ImportError
    with pytest.raises(peers.PeerUnavailable, match="torchtune does not import here"):
        peers.loss_fn("torchtune", "forward_kl")
    spec = {"kind": "case", "loss": "forward_kl", "impl": "torchtune", "n": 4, "v": 20, "dtype": "fp32",
            "repeats": 1, "warmup": 1}
    res = dense.run_case(spec)
    assert "torchtune does not import here" in res["skipped"]
    row = dense_report.summarize({"floors": [], "cases": [{**spec, **res}]})[0]
    assert row["skipped"] and not row["errors"] and not row["mismatch"]


def test_a_value_that_disagrees_after_mapping_fails_loudly():
    """The check compares mapped values: a peer off by its convention (here torchtune's teacher
    entropy left in) is a mismatch, marked ✗ in the table, and the run's exit status is 1."""
    res = dense.run_benchmark([(4, 50)], ["fp32"], ["forward_kl"], ["eager", "kdfast"], repeats=1, subprocess=False)
    kd = next(c for c in res["cases"] if c["impl"] == "kdfast")
    res["cases"].append({**kd, "impl": "torchtune", "loss_value": kd["loss_value"] + 3.0})
    res["config"]["impls"] = ["eager", "kdfast", "torchtune"]
    row = dense_report.summarize(res)[0]
    assert not row["agreement"]["torchtune"]["ok"] and row["agreement"]["kdfast"]["ok"]
    table = dense_report.format_table(res)
    assert "✗ torchtune" in table and "MISMATCH torchtune.loss_value" in table


def test_half_precision_peers_get_the_half_tolerance():
    assert dense_report.tolerance("trl", "bf16") == dense_report.HALF_TOLERANCE
    assert dense_report.tolerance("trl", "fp32") == dense_report.TOLERANCE
    assert dense_report.tolerance("torchtune", "bf16") == dense_report.TOLERANCE  # it upcasts
    assert dense_report.tolerance("kdfast", "bf16") == dense_report.TOLERANCE


def test_plot_has_time_and_memory_against_v(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    status, out = _bench(["--sizes", "4x40,4x80", "--dtypes", "fp32", "--losses", "forward_kl",
                          "--impls", "eager,kdfast", "--peers", "none", "--plot", str(path)], capsys)
    assert status == 0, out.err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = plot.series(json.loads(json.dumps({"cases": [
        {"impl": "kdfast", "loss": "jsd", "dtype": "fp32", "n": 4, "v": v, "time_s": 0.1 * v,
         "extra_peak_bytes": 2**20 * v} for v in (80, 40)]})))
    assert lines == {("kdfast", "jsd", "fp32"): [(40, 4.0, 40.0), (80, 8.0, 80.0)]}


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, out = _bench(["--sizes", "4x40", "--plot", str(tmp_path / "x.png")], capsys)
    assert status == 2 and "kdfast[demo]" in out.err and not (tmp_path / "x.png").exists()


def test_gpu_benchmark_runs_liger_through_the_peer_adapter():
    """`kdfast bench --gpu`'s liger cases use peers.loss_fn (here its JSD in Triton's interpreter)."""
    _triton_here()
    pytest.importorskip("liger_kernel.transformers", exc_type=ImportError, reason="liger-kernel is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's masked-off lanes
        cases = [gpu.run_dense_case("jsd", impl, 6, 37, "fp32", repeats=1, warmup=1, device="cpu")
                 for impl in ("eager", "liger")]
    assert cases[1]["loss_value"] == pytest.approx(cases[0]["loss_value"], rel=1e-5)
    assert cases[1]["grad_norm"] == pytest.approx(cases[0]["grad_norm"], rel=1e-4)


def test_trainer_benchmark_paths_agree_on_a_tiny_case():
    """benchmarks.trainer: every path steps and computes the same loss (tiny Llama models)."""
    pytest.importorskip("transformers")
    from kdfast.benchmarks import trainer

    paths = ["bare", "trainer", "trainer-logits"]
    results = [{"path": p, "loss": "jsd", "batch": 1, "seq": 12, "vocab": 300,
                **trainer.run_case({"path": p, "loss": "jsd", "batch": 1, "seq": 12, "vocab": 300, "warmup": 0})}
               for p in paths]
    values = [r["loss_value"] for r in results]
    assert max(values) - min(values) < 1e-5 * max(1.0, abs(values[0]))
    table = trainer.format_table(results)
    assert "jsd" in table and "✓" in table
