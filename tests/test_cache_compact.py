"""Cache format 2, the compact encoding: sampled targets as exact ids and counts and the exact
loss, top-k log-probs within 2^-8 nat, bytes per token, damaged records, version-1 caches."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")

import kdfast  # noqa: E402
from kdfast import _native  # noqa: E402
from kdfast.cache import CacheWriter, Collator, TeacherCache, decode_record  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
TOPK_ERROR = 2.0 ** -8
NEG_INF = float("-inf")


def logits_of(s, v, *, seed, scale=4.0, mask_half=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, v, generator=g) * scale
    if mask_half:
        x[:, : v // 2] = NEG_INF
    return x


def write(path, method, seqs, v, **kw):
    kw.setdefault("k" if method == "topk" else "num_samples", 8 if method == "topk" else 50)
    with CacheWriter(path, method=method, temperature=kw.pop("temperature", 1.0), vocab_size=v, **kw) as w:
        for ids, t in seqs:
            w.append(ids, t)
    return TeacherCache(path)


def by_id(ids, vals):
    """Per row, the (id, value) pairs of the used slots, in id order."""
    out = []
    for r in range(ids.shape[0]):
        used = ids[r] >= 0
        order = torch.argsort(ids[r][used])
        out.append(list(zip(ids[r][used][order].tolist(), vals[r][used][order].tolist())))
    return out


def sampled_seqs(n, v, num_samples, *, temperature=1.0, seed=0):
    seqs = []
    for i in range(n):
        x = logits_of(3 + 5 * i, v, seed=seed + i, mask_half=i % 2 == 1)
        t = kdfast.compress_sample(x, num_samples, temperature=temperature, seed=3, row_offset=1000 * i)
        seqs.append((torch.randint(0, v, (x.shape[0],)), t, x))
    return seqs


# ----------------------------------------------------------------------------- sampled


@pytest.mark.parametrize("v,num_samples", [(2, 1), (300, 20), (32000, 50), (128256, 50), (70000, 200)])
def test_sampled_ids_and_counts_are_exact(tmp_path, v, num_samples):
    seqs = sampled_seqs(4, v, num_samples)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v, num_samples=num_samples)
    assert cache.manifest["encoding"] == "compact" and cache.manifest["format_version"] == 2
    for n, (ids, t, _) in enumerate(seqs):
        got = cache[n]["targets"]
        assert got.method == "sample" and tuple(got.shape) == tuple(t.shape)
        assert by_id(got.indices, got.weights) == by_id(t.indices, t.weights)
        assert torch.equal(cache[n]["input_ids"], ids)
        # every used slot holds the position's Σ w log p, within 2^-17 nat
        want = torch.where(t.indices >= 0, t.weights.double() * t.logprobs.double(), 0.0).sum(-1)
        have = torch.where(got.indices >= 0, got.weights.double() * got.logprobs.double(), 0.0).sum(-1)
        assert (want - have).abs().max().item() <= 2.0 ** -17 + 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
def test_sampled_loss_and_gradient_are_those_of_the_stored_targets(tmp_path, temperature):
    v = 1000
    seqs = sampled_seqs(3, v, 50, temperature=temperature)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v, temperature=temperature)
    for n, (_, t, x) in enumerate(seqs):
        student = (logits_of(x.shape[0], v, seed=99 + n) * 3).requires_grad_(True)
        labels = torch.zeros(x.shape[0], dtype=torch.long)
        labels[::3] = -100
        losses, grads = [], []
        for targets in (t, cache[n]["targets"]):
            student.grad = None
            loss = kdfast.sparse_kl(student, targets, labels=labels, reduction="sum")
            loss.backward()
            losses.append(loss.item())
            grads.append(student.grad.clone())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=2.0 ** -17 * x.shape[0] + 1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_sampled_weights_must_be_whole_draws(tmp_path):
    v = 50
    t = kdfast.SparseTargets(indices=torch.tensor([[1, 2, -1]]), logprobs=torch.tensor([[-1.0, -2.0, NEG_INF]]),
                             weights=torch.tensor([[0.5, 0.25, 0.0]]), method="sample")
    with CacheWriter(tmp_path / "c", method="sample", temperature=1.0, vocab_size=v, num_samples=4) as w:
        with pytest.raises(ValueError, match="targets.weights"):
            w.append(torch.tensor([3]), t)  # 3 of 4 draws
        bad_lp = kdfast.SparseTargets(indices=torch.tensor([[1, 2]]), logprobs=torch.tensor([[NEG_INF, -2.0]]),
                                      weights=torch.tensor([[0.5, 0.5]]), method="sample")
        with pytest.raises(ValueError, match="targets.logprobs"):
            w.append(torch.tensor([3]), bad_lp)
        dup = kdfast.SparseTargets(indices=torch.tensor([[7, 7, 2]]), logprobs=torch.tensor([[-1.0, -1.0, -3.0]]),
                                   weights=torch.tensor([[0.25, 0.5, 0.25]]), method="sample")
        w.append(torch.tensor([3]), dup)  # the same id twice: one slot with both counts
    got = TeacherCache(tmp_path / "c")[0]["targets"]
    assert by_id(got.indices, got.weights) == [[(2, 0.25), (7, 0.75)]]


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("v,k", [(1, 1), (5, 8), (300, 8), (128256, 128)])
@pytest.mark.parametrize("temperature", [0.05, 2.0])
def test_topk_within_the_bound(tmp_path, v, k, temperature):
    seqs = []
    for i in range(4):
        x = logits_of(2 + 3 * i, v, seed=i, scale=20.0 if i == 3 else 4.0, mask_half=i == 1 and v > 1)
        seqs.append((torch.randint(0, v, (x.shape[0],)), kdfast.compress_topk(x, k, temperature=temperature)))
    cache = write(tmp_path / "c", "topk", seqs, v, k=k, temperature=temperature)
    for n, (_, t) in enumerate(seqs):
        got = cache[n]["targets"]
        assert got.k <= t.k
        assert torch.equal(got.indices, t.indices[:, :got.k])  # rank order, as compressed
        assert bool((t.indices[:, got.k:] == -1).all())
        lp, want = got.logprobs, t.logprobs[:, :got.k]
        assert torch.equal(torch.isinf(lp), torch.isinf(want))
        fin = torch.isfinite(want)
        assert (lp[fin] - want[fin]).abs().max().item() <= TOPK_ERROR
        tail, wtail = got.tail_logprob, t.tail_logprob
        assert torch.equal(torch.isinf(tail), torch.isinf(wtail))
        fin = torch.isfinite(wtail)
        assert (tail[fin] - wtail[fin]).abs().max().item() <= TOPK_ERROR if bool(fin.any()) else True


def test_topk_slots_in_any_order_are_stored_by_rank(tmp_path):
    ids = torch.tensor([[4, 9, 1, -1]])
    lp = torch.tensor([[-3.0, -0.5, -1.25, NEG_INF]])
    t = kdfast.SparseTargets(indices=ids, logprobs=lp, tail_logprob=torch.tensor([-2.0]))
    got = write(tmp_path / "c", "topk", [(torch.tensor([0]), t)], 10, k=4)[0]["targets"]
    assert got.indices.tolist() == [[9, 1, 4]] and got.logprobs.tolist() == [[-0.5, -1.25, -3.0]]


# ----------------------------------------------------------------------------- size, loaders


def test_compact_is_smaller(tmp_path):
    v = 32000
    x = logits_of(256, v, seed=0)
    sizes = {}
    for enc in ("compact", "packed"):
        for method in ("sample", "topk"):
            t = kdfast.compress_sample(x, 50, seed=1) if method == "sample" else kdfast.compress_topk(x, 50)
            kw = {"num_samples": 50} if method == "sample" else {"k": 50}
            cache = write(tmp_path / f"{enc}-{method}", method, [(torch.zeros(256, dtype=torch.long), t)], v,
                          encoding=enc, **kw)
            sizes[enc, method] = sum(s["bytes"] for s in cache.manifest["shards"])
    assert sizes["compact", "sample"] < 0.25 * sizes["packed", "sample"]
    assert sizes["compact", "topk"] < 0.8 * sizes["packed", "topk"]


def test_collate_and_worker_loader(tmp_path):
    v = 500
    seqs = sampled_seqs(6, v, 50)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v)
    loader = torch.utils.data.DataLoader(cache, batch_size=3, num_workers=1, collate_fn=Collator())
    seen = 0
    for batch in loader:
        for r, sid in enumerate(batch["seq_id"].tolist()):
            _, t, _ = seqs[sid]
            n = t.shape[0]
            got = batch["targets"]
            assert by_id(got.indices[r, :n], got.weights[r, :n]) == by_id(t.indices, t.weights)
            seen += 1
    assert seen == 6


def test_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    v = 300
    seqs = sampled_seqs(3, v, 20)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v, num_samples=20)
    ds = datasets.Dataset.from_file(cache.shard_files[0])
    for n, record in enumerate(ds):
        item = decode_record(record, cache.manifest)
        assert by_id(item["targets"].indices, item["targets"].weights) == by_id(seqs[n][1].indices, seqs[n][1].weights)


# ----------------------------------------------------------------------------- damage


def _record(method, v=300):
    if method == "sample":
        t = kdfast.compress_sample(logits_of(9, v, seed=5), 20, seed=1)
        codec = _native.compact_codec("sample", v, False, 20)
        args = (t.indices, t.logprobs, t.weights, None)
    else:
        t = kdfast.compress_topk(logits_of(9, v, seed=5), 8)
        codec = _native.compact_codec("topk", v, True, None)
        args = (t.indices, t.logprobs, None, t.tail_logprob)
    data, k_row = _native.compact_encode(codec, *args)
    return codec, data, k_row


@pytest.mark.parametrize("method", ["sample", "topk"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_damaged_records_are_value_errors(method, data):
    codec, record, k_row = _record(method)
    buf = bytearray(record)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "rows"]))
    rows = 9
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) * 8 - 1))
            buf[i // 8] ^= 1 << (i % 8)
    elif how == "cut":
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    elif how == "extend":
        buf += bytes(data.draw(st.binary(min_size=1, max_size=8)))
    else:
        rows = data.draw(st.sampled_from([0, 1, 8, 10, 100]))
    tensor = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
    try:
        ids, lp, w, tail = _native.compact_decode(codec, tensor, rows, k_row, method == "sample", method == "topk")
    except ValueError as exc:
        assert "record" in str(exc)
        return
    # a damaged stream that still parses: every output stays in its domain
    assert bool(((ids >= -1) & (ids < 300)).all())
    assert not bool(torch.isnan(lp).any())
    if w is not None:
        assert bool(((w >= 0) & (w <= 1)).all())


def test_damaged_shard_names_the_sequence(tmp_path):
    v = 300
    seqs = sampled_seqs(2, v, 20)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v, num_samples=20)
    path = cache.shard_files[0]
    table = pa.ipc.open_stream(pa.OSFile(path)).read_all()
    rec = table.column("targets")[1].as_py()
    record = {name: table.column(name)[1].as_py() for name in table.column_names}
    record["targets"] = rec[:-1]
    with pytest.raises(ValueError, match="sequence 1.*corrupt"):
        decode_record(record, cache.manifest)


# ----------------------------------------------------------------------------- versions


def v1_sequences(method):
    """The sequences tests/data/cache_v1_* were written from (by kdfast with format version 1)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for name in ("topk_packed", "sample_packed", "topk_raw"):
        for i in range(5):
            s = int(torch.randint(1, 7, (1,), generator=g))
            x = torch.randn(s, 300, generator=g) * 4
            t = kdfast.compress_topk(x, 8, temperature=2.0) if name.startswith("topk") else \
                kdfast.compress_sample(x, 20, temperature=2.0, seed=7, row_offset=100 * i)
            ids = torch.randint(0, 300, (s,), generator=g)
            if name == method:
                out.append((ids, t))
    return out


