"""Type stubs of the private Rust extension ``kdfast._kdfast`` (see rust/kdfast-py)."""

from typing import Optional, Tuple

# (data_ptr, rows, cols, row_stride, dtype name)
Tensor2d = Tuple[int, int, int, int, str]

__version__: str

def best_isa() -> str: ...
def dense_loss(
    loss: str,
    param: float,
    student: Tensor2d,
    teacher: Tensor2d,
    labels: Optional[Tensor2d],
    ignore_index: int,
    temperature: float,
    t2_scale: bool,
    grad_scale: float,
    loss_out: Tensor2d,
    grad_out: Optional[Tensor2d],
    grad_cols: int,
    isa: str,
    num_threads: int,
) -> None: ...

# ---- offline distillation (rust/kdfast-py/src/offline.rs)

# (data_ptr, len) of a contiguous uint8 buffer
Bytes = Tuple[int, int]

def compress_topk(
    logits: Tensor2d,
    k: int,
    temperature: float,
    ids_out: Tensor2d,
    logprobs_out: Tensor2d,
    tail_out: Tensor2d,
    isa: str,
    num_threads: int,
) -> None: ...
def compress_sample(
    logits: Tensor2d,
    num_samples: int,
    temperature: float,
    seed: int,
    row_offset: int,
    ids_out: Tensor2d,
    logprobs_out: Tensor2d,
    weights_out: Tensor2d,
    isa: str,
    num_threads: int,
) -> None: ...
def sparse_kl(
    mode: str,
    student: Tensor2d,
    ids: Tensor2d,
    logprobs: Tensor2d,
    weights: Optional[Tensor2d],
    tail: Optional[Tensor2d],
    labels: Optional[Tensor2d],
    ignore_index: int,
    temperature: float,
    t2_scale: bool,
    grad_scale: float,
    loss_out: Tensor2d,
    grad_out: Optional[Tensor2d],
    grad_cols: int,
    isa: str,
    num_threads: int,
) -> None: ...
def encoded_row_bytes(k: int, vocab_size: int, has_tail: bool, num_samples: Optional[int]) -> int: ...
def encode_targets(
    ids: Tensor2d,
    logprobs: Tensor2d,
    weights: Optional[Tensor2d],
    tail: Optional[Tensor2d],
    vocab_size: int,
    num_samples: Optional[int],
    out: Bytes,
    num_threads: int,
) -> None: ...
def decode_targets(
    data: Bytes,
    rows: int,
    k: int,
    vocab_size: int,
    num_samples: Optional[int],
    ids_out: Tensor2d,
    logprobs_out: Tensor2d,
    weights_out: Optional[Tensor2d],
    tail_out: Optional[Tensor2d],
) -> None: ...
