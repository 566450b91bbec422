"""kdfast.integrations.transformers.DistillationTrainer on a tiny GPT-2, on the CPU.

The trainer's loss and update must equal a hand-written loop's on the same data, also under
gradient accumulation with micro-batches of unequal token counts (the `num_items_in_batch`
normalisation), for a live teacher (dense loss) and for cached sparse targets.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import kdfast  # noqa: E402
from kdfast.integrations.transformers import DistillationTrainer  # noqa: E402

VOCAB = 48
LENGTHS = (12, 5, 9, 3)  # unequal, so micro-batches hold different numbers of tokens


def _gpt2(n_layer, seed, init=0.02):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def teacher():
    return _gpt2(2, seed=1, init=0.3).eval()  # peaked distributions


@pytest.fixture(scope="module")
def sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


class _Seqs(torch.utils.data.Dataset):
    """Items in the Hugging Face convention (labels == input_ids), optionally with cached targets."""

    def __init__(self, seqs, targets=None):
        self.seqs, self.targets = seqs, targets

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        item = {"input_ids": self.seqs[i]}
        if self.targets is not None:
            item["targets"] = self.targets[i]
        return item


def _collate(items):
    """Right-pad; labels in the HF convention, or (with targets) already shifted like
    kdfast.cache.collate: labels[t] = input_ids[t + 1], -100 at padding and at the end."""
    s = max(len(it["input_ids"]) for it in items)
    b = len(items)
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    labels = torch.full((b, s), -100, dtype=torch.long)
    offline = "targets" in items[0]
    if offline:
        k = items[0]["targets"].k
        tid = torch.full((b, s, k), -1, dtype=torch.long)
        tlp = torch.full((b, s, k), float("-inf"))
        ttail = torch.zeros(b, s)
    for i, it in enumerate(items):
        x = it["input_ids"]
        n = len(x)
        ids[i, :n], mask[i, :n] = x, 1
        if offline:
            labels[i, : n - 1] = x[1:]
            t = it["targets"]
            tid[i, :n], tlp[i, :n], ttail[i, :n] = t.indices, t.logprobs, t.tail_logprob
        else:
            labels[i, :n] = x
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if offline:
        batch["targets"] = kdfast.SparseTargets(indices=tid, logprobs=tlp, tail_logprob=ttail,
                                                temperature=items[0]["targets"].temperature)
    return batch


def _cached_targets(teacher, seqs, k=8):
    with torch.no_grad():
        return [kdfast.compress_topk(teacher(x[None]).logits[0], k) for x in seqs]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
        gradient_accumulation_steps=1, max_steps=2, learning_rate=0.5, lr_scheduler_type="constant", optim="sgd",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no",
        seed=0, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def _train(tmp_path, student, dataset, collator=_collate, **kw):
    rec = _Recorder()
    trainer_kw = {k: kw.pop(k) for k in ("teacher_model", "distill_loss") if k in kw}
    trainer = DistillationTrainer(
        model=student, args=_args(tmp_path, **kw), train_dataset=dataset, data_collator=collator,
        callbacks=[rec], **trainer_kw,
    )
    trainer.train()
    return trainer, rec.logs


def _manual(student, teacher, seqs, loss_fn, steps, lr=0.5, targets=None):
    """The same training by hand: the whole dataset as one batch per optimizer step (SGD, so
    that the parameters after the steps compare the gradients too)."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    batch = _collate([{"input_ids": x} for x in seqs])
    aligned = torch.cat([batch["labels"][:, 1:], torch.full((len(seqs), 1), -100)], 1)
    if targets is not None:
        tb = _collate([{"input_ids": x, "targets": t} for x, t in zip(seqs, targets)])
        teacher_obj, aligned = tb["targets"], tb["labels"]
    losses = []
    for _ in range(steps):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if targets is None:
            with torch.no_grad():
                teacher_obj = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, soft, hard = loss_fn(logits, teacher_obj, aligned, return_parts=True)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append((total.item(), soft.item(), hard.item()))
    return losses


