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

Modules: :mod:`.presets` (sizes), :mod:`.data` (corpus, tokenizer, chunks), :mod:`.train`
(teacher and students, on the models and loops of :mod:`kdfast.tiny`), :mod:`.report` (table,
plot, JSON); phases are measured with :class:`kdfast.benchmarks.harness.Phase`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Optional, Sequence

from kdfast.demo.presets import PRESETS, STUDENTS, Preset

__all__ = ["Preset", "PRESETS", "main", "add_arguments", "add_parser", "run"]


def _log(*parts) -> None:
    print(*parts, flush=True)


def _row(name: str, kind: str, phase, **fields) -> dict:
    """One row of the report: a phase's time and memory, and ``fields``."""
    return dict(name=name, kind=kind, train_seconds=phase.seconds, cpu_seconds=phase.cpu_seconds,
                peak_rss_mib=phase.peak_mib, rss_growth_mib=phase.growth_mib, cuda_peak_mib=phase.cuda_peak_mib,
                **fields)


def run(args: argparse.Namespace) -> dict:
    """Run the demo described by parsed ``args`` (see :func:`add_arguments`); returns the results."""
    import torch

    from kdfast.benchmarks.harness import Phase
    from kdfast.demo import data, report, train
    from kdfast.tiny import BYTE_VOCAB, evaluate, param_count

    p = PRESETS["quick" if args.quick else "default"]
    if args.steps is not None:
        p = dataclasses.replace(p, steps=args.steps)
    if args.teacher_steps is not None:
        p = dataclasses.replace(p, teacher_steps=args.teacher_steps)
    device = torch.device(args.device)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    seed = args.seed
    t_start = time.perf_counter()

    # ---- data
    d = data.load_data(args.data, data.Tokenizer(args.teacher_dir), p, seed)
    tok, val = d.tokenizer, d.val
    source = "pydoc topics (Python's built-in help text)" if args.data is None else args.data
    _log(f"kdfast demo{' --quick' if args.quick else ''}: {source}, {len(d.text.encode()) / 1e3:.0f} kB; "
         f"{len(d.train_chunks)} training chunks, {len(val)} validation chunks of ≤ {p.context} {tok.unit}s; "
         f"device {device}, {torch.get_num_threads()} threads, seed {seed}")

    # ---- teacher
    train.warm_up(BYTE_VOCAB, device)  # so that the first phase is not charged with loading torch's kernels
    with Phase(device) as teacher_phase:
        if args.teacher_dir is not None:
            teacher, teacher_steps, teacher_name = train.load_teacher(args.teacher_dir, device), 0, args.teacher_dir
        else:
            teacher = train.train_teacher(p, d.train_text, seed, device, p.teacher_steps)
            teacher_steps, teacher_name = p.teacher_steps, os.path.join(out, "teacher")
            teacher.save_pretrained(teacher_name)
    head = teacher.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(teacher.config.vocab_size)
    context = min(p.context, getattr(teacher.config, "n_positions", None)
                  or getattr(teacher.config, "max_position_embeddings", p.context))
    if context != p.context:
        p = dataclasses.replace(p, context=context)
        val = [v[:context] for v in val]
    teacher_loss = evaluate(teacher, val, 64, device)
    rows = [_row("teacher" + (" (--teacher-dir)" if args.teacher_dir else ""), "teacher", teacher_phase,
                 params=param_count(teacher), steps=teacher_steps, val_loss=teacher_loss,
                 perplexity=math.exp(teacher_loss))]
    _log(f"teacher: {param_count(teacher) / 1e6:.2f} M parameters, {teacher_steps} steps in "
         f"{teacher_phase.seconds:.1f} s, validation {teacher_loss:.4f} nats/{tok.unit}")

    # ---- capture
    caches, capture_info = _capture(teacher, d, p, out, seed, device, teacher_name, rows)

    # ---- students
    curves = _students(p, caches, capture_info, teacher, val, vocab, seed, device, teacher_loss, tok.unit, rows)

    # ---- report
    table = report.table(rows, tok.unit)
    peak_note = ("peak RSS: resident-set high-water mark of this process during each phase "
                 "(reset per phase via /proc/self/clear_refs; in brackets: above the phase's start)"
                 if teacher_phase.peak_is_phase else
                 "peak RSS: resident-set high-water mark of the whole process so far (getrusage)")
    _log("\n" + table)
    _log(f"\n{peak_note}; time: wall-clock training (or capture) time, validation passes excluded; "
         f"gap closed = share of the labels-only student's gap to the teacher that distillation closed "
         f"at equal steps.")
    title = (f"kdfast demo: {p.student_layers}×{p.student_embd} student, {p.steps} steps, "
             f"α={p.soft_weight:g}, T={p.temperature:g}")
    plot_path = os.path.join(out, "curves.png")
    report.plot(plot_path, curves, dict(STUDENTS), teacher_loss, tok.unit, title)
    results = dict(preset=dataclasses.asdict(p), quick=bool(args.quick), seed=seed, device=str(device),
                   threads=torch.get_num_threads(), unit=tok.unit, rows=rows, curves=curves, capture=capture_info,
                   total_seconds=time.perf_counter() - t_start, peak_rss_note=peak_note)
    report.write_json(os.path.join(out, "results.json"), results)
    _log(f"curves: {plot_path}; results: {os.path.join(out, 'results.json')}; "
         f"total {results['total_seconds']:.0f} s")
    return results


