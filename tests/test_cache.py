"""kdfast.cache: round trips (raw exact, packed within its bound), the manifest, atomic shards,
resume after a kill or an exception, corruption detection, Hugging Face datasets, collate +
sparse_kl, multi-rank manifests."""

import hashlib
import json
import os
import multiprocessing
import pickle

import pytest
import torch

pa = pytest.importorskip("pyarrow")

import kdfast  # noqa: E402
from kdfast.cache import (  # noqa: E402
    CacheWriter,
    Collator,
    TeacherCache,
    collate,
    decode_record,
    merge_manifests,
)

V = 300
NEG_INF = float("-inf")
QUANTUM_ERROR = 2.0 ** -12  # packed log-probs: |decoded - exact| <= half of 1/2048


def make_sequences(n, *, seed=0, v=V, max_len=9, method="topk", k=8, num_samples=20, temperature=2.0):
    """n deterministic (input_ids, targets) pairs of random lengths 1..max_len."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        s = int(torch.randint(1, max_len + 1, (1,), generator=g))
        logits = torch.randn(s, v, generator=g) * 4
        if i % 3 == 1:
            logits[:, : v // 2] = NEG_INF  # masked vocabulary entries
        ids = torch.randint(0, v, (s,), generator=g)
        if method == "topk":
            t = kdfast.compress_topk(logits, k, temperature=temperature)
        else:
            t = kdfast.compress_sample(logits, num_samples, temperature=temperature, seed=7, row_offset=100 * i)
        out.append((ids, t))
    return out


def writer(path, method="topk", **kw):
    kw.setdefault("temperature", 2.0)
    kw.setdefault("vocab_size", V)
    if method == "topk":
        kw.setdefault("k", 8)
    else:
        kw.setdefault("num_samples", 20)
    return CacheWriter(path, method=method, **kw)


def assert_same_targets(got, want, *, exact):
    """``got`` (stored, maybe fewer slots) against ``want`` (as compressed)."""
    k = got.k
    assert k <= want.k
    assert bool((want.indices[..., k:] == -1).all()), "trimmed slots must be unused"
    assert torch.equal(got.indices, want.indices[..., :k])
    assert got.method == want.method and got.temperature == want.temperature
    lp, wlp = got.logprobs, want.logprobs[..., :k]
    assert torch.equal(torch.isinf(lp), torch.isinf(wlp))
    fin = torch.isfinite(wlp)
    if exact:
        assert torch.equal(lp, wlp)
    else:
        assert (lp[fin] - wlp[fin]).abs().max().item() <= QUANTUM_ERROR + 1e-7
    if want.tail_logprob is not None:
        assert torch.equal(got.tail_logprob, want.tail_logprob)
    else:
        assert got.tail_logprob is None
    if want.weights is not None:
        assert torch.equal(got.weights, want.weights[..., :k])


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("encoding", ["raw", "packed"])
@pytest.mark.parametrize("method", ["topk", "sample"])
def test_round_trip(tmp_path, encoding, method):
    seqs = make_sequences(10, method=method)
    with writer(tmp_path / "c", method, encoding=encoding, shard_size=4, teacher_name="tiny") as w:
        for ids, t in seqs:
            w.append(ids, t)
    cache = TeacherCache(tmp_path / "c")
    assert len(cache) == 10
    assert cache.seq_ids.tolist() == list(range(10))
    assert len(cache.shard_files) == 3  # 4 + 4 + 2
    for i, (ids, t) in enumerate(seqs):
        item = cache[i]
        assert item["seq_id"] == i and item["prompt_length"] == 0
        assert item["input_ids"].dtype == torch.int64 and torch.equal(item["input_ids"], ids)
        assert tuple(item["targets"].shape) == (ids.shape[0],)
        assert_same_targets(item["targets"], t, exact=encoding == "raw")
    assert cache[-1]["seq_id"] == 9
    with pytest.raises(IndexError):
        cache[10]
    if method == "sample":  # slots trimmed to what the sequence uses
        assert max(cache[i]["targets"].k for i in range(10)) < 20


def test_manifest_and_files(tmp_path):
    path = tmp_path / "c"
    seqs = make_sequences(5)
    with writer(path, shard_size=2, teacher_name="gpt2-tiny", config={"data": "x"}) as w:
        assert w.num_sequences == 0 and w.done == frozenset()
        for ids, t in seqs:
            w.append(ids, t, seq_id=100 + len(w.done) * 2)
        assert w.done == {100, 102, 104, 106, 108}
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "kdfast-teacher-cache" and m["format_version"] == 2
    assert (m["method"], m["k"], m["num_samples"], m["temperature"], m["vocab_size"]) == ("topk", 8, None, 2.0, V)
    assert m["teacher_name"] == "gpt2-tiny" and m["config"] == {"data": "x"}
    assert m["encoding"] == "compact" and m["has_tail"] is True and m["id_bits"] == 9
    assert m["dtypes"]["input_ids"] == "list<item: uint16>" and m["dtypes"]["targets"] == "binary"
    assert m["complete"] is True
    assert m["num_sequences"] == 5 and m["num_tokens"] == sum(ids.shape[0] for ids, _ in seqs)
    assert [s["file"] for s in m["shards"]] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert [s["rows"] for s in m["shards"]] == [2, 2, 1]
    for s in m["shards"]:
        data = (path / s["file"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    # no temporary files left behind
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".lock")) == [
        "manifest.json", "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert TeacherCache(path).seq_ids.tolist() == [100, 102, 104, 106, 108]


# ----------------------------------------------------------------------------- resume

def _write_and_die(path):
    torch.set_num_threads(1)
    w = writer(path, shard_size=4, encoding="packed")
    for i, (ids, t) in enumerate(make_sequences(10)):
        w.append(ids, t)
        if i == 8:
            # a temporary shard being written when the process dies
            with open(os.path.join(path, ".shard-00002.arrow.tmp-99999"), "wb") as f:
                f.write(b"partial")
            os._exit(3)  # killed: no flush, no close


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_resume_after_kill(tmp_path):
    path = str(tmp_path / "c")
    proc = multiprocessing.get_context("fork").Process(target=_write_and_die, args=(path,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 3
    # What survived is a valid (incomplete) cache: the two complete shards.
    partial = TeacherCache(path)
    assert len(partial) == 8 and not partial.complete
    seqs = make_sequences(10)
    with writer(path, shard_size=4, encoding="packed") as w:
        assert w.done == frozenset(range(8))  # sequence 8 was only buffered: lost, redone
        assert w.num_tokens == sum(ids.shape[0] for ids, _ in seqs[:8])
        for i, (ids, t) in enumerate(seqs):
            if i not in w.done:
                w.append(ids, t, seq_id=i)
    assert not any(".tmp-" in n for n in os.listdir(path))
    cache = TeacherCache(path)
    assert cache.complete and cache.seq_ids.tolist() == list(range(10))
    for i, (ids, t) in enumerate(seqs):
        assert torch.equal(cache[i]["input_ids"], ids)
        assert_same_targets(cache[i]["targets"], t, exact=False)


def test_resume_after_exception_and_orphan_shard(tmp_path):
    path = tmp_path / "c"
    seqs = make_sequences(9)
    with pytest.raises(RuntimeError, match="boom"):
        with writer(path, shard_size=4) as w:
            for i, (ids, t) in enumerate(seqs):
                if i == 6:
                    raise RuntimeError("boom")
                w.append(ids, t, seq_id=i)
    # leaving the block by an exception still stored the buffered, complete sequences
    assert TeacherCache(path).seq_ids.tolist() == list(range(6))
    # a shard renamed into place whose manifest update never happened is an orphan
    (path / "shard-00002.arrow").write_bytes(b"orphan")
    with writer(path, shard_size=4) as w:
        assert w.done == frozenset(range(6))
        assert not (path / "shard-00002.arrow").exists()
        for i, (ids, t) in enumerate(seqs):
            if i not in w.done:
                w.append(ids, t, seq_id=i)
        with pytest.raises(ValueError, match="sequence 3 is already stored"):
            w.append(*seqs[3], seq_id=3)
    cache = TeacherCache(path)
    assert cache.seq_ids.tolist() == list(range(9))
    for i, (ids, _) in enumerate(seqs):
        assert torch.equal(cache[i]["input_ids"], ids)


@pytest.mark.parametrize(
    "change, field",
    [({"k": 4}, "k"), ({"temperature": 1.0}, "temperature"), ({"vocab_size": 301}, "vocab_size"),
     ({"encoding": "raw"}, "encoding"), ({"teacher_name": "other"}, "teacher_name"),
     ({"config": {"seed": 1}}, "config"), ({"method": "sample", "k": None}, "method")],
)
def test_resume_with_other_parameters_is_an_error(tmp_path, change, field):
    path = tmp_path / "c"
    with writer(path, config={"seed": 0}) as w:
        for ids, t in make_sequences(2):
            w.append(ids, t)
    kw = dict(config={"seed": 0})
    kw.update(change)
    method = kw.pop("method", "topk")
    if kw.get("k", 0) is None:
        kw.pop("k")
    with pytest.raises(ValueError, match=rf"cannot resume.*{field}: cache has"):
        writer(path, method, **kw)
    # the original parameters still resume; overwrite=True starts afresh
    with writer(path, config={"seed": 0}) as w:
        assert w.num_sequences == 2
    with writer(path, config={"seed": 1}, overwrite=True) as w:
        assert w.num_sequences == 0
    assert len(TeacherCache(path)) == 0


def test_one_writer_at_a_time(tmp_path):
    w = writer(tmp_path / "c")
    with pytest.raises(RuntimeError, match="another CacheWriter"):
        writer(tmp_path / "c")
    w.close()
    writer(tmp_path / "c").close()


def test_append_validation(tmp_path):
    (ids, t), = make_sequences(1)
    s = ids.shape[0]
    with writer(tmp_path / "c") as w:
        with pytest.raises(ValueError, match="leading shape"):
            w.append(torch.cat([ids, ids]), t)
        with pytest.raises(ValueError, match="method='topk'"):
            w.append(ids, kdfast.compress_sample(torch.randn(s, V), 8, temperature=2.0))
        with pytest.raises(ValueError, match="temperature"):
            w.append(ids, kdfast.compress_topk(torch.randn(s, V), 8, temperature=1.0))
        with pytest.raises(ValueError, match="at most k=8"):
            w.append(ids, kdfast.compress_topk(torch.randn(s, V), 9, temperature=2.0))
        with pytest.raises(ValueError, match=r"token ids in \[0, 300\)"):
            w.append(ids + 1000, t)
        with pytest.raises(TypeError, match="integer token ids"):
            w.append(ids.float(), t)
        with pytest.raises(ValueError, match="prompt_length"):
            w.append(ids, t, prompt_length=s + 1)
        w.append(ids, t, prompt_length=s)
    with pytest.raises(ValueError, match="k: method='topk' needs k"):
        CacheWriter(tmp_path / "d", method="topk", temperature=1.0, vocab_size=V)
    with pytest.raises(ValueError, match="encoding"):
        writer(tmp_path / "d", encoding="zip")


# ----------------------------------------------------------------------------- corruption


def _small_cache(path):
    with writer(path, shard_size=3) as w:
        for ids, t in make_sequences(7):
            w.append(ids, t)
    return path


def test_corrupted_shard_is_named(tmp_path):
    path = _small_cache(tmp_path / "c")
    shard = path / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001\.arrow: shard checksum mismatch"):
        TeacherCache(path)


def test_truncated_and_missing_shards_are_named(tmp_path):
    path = _small_cache(tmp_path / "c")
    shard = path / "shard-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"shard-00002\.arrow: shard is truncated"):
        TeacherCache(path)
    with pytest.raises(ValueError, match=r"shard-00002\.arrow: shard is truncated"):
        writer(path, shard_size=3)  # resuming checks the shards too
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard-00002\.arrow: shard listed in the manifest is missing"):
        TeacherCache(path)
    with pytest.raises(FileNotFoundError, match="not a kdfast teacher cache"):
        TeacherCache(tmp_path)


# ----------------------------------------------------------------------------- file safety


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _put_shard(path, index, data):
    """Replace shard ``index`` by ``data`` and record its size and sha256 in the manifest."""
    def edit(m):
        entry = m["shards"][index]
        (path / entry["file"]).write_bytes(data)
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    _edit_manifest(path, edit)


@pytest.mark.parametrize("name", ["../outside.arrow", "ABSOLUTE", "sub/shard-00000.arrow", "shard-00000.arrow/",
                                  "..", "", None, 7])
def test_manifest_cannot_name_files_outside_the_cache(tmp_path, name):
    path = _small_cache(tmp_path / "c")
    outside = tmp_path / "outside.arrow"
    outside.write_bytes((path / "shard-00000.arrow").read_bytes())  # a valid shard, outside the cache
    (path / "sub").mkdir()
    (path / "sub" / "shard-00000.arrow").write_bytes(outside.read_bytes())
    name = str(outside) if name == "ABSOLUTE" else name

    def edit(m):
        m["shards"][0]["file"] = name

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match="is not a shard name of this cache"):
        TeacherCache(path)
    with pytest.raises(ValueError, match="is not a shard name of this cache"):
        writer(path, shard_size=3)  # resuming reads the manifest the same way
    # per-rank manifests are checked before they are merged
    ranks = tmp_path / "r"
    with writer(ranks, rank=0, world_size=2) as w0, writer(ranks, rank=1, world_size=2) as w1:
        for i, (ids, t) in enumerate(make_sequences(4)):
            (w0, w1)[i % 2].append(ids, t, seq_id=i)
    m = json.loads((ranks / "manifest.rank001.json").read_text())
    m["shards"][0]["file"] = name
    (ranks / "manifest.rank001.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="is not a shard name of this cache"):
        merge_manifests(ranks)
    assert not (ranks / "manifest.json").exists()


@pytest.mark.parametrize("key, value", [("bytes", -1), ("rows", "3"), ("tokens", 1.5), ("sha256", "../x"),
                                        ("bytes", True)])
def test_manifest_shard_entries_are_checked(tmp_path, key, value):
    path = _small_cache(tmp_path / "c")

    def edit(m):
        m["shards"][1][key] = value

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match=rf"shard entry 1 \(shard-00001\.arrow\): {key}"):
        TeacherCache(path)


@pytest.mark.parametrize("key, value, message", [
    ("encoding", "raw", r"shard-00000\.arrow: the manifest's parameters differ .*encoding: manifest 'raw', shard 'compact'"),
    ("vocab_size", 70000, r"shard-00000\.arrow: the manifest's parameters differ .*vocab_size: manifest 70000"),
    ("vocab_size", 10, r"shard-00000\.arrow: the manifest's parameters differ .*vocab_size: manifest 10, shard 300"),
    ("k", 4, r"shard-00000\.arrow: the manifest's parameters differ .*k: manifest 4, shard 8"),
    ("vocab_size", 0, "vocab_size 0 is not an integer"),
    ("method", "../x", "method '../x' is not one of"),
    ("temperature", float("nan"), "temperature nan is not a finite number"),
])
def test_manifest_that_disagrees_with_its_shards(tmp_path, key, value, message):
    path = _small_cache(tmp_path / "c")

    def edit(m):
        m[key] = value

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match=message):
        cache = TeacherCache(path)
        for i in range(len(cache)):
            cache[i]


def test_list_offsets_past_the_end_are_refused(tmp_path):
    """A shard whose offsets point past its values (with a matching checksum) is refused on
    open; Arrow's IPC reader alone accepts it."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "c"
    seqs = make_sequences(3)
    with writer(path, encoding="raw") as w:
        for ids, t in seqs:
            w.append(ids, t)
    data = bytearray((path / "shard-00000.arrow").read_bytes())
    offsets = np.cumsum([0] + [ids.shape[0] for ids, _ in seqs]).astype(np.int32).tobytes()
    at = data.find(offsets)  # the input_ids offsets (the first list column)
    assert at >= 0
    data[at + len(offsets) - 4:at + len(offsets)] = np.array([1 << 30], np.int32).tobytes()
    _put_shard(path, 0, bytes(data))
    assert pa.ipc.open_stream(pa.py_buffer(bytes(data))).read_all().num_rows == 3
    with pytest.raises(ValueError, match=r"column 'input_ids' has offsets outside its values"):
        TeacherCache(path)