def _assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("ga", [1, 2])
def test_online_step_equals_manual_loop(tmp_path, teacher, sequences, ga):
    student = _gpt2(1, seed=2)
    reference = copy.deepcopy(student)
    loss_fn = kdfast.DistillationLoss("jsd", soft_weight=0.7, hard_weight=0.3, beta=0.5, temperature=2.0)
    trainer, logs = _train(tmp_path, student, _Seqs(sequences), teacher_model=teacher, distill_loss=loss_fn,
                           per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga)
    manual = _manual(reference, teacher, sequences, loss_fn, steps=2)
    assert len(logs) == 2
    for log, (total, soft, hard) in zip(logs, manual):
        assert log["loss"] == pytest.approx(total, rel=1e-5)
        assert log["soft_loss"] == pytest.approx(soft, rel=1e-5)
        assert log["hard_loss"] == pytest.approx(hard, rel=1e-5)
    _assert_same_params(trainer.model, reference)


@pytest.mark.parametrize("ga", [1, 2])
def test_offline_step_equals_manual_loop(tmp_path, teacher, sequences, ga):
    targets = _cached_targets(teacher, sequences)
    student = _gpt2(1, seed=3)
    reference = copy.deepcopy(student)
    loss_fn = kdfast.DistillationLoss(soft_weight=0.9, hard_weight=0.1)
    trainer, logs = _train(tmp_path, student, _Seqs(sequences, targets), distill_loss=loss_fn,
                           per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga,
                           remove_unused_columns=True)  # the trainer keeps `targets` itself
    manual = _manual(reference, teacher, sequences, loss_fn, steps=2, targets=targets)
    for log, (total, soft, hard) in zip(logs, manual):
        assert log["loss"] == pytest.approx(total, rel=1e-5)
        assert log["soft_loss"] == pytest.approx(soft, rel=1e-5)
        assert log["hard_loss"] == pytest.approx(hard, rel=1e-5)
    _assert_same_params(trainer.model, reference)


def test_teacher_cache_with_default_collator(tmp_path, teacher, sequences):
    """A kdfast.cache.TeacherCache as the training set; kdfast.cache.collate picked by default."""
    cache = pytest.importorskip("kdfast.cache")
    targets = _cached_targets(teacher, sequences, k=6)
    with cache.CacheWriter(tmp_path / "cache", method="topk", k=6, temperature=1.0, vocab_size=VOCAB,
                           shard_size=3) as writer:
        for x, t in zip(sequences, targets):
            writer.append(x, t)
    dataset = cache.TeacherCache(tmp_path / "cache")
    student = _gpt2(1, seed=6)
    reference = copy.deepcopy(student)
    loss_fn = kdfast.DistillationLoss(soft_weight=0.5, hard_weight=0.5, temperature=2.0)
    trainer, logs = _train(tmp_path / "out", student, dataset, collator=None, distill_loss=loss_fn,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           remove_unused_columns=True)
    assert isinstance(trainer.data_collator, cache.Collator)
    # the manual loop on the decoded cache (packed log-probs are quantised, the same for both)
    batch = cache.collate([dataset[i] for i in range(len(dataset))])
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for log in logs:
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch["targets"], batch["labels"])
        assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _assert_same_params(trainer.model, reference)


