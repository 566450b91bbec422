"""One distillation training step through each path, at LLM vocabulary size (issue: the fused
head in every training path).

Llama-architecture student and teacher with random weights (hidden 256 / 384, 2 layers,
V = 128256 by default), one batch of ``B × S`` random tokens, forward + backward of the
distillation loss, each case in a fresh process. Paths:

* ``bare`` — the models' final hidden states (computed outside the timed region) into
  :func:`kdfast.fused_linear_distill_loss`: the floor of the loss itself;
* ``trainer`` — :class:`~kdfast.integrations.transformers.DistillationTrainer`, fused (the default);
* ``trainer-logits`` — the same with ``fused=False`` (materialised logits);
* ``trl`` — TRL's ``GKDTrainer`` with its own loss (materialised logits);
* ``trl-kdfast`` — :class:`kdfast.integrations.trl.GKDTrainer` (kdfast's loss, fused).

For the trainer paths the step is the trainer's ``compute_loss`` and ``backward`` (the models'
bodies included, so their activations count for every path alike). Reported: extra peak memory
(resident-set high-water mark over the resident size before the step) and step time, with the
ratios the issue targets: trainer ≤ 1.3 × bare memory, ≥ 5 × below TRL at the largest size,
time ≤ 1.1 × ``trainer-logits``. Run ``python -m kdfast.benchmarks.trainer`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any, Sequence

import torch

from .. import tiny
from . import harness, tables

MODULE = "kdfast.benchmarks.trainer"
PATHS = ("bare", "trainer", "trainer-logits", "trl", "trl-kdfast")
LOSSES = ("forward_kl", "jsd")
SIZES = ((2, 1024), (4, 2048))


def _batch(b: int, s: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _beta(loss: str) -> float:
    return 0.0 if loss == "forward_kl" else 0.5


def _kdfast_trainer(student, teacher, loss: str, fused: bool, out: str):
    import transformers

    from ..integrations.transformers import DistillationTrainer

    args = transformers.TrainingArguments(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=1,
                                          save_strategy="no", disable_tqdm=True)
    kw = {"beta": 0.5} if loss == "jsd" else {}
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, fused=fused,
                               distill_loss={"loss": loss, **kw})


def _trl_trainer(student, teacher, loss: str, kdfast: bool, out: str, vocab: int):
    import datasets
    import transformers
    from tokenizers import Tokenizer, models

    if kdfast:
        from ..integrations.trl import GKDTrainer
    else:
        from trl.experimental.gkd import GKDTrainer
    from trl.experimental.gkd import GKDConfig

    words = {f"t{i}": i for i in range(vocab)}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t0")),
                                               unk_token="t0", pad_token="t0", eos_token="t0")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    data = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "t1"},
                                                     {"role": "assistant", "content": "t2"}]}])
    args = GKDConfig(output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=1, save_strategy="no",
                     lmbda=0.0, beta=_beta(loss), bf16=False, activation_checkpointing=False, disable_tqdm=True)
    return GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One (path, loss, B, S) case: extra peak memory and time of one training step."""
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    vocab, b, s, loss, path = spec["vocab"], spec["batch"], spec["seq"], spec["loss"], spec["path"]
    student, teacher = tiny.llama(256, vocab, 1), tiny.llama(384, vocab, 2).eval()
    batch = _batch(b, s, vocab)
    out = tempfile.mkdtemp(prefix="kdfast-bench-")
    if path == "bare":
        import kdfast

        with torch.no_grad():
            t_hidden = teacher.model(input_ids=batch["input_ids"]).last_hidden_state
        hidden = student.model(input_ids=batch["input_ids"]).last_hidden_state.detach().requires_grad_()
        labels = torch.cat([batch["labels"][:, 1:], torch.full((b, 1), -100)], 1)
        kw = {"beta": 0.5} if loss == "jsd" else {}

        def step():
            value = kdfast.fused_linear_distill_loss(hidden, student.lm_head.weight, teacher_hidden=t_hidden,
                                                     teacher_weight=teacher.lm_head.weight, loss=loss, labels=labels, **kw)
            value.backward()
            return value.detach()
        model = student
    else:
        if path.startswith("trainer"):
            trainer = _kdfast_trainer(student, teacher, loss, path == "trainer", out)
        else:
            trainer = _trl_trainer(student, teacher, loss, path == "trl-kdfast", out, vocab)
        model = trainer.model

        def step():
            value = trainer.compute_loss(model, dict(batch))
            value.backward()
            return value.detach()

    def reset():
        model.zero_grad(set_to_none=True)

    stats, value = harness.measure(step, repeats=spec.get("repeats", 1), warmup=spec.get("warmup", 1), reset=reset)
    return {**stats, "loss_value": float(value)}


