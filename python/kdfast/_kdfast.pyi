"""Type stubs of the private Rust extension ``kdfast._kdfast`` (see rust/kdfast-py).

Every tensor argument is a ``torch.Tensor`` itself: a 1-D or 2-D CPU tensor with unit stride
along its last dimension. Outputs are preallocated by the caller (``kdfast/_native.py``) and
must share no memory with the other arguments. Bad values raise ``ValueError`` naming the
argument; a wrong dtype raises ``kdfast.DtypeError`` (a ``TypeError`` and a ``ValueError``).
"""

from typing import Optional, Tuple

from torch import Tensor

# (ids int64 [N, k], logprobs float32 [N, k], weights float32 [N, k] | None, tail float32 [N] | None)
Targets = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]

__version__: str

class Runtime:
    """Instruction set ("auto", "scalar", "baseline", "avx2", "avx512") and worker threads (≥ 1)."""
    def __init__(self, isa: str = "auto", num_threads: int = 1) -> None: ...
    @property
    def isa(self) -> str: ...
    @property
    def num_threads(self) -> int: ...

def best_isa() -> str: ...

# ---- dense losses (rust/kdfast-py/src/dense.rs)

class DenseConfig:
    """``loss``: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd, akl or taid;
    ``param``: β (jsd), the skew, head_mass (akl) or t (taid), ignored otherwise."""
    def __init__(
        self,
        loss: str,
        param: float = 0.0,
        temperature: float = 1.0,
        t2_scale: bool = False,
        grad_scale: float = 1.0,
        ignore_index: int = -100,
    ) -> None: ...

def dense_loss(
    config: DenseConfig,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    loss_out: Tensor,
    grad_out: Optional[Tensor],
    runtime: Runtime,
) -> None: ...
def mass_at_least(p: Tensor, thresholds: Tensor, out: Tensor, runtime: Runtime) -> None: ...
def slice_dense(step: int, config: DenseConfig, student_logits: Tensor, teacher_logits: Tensor,
                softmax: Optional[Tensor], sums: Optional[Tensor], out: Optional[Tensor],
                grad_out: Optional[Tensor], runtime: Runtime) -> None: ...

# ---- sparse-target losses (rust/kdfast-py/src/sparse.rs)

class SparseConfig:
    def __init__(
        self,
        mode: str,
        temperature: float = 1.0,
        t2_scale: bool = False,
        grad_scale: float = 1.0,
        ignore_index: int = -100,
        loss: str = "forward_kl",
        param: float = 0.0,
    ) -> None: ...

def sparse_loss(
    config: SparseConfig,
    student_logits: Tensor,
    targets: Targets,
    labels: Optional[Tensor],
    loss_out: Tensor,
    grad_out: Optional[Tensor],
    runtime: Runtime,
) -> None: ...
def listed_stats(student_logits: Tensor, ids: Tensor, temperature: float, stats: Tensor, at: Tensor,
                 runtime: Runtime) -> None: ...
def listed_gradient(student_logits: Tensor, ids: Tensor, temperature: float, softmax: Tensor, coef: Tensor,
                    g_at: Tensor, grad_out: Tensor, runtime: Runtime) -> None: ...

# ---- compression (rust/kdfast-py/src/compress.rs)

class TopK:
    def __init__(self, k: int, temperature: float = 1.0) -> None: ...
    @property
    def k(self) -> int: ...
    @property
    def temperature(self) -> float: ...

class Sampling:
    def __init__(self, num_samples: int, temperature: float = 1.0, seed: int = 0, row_offset: int = 0) -> None: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def row_offset(self) -> int: ...

def compress_topk(options: TopK, teacher_logits: Tensor, out: Targets, runtime: Runtime) -> None: ...
def compress_sample(options: Sampling, teacher_logits: Tensor, out: Targets, runtime: Runtime) -> None: ...
def compress_topk_slice(options: TopK, teacher_logits: Tensor, offset: int, out: Tuple[Tensor, Tensor, Tensor],
                        runtime: Runtime) -> None: ...
def sharded_sample(step: int, options: Sampling, teacher_logits: Tensor, offset: int, vocab: int, maxima: Tensor,
                   carry_in: Optional[Tensor], sums: Optional[Tensor], checkpoints: Optional[Tensor],
                   out: Optional[Tuple[Tensor, Tensor]], runtime: Runtime) -> None: ...
def sharded_slice_plan(offset: int, len: int, vocab: int) -> Tuple[int, int, bool, bool]: ...
def merge_sample_draws(num_samples: int, picked: Tensor, lse: Tensor, out: Targets) -> None: ...

# ---- storage encoding (rust/kdfast-py/src/encode.rs)

class Layout:
    def __init__(self, k: int, vocab_size: int, has_tail: bool, num_samples: Optional[int] = None) -> None: ...
    @property
    def row_bytes(self) -> int: ...

def encode_targets(layout: Layout, targets: Targets, out: Tensor, runtime: Runtime) -> None: ...
def decode_targets(layout: Layout, data: Tensor, out: Targets) -> None: ...

# ---- compact cache records (rust/kdfast-py/src/compact.rs)

class CompactCodec:
    def __init__(self, method: str, vocab_size: int, has_tail: bool, num_samples: Optional[int] = None) -> None: ...
    def encode(self, targets: Targets) -> Tuple[bytes, int]: ...
    def decode(self, data: Tensor, rows: int, k_row: int, out: Targets) -> None: ...
    def decode_many(self, data: Tensor, offsets: Tensor, rows: Tensor, k_rows: Tensor, stride: int, width: int,
                    out: Targets) -> None: ...