def test_loss_falls_and_parts_are_logged(tmp_path, teacher, sequences):
    student = _gpt2(1, seed=4)
    trainer, logs = _train(tmp_path, student, _Seqs(sequences * 2), teacher_model=teacher,
                           distill_loss={"loss": "forward_kl", "hard_weight": 0.5, "soft_weight": 0.5},
                           max_steps=25, logging_steps=5, per_device_train_batch_size=4, learning_rate=3e-3,
                           optim="adamw_torch")
    assert len(logs) == 5
    for log in logs:
        assert log["loss"] == pytest.approx(0.5 * log["soft_loss"] + 0.5 * log["hard_loss"], rel=1e-4)
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], [log["loss"] for log in logs]
    assert logs[-1]["soft_loss"] < logs[0]["soft_loss"]
    metrics = trainer.evaluate(eval_dataset=_Seqs(sequences))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_errors(tmp_path, teacher, sequences):
    student = _gpt2(1, seed=5)
    with pytest.raises(ValueError, match="no teacher for this batch"):
        _train(tmp_path, student, _Seqs(sequences))
    with pytest.raises(ValueError, match="compute_loss_func"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                            compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="reduction='mean'"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                            distill_loss={"reduction": "sum"})
    with pytest.raises(TypeError, match="distill_loss"):
        DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, distill_loss=3)


def test_label_alignment_conventions(tmp_path, teacher):
    trainer = DistillationTrainer(model=_gpt2(1, seed=7), args=_args(tmp_path), teacher_model=teacher)
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    aligned = [[6, 7, -100, -100]]
    # Hugging Face convention (labels == input_ids, the model shifts): shifted here
    hf = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([[5, 6, 7, -100]])}
    assert trainer._aligned_labels(hf).tolist() == aligned
    # no labels: the input_ids, padding masked
    assert trainer._aligned_labels({"input_ids": ids, "attention_mask": mask}).tolist() == aligned
    # kdfast.cache.collate batches (with targets) and shift_labels are already aligned
    assert trainer._aligned_labels({"input_ids": ids, "labels": torch.tensor(aligned), "targets": None,
                                    "shift_labels": torch.tensor(aligned)}).tolist() == aligned
    assert trainer._aligned_labels({"input_ids": ids, "labels": torch.tensor(aligned),
                                    "targets": object()}).tolist() == aligned
    # the explicit switch wins
    trainer.labels_shifted = True
    assert trainer._aligned_labels(hf).tolist() == [[5, 6, 7, -100]]
    # num_items_in_batch counts the aligned labels of the whole window
    trainer.labels_shifted = None
    n = trainer._get_num_items_in_batch([hf, {"input_ids": ids, "attention_mask": mask}], torch.device("cpu"))
    assert int(n) == 4


def test_taid_schedule_advances_each_step_and_resumes_from_checkpoints(tmp_path, teacher, sequences):
    """loss="taid": the trainer updates the schedule once per optimizer step with that step's
    distillation loss, writes it into each checkpoint, and restores it on resume."""
    from kdfast.integrations.transformers import TAID_STATE_FILE

    def run(out, steps, resume=None):
        sched = kdfast.TAIDSchedule(t_start=0.2, t_end=0.9, alpha=0.2, beta=0.5)
        trainer = DistillationTrainer(
            model=_gpt2(1, seed=3), args=_args(out, max_steps=steps, save_strategy="steps", save_steps=2,
                                                per_device_train_batch_size=2, gradient_accumulation_steps=2),
            train_dataset=_Seqs(sequences * 4), data_collator=_collate, teacher_model=teacher,
            distill_loss=kdfast.DistillationLoss("taid", t=sched, temperature=2.0),
        )
        seen = []
        real = sched.update
        sched.update = lambda loss, progress: seen.append((float(loss), progress)) or real(loss, progress)
        trainer.train(resume_from_checkpoint=resume)
        return sched, seen

    sched, seen = run(tmp_path / "a", 4)
    assert [p for _, p in seen] == [0.25, 0.5, 0.75, 1.0]
    assert all(math.isfinite(x) and x > 0 for x, _ in seen)
    assert float(sched.t) == 0.9  # the floor reaches t_end at progress 1
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / TAID_STATE_FILE).read_text())
    assert 0.2 < saved["t"] < 0.9 and saved["prev_loss"] == pytest.approx(seen[1][0])

    resumed, seen_after = run(tmp_path / "a", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert [p for _, p in seen_after] == [0.75, 1.0]
    assert resumed.state_dict() == pytest.approx(sched.state_dict())
