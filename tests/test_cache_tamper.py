"""A teacher cache cannot be tricked: a manifest that disagrees with its shards (parameters,
counts, names), names outside the directory, symbolic links, an overwrite while another writer
is running, a cache rewritten under an open reader, and malformed manifests are all refused
with a ``ValueError`` / ``RuntimeError`` naming the file and the field. Real files, real Arrow,
real CacheWriter / TeacherCache / capture; no mocks."""

import json
import multiprocessing
import os
import pickle
import re
import shutil

import pytest
import torch

pytest.importorskip("pyarrow")

import kdfast  # noqa: E402
from kdfast.cache import CacheWriter, TeacherCache, collate, merge_manifests  # noqa: E402
from kdfast.cache.writer import clear_cache  # noqa: E402

V = 300


def sequences(n, *, seed=0, method="topk", k=8, temperature=1.0, length=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        logits = torch.randn(length, V, generator=g) * 3
        ids = torch.randint(0, V, (length,), generator=g)
        if method == "topk":
            t = kdfast.compress_topk(logits, k, temperature=temperature)
        else:
            t = kdfast.compress_sample(logits, k, temperature=temperature, seed=3, row_offset=10 * i)
        out.append((ids, t))
    return out


def writer(path, method="topk", k=8, temperature=1.0, **kw):
    if method == "topk":
        return CacheWriter(path, method=method, k=k, temperature=temperature, vocab_size=V, **kw)
    return CacheWriter(path, method=method, num_samples=k, temperature=temperature, vocab_size=V, **kw)


def make_cache(path, n=7, *, close=True, seed=0, **kw):
    kw.setdefault("shard_size", 3)
    w = writer(path, **kw)
    method, k, temperature = kw.get("method", "topk"), kw.get("k", 8), kw.get("temperature", 1.0)
    for ids, t in sequences(n, seed=seed, method=method, k=k, temperature=temperature):
        w.append(ids, t)
    w.close() if close else w.abort()
    return path


def edit_manifest(path, edit, name="manifest.json"):
    file = path / name
    m = json.loads(file.read_text())
    edit(m)
    file.write_text(json.dumps(m))


def set_fields(**fields):
    return lambda m: m.update(fields)


# ----------------------------------------------------------------------------- 1. parameters


@pytest.mark.parametrize("method, edit, fields", [
    ("topk", set_fields(temperature=2.0), ["temperature"]),
    ("topk", set_fields(temperature=1), ["temperature"]),  # the same number, not the same JSON
    ("sample", set_fields(num_samples=40, k=40), ["k", "num_samples"]),
    ("topk", set_fields(k=4), ["k"]),
    ("topk", set_fields(vocab_size=301), ["vocab_size"]),
    ("topk", set_fields(vocab_size=70000), ["vocab_size"]),  # another input_ids type as well
    ("topk", set_fields(encoding="raw"), ["encoding"]),
    ("topk", set_fields(has_tail=False), ["has_tail"]),
    ("topk", set_fields(method="sample", num_samples=8, has_tail=False), ["method", "num_samples", "has_tail"]),
    ("sample", set_fields(method="topk", num_samples=None), ["method", "num_samples"]),
])
def test_a_manifest_parameter_that_disagrees_with_the_shards_is_refused_at_open(tmp_path, method, edit, fields):
    path = make_cache(tmp_path / "c", method=method)
    edit_manifest(path, edit)
    with pytest.raises(ValueError, match=r"shard-00000\.arrow: the manifest's parameters differ") as info:
        TeacherCache(path)
    for field in fields:
        assert f"{field}: manifest" in str(info.value)


def test_a_resumed_writer_checks_the_shards_against_the_manifest(tmp_path):
    """A writer given the edited parameters (so that they match the manifest) still refuses."""
    path = make_cache(tmp_path / "c", close=False)
    edit_manifest(path, set_fields(temperature=2.0, k=4))
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=r"shard-00000\.arrow: the manifest's parameters differ.*k: manifest 4"):
        writer(path, k=4, temperature=2.0, shard_size=3)
    assert (path / "manifest.json").read_bytes() == before