def _capture(teacher, d, p: Preset, out: str, seed: int, device, teacher_name: str, rows: list):
    """The teacher over the training chunks into a top-k and a sampled cache."""
    from kdfast.benchmarks.harness import Phase
    from kdfast.cache import TeacherCache
    from kdfast.capture import capture

    tok = d.tokenizer
    caches, capture_info = {}, {}
    for method in ("topk", "sample"):
        path = os.path.join(out, f"cache-{method}")
        with Phase(device) as phase:
            summary = capture(
                teacher, d.train_chunks, path, method=method, k=p.k, num_samples=p.num_samples,
                temperature=p.temperature, seed=seed, batch_size=64, max_length=p.context,
                device=str(device), tokenizer="bytes" if tok.hf is None else tok.hf,
                teacher_name=os.path.basename(teacher_name), overwrite=True, verbose=False,
            )
        caches[method] = TeacherCache(path, verify=False)
        capture_info[method] = dict(seconds=phase.seconds, cpu_seconds=phase.cpu_seconds, bytes=summary.bytes,
                                    tokens=summary.tokens, bytes_per_token=summary.bytes_per_token,
                                    peak_rss_mib=phase.peak_mib)
        what = f"top-{p.k}" if method == "topk" else f"{p.num_samples} samples"
        rows.append(_row(f"capture: {what} (kdfast capture)", f"capture-{method}", phase,
                         cache_bytes_per_token=summary.bytes_per_token))
        _log(f"capture ({what}, T={p.temperature:g}): {summary.tokens} {tok.unit}s, {summary.bytes / 2**20:.2f} MiB "
             f"= {summary.bytes_per_token:.1f} bytes/{tok.unit}, {phase.seconds:.1f} s -> {path}")
    if len(caches["topk"]) != len(caches["sample"]):
        raise RuntimeError("capture: the two caches hold different numbers of sequences")
    return caches, capture_info


def _students(p: Preset, caches, capture_info, teacher, val, vocab, seed, device, teacher_loss, unit, rows):
    """The same student four ways; appends their rows, returns their validation curves."""
    from kdfast import DistillationLoss
    from kdfast.benchmarks.harness import Phase
    from kdfast.demo import train
    from kdfast.tiny import param_count

    loss_fn = DistillationLoss("forward_kl", soft_weight=p.soft_weight, hard_weight=1.0 - p.soft_weight,
                               temperature=p.temperature)
    eval_at = {max(1, round(p.steps * (i + 1) / p.evals)) for i in range(p.evals)}
    labels_loss, curves = None, {}
    for kind, label in STUDENTS:
        with Phase(device) as phase:
            model, curve, eval_s = train.train_student(kind, p, caches, teacher, val, vocab, seed, device,
                                                       p.steps, loss_fn, eval_at)
        loss = curve[-1][1]
        if kind == "labels":
            labels_loss = loss
        gap = None
        if kind != "labels" and labels_loss is not None and labels_loss > teacher_loss:
            gap = (labels_loss - loss) / (labels_loss - teacher_loss)
        curves[kind] = curve
        cache_bpt = capture_info[kind]["bytes_per_token"] if kind in capture_info else None
        row = _row(f"student: {label}", kind, phase, params=param_count(model), steps=p.steps, val_loss=loss,
                   perplexity=math.exp(loss), gap_closed=gap, cache_bytes_per_token=cache_bpt)
        row["train_seconds"] = phase.seconds - eval_s
        rows.append(row)
        _log(f"student {kind}: validation {loss:.4f} nats/{unit}, {phase.seconds - eval_s:.1f} s")
        del model
    return curves


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


