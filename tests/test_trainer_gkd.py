"""On-policy (lmbda) and sequence-level (seq_kd) distillation in DistillationTrainer (api.md §4):
the generated tokens are exactly what the loss covers, the prompt is masked, runs are
reproducible for a seed, and the loss falls."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from kdfast.integrations import gkd  # noqa: E402
from kdfast.integrations.transformers import DistillationTrainer  # noqa: E402
from test_trainer import VOCAB, _args, _gpt2  # noqa: E402

EOS = 0


class _Prompts(torch.utils.data.Dataset):
    """Prompt + reference completion, with the prompt's length."""

    def __init__(self, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            p = int(torch.randint(2, 6, (1,), generator=g))
            c = int(torch.randint(1, 5, (1,), generator=g))
            self.items.append({"input_ids": torch.randint(1, VOCAB, (p + c,), generator=g), "prompt_length": p})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(items):
    s = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), s), EOS, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], mask[i, :n] = it["input_ids"], 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_length": torch.tensor([it["prompt_length"] for it in items])}


def _trainer(tmp_path, student, teacher, **kw):
    args = _args(tmp_path, max_steps=kw.pop("steps", 3), per_device_train_batch_size=4,
                 learning_rate=kw.pop("lr", 0.5))
    kw.setdefault("max_new_tokens", 6)
    data = _Prompts(n=kw.pop("items", 8))
    return DistillationTrainer(model=student, args=args, train_dataset=data, data_collator=_collate,
                               teacher_model=teacher, **kw)


@pytest.fixture(scope="module")
def teacher():
    return _gpt2(2, seed=1, init=0.3).eval()


def test_complete_labels_exactly_the_generated_tokens(teacher):
    batch = _collate([_Prompts()[i] for i in range(4)])
    torch.manual_seed(0)
    out = gkd.complete(teacher, batch, max_new_tokens=5, generation_kwargs=None, pad_id=EOS, eos_id=EOS,
                       ignore_index=-100)
    plen = batch["prompt_length"].tolist()
    for i, p in enumerate(plen):
        ids, mask, lab = out["input_ids"][i], out["attention_mask"][i], out["shift_labels"][i]
        n = int(mask.sum())
        assert torch.equal(ids[:p], batch["input_ids"][i, :p]), "the prompt is kept"
        new = ids[p:n]
        assert 1 <= len(new) <= 5
        assert (new[:-1] != EOS).all(), "generation stops at the first end-of-sequence token"
        labelled = (lab != -100).nonzero().squeeze(1)
        assert labelled.tolist() == list(range(p - 1, n - 1)), "labels sit on the positions before each new token"
        assert torch.equal(lab[labelled], new)


def test_mask_prompts_and_prompt_lengths():
    ids = torch.arange(12).reshape(2, 6)
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
             "prompt_length": torch.tensor([2, 3])}
    labels = torch.arange(100, 112).reshape(2, 6)
    masked = gkd.mask_prompts(labels, batch, -100)
    assert masked[0].tolist() == [-100, 101, 102, 103, 104, 105]
    assert masked[1].tolist() == [-100, -100, 108, 109, 110, 111]
    cm = {"input_ids": ids, "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]])}
    assert gkd.prompt_lengths(cm).tolist() == [3, 1]
    with pytest.raises(ValueError, match="prompt_length"):
        gkd.prompt_lengths({"input_ids": ids, "prompt_length": torch.tensor([1, 2, 3])})


@pytest.mark.parametrize("mode", [dict(lmbda=1.0), dict(seq_kd=True)])
def test_the_loss_covers_the_generated_tokens_only(tmp_path, teacher, mode, monkeypatch):
    seen = []
    real = gkd.complete

    def spy(model, batch, **kw):
        out = real(model, batch, **kw)
        seen.append((model, dict(out)))
        return out

    monkeypatch.setattr(gkd, "complete", spy)
    student = _gpt2(1, seed=5)
    trainer = _trainer(tmp_path, student, teacher, **mode)
    captured = []
    orig = trainer.distill_loss.fused

    def record(hidden, weight, teacher_, labels, **kw):
        captured.append(labels.clone())
        return orig(hidden, weight, teacher_, labels, **kw)

    trainer.distill_loss.fused = record
    trainer.train()
    assert len(seen) == 3 and len(captured) == 3
    want_model = teacher if mode.get("seq_kd") else student
    assert all(m is want_model for m, _ in seen)
    for (_, out), labels in zip(seen, captured):
        assert torch.equal(labels, out["shift_labels"])


def test_on_policy_runs_are_reproducible_for_a_seed(tmp_path, teacher):
    def run(out):
        student = _gpt2(1, seed=5)
        _trainer(out, student, teacher, lmbda=0.5).train()
        return student

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_sequence_level_kd_loss_falls(tmp_path, teacher):
    student = _gpt2(1, seed=6)
    # One batch (4 items), completed greedily: the same target sequences every step.
    trainer = _trainer(tmp_path, student, teacher, seq_kd=True, steps=10, lr=0.5, items=4,
                       generation_kwargs={"do_sample": False})
    trainer.train()
    losses = [h["soft_loss"] for h in trainer.state.log_history if "soft_loss" in h]
    assert len(losses) == 10
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_gkd_argument_errors(tmp_path, teacher):
    student = _gpt2(1, seed=5)
    with pytest.raises(ValueError, match="lmbda"):
        _trainer(tmp_path, student, teacher, lmbda=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _trainer(tmp_path, student, teacher, lmbda=0.5, max_new_tokens=0)
    with pytest.raises(TypeError, match="generation_kwargs"):
        _trainer(tmp_path, student, teacher, seq_kd=True, generation_kwargs=[1])
    with pytest.raises(ValueError, match="teacher_model"):
        DistillationTrainer(model=copy.deepcopy(student), args=_args(tmp_path), train_dataset=_Prompts(),
                            data_collator=_collate, lmbda=0.5)
