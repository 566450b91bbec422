"""kdfast capture with a tensor-parallel teacher (issue 11): groups of ranks that hold one
teacher between them, each computing and compressing its slice of the vocabulary. Ranks are
forked with torchrun's environment (gloo on loopback); the cache must hold, sequence for
sequence, what one process captures — the same ids and draws."""

import multiprocessing
import os
import sys

import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

import kdfast.sparse  # noqa: E402
from kdfast.cache import TeacherCache  # noqa: E402
from kdfast.capture import capture  # noqa: E402

import _tiny_models as tm  # noqa: E402
from _gloo import fork, free_port  # noqa: E402

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")]
MAXLEN = 40


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tm.save_tiny_gpt2(tmp_path_factory.mktemp("teacher") / "tiny-gpt2")


@pytest.fixture(scope="module")
def docs_txt(tmp_path_factory):
    return tm.write_txt(tmp_path_factory.mktemp("data") / "docs.txt")


def _sliced_head(model, rank, split):
    """``model`` with its head replaced by this rank's rows (a teacher whose head is sharded)."""
    w = model.get_output_embeddings().weight.detach()
    lo = sum(split[:rank])
    head = torch.nn.Linear(w.shape[1], split[rank], bias=False)
    head.weight.data.copy_(w[lo:lo + split[rank]])
    model.set_output_embeddings(head)
    return model


def _rank_main(rank, world, port, kwargs, split, die):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    kwargs = dict(kwargs)
    if split is not None:
        kwargs["model"] = _sliced_head(tm.load_model(kwargs["model"]), rank % kwargs["tensor_parallel"], split)
    if die is not None and rank == die[0]:  # this rank is killed at its die[1]-th compression
        real, calls = kdfast.sparse.compress_topk, [0]

        def dying(*args, **kw):
            calls[0] += 1
            if calls[0] == die[1]:
                os._exit(9)
            return real(*args, **kw)

        kdfast.sparse.compress_topk = dying
    try:
        capture(progress=False, verbose=False, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - the exit code tells the test
        print(f"rank {rank}: {exc!r}", file=sys.stderr)
        os._exit(3)
    os._exit(0)


def _run(world, kwargs, split=None, die=None, timeout=120):
    return fork(_rank_main, world, world, free_port(), kwargs, split, die, timeout=timeout)


def _same_as_one_process(out, tmp_path, teacher_dir, docs_txt, **kw):
    single = TeacherCache(capture(teacher_dir, docs_txt, tmp_path / "single", max_length=MAXLEN, batch_size=3,
                                  progress=False, verbose=False, **kw).path)
    cache = TeacherCache(out)
    assert cache.manifest["complete"] and len(cache) == len(single) == len(tm.DOCS)
    assert cache.seq_ids.tolist() == list(range(len(tm.DOCS)))  # every sequence exactly once
    for i in range(len(tm.DOCS)):
        a, b = cache[i], single[i]
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["targets"].indices, b["targets"].indices), i
        if kw.get("method") == "sample":  # the same draws, bit for bit
            assert torch.equal(a["targets"].logprobs, b["targets"].logprobs)
            assert torch.equal(a["targets"].weights, b["targets"].weights)
        else:
            torch.testing.assert_close(a["targets"].logprobs, b["targets"].logprobs, atol=2**-8, rtol=0)
    return cache


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_two_ranks_hold_one_teacher(tmp_path, teacher_dir, docs_txt, method):
    out = tmp_path / "cache"
    kw = dict(method=method, k=5, num_samples=24, seed=3)
    codes = _run(2, dict(model=teacher_dir, data=docs_txt, output=str(out), max_length=MAXLEN, batch_size=3,
                         tensor_parallel=2, **kw))
    assert codes == [0, 0]
    cache = _same_as_one_process(out, tmp_path, teacher_dir, docs_txt, **kw)
    assert cache.manifest["world_size"] == 1  # one data-parallel rank wrote it
    assert not any(name.startswith("manifest.rank") for name in os.listdir(out))


def test_two_groups_of_two_with_sharded_heads_and_resume(tmp_path, teacher_dir, docs_txt):
    """4 ranks = 2 data-parallel groups × 2 tensor-parallel ranks whose heads hold uneven row
    slices; the writer of group 1 dies once, then the same run resumes."""
    out = tmp_path / "cache"
    args = dict(model=teacher_dir, data=docs_txt, output=str(out), max_length=MAXLEN, batch_size=2, k=4,
                shard_size=2, tensor_parallel=2)
    split = [100, 156]  # the tiny teacher's 256 ids
    codes = _run(4, args, split=split, die=(2, 3), timeout=20)
    assert codes[2] == 9
    assert "manifest.json" not in os.listdir(out)
    assert _run(4, args, split=split) == [0, 0, 0, 0]
    cache = _same_as_one_process(out, tmp_path, teacher_dir, docs_txt, k=4)
    assert cache.manifest["world_size"] == 2


def test_bad_tensor_parallel_sizes(tmp_path, teacher_dir, docs_txt):
    with pytest.raises(ValueError, match="tensor_parallel: 2 does not divide the 1 ranks"):
        capture(teacher_dir, docs_txt, tmp_path / "c", tensor_parallel=2, progress=False, verbose=False)
    with pytest.raises(ValueError, match="tensor_parallel: expected an integer ≥ 1, got 0"):
        capture(teacher_dir, docs_txt, tmp_path / "c", tensor_parallel=0, progress=False, verbose=False)


def test_refusals_come_from_every_rank_together(tmp_path, teacher_dir, docs_txt, capfd):
    args = dict(model=teacher_dir, data=docs_txt, output=str(tmp_path / "c"), max_length=MAXLEN, k=4,
                tensor_parallel=2)
    # Sharded heads of 200 rows in all: too few for the byte-level tokenizer's 256 ids.
    assert _run(2, args, split=[100, 100], timeout=60) == [3, 3]
    err = capfd.readouterr().err
    assert err.count("the byte-level tokenizer needs a vocabulary of ≥ 256 ids, the teacher has 200") == 2
    # Generation needs whole logits on every rank.
    assert _run(2, dict(args, mode="generate", max_new_tokens=4), split=[100, 156], timeout=60) == [3, 3]
    assert capfd.readouterr().err.count("mode: 'generate' needs the whole vocabulary's logits") == 2


def test_generate_mode_with_a_whole_head_on_every_rank(tmp_path, teacher_dir, docs_txt):
    out = tmp_path / "cache"
    kw = dict(mode="generate", max_new_tokens=6, method="sample", num_samples=16, seed=1)
    assert _run(2, dict(model=teacher_dir, data=docs_txt, output=str(out), max_length=MAXLEN, batch_size=3,
                        tensor_parallel=2, **kw)) == [0, 0]
    _same_as_one_process(out, tmp_path, teacher_dir, docs_txt, **kw)
