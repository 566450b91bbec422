"""Part 3 of the offline benchmark: fidelity (and storage) of stored sparse targets.

On the logits of a *real* teacher — a byte-level GPT-2 of :mod:`kdfast.tiny` trained here for
about a minute on the ``pydoc`` topics (V = 256), measured on held-out text, with the same model
earlier in its training as the student — and on a *synthetic* V = 32000 distribution
(:func:`.logits.zipf_logits`). Per method (top-k with a bucket tail, sampled): the bytes per token
of :mod:`.storage`, KL between the full teacher distribution and the one reconstructed from the
*decoded* record (:func:`reconstruct`), the teacher mass covered, and the cosine between the sparse
loss's gradient and the full forward-KL gradient for the student — per position, over all logits,
summed over positions and (real teacher) over the student's parameters.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

import kdfast
from kdfast import tiny
from kdfast.benchmarks.offline.logits import NUM_SAMPLES, distribution_stats, zipf_logits
from kdfast.benchmarks.offline.storage import TARGET_SAMPLE_BYTES, storage_row

TOPK = (8, 32, 64, 128)
SAMPLES = (16, 50, 100)


def train_byte_teacher(seconds: float, *, context: int = 128, batch: int = 32, layers: int = 2,
                       embd: int = 128, heads: int = 4, lr: float = 3e-3, seed: int = 0,
                       log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Train a byte-level GPT-2 on the training text of the pydoc topics for about ``seconds``.

    The *student* is the same model's snapshot at one third of the steps; ``val`` are the byte
    ids of the validation text."""
    train_text, val_text = tiny.split_text(tiny.pydoc_text())
    model = tiny.gpt2(tiny.BYTE_VOCAB, context, layers, embd, heads, seed)
    snapshot: dict[str, Any] = {}

    def on_step(step: int, steps: int, loss: float) -> None:
        if "state" not in snapshot and step >= steps // 3:
            snapshot.update(state=copy.deepcopy(model.state_dict()), step=step)
        if step % max(1, steps // 5) == 0:
            log(f"  teacher step {step}/{steps}: train loss {loss:.3f}")
        snapshot["last"] = loss

    t0 = time.perf_counter()
    steps = tiny.train_lm(model, tiny.byte_ids(train_text), context=context, batch_size=batch, lr=lr,
                          seed=seed, seconds=seconds, on_step=on_step)
    train_s = time.perf_counter() - t0
    student = tiny.gpt2(tiny.BYTE_VOCAB, context, layers, embd, heads, seed)
    student.load_state_dict(snapshot["state"])
    return {"teacher": model.eval(), "student": student.eval(), "val": tiny.byte_ids(val_text), "steps": steps,
            "student_step": snapshot["step"], "train_s": train_s, "final_train_loss": snapshot["last"],
            "params": tiny.param_count(model),
            "config": {"context": context, "batch": batch, "layers": layers, "embd": embd,
                       "heads": heads, "lr": lr}}


def _val_windows(val: torch.Tensor, positions: int, context: int) -> torch.Tensor:
    """Non-overlapping held-out windows, ``positions`` predicted bytes in all."""
    per = context - 1
    count = max(1, math.ceil(positions / per))
    stride = max(context, (len(val) - context) // count)
    return torch.stack([val[i * stride:i * stride + context] for i in range(count)])


def _row_chunks(n: int, size: int = 256) -> Iterable[slice]:
    for r0 in range(0, n, size):
        yield slice(r0, min(n, r0 + size))


def reconstruct(targets, v: int) -> torch.Tensor:
    """The distribution a stored record stands for, float64 ``[rows, V]``.

    * top-k: each listed id gets its stored probability, the stored tail mass is spread uniformly
      over the unlisted ids; renormalised to sum 1 (the 16-bit log-prob codes leave a ≤ 0.025 %
      error per probability);
    * sampled: ``p̂ = weights`` (count / N) on the drawn ids, 0 elsewhere.
    """
    ids = targets.indices
    rows = ids.shape[0]
    used = ids >= 0
    safe = ids.clamp(min=0)
    if targets.method == "sample":
        p = torch.zeros(rows, v, dtype=torch.float64)
        p.scatter_add_(1, safe, torch.where(used, targets.weights.double(), torch.zeros((), dtype=torch.float64)))
        return p
    listed = torch.where(used, targets.logprobs.double().exp(), torch.zeros((), dtype=torch.float64))
    n_listed = used.sum(-1, keepdim=True)
    tail = targets.tail_logprob.double().exp().unsqueeze(-1)
    fill = torch.where(n_listed < v, tail / (v - n_listed).clamp(min=1), torch.zeros_like(tail))
    p = fill.expand(rows, v).clone()
    p.scatter_(1, safe, torch.where(used, listed, fill.expand_as(listed)))
    return p / p.sum(-1, keepdim=True)


def _kl_rows(p_log: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row; ``p_log`` log-probs (float64), ``q`` probabilities (0 allowed → inf)."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q.log()), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1)


def _rev_kl_rows(p_log: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) per row (q may have zeros: 0 · log 0 = 0)."""
    terms = torch.where(q > 0, q * (q.log() - p_log), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


def fidelity_table(teacher: torch.Tensor, student: torch.Tensor, *, ks: Sequence[int],
                   ns: Sequence[int], seed: int = 0,
                   param_grads: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None
                   ) -> list[dict[str, Any]]:
    """Storage and fidelity of each method on teacher logits ``[P, V]`` and a student ``[P, V]``.

    ``param_grads(loss_fn)``, when given, returns the student model's flattened parameter
    gradient of ``loss_fn(student_logits)`` (the cosine the Sparse Logit Sampling paper
    reports)."""
    t = teacher.float()
    s = student.float()
    rows, v = t.shape
    t_log = torch.log_softmax(t.double(), dim=-1)

    s_leaf = s.clone().requires_grad_(True)
    kdfast.forward_kl(s_leaf, t, reduction="sum").backward()
    g_full = s_leaf.grad.clone()
    pg_full = param_grads(lambda z: kdfast.forward_kl(z, t, reduction="mean")) if param_grads else None

    methods = [("topk", k) for k in ks] + [("sample", n) for n in ns]
    out = []
    for method, size in methods:
        if method == "topk":
            tg = kdfast.compress_topk(t, size)
            enc = kdfast.encode_targets(tg, v)
        else:
            tg = kdfast.compress_sample(t, size, seed=seed)
            enc = kdfast.encode_targets(tg, v, num_samples=size)
        dec = kdfast.decode_targets(enc)
        used = (dec.indices >= 0).sum(-1)

        kl, rkl, mass = [], [], []
        for sl in _row_chunks(rows):
            sub = kdfast.SparseTargets(
                indices=dec.indices[sl], logprobs=dec.logprobs[sl],
                weights=None if dec.weights is None else dec.weights[sl],
                tail_logprob=None if dec.tail_logprob is None else dec.tail_logprob[sl],
                temperature=dec.temperature, method=dec.method)
            q = reconstruct(sub, v)
            kl.append(_kl_rows(t_log[sl], q))
            rkl.append(_rev_kl_rows(t_log[sl], q))
            ok = sub.indices >= 0
            mass.append(torch.where(ok, t_log[sl].gather(-1, sub.indices.clamp(min=0)).exp(),
                                    torch.zeros((), dtype=torch.float64)).sum(-1))
        kl_t, rkl_t, mass_t = torch.cat(kl), torch.cat(rkl), torch.cat(mass)
        finite = torch.isfinite(kl_t)

        s_leaf = s.clone().requires_grad_(True)
        kdfast.sparse_kl(s_leaf, dec, tail="bucket", reduction="sum").backward()
        g_sp = s_leaf.grad
        cos = _cos_rows(g_sp, g_full)
        row: dict[str, Any] = {
            "method": method, "size": size,
            "mean_used_slots": float(used.float().mean()), "max_used_slots": int(used.max()),
            **storage_row(enc, used),
            "kl_full_recon": float(kl_t.mean()) if bool(finite.all()) else float("inf"),
            "kl_full_recon_finite_rows": float(finite.float().mean()),
            "kl_recon_full": float(rkl_t.mean()),
            "mass_covered": float(mass_t.mean()),
            "grad_cos_mean": float(cos.mean()),
            "grad_cos_median": float(cos.median()),
            "grad_cos_flat": float(_cos_rows(g_sp.reshape(1, -1), g_full.reshape(1, -1))[0]),
        }
        # Summed over positions (the gradient w.r.t. an output bias over the vocabulary): noise
        # that differs between positions cancels, a systematic bias does not.
        c = float(_cos_rows(g_sp.double().sum(0, keepdim=True), g_full.double().sum(0, keepdim=True))[0])
        row["bias_grad_angle_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, c))))
        if param_grads is not None:
            pg = param_grads(lambda z, dec=dec: kdfast.sparse_kl(z, dec, tail="bucket", reduction="mean"))
            c = float(_cos_rows(pg.reshape(1, -1), pg_full.reshape(1, -1))[0])
            row["param_grad_cos"] = c
            row["param_grad_angle_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, c))))
        out.append(row)
    return out


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if spec["source"] == "zipf":
        n, v = spec["positions"], spec["v"]
        teacher = zipf_logits(n, v, seed=1)
        # A "less-trained student": partly agrees with the teacher, softer, own noise.
        student = 0.6 * teacher + 0.4 * zipf_logits(n, v, seed=2)
        rows = fidelity_table(teacher, student, ks=spec["ks"], ns=spec["ns"])
        return {"v": v, "positions": n, "teacher_stats": distribution_stats(teacher),
                "student_stats": distribution_stats(student), "rows": rows}

    trained = train_byte_teacher(spec["train_seconds"], log=log)
    teacher_m, student_m = trained["teacher"], trained["student"]
    ctx = trained["config"]["context"]
    windows = _val_windows(trained["val"], spec["positions"], ctx)
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        t_logits = teacher_m(input_ids=windows).logits[:, :-1].reshape(-1, 256).float()
        s_logits_ng = student_m(input_ids=windows).logits[:, :-1].reshape(-1, 256).float()
    val_t = float(F.cross_entropy(t_logits, y.reshape(-1)))
    val_s = float(F.cross_entropy(s_logits_ng, y.reshape(-1)))
    del x

    params = [p for p in student_m.parameters()]

    def param_grads(loss_fn):
        z = student_m(input_ids=windows).logits[:, :-1].reshape(-1, 256)
        grads = torch.autograd.grad(loss_fn(z), params)
        return torch.cat([g.reshape(-1) for g in grads]).double()

    rows = fidelity_table(t_logits, s_logits_ng, ks=spec["ks"], ns=spec["ns"], param_grads=param_grads)
    return {"v": 256, "positions": t_logits.shape[0], "train_s": trained["train_s"],
            "steps": trained["steps"], "student_step": trained["student_step"],
            "params": trained["params"], "model_config": trained["config"],
            "teacher_val_nats_per_byte": val_t, "student_val_nats_per_byte": val_s,
            "teacher_stats": distribution_stats(t_logits), "student_stats": distribution_stats(s_logits_ng),
            "rows": rows}



def _fmt_g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def format_table(results: list[dict[str, Any]]) -> str:
    parts = []
    for r in results:
        if r["kind"] != "fidelity":
            continue
        if "error" in r:
            parts.append(f"fidelity {r['source']}: {r['error']}")
            continue
        v = r["v"]
        ts = r["teacher_stats"]
        if r["source"] == "gpt2":
            title = (f"**Real teacher, V = 256 (bytes)**: GPT-2 {r['model_config']['layers']}×"
                     f"{r['model_config']['embd']} ({r['params'] / 1e6:.2f} M params), {r['steps']} steps in "
                     f"{r['train_s']:.0f} s on pydoc topics; held-out {r['positions']} positions; teacher "
                     f"{r['teacher_val_nats_per_byte']:.3f} nats/byte, student (same model at step "
                     f"{r['student_step']}) {r['student_val_nats_per_byte']:.3f} nats/byte.")
        else:
            title = (f"**Synthetic, V = {v}** (`zipf_logits`, not a real model): {r['positions']} positions; "
                     f"student = 0.6·teacher + 0.4·(another draw).")
        title += (f" Teacher: mean entropy {ts['entropy_nats']:.2f} nats, top-1 p {ts['top1_prob']:.2f}, "
                  f"top-64 mass {ts['top64_mass']:.2f}. Full logits: {4 * v} B/token fp32, {2 * v} bf16.")
        has_param = any("param_grad_cos" in row for row in r["rows"])
        head = ["method", "ids used (mean / max)", "B/token record", "B/token trimmed", "B/token variable",
                "B/token ids+counts",
                "KL(p‖p̂)", "KL(p̂‖p)", "mass covered", "grad cos/position (mean / median)", "grad cos (all logits)", "Σ-positions grad angle"]
        if has_param:
            head += ["param-grad angle"]
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in r["rows"]:
            name = f"top-{row['size']} bucket" if row["method"] == "topk" else f"sample N={row['size']}"
            rec = f"{row['bytes_record']}"
            if row["method"] == "sample" and row["size"] == NUM_SAMPLES:
                rec += " ✓" if row["bytes_record"] <= TARGET_SAMPLE_BYTES else " ✗"
            kl = _fmt_g(row["kl_full_recon"], 4)
            if math.isinf(row["kl_full_recon"]):
                kl = f"∞ ({100 * (1 - row['kl_full_recon_finite_rows']):.0f}% rows)"
            cells = [name, f"{row['mean_used_slots']:.1f} / {row['max_used_slots']}", rec,
                     str(row["bytes_trimmed"]), f"{row['bytes_variable']:.1f}",
                     "-" if row.get("bytes_lean_ids_counts") is None else f"{row['bytes_lean_ids_counts']:.1f}", kl,
                     _fmt_g(row["kl_recon_full"], 4), f"{row['mass_covered']:.4f}",
                     f"{row['grad_cos_mean']:.3f} / {row['grad_cos_median']:.3f}", f"{row['grad_cos_flat']:.3f}",
                     f"{row['bias_grad_angle_deg']:.1f}°"]
            if has_param:
                cells.append(f"{row['param_grad_angle_deg']:.1f}°" if "param_grad_angle_deg" in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


