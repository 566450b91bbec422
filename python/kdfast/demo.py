"""``kdfast demo``: distil a small GPT-2 on the CPU, four ways, and compare them.

No download: the corpus is the text of Python's own ``pydoc`` topics (``pydoc_data.topics``,
about 460 KB, shipped with CPython), tokenised as UTF-8 bytes (vocabulary 256), split 90/10 into
training and validation text. The demo

1. trains a GPT-2-style **teacher** on random windows of the training text (or loads yours with
   ``--teacher-dir``) and saves it under ``OUT/teacher`` (reuse it with ``--teacher-dir``);
2. **captures** the teacher over the training chunks (≤ ``context`` bytes each) with
   :func:`kdfast.capture.capture` into two caches: top-k and randomly sampled targets;
3. trains the **same smaller student** (same initial weights, same batches, same steps) four
   ways: *labels only* (cross-entropy), *online dense KD* (forward KL against the live teacher's
   full distribution), *offline top-k KD* and *offline sampled KD* (:func:`kdfast.sparse_kl`
   against the caches) — the KD students through :class:`kdfast.DistillationLoss`;
4. prints a table — validation loss (nats per byte) and perplexity of the teacher and of each
   student, training time, peak memory (resident-set high-water mark of the process during
   each phase), cache bytes per token — and writes ``OUT/curves.png`` (validation curves) and
   ``OUT/results.json``.

Sizes (``--quick`` for about a minute) were chosen for a 2-core CPU; see README.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["Preset", "PRESETS", "main", "add_arguments", "add_parser", "run"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything a demo run needs besides the data: model sizes, steps, optimisation, KD."""

    context: int = 128
    batch_size: int = 32
    teacher_layers: int = 2
    teacher_embd: int = 192
    teacher_heads: int = 3
    teacher_steps: int = 500
    teacher_lr: float = 2e-3
    student_layers: int = 2
    student_embd: int = 96
    student_heads: int = 2
    steps: int = 350
    student_lr: float = 3e-3
    soft_weight: float = 0.9  # KD students: 0.9 · KL + 0.1 · cross-entropy
    temperature: float = 1.0
    k: int = 16  # top-k cache
    num_samples: int = 50  # sampled cache: draws per position
    evals: int = 10  # validation points per student curve
    max_train_chunks: Optional[int] = None  # captured/trained chunks (None: all)
    max_val_chunks: Optional[int] = None


PRESETS: Dict[str, Preset] = {
    "default": Preset(),
    "quick": Preset(
        context=64, batch_size=16, teacher_layers=2, teacher_embd=128, teacher_heads=2, teacher_steps=300,
        teacher_lr=3e-3, student_layers=1, student_embd=64, student_heads=2, steps=250, student_lr=4e-3,
        evals=5, max_train_chunks=1200, max_val_chunks=200,
    ),
}

STUDENTS = (
    ("labels", "labels only (cross-entropy)"),
    ("online", "online dense KD (forward KL, live teacher)"),
    ("topk", "offline top-k KD (cache)"),
    ("sample", "offline sampled KD (cache)"),
)


# ----------------------------------------------------------------------------- measurements


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux ≥ 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mib() -> float:
    """Current resident set (Linux ``/proc/self/statm``), in MiB; NaN where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def _peak_rss_mib() -> float:
    """``getrusage`` high-water mark of this process's resident set, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class _Phase:
    """Wall time and peak memory of one phase of the demo."""

    def __init__(self, device):
        self.device = device
        self.seconds = 0.0
        self.peak_mib = float("nan")
        self.peak_is_phase = False
        self.cuda_peak_mib = None

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        self.peak_is_phase = _reset_peak_rss()
        self.start_mib = _rss_mib()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        self._cpu0 = _cpu_seconds()
        return self

    def __exit__(self, *exc):
        import torch

        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = _cpu_seconds() - self._cpu0
        self.peak_mib = _peak_rss_mib()
        self.growth_mib = self.peak_mib - self.start_mib if self.peak_is_phase else float("nan")
        if self.device.type == "cuda":
            self.cuda_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        return False


# ----------------------------------------------------------------------------- data


def _corpus(data: Optional[str]) -> str:
    if data is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
    from .capture import read_documents

    return "\n\n".join(read_documents(data, txt_docs="blank")) + "\n"


def _split(text: str, val_fraction: float = 0.1):
    cut = int(len(text) * (1.0 - val_fraction))
    # cut at a paragraph boundary so that no document straddles the split
    para = text.rfind("\n\n", 0, cut)
    cut = para + 2 if para > len(text) // 2 else cut
    return text[:cut], text[cut:]


