"""kdfast capture without [B, S, V] logits (issue 12): the targets computed chunk by chunk through
the teacher's head equal those of the materialised logits — top-k ids exactly, log-probs to
float noise, sampled draws exactly — on tiny random Llama (untied, padded head, bfloat16), GPT-2
(tied head) and Granite (a logit scale) teachers, over padded batches and chunks that split
sequences; refused heads (Gemma 2's soft-capping) and forwards that bypass their head take the
materialised path; the head module never produces logits on the chunked path; generate mode and
resume are unchanged."""

import pytest
import torch

pytest.importorskip("pyarrow")
transformers = pytest.importorskip("transformers")

import kdfast  # noqa: E402
import kdfast.sparse  # noqa: E402
from kdfast import tiny  # noqa: E402
from kdfast.cache import TeacherCache  # noqa: E402
from kdfast.capture import capture, scoring  # noqa: E402
from kdfast.capture.teacher import compress_rows  # noqa: E402

import _tiny_models as tm  # noqa: E402

V = 300  # ≥ 256 for the byte-level tokenizer; not a power of two
MAXLEN = 40
KW = dict(max_length=MAXLEN, encoding="raw", progress=False, verbose=False)


def _sharpen(model, factor=6.0):
    with torch.no_grad():  # distributions with real structure (random heads are nearly flat)
        model.get_output_embeddings().weight.mul_(factor)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return _sharpen(tiny.llama(32, V, 0, context=128))


@pytest.fixture(scope="module")
def gpt2():
    model = _sharpen(tiny.gpt2(V, 128, 2, 32, 2, 0))
    assert model.lm_head.weight is model.transformer.wte.weight  # a tied head
    return model


def _gemma2():
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=128, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    return _sharpen(transformers.Gemma2ForCausalLM(cfg))


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(0, 256, (n,), generator=g)
        mask[r, :n] = 1
    return ids, mask


def _targets(model, lengths, method, *, chunked, chunk_bytes=None, vocab=V, offsets=None):
    ids, mask = _batch(lengths)
    offsets = offsets or [100 * r for r in range(len(lengths))]
    scorer = scoring.Scorer(model, vocab, chunked=chunked, chunk_bytes=chunk_bytes)

    def compress(rows, r, start):
        return compress_rows(rows, method, 5, 16, 1.3, 7, offsets[r] + start)

    return scorer, scorer.targets(ids, mask, lengths, compress)


def _assert_same(got, want, method):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        if method == "topk":
            torch.testing.assert_close(a.tail_logprob, b.tail_logprob, rtol=0, atol=1e-5)
        else:
            assert torch.equal(a.weights, b.weights)


# ----------------------------------------------------------------------------- the scorer


@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("lengths", [[17], [40, 23, 1, 9], [33, 33]])
@pytest.mark.parametrize("rows_per_chunk", [1, 7, None])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_chunked_targets_equal_the_materialised_path(name, rows_per_chunk, lengths, method, request):
    model = request.getfixturevalue(name)
    budget = None if rows_per_chunk is None else rows_per_chunk * V * 4
    scorer, got = _targets(model, lengths, method, chunked=True, chunk_bytes=budget)
    ref, want = _targets(model, lengths, method, chunked=False)
    assert scorer.fallback is None and ref.fallback == "chunked=False"
    assert [tuple(t.shape) for t in got] == [(n,) for n in lengths]
    _assert_same(got, want, method)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_padded_head_is_sliced_to_the_vocabulary(method):
    model = tiny.llama(32, V, 1, context=128)
    model.lm_head = torch.nn.Linear(32, V + 20, bias=True)  # a head padded past the vocabulary, with a bias
    _sharpen(model)
    with torch.no_grad():
        model.lm_head.weight[V:] = 0.0
        model.lm_head.bias[V:] = 50.0  # the padding rows would win every top-k if they were kept
    scorer, got = _targets(model, [12, 30], method, chunked=True, chunk_bytes=5 * V * 4)
    _, want = _targets(model, [12, 30], method, chunked=False)
    assert scorer.fallback is None
    _assert_same(got, want, method)
    assert all(int(t.indices.max()) < V for t in got)


def test_bfloat16_teacher_gives_the_models_bfloat16_logits():
    model = _sharpen(tiny.llama(32, V, 2, context=128)).to(torch.bfloat16)
    for method in ("topk", "sample"):
        _, got = _targets(model, [25, 8], method, chunked=True, chunk_bytes=3 * V * 2)
        _, want = _targets(model, [25, 8], method, chunked=False)
        _assert_same(got, want, method)


def test_a_constant_logit_scale_is_applied_after_the_head():
    cfg = transformers.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                     logits_scaling=4.0)
    torch.manual_seed(0)
    model = _sharpen(transformers.GraniteForCausalLM(cfg), 20.0)
    scorer, got = _targets(model, [20, 11], "topk", chunked=True, chunk_bytes=4 * V * 4)
    _, want = _targets(model, [20, 11], "topk", chunked=False)
    assert scorer.fallback is None and scorer.head.scale == 0.25
    _assert_same(got, want, "topk")


def test_soft_capped_head_is_refused_and_materialised():
    model = _gemma2()
    scorer, got = _targets(model, [15, 6], "topk", chunked=True)
    assert scorer.head is None and "final_logit_softcapping" in scorer.fallback
    ids, mask = _batch([15, 6])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert float(logits.abs().max()) <= 5.0  # the model's capped logits are what was compressed
    for r, n in enumerate([15, 6]):
        want = kdfast.compress_topk(logits[r, :n], 5, temperature=1.3)
        assert torch.equal(got[r].indices, want.indices)
        torch.testing.assert_close(got[r].logprobs, want.logprobs, rtol=0, atol=1e-5)