def test_symbolic_links_in_the_cache_are_refused(tmp_path):
    path = _small_cache(tmp_path / "c")
    shard = path / "shard-00001.arrow"
    outside = tmp_path / "elsewhere.arrow"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ValueError, match=r"shard-00001\.arrow: shard is a symbolic link"):
        TeacherCache(path)
    with pytest.raises(ValueError, match=r"shard-00001\.arrow: shard is a symbolic link"):
        writer(path, shard_size=3)
    shard.unlink()
    shard.write_bytes(outside.read_bytes())
    manifest = path / "manifest.json"
    (tmp_path / "m.json").write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(tmp_path / "m.json")
    with pytest.raises(ValueError, match=r"manifest\.json: cache manifest is a symbolic link"):
        TeacherCache(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_in_place_of_a_shard_is_refused_without_blocking(tmp_path):
    path = _small_cache(tmp_path / "c")
    (path / "shard-00000.arrow").unlink()
    os.mkfifo(path / "shard-00000.arrow")
    with pytest.raises(ValueError, match=r"shard-00000\.arrow: shard is not a regular file"):
        TeacherCache(path)


def test_writes_do_not_follow_planted_links(tmp_path):
    from kdfast.cache.durable import atomic_write

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "c"
    path.mkdir()
    (path / f".manifest.json.tmp-{os.getpid()}").symlink_to(victim)
    atomic_write(str(path / "manifest.json"), b"{}")
    assert victim.read_text() == "keep me" and (path / "manifest.json").read_bytes() == b"{}"
    (path / "manifest.json").unlink()
    (path / ".lock.rank000").symlink_to(victim)
    with pytest.raises(OSError):
        writer(path)
    assert victim.read_text() == "keep me"


def test_resume_refuses_a_manifest_of_other_shard_names(tmp_path):
    path = _small_cache(tmp_path / "c")

    def edit(m):
        m["shards"][0]["file"], m["shards"][1]["file"] = m["shards"][1]["file"], m["shards"][0]["file"]

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match=r"shard entry 0 \(shard-00001\.arrow\): file, rank 0 and index 0 do not agree"):
        writer(path, shard_size=3)


