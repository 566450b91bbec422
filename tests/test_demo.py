"""``kdfast demo``: the quick run end to end (distillation must beat labels only), and its parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("pyarrow")

from kdfast import cli, tiny  # noqa: E402

# The quick preset, a little shorter still, so that the test stays well under 2 minutes on a
# shared 2-core machine: about 35 s of CPU time in one thread. One thread: on an oversubscribed
# machine two spinning OpenMP threads are several times slower than one.
QUICK_ARGS = ["--quick", "--seed", "0", "--teacher-steps", "200", "--steps", "200"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "kdfast.demo", *QUICK_ARGS, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    return out, proc.stdout, results


def test_quick_demo_distillation_beats_labels_only(quick_run):
    out, stdout, results = quick_run
    rows = {r["kind"]: r for r in results["rows"]}
    assert set(rows) == {"teacher", "capture-topk", "capture-sample", "labels", "online", "topk", "sample"}
    labels = rows["labels"]["val_loss"]
    assert rows["teacher"]["val_loss"] < labels
    for kind in ("online", "topk", "sample"):
        assert rows[kind]["val_loss"] < labels, (kind, rows[kind]["val_loss"], labels)
        assert rows[kind]["steps"] == rows["labels"]["steps"] == 200
        assert rows[kind]["params"] == rows["labels"]["params"]
    for kind in ("topk", "sample", "capture-topk", "capture-sample"):
        assert 0 < rows[kind]["cache_bytes_per_token"] < 1000
    for r in rows.values():
        assert r["train_seconds"] > 0 and r["peak_rss_mib"] > 0


def test_quick_demo_outputs(quick_run):
    out, stdout, results = quick_run
    assert "labels only" in stdout and "offline sampled KD" in stdout and "perplexity" in stdout
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for kind in ("labels", "online", "topk", "sample"):
        steps = [s for s, _ in results["curves"][kind]]
        assert steps[0] == 0 and steps[-1] == 200
    # the teacher is saved for reuse with --teacher-dir, the caches are readable
    assert os.path.exists(out / "teacher" / "config.json")
    from kdfast.cache import TeacherCache

    topk, sample = TeacherCache(out / "cache-topk"), TeacherCache(out / "cache-sample")
    assert len(topk) == len(sample) > 0
    assert topk[0]["input_ids"].tolist() == sample[0]["input_ids"].tolist()


def test_byte_chunks_cut_between_characters():
    text = "héllo wörld — ünïcode " * 20 + "\n\n   \n\n" + "tail"
    chunks = tiny.byte_chunks(text, 16)
    assert all(len(c.encode("utf-8")) <= 16 for c in chunks)
    assert all(c.strip() for c in chunks)
    assert "".join(chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_command_line_errors(capsys, tmp_path):
    assert cli.main(["demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps: expected a positive integer" in capsys.readouterr().err
    assert cli.main(["demo", "--teacher-dir", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["demo", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