@pytest.mark.parametrize("name", ["topk_packed", "sample_packed", "topk_raw"])
def test_version_1_caches_still_open(tmp_path, name):
    path = tmp_path / "c"
    shutil.copytree(os.path.join(DATA, f"cache_v1_{name}"), path)
    cache = TeacherCache(path)
    assert cache.manifest["format_version"] == 1 and len(cache) == 5
    for n, (ids, t) in enumerate(v1_sequences(name)):
        item = cache[n]
        got = item["targets"]
        assert torch.equal(item["input_ids"], ids)
        assert torch.equal(got.indices, t.indices[:, :got.k])
        fin = torch.isfinite(t.logprobs[:, :got.k])
        # Raw records hold float32 log-probs exactly; a recomputation may differ from the one
        # they were written from by float32 rounding (1 ulp: the tail's summation order).
        err = 0.0 if name.endswith("raw") else 2.0 ** -12
        want = t.logprobs[:, :got.k][fin]
        assert ((got.logprobs[fin] - want).abs() <= err + 1e-7 + 2.0 ** -23 * want.abs()).all()
    with pytest.raises(ValueError, match="format_version"):
        CacheWriter(path, method=cache.manifest["method"], temperature=2.0, vocab_size=300,
                    encoding=cache.manifest["encoding"],
                    **({"k": 8} if name.startswith("topk") else {"num_samples": 20}))