def test_a_resumed_writer_keeps_the_cache_temperature_exactly(tmp_path):
    path = make_cache(tmp_path / "c", close=False, temperature=0.7)
    with writer(path, temperature=0.7 * (1 + 1e-14), shard_size=3) as w:  # the same within 1e-12
        for ids, t in sequences(2, seed=5, temperature=0.7):
            w.append(ids, t)
    cache = TeacherCache(path)
    assert len(cache) == 9 and cache.manifest["temperature"] == 0.7


# ----------------------------------------------------------------------------- 1. counts, names


def drop_entry(index, fix_counts):
    def edit(m):
        gone = m["shards"].pop(index)
        if fix_counts:
            m["num_sequences"] -= gone["rows"]
            m["num_tokens"] -= gone["tokens"]
    return edit


def edit_entry(at, **fields):
    return lambda m: m["shards"][at].update(fields)


def both(*edits):
    def edit(m):
        for e in edits:
            e(m)
    return edit


@pytest.mark.parametrize("edit, message", [
    (drop_entry(2, fix_counts=False), r"num_sequences 7 is not the sum of the shards' rows \(6\)"),
    (drop_entry(2, fix_counts=True), r"the directory also holds shard-00002\.arrow"),
    (drop_entry(0, fix_counts=True), r"shard entry 0 \(shard-00001\.arrow\): index 1 out of order"),
    (set_fields(num_sequences=8), r"num_sequences 8 is not the sum"),
    (set_fields(num_tokens=41), r"num_tokens 41 is not the sum of the shards' tokens \(42\)"),
    (both(edit_entry(1, tokens=17), set_fields(num_tokens=41)),
     r"shard-00001\.arrow: the manifest's shard entry does not match the shard \(tokens: manifest 17, shard 18\)"),
    (edit_entry(1, min_seq_id=2), r"shard-00001\.arrow: .*min_seq_id: manifest 2, shard 3"),
    (edit_entry(2, max_seq_id=9), r"shard-00002\.arrow: .*max_seq_id: manifest 9, shard 6"),
    (edit_entry(1, min_seq_id=6, max_seq_id=5), r"min_seq_id 6 > max_seq_id 5"),
    (both(edit_entry(2, rows=2), set_fields(num_sequences=8)), r"shard-00002\.arrow: manifest lists 2 rows"),
    (edit_entry(1, index=5), r"shard entry 1 \(shard-00001\.arrow\): file, rank 0 and index 5 do not agree"),
    (edit_entry(1, rank=1), r"shard entry 1 \(shard-00001\.arrow\): file, rank 1 and index 1 do not agree"),
    (set_fields(world_size=2), r"shard entry 0 \(shard-00000\.arrow\): .*world_size 2"),
    (set_fields(rank=3), r"rank 3 is not in \[0, world_size = 1\)"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), r"shard entry 3 .*index 0 out of order"),
])
def test_a_manifest_whose_counts_or_names_disagree_is_refused(tmp_path, edit, message):
    path = make_cache(tmp_path / "c")  # 7 sequences of 6 tokens in shards of 3, 3, 1
    edit_manifest(path, edit)
    with pytest.raises(ValueError, match=message):
        TeacherCache(path)


def test_an_incomplete_cache_may_hold_a_shard_it_does_not_list(tmp_path):
    """A writer killed between a shard's rename and the manifest's update leaves one."""
    path = make_cache(tmp_path / "c", close=False)
    shutil.copy(path / "shard-00000.arrow", path / "shard-00003.arrow")
    assert len(TeacherCache(path)) == 7
    edit_manifest(path, set_fields(complete=True))
    with pytest.raises(ValueError, match=r"manifest\.json: shards lists 3 shard files, the directory also holds"):
        TeacherCache(path)


# ----------------------------------------------------------------------------- 2. names and links