# ----------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("encoding", ["packed", "raw"])
def test_shards_load_in_hugging_face_datasets(tmp_path, encoding):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "c"
    with writer(path, "sample", shard_size=4, encoding=encoding) as w:
        for ids, t in make_sequences(6, method="sample"):
            w.append(ids, t)
    cache = TeacherCache(path)
    one = datasets.Dataset.from_file(cache.shard_files[0])
    assert one.num_rows == 4 and "input_ids" in one.column_names
    every = datasets.load_dataset("arrow", data_files=sorted(cache.shard_files), split="train",
                                  cache_dir=str(tmp_path / "hf"))
    assert every.num_rows == 6
    for record in every:
        item = decode_record(record, cache.manifest)
        ref = cache[item["seq_id"]]
        assert torch.equal(item["input_ids"], ref["input_ids"])
        assert torch.equal(item["targets"].indices, ref["targets"].indices)
        assert torch.equal(item["targets"].logprobs, ref["targets"].logprobs)
        assert torch.equal(item["targets"].weights, ref["targets"].weights)


# ----------------------------------------------------------------------------- batching


def test_collate_alignment_padding_and_sparse_kl(tmp_path):
    path = tmp_path / "c"
    seqs = make_sequences(5, max_len=7)
    with writer(path) as w:
        for i, (ids, t) in enumerate(seqs):
            w.append(ids, t, prompt_length=min(2, ids.shape[0]) if i == 4 else 0)
    cache = TeacherCache(path)
    batch = collate([cache[i] for i in range(5)], pad_id=5)
    lengths = [ids.shape[0] for ids, _ in seqs]
    b, s = 5, max(lengths)
    assert batch["input_ids"].shape == (b, s) and batch["targets"].shape == (b, s)
    for r, (ids, _) in enumerate(seqs):
        n = lengths[r]
        assert torch.equal(batch["input_ids"][r, :n], ids) and bool((batch["input_ids"][r, n:] == 5).all())
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (s - n)
        # labels[t] = input_ids[t + 1]; the last position and padding are -100
        assert batch["labels"][r].tolist() == ids[1:].tolist() + [-100] * (s - n + 1)
        assert torch.equal(batch["targets"].indices[r, :n], cache[r]["targets"].indices)
        assert bool((batch["targets"].indices[r, n:] == -1).all())
        assert bool(torch.isneginf(batch["targets"].logprobs[r, n:]).all())
        assert bool((batch["targets"].tail_logprob[r, n:] == 0).all())
    # prompt_length marks the response: labels from position prompt_length - 1 on
    n4 = lengths[4]
    assert batch["response_mask"][4].tolist() == [False] + [True] * (n4 - 2) + [False] * (s - n4 + 1)
    only = Collator(pad_id=5, response_only=True)([cache[4]])
    assert only["labels"][0].tolist() == [-100] + cache[4]["input_ids"][2:].tolist() + [-100]

    # end to end: a student's logits at position t against targets[t], masked by labels
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(V, 16), torch.nn.Linear(16, V))
    logits = student(batch["input_ids"])
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student[1].weight.grad is not None and student[1].weight.grad.abs().sum() > 0
    rows = kdfast.sparse_kl(logits.detach(), batch["targets"], labels=batch["labels"], reduction="none")
    assert bool((rows[batch["labels"] == -100] == 0).all())
    # the same rows computed sequence by sequence, unpadded
    for r in range(5):
        n = lengths[r]
        labels = batch["labels"][r, :n]
        one = kdfast.sparse_kl(logits.detach()[r, :n], cache[r]["targets"], labels=labels, reduction="none")
        torch.testing.assert_close(rows[r, :n], one)