def test_unknown_versions_are_refused(tmp_path):
    path = tmp_path / "c"
    shutil.copytree(os.path.join(DATA, "cache_v1_topk_packed"), path)
    manifest = json.loads((path / "manifest.json").read_text())
    for version, match in ((3, "version .*3 is not supported"), (True, "not supported")):
        (path / "manifest.json").write_text(json.dumps(dict(manifest, format_version=version)))
        with pytest.raises(ValueError, match=match):
            TeacherCache(path)
    (path / "manifest.json").write_text(json.dumps(dict(manifest, encoding="compact")))
    with pytest.raises(ValueError, match="compact.*version 2"):
        TeacherCache(path)


def test_bound_is_stated_in_the_manifest(tmp_path):
    t = kdfast.compress_topk(logits_of(3, 40, seed=0), 4)
    cache = write(tmp_path / "c", "topk", [(torch.zeros(3, dtype=torch.long), t)], 40, k=4)
    assert cache.manifest["logprob_quantum"] == 2.0 ** -7
    assert math.isclose(2 * TOPK_ERROR, cache.manifest["logprob_quantum"])


@pytest.mark.parametrize("field,value", [("teacher_name", "another-teacher"), ("world_size", 2)])
def test_version_2_binds_the_teacher_and_the_ranks_into_the_shards(tmp_path, field, value):
    t = kdfast.compress_topk(logits_of(3, 40, seed=0), 4)
    path = tmp_path / "c"
    write(path, "topk", [(torch.zeros(3, dtype=torch.long), t)], 40, k=4, teacher_name="teacher")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(dict(manifest, **{field: value})))
    with pytest.raises(ValueError, match=field):
        TeacherCache(path)