@pytest.mark.parametrize("name", ["../../outside/x.arrow", "ABSOLUTE"])
@pytest.mark.parametrize("complete", [True, False])
def test_names_outside_the_cache_are_refused_at_open_and_on_resume(tmp_path, name, complete):
    path = make_cache(tmp_path / "a" / "c", close=complete)
    outside = tmp_path / "outside" / "x.arrow"
    outside.parent.mkdir()
    outside.write_bytes((path / "shard-00000.arrow").read_bytes())
    name = str(outside) if name == "ABSOLUTE" else name
    edit_manifest(path, edit_entry(0, file=name))
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=r"manifest\.json: shard entry 0: file .* is not a shard name"):
        TeacherCache(path)
    with pytest.raises(ValueError, match=r"manifest\.json: shard entry 0: file .* is not a shard name"):
        writer(path, shard_size=3)
    # the resume refused: the manifest is as it was (not marked complete, nothing appended)
    assert (path / "manifest.json").read_bytes() == before
    assert json.loads(before)["complete"] is complete
    assert outside.read_bytes() == (path / "shard-00000.arrow").read_bytes()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    import _tiny_models as tm

    return tm.save_tiny_gpt2(tmp_path_factory.mktemp("teacher") / "tiny-gpt2")


def capture(*args, **kwargs):
    from kdfast.capture import capture as run

    return run(*args, **kwargs)


DOCS = ["The quick brown fox.", "Sparse targets keep a few ids.", "a b c", "Resume once.", "Last one."]
CAPTURE_KW = dict(k=4, batch_size=2, max_length=16, shard_size=2, progress=False, verbose=False)


def test_capture_resume_refuses_a_manifest_naming_files_outside(tmp_path, teacher_dir):
    out = tmp_path / "cache"
    capture(teacher_dir, DOCS[:3], out, **CAPTURE_KW)
    edit_manifest(out, both(edit_entry(0, file="../../outside/x.arrow"), set_fields(complete=False)))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="is not a shard name of this cache"):
        capture(teacher_dir, DOCS[:3], out, **CAPTURE_KW)
    assert (out / "manifest.json").read_bytes() == before


def test_symbolic_links(tmp_path):
    real = make_cache(tmp_path / "real", close=False)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    # a link among the directories above the cache is fine: open and resume through it
    assert len(TeacherCache(link)) == 7
    with writer(link, shard_size=3) as w:
        assert w.num_sequences == 7
    assert TeacherCache(link).complete
    # a shard that is a link is not, at open nor on resume
    shard = real / "shard-00001.arrow"
    elsewhere = tmp_path / "elsewhere.arrow"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    for opener in (TeacherCache, lambda p: writer(p, shard_size=3)):
        with pytest.raises(ValueError, match=r"shard-00001\.arrow: shard is a symbolic link"):
            opener(link)
    shard.unlink()
    shutil.move(elsewhere, shard)
    # nor is a manifest
    manifest = real / "manifest.json"
    shutil.move(manifest, tmp_path / "m.json")
    manifest.symlink_to(tmp_path / "m.json")
    for opener in (TeacherCache, lambda p: writer(p, shard_size=3)):
        with pytest.raises(ValueError, match=r"manifest\.json: cache manifest is a symbolic link"):
            opener(real)
    assert os.path.islink(manifest)  # the refused writer did not replace it


def test_a_linked_rank_manifest_is_not_merged(tmp_path):
    path = tmp_path / "r"
    for rank in range(2):
        with writer(path, rank=rank, world_size=2) as w:
            for i, (ids, t) in enumerate(sequences(2, seed=rank)):
                w.append(ids, t, seq_id=2 * i + rank)
    rank1 = path / "manifest.rank001.json"
    shutil.move(rank1, tmp_path / "m1.json")
    rank1.symlink_to(tmp_path / "m1.json")
    with pytest.raises(ValueError, match=r"manifest\.rank001\.json: cache manifest is a symbolic link"):
        merge_manifests(path)