class _BypassingLlama(transformers.LlamaForCausalLM):
    """Computes its logits from the embedding matrix without calling ``lm_head``."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = torch.nn.functional.linear(hidden, self.lm_head.weight) * 0.5
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)


def test_a_forward_that_bypasses_its_head_falls_back_on_the_first_batch(llama):
    model = _BypassingLlama(llama.config).eval()
    model.load_state_dict(llama.state_dict())
    scorer, got = _targets(model, [18, 4], "sample", chunked=True)
    assert scorer.head is None and "does not call its head" in scorer.fallback
    _, want = _targets(model, [18, 4], "sample", chunked=False)
    _assert_same(got, want, "sample")


# ----------------------------------------------------------------------------- capture end to end


def _same_caches(a, b, method):
    a, b = TeacherCache(a), TeacherCache(b)
    assert len(a) == len(b) and a.seq_ids.tolist() == b.seq_ids.tolist()
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
        assert a[i]["prompt_length"] == b[i]["prompt_length"]
        _assert_same([a[i]["targets"]], [b[i]["targets"]], method)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_capture_chunked_equals_capture_materialised(tmp_path, llama, method, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 6 * V * 4)  # 6 rows a chunk: every long document splits
    outputs = []
    for chunked in (True, False):
        out = tmp_path / f"chunked-{chunked}"
        summary = capture(llama, tm.DOCS, out, method=method, k=6, num_samples=12, seed=3, batch_size=4,
                          chunked_head=chunked, **KW)
        assert summary.fallback == (None if chunked else "chunked=False")
        outputs.append(out)
    _same_caches(*outputs, method)


def test_the_head_never_computes_logits_on_the_chunked_path(tmp_path, gpt2):
    widths = []
    hook = gpt2.lm_head.register_forward_hook(lambda module, args, output: widths.append(output.shape[-1]))
    try:
        capture(gpt2, tm.DOCS, tmp_path / "a", k=4, batch_size=3, **KW)
        assert widths and set(widths) == {0}  # called (its input captured), never a row of logits
        widths.clear()
        capture(gpt2, tm.DOCS, tmp_path / "b", k=4, batch_size=3, chunked_head=False, **KW)
        assert widths and set(widths) == {V}
    finally:
        hook.remove()
    _same_caches(tmp_path / "a", tmp_path / "b", "topk")


def test_capture_with_a_refused_head_notes_the_fallback_once(tmp_path, capsys):
    model = _gemma2()
    summary = capture(model, tm.DOCS, tmp_path / "cache", k=4, batch_size=2, max_length=MAXLEN,
                      encoding="raw", progress=False, verbose=True)
    assert "final_logit_softcapping" in summary.fallback
    err = capsys.readouterr().err
    assert err.count("materialising each batch's logits") == 1 and "final_logit_softcapping" in err
    cache = TeacherCache(tmp_path / "cache")
    for i in (0, 1, 3):
        ids = cache[i]["input_ids"]
        with torch.inference_mode():
            logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits[0]
        want = kdfast.compress_topk(logits, 4)
        assert torch.equal(cache[i]["targets"].indices, want.indices)


def test_generate_mode_is_unchanged(tmp_path, llama, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 5 * V * 4)
    kw = dict(mode="generate", k=4, batch_size=3, max_length=16, max_new_tokens=6, limit=5,
              progress=False, verbose=False)
    capture(llama, tm.DOCS, tmp_path / "a", **kw)
    capture(llama, tm.DOCS, tmp_path / "b", chunked_head=False, **kw)
    _same_caches(tmp_path / "a", tmp_path / "b", "topk")
    assert all(TeacherCache(tmp_path / "a")[i]["prompt_length"] > 0 for i in range(5))


def test_resume_after_an_interruption_between_chunks(tmp_path, llama, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 8 * V * 4)
    out = tmp_path / "cache"
    kw = dict(method="sample", num_samples=10, seed=2, batch_size=2, shard_size=2, **KW)
    real = kdfast.sparse.compress_sample
    monkeypatch.setattr(kdfast.sparse, "compress_sample", tm.dying(real, 20))  # between two chunks of a sequence
    with pytest.raises(KeyboardInterrupt):
        capture(llama, tm.DOCS, out, **kw)
    monkeypatch.setattr(kdfast.sparse, "compress_sample", real)
    partial = TeacherCache(out)
    assert 0 < len(partial) < len(tm.DOCS) and not partial.complete
    summary = capture(llama, tm.DOCS, out, **kw)
    assert summary.new_sequences == len(tm.DOCS) - len(partial)
    capture(llama, tm.DOCS, tmp_path / "fresh", **kw)
    _same_caches(out, tmp_path / "fresh", "sample")


def test_capture_benchmark_paths_agree_on_a_tiny_case():
    """benchmarks.capture: both paths store the same targets; the table reports both."""
    from kdfast.benchmarks import capture as bench

    results = [{**spec, **bench.run_case(spec)}
               for spec in ({"path": p, "method": "sample", "batch": 2, "seq": 30, "vocab": V, "hidden": 32, "k": 8}
                            for p in bench.PATHS)]
    assert [r["fallback"] for r in results] == ["chunked=False", None]
    assert results[0]["targets_hash"] == results[1]["targets_hash"]
    assert all(r["tokens"] == 60 and r["logits_bytes"] == 60 * V * 4 for r in results)
    table = bench.format_table(results)
    assert "| sample | 2×30 |" in table and table.rstrip().endswith("✓ |")