def _byte_chunks(text: str, size: int) -> List[str]:
    """Consecutive pieces of ``text`` of at most ``size`` UTF-8 bytes (cut between characters),
    whitespace-only pieces dropped."""
    raw = text.encode("utf-8")
    out, i = [], 0
    while i < len(raw):
        j = min(len(raw), i + size)
        while j < len(raw) and j > i and (raw[j] & 0xC0) == 0x80:  # inside a multi-byte character
            j -= 1
        piece = raw[i:j].decode("utf-8")
        if piece.strip():
            out.append(piece)
        i = j
    return out


class _Tokenizer:
    """Bytes (the demo's own teacher), or the ``--teacher-dir`` tokenizer as capture uses it."""

    def __init__(self, teacher_dir: Optional[str]):
        from .capture import _TOKENIZER_FILES

        self.hf = None
        if teacher_dir is not None and any(os.path.exists(os.path.join(teacher_dir, f)) for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
        self.unit = "byte" if self.hf is None else "token"

    def encode(self, text: str) -> List[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def chunks(self, text: str, context: int) -> List[str]:
        # ~4 characters per token for subword tokenizers; capture cuts each chunk to `context`.
        return _byte_chunks(text, context if self.hf is None else 4 * context)


def _pad_batch(seqs: Sequence[Sequence[int]], device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _evaluate(model, val: Sequence[Sequence[int]], batch_size: int, device) -> float:
    """Mean next-token cross-entropy (nats per token) over the validation chunks."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(0, len(val), batch_size):
            ids, mask = _pad_batch(val[j: j + batch_size], device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    model.train(was_training)
    return total / max(1, count)


# ----------------------------------------------------------------------------- models


def _gpt2(vocab: int, context: int, layers: int, embd: int, heads: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=embd, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                     activation_function="gelu")  # PyTorch's fused GELU: faster on the CPU than gelu_new
    return GPT2LMHeadModel(cfg)


def _warm_up(vocab: int, device) -> None:
    """One tiny training step: pages in the kernels (and allocator pools) every phase uses."""
    import torch

    model = _gpt2(vocab, 16, 1, 32, 2, seed=0).to(device)
    opt = _optimizer(model, 1e-3)
    ids = torch.zeros((2, 16), dtype=torch.long, device=device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _schedule(opt, steps: int, warmup_fraction: float = 0.05, floor: float = 0.1):
    import torch

    warmup = max(1, int(steps * warmup_fraction))

    def lr(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr)


def _optimizer(model, lr: float):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def _bar(total: int, desc: str, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, leave=False)


def _train_teacher(p: Preset, train_ids, vocab, seed, device, steps):
    """The teacher on random ``context``-byte windows of the training text."""
    import torch
    import torch.nn.functional as F

    model = _gpt2(vocab, p.context, p.teacher_layers, p.teacher_embd, p.teacher_heads, seed + 1000).to(device)
    opt = _optimizer(model, p.teacher_lr)
    sched = _schedule(opt, steps)
    data = torch.as_tensor(train_ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed + 1000)
    bar = _bar(steps, "teacher")
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - p.context, (p.batch_size,), generator=g)
        x = torch.stack([data[s: s + p.context] for s in starts.tolist()]).to(device)
        logits = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model


def _train_student(kind: str, p: Preset, caches, teacher, val, vocab, seed, device, steps, loss_fn, eval_at):
    """One student; returns (model, curve [(step, val loss)], seconds spent in evaluation)."""
    import torch
    import torch.nn.functional as F

    from .cache import Collator

    model = _gpt2(vocab, p.context, p.student_layers, p.student_embd, p.student_heads, seed).to(device)
    opt = _optimizer(model, p.student_lr)
    sched = _schedule(opt, steps)
    cache = caches["sample" if kind == "sample" else "topk"]
    collate = Collator(pad_id=0)
    n = len(cache)
    g = torch.Generator().manual_seed(seed)  # the same batches for every student
    order = torch.randperm(n, generator=g)
    pos = 0
    curve = [(0, _evaluate(model, val, 64, device))]
    eval_seconds = 0.0
    bar = _bar(steps, f"student: {kind}")
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
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step in eval_at:
            t0 = time.perf_counter()
            curve.append((step, _evaluate(model, val, 64, device)))
            eval_seconds += time.perf_counter() - t0
    bar.close()
    return model, curve, eval_seconds


# ----------------------------------------------------------------------------- report


def _table(rows: List[dict], unit: str) -> str:
    head = ["model", "params", "steps", f"val loss (nats/{unit})", "perplexity", "gap closed",
            "time", "peak RSS", "cache"]
    lines = []
    for r in rows:
        gap = "" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f} %"
        cache = "" if r.get("cache_bytes_per_token") is None else f"{r['cache_bytes_per_token']:.1f} B/{unit}"
        peak = f"{r['peak_rss_mib']:.0f} MiB"
        if r.get("rss_growth_mib") is not None and math.isfinite(r["rss_growth_mib"]):
            peak += f" (+{max(0.0, r['rss_growth_mib']):.0f})"
        if r.get("cuda_peak_mib") is not None:
            peak += f" (GPU {r['cuda_peak_mib']:.0f} MiB)"
        if r.get("val_loss") is None:  # a capture
            lines.append([r["name"], "", "", "", "", "", f"{r['train_seconds']:.1f} s", peak, cache])
            continue
        lines.append([r["name"], f"{r['params'] / 1e6:.2f} M", str(r["steps"] or "-"), f"{r['val_loss']:.4f}",
                      f"{r['perplexity']:.3f}", gap, f"{r['train_seconds']:.1f} s", peak, cache])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *(fmt(line) for line in lines)])


def _plot(path: str, curves: Dict[str, list], labels: Dict[str, str], teacher_loss: float, unit: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for kind, curve in curves.items():
        xs, ys = zip(*curve)
        ax.plot(xs, ys, marker="o", markersize=3, label=labels[kind])
    ax.axhline(teacher_loss, color="black", linestyle="--", linewidth=1, label="teacher")
    finals = [c[-1][1] for c in curves.values()]
    lo = min(min(finals), teacher_loss)
    hi = max(c[min(1, len(c) - 1)][1] for c in curves.values())
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("student training step")
    ax.set_ylabel(f"validation loss (nats/{unit})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args`` (see :func:`add_arguments`); returns the results."""
    import torch

    from . import DistillationLoss
    from .cache import TeacherCache
    from .capture import capture

    p = PRESETS["quick" if args.quick else "default"]
    if args.steps is not None:
        p = dataclasses.replace(p, steps=args.steps)
    if args.teacher_steps is not None:
        p = dataclasses.replace(p, teacher_steps=args.teacher_steps)
    device = torch.device(args.device)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    seed = args.seed

    def log(*parts):
        print(*parts, flush=True)

    t_start = time.perf_counter()

    # ---- data
    tok = _Tokenizer(args.teacher_dir)
    text = _corpus(args.data)
    train_text, val_text = _split(text)
    train_chunks = tok.chunks(train_text, p.context)
    val_chunks = tok.chunks(val_text, p.context)
    if p.max_train_chunks is not None and len(train_chunks) > p.max_train_chunks:
        # a contiguous piece (not a random subset), chosen by the seed
        g = torch.Generator().manual_seed(seed)
        start = int(torch.randint(0, len(train_chunks) - p.max_train_chunks + 1, (1,), generator=g))
        train_chunks = train_chunks[start: start + p.max_train_chunks]
    if p.max_val_chunks is not None and len(val_chunks) > p.max_val_chunks:
        stride = len(val_chunks) / p.max_val_chunks  # evenly spread over the validation text
        val_chunks = [val_chunks[int(i * stride)] for i in range(p.max_val_chunks)]
    val = [tok.encode(c)[: p.context] for c in val_chunks]
    val = [v for v in val if len(v) > 1]
    if len(train_chunks) < p.batch_size or not val:
        raise ValueError(f"data: too little text ({len(train_chunks)} training chunks, {len(val)} validation chunks "
                         f"of ≤ {p.context} {tok.unit}s); need at least {p.batch_size} and 1")
    source = "pydoc topics (Python's built-in help text)" if args.data is None else args.data
    log(f"kdfast demo{' --quick' if args.quick else ''}: {source}, {len(text.encode()) / 1e3:.0f} kB; "
        f"{len(train_chunks)} training chunks, {len(val)} validation chunks of ≤ {p.context} {tok.unit}s; "
        f"device {device}, {torch.get_num_threads()} threads, seed {seed}")

    # ---- teacher
    _warm_up(vocab=256, device=device)  # so that the first phase is not charged with loading torch's kernels
    rows, curves = [], {}
    teacher_phase = _Phase(device)
    with teacher_phase:
        if args.teacher_dir is not None:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, local_files_only=True).to(device).eval()
            teacher_steps = 0
            teacher_name = args.teacher_dir
        else:
            train_ids = list(train_text.encode("utf-8"))
            teacher = _train_teacher(p, train_ids, 256, seed, device, p.teacher_steps)
            teacher_steps = p.teacher_steps
            teacher_name = os.path.join(out, "teacher")
            teacher.save_pretrained(teacher_name)
    head = teacher.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(teacher.config.vocab_size)
    context = min(p.context, getattr(teacher.config, "n_positions", None)
                  or getattr(teacher.config, "max_position_embeddings", p.context))
    if context != p.context:
        p = dataclasses.replace(p, context=context)
        val = [v[:context] for v in val]
    teacher_loss = _evaluate(teacher, val, 64, device)
    rows.append(dict(name="teacher" + (" (--teacher-dir)" if args.teacher_dir else ""), kind="teacher",
                     params=_params(teacher), steps=teacher_steps, val_loss=teacher_loss,
                     perplexity=math.exp(teacher_loss), train_seconds=teacher_phase.seconds,
                     cpu_seconds=teacher_phase.cpu_seconds,
                     peak_rss_mib=teacher_phase.peak_mib, rss_growth_mib=teacher_phase.growth_mib,
                     cuda_peak_mib=teacher_phase.cuda_peak_mib))
    log(f"teacher: {_params(teacher) / 1e6:.2f} M parameters, {teacher_steps} steps in {teacher_phase.seconds:.1f} s, "
        f"validation {teacher_loss:.4f} nats/{tok.unit}")

    # ---- capture
    caches, capture_info = {}, {}
    for method in ("topk", "sample"):
        path = os.path.join(out, f"cache-{method}")
        phase = _Phase(device)
        with phase:
            summary = capture(
                teacher, train_chunks, path, method=method, k=p.k, num_samples=p.num_samples,
                temperature=p.temperature, seed=seed, batch_size=64, max_length=p.context,
                device=str(device), tokenizer="bytes" if tok.hf is None else tok.hf,
                teacher_name=os.path.basename(teacher_name), overwrite=True, verbose=False,
            )
        caches[method] = TeacherCache(path, verify=False)
        capture_info[method] = dict(seconds=phase.seconds, cpu_seconds=phase.cpu_seconds, bytes=summary.bytes,
                                    tokens=summary.tokens, bytes_per_token=summary.bytes_per_token,
                                    peak_rss_mib=phase.peak_mib)
        what = f"top-{p.k}" if method == "topk" else f"{p.num_samples} samples"
        rows.append(dict(name=f"capture: {what} (kdfast capture)", kind=f"capture-{method}",
                         train_seconds=phase.seconds, cpu_seconds=phase.cpu_seconds, peak_rss_mib=phase.peak_mib,
                         rss_growth_mib=phase.growth_mib, cuda_peak_mib=phase.cuda_peak_mib,
                         cache_bytes_per_token=summary.bytes_per_token))
        log(f"capture ({what}, T={p.temperature:g}): {summary.tokens} {tok.unit}s, {summary.bytes / 2**20:.2f} MiB "
            f"= {summary.bytes_per_token:.1f} bytes/{tok.unit}, {phase.seconds:.1f} s -> {path}")
    if len(caches["topk"]) != len(caches["sample"]):
        raise RuntimeError("capture: the two caches hold different numbers of sequences")

    # ---- students
    loss_fn = DistillationLoss("forward_kl", soft_weight=p.soft_weight, hard_weight=1.0 - p.soft_weight,
                               temperature=p.temperature)
    eval_at = {max(1, round(p.steps * (i + 1) / p.evals)) for i in range(p.evals)}
    labels_loss = None
    for kind, label in STUDENTS:
        phase = _Phase(device)
        with phase:
            model, curve, eval_s = _train_student(kind, p, caches, teacher, val, vocab, seed, device, p.steps,
                                                  loss_fn, eval_at)
        loss = curve[-1][1]
        if kind == "labels":
            labels_loss = loss
        gap = None
        if kind != "labels" and labels_loss is not None and labels_loss > teacher_loss:
            gap = (labels_loss - loss) / (labels_loss - teacher_loss)
        curves[kind] = curve
        cache_bpt = capture_info[kind]["bytes_per_token"] if kind in capture_info else None
        rows.append(dict(name=f"student: {label}", kind=kind, params=_params(model), steps=p.steps,
                         val_loss=loss, perplexity=math.exp(loss), gap_closed=gap,
                         train_seconds=phase.seconds - eval_s, cpu_seconds=phase.cpu_seconds,
                         peak_rss_mib=phase.peak_mib,
                         rss_growth_mib=phase.growth_mib,
                         cuda_peak_mib=phase.cuda_peak_mib, cache_bytes_per_token=cache_bpt))
        log(f"student {kind}: validation {loss:.4f} nats/{tok.unit}, {phase.seconds - eval_s:.1f} s")
        del model

    # ---- report
    table = _table(rows, tok.unit)
    peak_note = ("peak RSS: resident-set high-water mark of this process during each phase "
                 "(reset per phase via /proc/self/clear_refs; in brackets: above the phase's start)"
                 if teacher_phase.peak_is_phase else
                 "peak RSS: resident-set high-water mark of the whole process so far (getrusage)")
    log("\n" + table)
    log(f"\n{peak_note}; time: wall-clock training (or capture) time, validation passes excluded; "
        f"gap closed = share of the labels-only student's gap to the teacher that distillation closed "
        f"at equal steps.")
    title = (f"kdfast demo: {p.student_layers}×{p.student_embd} student, {p.steps} steps, "
             f"α={p.soft_weight:g}, T={p.temperature:g}")
    plot_path = os.path.join(out, "curves.png")
    _plot(plot_path, curves, dict(STUDENTS), teacher_loss, tok.unit, title)
    results = dict(preset=dataclasses.asdict(p), quick=bool(args.quick), seed=seed, device=str(device),
                   threads=torch.get_num_threads(), unit=tok.unit, rows=rows, curves=curves, capture=capture_info,
                   total_seconds=time.perf_counter() - t_start, peak_rss_note=peak_note)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_finite(results), f, indent=1)
    log(f"curves: {plot_path}; results: {os.path.join(out, 'results.json')}; "
        f"total {results['total_seconds']:.0f} s")
    return results


def _finite(x):
    """``x`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, q = PRESETS["default"], PRESETS["quick"]
    p.add_argument("--quick", action="store_true",
                   help=f"about a minute: smaller teacher/student, {q.teacher_steps} teacher and "
                        f"{q.steps} student steps")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and sampling (default 0)")
    p.add_argument("--out", default="kdfast-demo", help="output directory (default ./kdfast-demo)")
    p.add_argument("--teacher-dir", default=None,
                   help="a Hugging Face causal LM directory to use as the teacher (no teacher training); "
                        "its tokenizer if it has one, else bytes; e.g. OUT/teacher of an earlier run")
    p.add_argument("--data", default=None, help="a .txt or .jsonl (field 'text') corpus instead of the pydoc topics")
    p.add_argument("--steps", type=int, default=None, help=f"student steps (default {d.steps}, --quick {q.steps})")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help=f"teacher steps (default {d.teacher_steps}, --quick {q.teacher_steps})")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def _check(args: argparse.Namespace) -> Optional[str]:
    for name in ("steps", "teacher_steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            return f"--{name.replace('_', '-')}: expected a positive integer, got {v}"
    if args.teacher_dir is not None and not os.path.isdir(args.teacher_dir):
        return f"--teacher-dir: {args.teacher_dir} is not a directory"
    if args.data is not None and not os.path.exists(args.data):
        return f"--data: {args.data} does not exist"
    return None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kdfast demo`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "demo",
        help="train a teacher and distil a student four ways on the CPU (no download); prints a table and a plot",
        description=(
            "Trains a small GPT-2 teacher on Python's pydoc topics (byte-level, no download), captures it "
            "into top-k and sampled caches with kdfast capture, and trains the same smaller student four "
            "ways for the same steps: labels only, online dense KD, offline top-k KD, offline sampled KD. "
            "Prints validation loss, perplexity, time, peak memory and cache size, and writes "
            "OUT/curves.png and OUT/results.json. The default run takes under 10 minutes on 2 CPU cores."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=_main)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m kdfast.demo`` / ``kdfast demo``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="kdfast demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return _main(args)


def _main(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"kdfast demo: error: {problem}", file=sys.stderr)
        return 2
    missing = [m for m in ("transformers", "tqdm", "matplotlib", "pyarrow") if not _importable(m)]
    if missing:
        print(f"kdfast demo: error: missing {', '.join(missing)}; install with: pip install 'kdfast[demo]'",
              file=sys.stderr)
        return 2
    with _quiet_transformers():
        run(args)
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