def _same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "targets":
            for field in ("indices", "logprobs", "weights", "tail_logprob"):
                x, y = getattr(a[key], field), getattr(b[key], field)
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), field
            assert (a[key].method, a[key].temperature) == (b[key].method, b[key].temperature)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", ["sample", "topk"])
@pytest.mark.parametrize("response_only", [False, True])
def test_one_call_batches_equal_item_by_item_batches(tmp_path, method, response_only):
    v = 70000 if method == "topk" else 300  # int32 and uint16 input ids
    seqs = []
    for i in range(7):
        x = logits_of(1 + 4 * i, v, seed=i, mask_half=i == 2)
        t = kdfast.compress_sample(x, 20, seed=3, row_offset=100 * i) if method == "sample" else \
            kdfast.compress_topk(x, 6)
        seqs.append((torch.randint(0, v, (x.shape[0],)), t))
    kw = {"num_samples": 20} if method == "sample" else {"k": 6}
    with CacheWriter(tmp_path / "c", method=method, temperature=1.0, vocab_size=v, shard_size=3, **kw) as w:
        for n, (ids, t) in enumerate(seqs):
            w.append(ids, t, prompt_length=n % 3)
    cache = TeacherCache(tmp_path / "c")
    col = Collator(pad_id=5, response_only=response_only)
    for idx in ([0], [6, 1, 3], [2, 5, 4, 0, 1]):
        fast = cache.__getitems__(idx)
        assert len(fast) == len(idx) and fast.compact_rows() is not None
        _same_batches(col(fast), col([cache[i] for i in idx]))
        assert fast[1 if len(idx) > 1 else 0]["seq_id"] == idx[1 if len(idx) > 1 else 0]


def test_one_call_batch_names_a_damaged_record(tmp_path):
    v = 300
    seqs = sampled_seqs(3, v, 20)
    cache = write(tmp_path / "c", "sample", [(i, t) for i, t, _ in seqs], v, num_samples=20)
    batch = cache.__getitems__([0, 1, 2])
    rows = batch.compact_rows()
    rows.rows[1]["record"] = np.asarray(rows.rows[1]["record"])[:-2]
    b, s, k = 3, max(len(r["input_ids"]) for r in rows.rows), max(r["k"] for r in rows.rows)
    out = [torch.empty(b, s, k, dtype=torch.int64), torch.empty(b, s, k), torch.empty(b, s, k), None]
    with pytest.raises(ValueError, match="sequence 1.*corrupt"):
        rows.decode_into(s, k, *out)