# ----------------------------------------------------------------------------- 3. overwrite


def _hold_writer(path, world_size, rank, ready, go):
    """A second process: a writer that is open (one shard written) until ``go`` is set."""
    torch.set_num_threads(1)
    seqs = sequences(5, seed=11)
    w = writer(path, shard_size=2, rank=rank, world_size=world_size)
    for i, (ids, t) in enumerate(seqs[:3]):
        w.append(ids, t, seq_id=i * world_size + rank)
    ready.set()
    if not go.wait(300):
        os._exit(2)
    for i, (ids, t) in enumerate(seqs[3:], start=3):
        w.append(ids, t, seq_id=i * world_size + rank)
    w.close()


def _start_holder(path, world_size=1, rank=0):
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_writer, args=(str(path), world_size, rank, ready, go))
    proc.start()
    assert ready.wait(300), "the writer process did not start"
    return proc, go


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if not p.name.startswith(".lock")}


def test_overwrite_while_another_process_writes_is_refused(tmp_path, teacher_dir):
    path = tmp_path / "c"
    proc, go = _start_holder(path)
    try:
        files = _snapshot(path)
        assert "shard-00000.arrow" in files
        refused = rf"{re.escape(str(path))}: another capture/CacheWriter is writing this cache"
        with pytest.raises(RuntimeError, match=refused):
            writer(path, overwrite=True)
        with pytest.raises(RuntimeError, match=refused):
            clear_cache(path)
        with pytest.raises(RuntimeError, match=refused):
            capture(teacher_dir, DOCS, path, overwrite=True, **CAPTURE_KW)
        assert _snapshot(path) == files  # nothing deleted
    finally:
        go.set()
        proc.join(120)
    assert proc.exitcode == 0  # the first writer closed normally
    cache = TeacherCache(path)
    assert cache.complete and cache.seq_ids.tolist() == list(range(5))
    # once it is closed, the overwrite goes ahead
    capture(teacher_dir, DOCS, path, overwrite=True, **CAPTURE_KW)
    assert TeacherCache(path).seq_ids.tolist() == list(range(len(DOCS)))


def test_clearing_a_multi_rank_cache_waits_for_every_rank(tmp_path):
    path = tmp_path / "c"
    proc, go = _start_holder(path, world_size=2, rank=1)
    try:
        files = _snapshot(path)
        refused = rf"{re.escape(str(path))}: another capture/CacheWriter is writing this cache .*\.lock\.rank001"
        with pytest.raises(RuntimeError, match=refused):
            clear_cache(path)  # what rank 0 of `kdfast capture --overwrite` calls
        with pytest.raises(RuntimeError, match=refused):
            writer(path, overwrite=True)  # a single-process cache would replace every rank's files
        assert _snapshot(path) == files
        # rank 0's own writer may start (and overwrite only its own files) meanwhile
        with writer(path, rank=0, world_size=2, overwrite=True, shard_size=2) as w0:
            for i, (ids, t) in enumerate(sequences(5, seed=12)):
                w0.append(ids, t, seq_id=2 * i)
        assert all(_snapshot(path)[name] == data for name, data in files.items())
    finally:
        go.set()
        proc.join(120)
    assert proc.exitcode == 0
    merge_manifests(path)
    assert TeacherCache(path).seq_ids.tolist() == list(range(10))
    clear_cache(path)
    assert sorted(os.listdir(path)) == [".lock", ".lock.rank000", ".lock.rank001"]


# ----------------------------------------------------------------------------- 4. rewritten under a reader


