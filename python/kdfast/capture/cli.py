"""``kdfast capture`` on the command line: its argument parser and handler.

:func:`add_parser` registers the subcommand on the ``kdfast`` parser (:mod:`kdfast.cli`);
:func:`main` runs :func:`kdfast.capture.capture` with the parsed arguments and turns a
``ValueError`` / ``FileNotFoundError`` into exit status 2 with the message on stderr.
"""

from __future__ import annotations

import argparse
import sys

from .documents import TXT_DOCS
from .run import METHODS, MODES, capture
from .teacher import DTYPES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kdfast capture`` on an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "capture",
        help="run a Hugging Face teacher over text and cache sparse (top-k / sampled) targets",
        description=(
            "Run a local Hugging Face causal LM teacher over a text dataset (score: teacher "
            "forcing; generate: the teacher answers prompts) and stream compressed targets into "
            "an Arrow cache readable by kdfast.cache.TeacherCache and Hugging Face datasets. "
            "Rerun with the same arguments to resume. Under torchrun each rank writes its own shards."
        ),
    )
    p.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM)")
    p.add_argument("--data", required=True, help=".txt, .jsonl, or a directory saved by datasets")
    p.add_argument("--output", "-o", required=True, help="cache directory")
    p.add_argument("--mode", choices=MODES, default="score")
    p.add_argument("--method", choices=METHODS, default="topk")
    p.add_argument("--k", type=int, default=64, help="top-k ids per position (default 64)")
    p.add_argument("--num-samples", type=int, default=64, help="draws per position for --method sample")
    p.add_argument("--temperature", type=float, default=1.0, help="capture temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens kept per document (generate: per prompt); default: the teacher's context")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="generate by sampling (seeded) instead of greedily")
    p.add_argument("--generation-temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "bytes"),
                   help="auto: the model directory's tokenizer, else bytes")
    p.add_argument("--text-field", default=None, help="JSON/datasets field with the text")
    p.add_argument("--split", default="train", help="split of a saved DatasetDict")
    p.add_argument("--txt-docs", choices=TXT_DOCS, default="line",
                   help=".txt documents: one per line, or separated by blank lines")
    p.add_argument("--encoding", choices=("compact", "packed", "raw"), default="compact")
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard")
    p.add_argument("--teacher-name", default=None)
    p.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    p.add_argument("--overwrite", action="store_true", help="delete an existing cache instead of resuming")
    p.add_argument("--no-chunked-head", action="store_true",
                   help="materialise each batch's [B, S, V] logits instead of computing them chunk by "
                        "chunk through the teacher's head")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="P",
                   help="ranks per teacher under torchrun: each of P consecutive ranks computes and "
                        "compresses its slice of the vocabulary (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Handler of ``kdfast capture``; returns the exit status."""
    try:
        capture(
            args.model, args.data, args.output, mode=args.mode, method=args.method, k=args.k,
            num_samples=args.num_samples, temperature=args.temperature, seed=args.seed,
            batch_size=args.batch_size, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample, generation_temperature=args.generation_temperature, top_p=args.top_p,
            device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, text_field=args.text_field,
            split=args.split, txt_docs=args.txt_docs, encoding=args.encoding, shard_size=args.shard_size,
            teacher_name=args.teacher_name, limit=args.limit, overwrite=args.overwrite,
            chunked_head=not args.no_chunked_head, tensor_parallel=args.tensor_parallel,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"kdfast capture: error: {exc}", file=sys.stderr)
        return 2
    return 0
