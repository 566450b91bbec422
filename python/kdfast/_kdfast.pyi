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
