"""The models of a ``kdfast demo`` run: the teacher (trained, or loaded from ``--teacher-dir``)
and the four students, all small GPT-2s of :mod:`kdfast.tiny`."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from kdfast import tiny
from kdfast.demo.presets import Preset


def bar(total: int, desc: str, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, leave=False)


def warm_up(vocab: int, device) -> None:
    """One tiny training step: pages in the kernels (and allocator pools) every phase uses."""
    model = tiny.gpt2(vocab, 16, 1, 32, 2, seed=0).to(device)
    opt = tiny.optimizer(model, 1e-3)
    ids = torch.zeros((2, 16), dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    F.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_teacher(p: Preset, train_text: str, seed: int, device, steps: int):
    """The byte-level teacher on random ``context``-byte windows of the training text."""
    model = tiny.gpt2(tiny.BYTE_VOCAB, p.context, p.teacher_layers, p.teacher_embd, p.teacher_heads, seed + 1000)
    progress = bar(steps, "teacher")

    def on_step(step: int, total: int, loss: float) -> None:
        progress.update()
        progress.set_postfix(loss=f"{loss:.3f}", refresh=False)

    tiny.train_lm(model, tiny.byte_ids(train_text), context=p.context, batch_size=p.batch_size, lr=p.teacher_lr,
                  seed=seed + 1000, steps=steps, device=device, on_step=on_step)
    progress.close()
    return model


def load_teacher(teacher_dir: str, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True).to(device).eval()


def train_student(kind: str, p: Preset, caches, teacher, val, vocab, seed, device, steps, loss_fn, eval_at):
    """One student; returns (model, curve [(step, val loss)], seconds spent in evaluation).

    Every student starts from the same weights and sees the same batches (of the top-k cache;
    the sampled student reads the same sequences from the sampled cache)."""
    from kdfast.cache import Collator

    model = tiny.gpt2(vocab, p.context, p.student_layers, p.student_embd, p.student_heads, seed).to(device)
    opt = tiny.optimizer(model, p.student_lr)
    sched = tiny.lr_schedule(opt, steps)
    cache = caches["sample" if kind == "sample" else "topk"]
    collate = Collator(pad_id=0)
    n = len(cache)
    g = torch.Generator().manual_seed(seed)  # the same batches for every student
    order = torch.randperm(n, generator=g)
    pos = 0
    curve = [(0, tiny.evaluate(model, val, 64, device))]
    eval_seconds = 0.0
    progress = bar(steps, f"student: {kind}")
    model.train()
    for step in range(1, steps + 1):
        if pos + p.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos: pos + p.batch_size].tolist()
        pos += p.batch_size
        batch = collate([cache[i] for i in idx])
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        if kind == "labels":
            loss = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100)
        elif kind == "online":
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
            loss = loss_fn(logits, teacher_logits, labels)
        else:
            loss = loss_fn(logits, batch["targets"].to(device), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step in eval_at:
            t0 = time.perf_counter()
            curve.append((step, tiny.evaluate(model, val, 64, device)))
            eval_seconds += time.perf_counter() - t0
    progress.close()
    return model, curve, eval_seconds