def _describe(spec: dict[str, Any], res: dict[str, Any]) -> str:
    if "error" in res:
        return f"{spec['path']} {spec['loss']} {spec['batch']}x{spec['seq']}: {res['error']}"
    mib = (res.get("extra_peak_bytes") or 0) / 2**20
    return f"{spec['path']} {spec['loss']} {spec['batch']}x{spec['seq']}: {res['time_s']:.2f} s, {mib:.0f} MiB"


def format_table(results: list) -> str:
    """One row per (loss, size): each path's extra peak MiB and seconds, and the target ratios."""
    by = {(r["loss"], r["batch"], r["seq"], r["path"]): r for r in results}
    keys = sorted({(r["loss"], r["batch"], r["seq"]) for r in results})
    paths = [p for p in PATHS if any(r["path"] == p for r in results)]
    head = ["loss", "B×S"] + [f"{p} MiB / s" for p in paths] + ["mem trainer/bare", "mem trl/trainer",
                                                               "time trainer/logits", "loss agree"]
    rows = []
    for loss, b, s in keys:
        cell, mem, sec, vals = [], {}, {}, []
        for p in paths:
            r = by.get((loss, b, s, p), {})
            if "time_s" in r:
                mem[p], sec[p] = (r.get("extra_peak_bytes") or 0) / 2**20, r["time_s"]
                vals.append(r["loss_value"])
                cell.append(f"{mem[p]:.0f} / {sec[p]:.1f}")
            else:
                cell.append(r.get("error", "—")[:30] if r else "—")
        ratio = (lambda a, c, d: f"{d[a] / d[c]:.2f}" if a in d and c in d and d[c] else "—")
        agree = "✓" if vals and max(vals) - min(vals) <= 1e-3 * max(1.0, abs(max(vals))) else ("✗" if vals else "—")
        rows.append([loss, f"{b}×{s}", *cell, ratio("trainer", "bare", mem), ratio("trl", "trainer", mem),
                     ratio("trainer", "trainer-logits", sec), agree])
    return "\n".join(tables.markdown_head(head) + [tables.markdown_row(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m " + MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--sizes", type=tables.sizes("BxS", "2x1024"), default=list(SIZES))
    p.add_argument("--losses", type=tables.subset(LOSSES, "--losses"), default=list(LOSSES))
    p.add_argument("--paths", type=tables.subset(PATHS, "--paths"), default=list(PATHS))
    p.add_argument("--quick", action="store_true", help="2x1024 only, forward_kl only")
    p.add_argument("--json", metavar="PATH")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    sizes = [(2, 1024)] if args.quick else args.sizes
    losses = ["forward_kl"] if args.quick else args.losses
    specs = [{"path": p, "loss": loss, "batch": b, "seq": s, "vocab": args.vocab}
             for loss in losses for b, s in sizes for p in args.paths]
    results, run = harness.run_cases(specs, run_case, module=MODULE, describe=_describe, timeout=3600)
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": harness.machine_info(), "run": run, "results": results}, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return harness.main(argv, run_case, _parser, run_from_args)


if __name__ == "__main__":
    sys.exit(main())
