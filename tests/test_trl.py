"""kdfast.integrations.trl against TRL's own GKD loss and trainer: equal values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'kdfast[peers]')")
transformers = pytest.importorskip("transformers")
trl_gkd = pytest.importorskip("trl.experimental.gkd")

from kdfast.integrations import trl as kdtrl  # noqa: E402

V = 29


def _logits(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 5, V, generator=g) * scale
    t = torch.randn(2, 5, V, generator=g) * scale
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, :2] = -100
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_equals_trl(beta, temperature, reduction, with_labels):
    s, t, labels = _logits()
    labels = labels if with_labels else None
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = kdtrl.generalized_jsd_loss(a, t, labels=labels, beta=beta, temperature=temperature, reduction=reduction)
    theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(b, t, labels=labels, beta=beta, temperature=temperature,
                                                     reduction=reduction)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_generalized_jsd_loss_with_num_items_and_none():
    s, t, labels = _logits(seed=1)
    ours = kdtrl.generalized_jsd_loss(s, t, labels=labels, num_items_in_batch=torch.tensor(13))
    theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, num_items_in_batch=torch.tensor(13))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    none = kdtrl.generalized_jsd_loss(s, t, labels=labels, reduction="none")
    assert none.shape == trl_gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, reduction="none").shape
    with pytest.raises(ValueError, match="reduction"):
        kdtrl.generalized_jsd_loss(s, t, reduction="avg")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(V - 1)}
    vocab["<unk>"] = V - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ptok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="t0",
                                                eos_token="t0")
    ptok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return ptok


def _gpt2(seed, init=0.02):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _dataset():
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        p = " ".join(f"t{int(i)}" for i in torch.randint(1, V - 1, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g))
        c = " ".join(f"t{int(i)}" for i in torch.randint(1, V - 1, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g))
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gkd_trainer_trains_like_trls(tmp_path, beta):
    """Off-policy steps (lmbda = 0): the kdfast trainer (fused) gives TRL's parameters."""
    teacher = _gpt2(1, init=0.3).eval()
    base = _gpt2(2)
    results = []
    for name, cls in (("trl", trl_gkd.GKDTrainer), ("kdfast", kdtrl.GKDTrainer)):
        student = copy.deepcopy(base)
        args = trl_gkd.GKDConfig(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], max_steps=3,
                                 per_device_train_batch_size=4, lmbda=0.0, beta=beta, learning_rate=0.5,
                                 optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                                 seed=0, disable_tqdm=True, save_strategy="no", max_new_tokens=4,
                                 activation_checkpointing=False, bf16=False)
        trainer = cls(model=student, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=_dataset(),
                      processing_class=_tokenizer())
        trainer.train()
        results.append(student)
    for x, y in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
