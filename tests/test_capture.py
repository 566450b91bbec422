"""kdfast capture: a tiny random GPT-2 teacher (byte-level fallback tokenizer) over small text
files — stored targets against compress_topk/compress_sample on the model's own logits, generate
mode, resume, data formats, the command line and a 2-rank torchrun run."""

import multiprocessing
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("pyarrow")
pytest.importorskip("transformers")

import kdfast  # noqa: E402
import kdfast.sparse  # noqa: E402
from kdfast import cli  # noqa: E402
from kdfast.cache import TeacherCache, collate  # noqa: E402
from kdfast.capture import ByteTokenizer, capture, read_documents  # noqa: E402

import _tiny_models as tm  # noqa: E402

MAXLEN = 40


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tm.save_tiny_gpt2(tmp_path_factory.mktemp("teacher") / "tiny-gpt2")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return tm.load_model(teacher_dir)


@pytest.fixture(scope="module")
def docs_txt(tmp_path_factory):
    return tm.write_txt(tmp_path_factory.mktemp("data") / "docs.txt")


def direct_logits(model, ids):
    """The teacher's logits for one unpadded sequence, computed as capture does."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        return model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0]


def byte_ids(doc, max_length=MAXLEN):
    return list(doc.encode("utf-8"))[:max_length]


# ----------------------------------------------------------------------------- score mode


def test_score_topk_is_exactly_compress_topk_of_the_teacher(tmp_path, teacher_dir, teacher, docs_txt, capsys):
    out = tmp_path / "cache"
    summary = capture(teacher_dir, docs_txt, out, k=6, temperature=1.5, batch_size=1, max_length=MAXLEN,
                      encoding="raw", progress=True)
    printed = capsys.readouterr()
    assert "kdfast capture: 11 sequences (11 new)" in printed.out and "bytes/token" in printed.out
    assert "tok/s" in printed.err  # the progress bar
    cache = TeacherCache(out)
    m = cache.manifest
    assert (m["method"], m["k"], m["temperature"]) == ("topk", 6, 1.5)
    assert (m["vocab_size"], m["teacher_name"]) == (256, "tiny-gpt2")
    assert m["config"]["tokenizer"] == "bytes" and m["config"]["mode"] == "score"
    assert len(cache) == len(tm.DOCS) == summary.sequences
    assert summary.tokens == sum(len(byte_ids(d)) for d in tm.DOCS) == cache.num_tokens
    for i, doc in enumerate(tm.DOCS):
        item = cache[i]
        ids = byte_ids(doc)
        assert item["input_ids"].tolist() == ids
        want = kdfast.compress_topk(direct_logits(teacher, ids), 6, temperature=1.5)
        got = item["targets"]
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.logprobs, want.logprobs)
        assert torch.equal(got.tail_logprob, want.tail_logprob)


def test_score_batched_packed_and_student_training_step(tmp_path, teacher_dir, teacher, docs_txt):
    out = tmp_path / "cache"
    capture(teacher_dir, docs_txt, out, k=8, batch_size=4, max_length=MAXLEN, shard_size=3,
            encoding="packed", progress=False, verbose=False)
    cache = TeacherCache(out)
    assert len(cache.shard_files) == 4
    for i, doc in enumerate(tm.DOCS):  # padded batches: the same targets up to float noise
        ids = byte_ids(doc)
        want = kdfast.compress_topk(direct_logits(teacher, ids), 8)
        got = cache[i]["targets"]
        assert torch.equal(got.indices, want.indices)
        assert (got.logprobs - want.logprobs).abs().max().item() <= 2.0 ** -12 + 1e-5
        torch.testing.assert_close(got.tail_logprob, want.tail_logprob, rtol=1e-4, atol=1e-4)

    # a training step of a (different) student on the collated cache
    student = tm.load_model(tm.save_tiny_gpt2(tmp_path / "student", seed=1))
    student.train()
    batch = collate([cache[i] for i in range(4)])
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    # the teacher against its own targets: the distillation loss is (up to quantisation) zero
    tl = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    assert kdfast.sparse_kl(tl, batch["targets"], labels=batch["labels"]).item() < 1e-3


def test_score_sampled_targets_match_compress_sample(tmp_path, teacher_dir, teacher, docs_txt):
    out = tmp_path / "cache"
    capture(teacher_dir, docs_txt, out, method="sample", num_samples=16, seed=5, batch_size=1,
            max_length=MAXLEN, encoding="raw", progress=False, verbose=False)
    cache = TeacherCache(out)
    assert cache.manifest["num_samples"] == 16 and cache.manifest["config"]["seed"] == 5
    for i, doc in enumerate(tm.DOCS):
        ids = byte_ids(doc)
        # each sequence draws from its own streams: row_offset = seq_id × max positions
        want = kdfast.compress_sample(direct_logits(teacher, ids), 16, seed=5, row_offset=i * MAXLEN)
        got = cache[i]["targets"]
        k = got.k
        assert bool((want.indices[:, k:] == -1).all())
        assert torch.equal(got.indices, want.indices[:, :k])
        assert torch.equal(got.weights, want.weights[:, :k])
        assert torch.equal(got.logprobs, want.logprobs[:, :k])


# ----------------------------------------------------------------------------- generate mode


def test_generate_mode_stores_prompt_response_and_every_position(tmp_path, teacher_dir, teacher, docs_txt):
    out = tmp_path / "cache"
    new = 12
    capture(teacher_dir, docs_txt, out, mode="generate", k=4, batch_size=3, max_length=24,
            max_new_tokens=new, limit=7, progress=False, verbose=False)
    cache = TeacherCache(out)
    assert cache.manifest["config"]["mode"] == "generate" and cache.manifest["config"]["max_new_tokens"] == new
    assert len(cache) == 7
    for i, doc in enumerate(tm.DOCS[:7]):
        item = cache[i]
        prompt = list(doc.encode("utf-8"))[-24:]  # prompts keep their last max_length tokens
        ids = item["input_ids"].tolist()
        assert item["prompt_length"] == len(prompt) and ids[:len(prompt)] == prompt
        assert len(ids) == len(prompt) + new  # no EOS in this model: full-length responses
        # a distribution at every position; at generated positions greedy's choice is its top-1
        t = item["targets"]
        assert tuple(t.shape) == (len(ids),)
        p = len(prompt)
        assert t.indices[p - 1:-1, 0].tolist() == ids[p:]
        want = kdfast.compress_topk(direct_logits(teacher, ids), 4)
        assert torch.equal(t.indices, want.indices)
        if i >= 3:
            continue  # the reference generations below are the slow part; three suffice
        # greedy with the same model (alone, unpadded)
        with torch.inference_mode():
            x = torch.tensor([prompt])
            ref = teacher.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                   do_sample=False, pad_token_id=0)
        assert ids == ref[0].tolist()
    batch = collate([cache[i] for i in range(3)], response_only=True)
    for r in range(3):
        p, n = cache[r]["prompt_length"], cache[r]["input_ids"].shape[0]
        kept = (batch["labels"][r] != -100).nonzero().squeeze(1).tolist()
        assert kept == list(range(p - 1, n - 1))
        assert batch["response_mask"][r].nonzero().squeeze(1).tolist() == kept


def test_generate_with_sampling_is_seeded(tmp_path, teacher_dir, docs_txt):
    kw = dict(mode="generate", k=4, batch_size=2, max_length=16, max_new_tokens=5, do_sample=True, limit=4,
              generation_temperature=1.0, progress=False, verbose=False)
    a = capture(teacher_dir, docs_txt, tmp_path / "a", seed=3, **kw)
    capture(teacher_dir, docs_txt, tmp_path / "b", seed=3, **kw)
    ca, cb = TeacherCache(tmp_path / "a"), TeacherCache(tmp_path / "b")
    assert a.sequences == 4
    assert all(torch.equal(ca[i]["input_ids"], cb[i]["input_ids"]) for i in range(len(ca)))


# ----------------------------------------------------------------------------- resume


def test_capture_resumes_after_an_interruption(tmp_path, teacher_dir, docs_txt, monkeypatch):
    out = tmp_path / "cache"
    kw = dict(k=5, batch_size=2, max_length=MAXLEN, shard_size=2, progress=False, verbose=False)
    real = kdfast.sparse.compress_topk
    monkeypatch.setattr(kdfast.sparse, "compress_topk", tm.dying(real, 6))  # killed mid-batch
    with pytest.raises(KeyboardInterrupt):
        capture(teacher_dir, docs_txt, out, **kw)
    monkeypatch.setattr(kdfast.sparse, "compress_topk", real)
    partial = TeacherCache(out)
    assert 0 < len(partial) < len(tm.DOCS) and not partial.complete

    with pytest.raises(ValueError, match="cannot resume.*k: cache has 5, got 6"):
        capture(teacher_dir, docs_txt, out, **{**kw, "k": 6})
    with pytest.raises(ValueError, match="cannot resume.*max_length"):
        capture(teacher_dir, docs_txt, out, **{**kw, "max_length": 20})

    summary = capture(teacher_dir, docs_txt, out, **kw)
    assert summary.new_sequences == len(tm.DOCS) - len(partial)
    cache = TeacherCache(out)
    assert cache.complete and cache.seq_ids.tolist() == list(range(len(tm.DOCS)))
    fresh = TeacherCache(capture(teacher_dir, docs_txt, tmp_path / "fresh", **kw).path)
    for i in range(len(tm.DOCS)):
        assert torch.equal(cache[i]["input_ids"], fresh[i]["input_ids"])
        assert torch.equal(cache[i]["targets"].indices, fresh[i]["targets"].indices)
    # nothing left to do: a rerun adds nothing
    assert capture(teacher_dir, docs_txt, out, **kw).new_sequences == 0


# ----------------------------------------------------------------------------- data formats


def test_jsonl_and_saved_datasets_give_the_same_sequences(tmp_path, teacher_dir):
    datasets = pytest.importorskip("datasets")
    jsonl = tm.write_jsonl(tmp_path / "docs.jsonl")
    ds_dir = str(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": tm.DOCS})}).save_to_disk(ds_dir)
    assert read_documents(jsonl) == tm.DOCS == read_documents(ds_dir)
    kw = dict(k=3, batch_size=4, max_length=MAXLEN, progress=False, verbose=False)
    capture(teacher_dir, jsonl, tmp_path / "a", **kw)
    capture(teacher_dir, ds_dir, tmp_path / "b", **kw)
    a, b = TeacherCache(tmp_path / "a"), TeacherCache(tmp_path / "b")
    assert a.manifest["config"]["data_sha256"] == b.manifest["config"]["data_sha256"]
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(tm.DOCS)))


def test_read_documents_formats(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    assert read_documents(txt) == ["first doc", "still first", "second", "third"]
    assert read_documents(txt, txt_docs="blank") == ["first doc\nstill first", "second", "third"]
    js = tmp_path / "d.jsonl"
    js.write_text('{"prompt": "p1", "text": "t1"}\n\n{"prompt": "p2", "text": "t2"}\n', encoding="utf-8")
    assert read_documents(js) == ["t1", "t2"]
    assert read_documents(js, mode="generate") == ["p1", "p2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no 'text' or 'prompt' field"):
        read_documents(bad)
    (tmp_path / "d.csv").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="expected a .txt file"):
        read_documents(tmp_path / "d.csv")
    assert ByteTokenizer().encode("é") == [195, 169]


def test_capture_argument_errors(tmp_path, teacher_dir, docs_txt):
    with pytest.raises(ValueError, match="exceeds the teacher's context of 64"):
        capture(teacher_dir, docs_txt, tmp_path / "c", max_length=60, mode="generate", max_new_tokens=10,
                progress=False, verbose=False)
    with pytest.raises(ValueError, match="mode"):
        capture(teacher_dir, docs_txt, tmp_path / "c", mode="chat")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        capture(tmp_path / "nope", docs_txt, tmp_path / "c")


# ----------------------------------------------------------------------------- command line


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_in_process(tmp_path, teacher_dir, docs_txt, capsys):
    out = tmp_path / "cache"
    rc = cli.main(["capture", "--model", teacher_dir, "--data", docs_txt, "--output", str(out),
                   "--k", "4", "--max-length", str(MAXLEN), "--batch-size", "4", "--no-progress"])
    assert rc == 0
    assert "kdfast capture: 11 sequences" in capsys.readouterr().out
    assert len(TeacherCache(out)) == len(tm.DOCS)
    rc = cli.main(["capture", "--model", teacher_dir, "--data", str(tmp_path / "missing.txt"),
                   "--output", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def _check_two_rank_cache(out, teacher_dir, docs_txt, tmp_path):
    import pyarrow as pa

    names = sorted(os.listdir(out))
    assert "manifest.json" in names and "manifest.rank000.json" in names and "manifest.rank001.json" in names
    cache = TeacherCache(out)
    m = cache.manifest
    assert m["world_size"] == 2 and m["complete"]
    assert {s["rank"] for s in m["shards"]} == {0, 1}
    assert cache.seq_ids.tolist() == list(range(len(tm.DOCS)))  # every sequence exactly once
    per_rank = {r: [] for r in (0, 1)}  # sequence i went to rank i % 2
    for s in m["shards"]:
        with pa.memory_map(str(out / s["file"])) as src:
            per_rank[s["rank"]] += pa.ipc.open_stream(src).read_all().column("seq_id").to_pylist()
    assert sorted(per_rank[0]) == list(range(0, len(tm.DOCS), 2))
    assert sorted(per_rank[1]) == list(range(1, len(tm.DOCS), 2))
    single = TeacherCache(capture(teacher_dir, docs_txt, tmp_path / "single", k=4, max_length=MAXLEN,
                                  batch_size=3, progress=False, verbose=False).path)
    for i in range(len(tm.DOCS)):
        assert torch.equal(cache[i]["input_ids"], single[i]["input_ids"])
        assert torch.equal(cache[i]["targets"].indices, single[i]["targets"].indices)


def _rank_main(rank, port, argv, fail_at):
    """One rank, as torchrun would start it (environment variables), in a forked process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if fail_at is not None and rank == 1:  # this rank dies after a few sequences
        real, calls = kdfast.sparse.compress_topk, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                os._exit(9)
            return real(*args, **kwargs)

        kdfast.sparse.compress_topk = dying
    sys.exit(cli.main(argv))