def _loader(cache):
    return torch.utils.data.DataLoader(cache, batch_size=4, collate_fn=collate, num_workers=1,
                                       multiprocessing_context="fork")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_a_dataloader_worker_refuses_a_cache_rewritten_after_the_open(tmp_path):
    path = make_cache(tmp_path / "c")
    cache = TeacherCache(path)
    assert torch.cat([b["seq_id"] for b in _loader(cache)]).tolist() == list(range(7))  # unchanged: works
    make_cache(path, overwrite=True, seed=1)  # the same names and counts, other targets
    with pytest.raises(ValueError, match=r"shard-00000\.arrow: the cache was rewritten after it was opened"
                                         r"( \(.*\))?; reopen TeacherCache"):
        list(_loader(cache))
    with pytest.raises(ValueError, match="the cache was rewritten after it was opened"):
        pickle.loads(pickle.dumps(cache))[0]  # a spawned worker: the same check
    fresh = TeacherCache(path)
    batches = list(_loader(fresh))
    assert torch.cat([b["seq_id"] for b in batches]).tolist() == list(range(7))
    assert torch.equal(batches[0]["input_ids"][0], fresh[0]["input_ids"])


def test_a_worker_refuses_a_shard_removed_after_the_open(tmp_path):
    path = make_cache(tmp_path / "c")
    clone = pickle.dumps(TeacherCache(path))
    (path / "shard-00002.arrow").unlink()
    with pytest.raises(ValueError, match=r"shard-00002\.arrow: the cache was rewritten after it was opened "
                                         r"\(.*missing"):
        pickle.loads(clone)[0]


# ----------------------------------------------------------------------------- 5. malformed manifests


WRONG = [None, "5", 1.5, [1], {"a": 1}, True, -1]
# values a field may take in the top-k cache below (so not wrong for it)
# (a temperature of the right type but another value is refused too, naming the shard: see above)
VALID = {"num_samples": [None], "rank": [None], "logprob_quantum": [None, 1.5], "teacher_name": ["5"],
         "temperature": [1.5],
         "config": [{"a": 1}], "info": [{"a": 1}], "complete": [True], "has_tail": [True]}
FIELDS = ["format", "format_version", "method", "k", "num_samples", "temperature", "vocab_size", "teacher_name",
          "encoding", "has_tail", "id_bits", "logprob_quantum", "dtypes", "rank", "world_size", "config", "info",
          "complete", "num_sequences", "num_tokens", "shards"]
ENTRY_FIELDS = ["file", "rank", "index", "rows", "tokens", "bytes", "sha256", "min_seq_id", "max_seq_id"]
DELETE = object()


def _cases(fields):
    for key in fields:
        yield key, DELETE
        for value in WRONG:
            if not any(value == v and type(value) is type(v) for v in VALID.get(key, [])):
                yield key, value


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("pristine") / "c")


def _assert_refused(path, key):
    for opener in (TeacherCache, lambda p: writer(p, shard_size=3)):
        with pytest.raises(ValueError) as info:
            opener(path)
        message = str(info.value)
        assert "manifest.json" in message and key in message, message


@pytest.mark.parametrize("key, value", list(_cases(FIELDS)))
def test_a_malformed_manifest_field_is_a_value_error_naming_it(tmp_path, pristine, key, value):
    path = tmp_path / "c"
    shutil.copytree(pristine, path)
    edit_manifest(path, lambda m: m.pop(key) if value is DELETE else m.update({key: value}))
    _assert_refused(path, key)


@pytest.mark.parametrize("key, value", list(_cases(ENTRY_FIELDS)))
def test_a_malformed_shard_entry_is_a_value_error_naming_it(tmp_path, pristine, key, value):
    path = tmp_path / "c"
    shutil.copytree(pristine, path)
    entry = lambda m: m["shards"][1]  # noqa: E731
    edit_manifest(path, lambda m: entry(m).pop(key) if value is DELETE else entry(m).update({key: value}))
    _assert_refused(path, key)


@pytest.mark.parametrize("text", ["[]", '"x"', "null", "{}", '{"format": "kdfast-teacher-cache"}', "{", "\xff"])
def test_a_manifest_that_is_not_an_object_of_the_format(tmp_path, pristine, text):
    path = tmp_path / "c"
    shutil.copytree(pristine, path)
    (path / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(ValueError, match=r"manifest\.json: .*(manifest|format)"):
        TeacherCache(path)
