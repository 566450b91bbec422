"""The teacher of a capture: loading it, its sizes, generating responses, compressing its logits.

:func:`load_model` loads a ``transformers`` causal LM from a **local** directory (or takes a
loaded one) in the requested dtype on the device; :func:`context_length`, :func:`vocab_size`
and :func:`eos_ids` read what the capture needs from it; :func:`generate` writes the responses
of sequence-level KD; :func:`compress_rows` turns one sequence's logits into sparse targets and
:func:`cat_targets` joins the targets of consecutive row chunks.
``torch`` and ``transformers`` are imported when called, so ``kdfast capture --help`` is fast.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(dtype: str):
    """``"auto"`` or the ``torch.dtype`` named by ``dtype`` (one of :data:`DTYPES`)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_model(model, dtype: str, device):
    """``(model, name, dtype name)``: the teacher in eval mode on ``device``; ``model`` is a local
    directory (``AutoModelForCausalLM``, no download) or a loaded causal LM."""
    if isinstance(model, (str, os.PathLike)):
        import transformers
        from transformers import AutoModelForCausalLM

        path = os.fspath(model)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: {path} is not a directory (capture loads local models only)")
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        m = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{key: torch_dtype(dtype)})
        name = os.path.basename(os.path.normpath(path))
    else:
        m = model
        if dtype != "auto":
            m = m.to(torch_dtype(dtype))
        name = getattr(getattr(m, "config", None), "name_or_path", "") or type(m).__name__
    m = m.to(device)
    m.eval()
    return m, name, str(next(m.parameters()).dtype).replace("torch.", "")


def context_length(model) -> Optional[int]:
    """The teacher's context in positions, from its config (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def vocab_size(model, group=None, device="cpu") -> int:
    """V of the teacher's logits (the output embedding's rows, else ``config.vocab_size``).

    With a tensor-parallel ``group``, a head of fewer rows than ``config.vocab_size`` is this
    rank's slice: V is then the rows of all the group's heads (one all-reduce)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    configured = getattr(getattr(model, "config", None), "vocab_size", None)
    if out is None or getattr(out, "weight", None) is None:
        return int(configured)
    rows = int(out.weight.shape[0])
    if group is None:
        return rows
    import torch

    from ..parallel.collectives import slice_bounds

    sliced = torch.tensor([int(configured is not None and rows < int(configured))], device=device)
    torch.distributed.all_reduce(sliced, group=group)  # every rank decides the same
    return slice_bounds(group, rows, device, "model")[1] if int(sliced) else rows


def eos_ids(tokenizer, model) -> List[int]:
    """The end-of-sequence ids of the tokenizer and the model's generation config, sorted."""
    ids = []
    for v in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if v is None:
            continue
        ids.extend(v if isinstance(v, (list, tuple)) else [v])
    return sorted({int(i) for i in ids})


def compress_rows(rows, method, k, num_samples, temperature, seed, row_offset, chunk_rows=None, process_group=None):
    """Targets of one sequence's ``[S, V]`` teacher logits, on the CPU (``process_group``: the
    rows are this rank's vocabulary slice, api.md §6).

    On the CPU one Rust call streams over the rows. Elsewhere kdfast's PyTorch backend sorts
    whole rows, so the rows go in chunks of about 2**26 logits to bound its temporary memory
    (the results do not depend on the chunking: top-k is per row and the sampler keys each
    row's draws by ``row_offset + row``).
    """
    from .. import sparse

    def one(x, offset):
        if method == "topk":
            return sparse.compress_topk(x, k, temperature=temperature, process_group=process_group)
        return sparse.compress_sample(x, num_samples, temperature=temperature, seed=seed, row_offset=offset,
                                      process_group=process_group)

    if chunk_rows is None:
        if rows.device.type == "cpu":
            return one(rows, row_offset)
        chunk_rows = max(1, (1 << 26) // rows.shape[-1])
    step = chunk_rows
    return cat_targets([one(rows[a:a + step], row_offset + a).to("cpu") for a in range(0, rows.shape[0], step)])


def cat_targets(parts):
    """The targets of consecutive rows, concatenated (the one part itself when there is one)."""
    import torch

    from .. import sparse

    if len(parts) == 1:
        return parts[0]
    cat = (lambda name: None if getattr(parts[0], name) is None
           else torch.cat([getattr(p, name) for p in parts], 0))
    return sparse.SparseTargets(indices=cat("indices"), logprobs=cat("logprobs"), weights=cat("weights"),
                                tail_logprob=cat("tail_logprob"), temperature=parts[0].temperature,
                                method=parts[0].method)


def generate(model, prompts, pad_id, eos, dev, max_new_tokens, do_sample, gen_temperature, top_p, seed, first_id):
    """Prompt + response token lists (responses cut after the first EOS, which is kept)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding: generation continues at the right edge
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "pad_token_id": pad_id}
    if eos:
        kwargs["eos_token_id"] = eos
    if do_sample:
        kwargs.update(temperature=float(gen_temperature), top_p=float(top_p))
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed((int(seed) * 1_000_003 + int(first_id)) % (1 << 63))
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
    out = out[:, width:].cpu().tolist()
    fulls = []
    eos_set = set(eos)
    for p, resp in zip(prompts, out):
        cut = len(resp)
        for j, t in enumerate(resp):
            if t in eos_set:
                cut = j + 1
                break
        fulls.append(list(p) + resp[:cut])
    return fulls