def _run_two_ranks(argv, fail_at=None):
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, argv, fail_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120 if fail_at is None else 20)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():  # a rank left waiting at the barrier by a dead peer (torchrun kills it)
            p.kill()
            p.join()
    return codes


@pytest.mark.distributed
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_two_ranks_store_every_sequence_once_and_resume(tmp_path, teacher_dir, docs_txt):
    """Two gloo ranks with torchrun's environment; rank 1 is killed once, then the same command
    is rerun: every sequence ends up in the cache exactly once."""
    out = tmp_path / "cache"
    argv = ["capture", "--model", teacher_dir, "--data", docs_txt, "--output", str(out), "--k", "4",
            "--max-length", str(MAXLEN), "--batch-size", "3", "--shard-size", "2", "--no-progress"]
    codes = _run_two_ranks(argv, fail_at=4)
    assert codes[1] == 9
    assert "manifest.json" not in os.listdir(out)  # never merged: readers refuse it
    with pytest.raises(ValueError, match="without a merged manifest.json"):
        TeacherCache(out)
    assert _run_two_ranks(argv) == [0, 0]
    _check_two_rank_cache(out, teacher_dir, docs_txt, tmp_path)


@pytest.mark.slow  # about 30 s on 2 cores: three fresh interpreters
@pytest.mark.distributed
def test_torchrun_two_ranks_store_every_sequence_once(tmp_path, teacher_dir, docs_txt):
    out = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", KDFAST_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(kdfast.__path__[0]), env.get("PYTHONPATH")] if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kdfast.cli",
           "capture", "--model", teacher_dir, "--data", docs_txt, "--output", str(out), "--k", "4",
           "--max-length", str(MAXLEN), "--batch-size", "3", "--shard-size", "2", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 ranks" in proc.stdout
    _check_two_rank_cache(out, teacher_dir, docs_txt, tmp_path)


