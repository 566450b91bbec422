"""DistillationTrainer's fused path (api.md §4): the models run to their final hidden states,
the heads go to DistillationLoss.fused, and training equals the logits path (fused=False)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from kdfast.integrations import heads  # noqa: E402
from kdfast.integrations.transformers import DistillationTrainer  # noqa: E402
from test_trainer import VOCAB, _args, _cached_targets, _collate, _gpt2, _Seqs  # noqa: E402


def _seqs(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g) for _ in range(n)]


def _train(student, fused, tmp_path, **kw):
    logits_seen = []
    head = student.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: logits_seen.append(o.shape[-1]))
    trainer_kw = dict(kw)
    dataset = trainer_kw.pop("dataset")
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                 **trainer_kw.pop("args", {}))
    trainer = DistillationTrainer(model=student, args=args, train_dataset=dataset, data_collator=_collate,
                                  fused=fused, **trainer_kw)
    trainer.train()
    hook.remove()
    return trainer, logits_seen


def _assert_same_parameters(a, b):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("loss", [{"loss": "forward_kl", "hard_weight": 0.3, "temperature": 2.0},
                                  {"loss": "jsd", "beta": 0.3}])
def test_fused_trainer_equals_the_logits_path_online(tmp_path, loss):
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    base = _gpt2(1, seed=5)  # GPT-2 ties its head to the input embeddings
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    data = _Seqs(_seqs())
    ta, seen_a = _train(a, None, tmp_path / "a", dataset=data, teacher_model=teacher, distill_loss=loss)
    tb, seen_b = _train(b, False, tmp_path / "b", dataset=data, teacher_model=teacher, distill_loss=loss)
    assert ta.fused and not tb.fused
    assert seen_a and set(seen_a) == {0}, "the fused path must not compute the student's logits"
    assert set(seen_b) == {VOCAB}
    _assert_same_parameters(a, b)


def test_fused_trainer_untied_head_with_bias_and_padded_vocab(tmp_path):
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    base = _gpt2(1, seed=6)
    torch.manual_seed(0)
    base.lm_head = torch.nn.Linear(32, VOCAB + 8, bias=True)  # untied, with a bias, 8 padding rows
    base.config.tie_word_embeddings = False
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    data = _Seqs(_seqs(seed=1))
    loss = {"loss": "forward_kl", "hard_weight": 0.2, "vocab_size": VOCAB}
    ta, _ = _train(a, True, tmp_path / "a", dataset=data, teacher_model=teacher, distill_loss=loss)
    _train(b, False, tmp_path / "b", dataset=data, teacher_model=teacher, distill_loss=loss)
    assert ta.fused
    _assert_same_parameters(a, b)
    assert not a.lm_head.bias.grad[VOCAB:].any() if a.lm_head.bias.grad is not None else True


def test_fused_trainer_from_cached_targets(tmp_path):
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    seqs = _seqs(seed=2)
    data = _Seqs(seqs, _cached_targets(teacher, seqs, k=6))
    base = _gpt2(1, seed=7)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ta, seen = _train(a, None, tmp_path / "a", dataset=data)
    _train(b, False, tmp_path / "b", dataset=data)
    assert ta.fused and set(seen) == {0}
    _assert_same_parameters(a, b)


def test_fused_trainer_with_a_logit_scale_is_exact(tmp_path):
    cohere = pytest.importorskip("transformers.models.cohere")
    cfg = transformers.CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, logit_scale=0.3,
                                    max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(3)
    base = cohere.CohereForCausalLM(cfg)
    assert heads.find_head(base).scale == pytest.approx(0.3)
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    data = _Seqs(_seqs(seed=3))
    ta, _ = _train(a, True, tmp_path / "a", dataset=data, teacher_model=teacher)
    _train(b, False, tmp_path / "b", dataset=data, teacher_model=teacher)
    assert ta.fused
    _assert_same_parameters(a, b)


def test_soft_capped_models_refuse_fused_and_default_to_logits(tmp_path):
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                    final_logit_softcapping=30.0, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(4)
    student = transformers.Gemma2ForCausalLM(cfg)
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    reason = heads.find_head(student)
    assert isinstance(reason, str) and "soft-capping" in reason
    with pytest.raises(ValueError, match="fused: .*soft-capping"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, fused=True)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)
    assert not trainer.fused
    with pytest.raises(TypeError, match="fused"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, fused="yes")


def test_unknown_post_head_attributes_are_refused():
    model = _gpt2(1, seed=0)
    model.config.logit_scale = 2.0  # GPT-2 would not apply it: unknown, so no fusing
    assert "unknown transform" in heads.find_head(model)
    model.config.logit_scale = 1.0
    assert isinstance(heads.find_head(model), heads.Head)


def test_fused_trainer_with_activation_checkpointing(tmp_path):
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    base = _gpt2(1, seed=8)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    data = _Seqs(_seqs(seed=4))
    ckpt = {"activation_checkpointing": True}
    ta, _ = _train(a, None, tmp_path / "a", dataset=data, teacher_model=teacher, args=ckpt)
    _train(b, False, tmp_path / "b", dataset=data, teacher_model=teacher, args=ckpt)
    assert ta.fused
    _assert_same_parameters(a, b)


def test_fused_trainer_under_bf16_mixed_precision(tmp_path):
    """Autocast rounds the logits path's materialised logits to bfloat16; the fused head keeps
    float32 logits, so the two agree to bf16 accuracy, not exactly."""
    teacher = _gpt2(2, seed=1, init=0.3).eval()
    base = _gpt2(1, seed=9)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    data = _Seqs(_seqs(seed=5))
    ta, _ = _train(a, None, tmp_path / "a", dataset=data, teacher_model=teacher, args={"bf16": True})
    _train(b, False, tmp_path / "b", dataset=data, teacher_model=teacher, args={"bf16": True})
    assert ta.fused
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=5e-2, atol=5e-3)