def test_collate_sampled_targets_of_different_widths(tmp_path):
    path = tmp_path / "c"
    with writer(path, "sample") as w:
        for ids, t in make_sequences(4, method="sample"):
            w.append(ids, t)
    cache = TeacherCache(path)
    items = [cache[i] for i in range(4)]
    batch = collate(items)
    kmax = max(it["targets"].k for it in items)
    assert batch["targets"].k == kmax and batch["targets"].method == "sample"
    for r, it in enumerate(items):
        n, k = it["input_ids"].shape[0], it["targets"].k
        assert torch.equal(batch["targets"].weights[r, :n, :k], it["targets"].weights)
        assert bool((batch["targets"].weights[r, :, k:] == 0).all())
    logits = torch.randn(*batch["input_ids"].shape, V, requires_grad=True)
    loss = kdfast.sparse_kl(logits, batch["targets"], labels=batch["labels"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_dataloader_and_pickle(tmp_path):
    path = _small_cache(tmp_path / "c")
    cache = TeacherCache(path)
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[3]["input_ids"], cache[3]["input_ids"])
    loader = torch.utils.data.DataLoader(cache, batch_size=3, collate_fn=collate)
    seen = torch.cat([batch["seq_id"] for batch in loader])
    assert seen.tolist() == list(range(7))
    assert cache.lengths() == [cache[i]["input_ids"].shape[0] for i in range(7)]


# ----------------------------------------------------------------------------- multi-rank


def test_multi_rank_manifests_merge(tmp_path):
    path = tmp_path / "c"
    seqs = make_sequences(7)
    writers = [writer(path, shard_size=2, rank=r, world_size=2) for r in range(2)]
    for i, (ids, t) in enumerate(seqs):
        writers[i % 2].append(ids, t, seq_id=i)
    writers[0].close()
    with pytest.raises(ValueError, match="rank 1 has not finished"):
        merge_manifests(path)
    with pytest.raises(ValueError, match="without a merged manifest.json"):
        TeacherCache(path)
    writers[1].close()
    merged = merge_manifests(path)
    assert merged["world_size"] == 2 and merged["num_sequences"] == 7 and merged["complete"]
    assert {s["file"] for s in merged["shards"]} == {
        "shard-r000-00000.arrow", "shard-r000-00001.arrow", "shard-r001-00000.arrow", "shard-r001-00001.arrow"}
    cache = TeacherCache(path)
    assert cache.seq_ids.tolist() == list(range(7))
    for i, (ids, _) in enumerate(seqs):
        assert torch.equal(cache[i]["input_ids"], ids)
    with pytest.raises(ValueError, match="multi-rank cache"):
        writer(path)  # a single-process writer on a multi-rank cache