# ----------------------------------------------------------------------------- details


class _FakeGenerator:
    """Records what generate() received and answers with fixed continuations."""

    def __init__(self, responses):
        self.responses = torch.tensor(responses)
        self.seen = None

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen = (input_ids.clone(), attention_mask.clone(), kwargs)
        return torch.cat([input_ids, self.responses[: input_ids.shape[0]]], 1)


def test_generate_left_pads_and_cuts_after_eos():
    from kdfast.capture.teacher import generate

    fake = _FakeGenerator([[7, 3, 9, 3], [3, 5, 5, 5], [5, 6, 7, 8]])
    fulls = generate(fake, [[1, 2, 3], [4], [5, 6]], 0, [3], torch.device("cpu"), 4, False, 1.0, 1.0, 0, 0)
    ids, mask, kwargs = fake.seen
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert kwargs["eos_token_id"] == [3] and kwargs["max_new_tokens"] == 4 and kwargs["do_sample"] is False
    # responses end after the first EOS (kept); without one they run to max_new_tokens
    assert fulls == [[1, 2, 3, 7, 3], [4, 3], [5, 6, 5, 6, 7, 8]]


def test_capture_with_a_saved_tokenizer(tmp_path, teacher_dir, docs_txt):
    """A model directory with tokenizer files uses AutoTokenizer (built locally, no download)."""
    import shutil

    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "with-tokenizer"
    shutil.copytree(teacher_dir, model_dir)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<unk>", "</s>"])
    bpe.train_from_iterator(tm.DOCS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(model_dir)
    capture(model_dir, docs_txt, tmp_path / "cache", k=4, batch_size=4, max_length=MAXLEN, progress=False,
            verbose=False)
    cache = TeacherCache(tmp_path / "cache")
    assert cache.manifest["config"]["tokenizer"] == "with-tokenizer"
    for i, doc in enumerate(tm.DOCS):
        assert cache[i]["input_ids"].tolist() == tok(doc)["input_ids"][:MAXLEN]


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_chunked_compression_equals_one_call(method):
    """The row chunks used off the CPU give the same targets as one call."""
    from kdfast.capture.teacher import compress_rows

    rows = torch.randn(10, 50, generator=torch.Generator().manual_seed(0)) * 3
    one = compress_rows(rows, method, 5, 7, 1.3, 11, 40)
    chunked = compress_rows(rows, method, 5, 7, 1.3, 11, 40, chunk_rows=3)
    for name in ("indices", "logprobs", "weights", "tail_logprob"):
        a, b = getattr(one, name), getattr(chunked, name)
        assert (a is None and b is None) or torch.equal(a, b), name
