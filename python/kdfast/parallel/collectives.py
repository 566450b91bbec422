"""The collectives of vocabulary-parallel losses, as autograd functions.

Every rank holds a contiguous slice of the vocabulary (rank order, sizes may differ) and computes
the *same* loss of the whole vocabulary. Two primitives then give exact gradients with plain
autograd:

* :func:`sum_over_ranks` — ``Σ_r x_r``; backward is the identity, because the upstream gradient
  is the same on every rank (everything after the sum is computed identically everywhere);
* :func:`global_lse` — the log-sum-exp of each row over the whole vocabulary, in two
  all-reduces of O(1) floats per row (the maxima, then the rescaled sums of exponentials); its
  backward all-reduces the upstream gradient once (each rank holds only its slice's part of
  ``∂L/∂lse``) and multiplies by the local ``softmax``.

A rank's slice may be empty (V_local = 0: more ranks than ids, or an uneven split); it still
makes every collective, so the whole vocabulary's emptiness is decided after one of them, on
every rank together (:func:`require_vocabulary`).

So a loss ``Σ_v f(log p_v, log q_v)`` costs three all-reduces in forward (maxima, sums, the
row's partial sums) and one in backward, never a gather of ``[N, V]`` logits. The log-sum-exp
must enter only per-slice computations that :func:`sum_over_ranks` then adds up (a replicated
use would be counted once per rank in backward).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
T = TypeVar("T")


def world(group) -> Tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """``Σ_r x_r`` on every rank (differentiable; see the module docstring)."""
    return _SumOverRanks.apply(x, group)


def _local_max(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], NEG_INF)
    return x.amax(-1)


class _GlobalLSE(torch.autograd.Function):
    """Row log-sum-exps of several ``[N, V_local]`` tensors over the whole vocabulary, in one
    max and one sum all-reduce. ``replicated``: the upstream gradient is already the whole
    ``∂L/∂lse`` (the log-sum-exp was used after the ranks' sums, identically everywhere), so
    backward does not add it up over the ranks."""

    @staticmethod
    def forward(ctx, group, replicated, what, *xs: torch.Tensor):
        m = torch.stack([_local_max(x) for x in xs])
        # the widest slice rides along with the maxima: 0 on every rank is an empty vocabulary
        both = torch.cat([m.flatten(), m.new_full((1,), float(max(x.shape[-1] for x in xs)))])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        m = both[:-1].view_as(m)
        require_vocabulary(bool(both[-1] > 0), what)
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        sums = torch.stack([torch.exp(x - c[:, None]).sum(-1) for x, c in zip(xs, shift)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = torch.where(torch.isfinite(m), shift + sums.log(), m)  # all -inf stays -inf; +inf, NaN stay
        ctx.group, ctx.replicated = group, replicated
        ctx.save_for_backward(*xs, lse)
        return tuple(lse)

    @staticmethod
    def backward(ctx, *grads):
        *xs, lse = ctx.saved_tensors
        needed = [i for i, g in enumerate(grads) if g is not None and ctx.needs_input_grad[3 + i]]
        if not needed:
            return (None, None, None) + (None,) * len(xs)
        g = torch.stack([grads[i] for i in needed])
        if not ctx.replicated:
            g = g.contiguous()
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        out = [None] * len(xs)
        for row, i in enumerate(needed):
            safe = torch.where(torch.isfinite(lse[i]), lse[i], torch.zeros_like(lse[i]))
            out[i] = g[row][:, None] * torch.exp(xs[i] - safe[:, None])
        return (None, None, None, *out)


def global_lse(group, differentiable: torch.Tensor, *others: torch.Tensor, what: str = "logits"
               ) -> Tuple[torch.Tensor, ...]:
    """``log Σ_v exp(x_v)`` over the whole vocabulary for each row of each ``[N, V_local]``
    argument (the first differentiable; use it only in per-slice terms), ``-inf`` for a row
    that is ``-inf`` everywhere. A slice may be empty (V_local = 0); the whole vocabulary may
    not (:func:`require_vocabulary`, naming ``what``, on every rank together)."""
    return _GlobalLSE.apply(group, False, what, differentiable, *[o.detach() for o in others])


def replicated_lse(group, *xs: torch.Tensor, what: str = "logits") -> Tuple[torch.Tensor, ...]:
    """:func:`global_lse` of every argument, differentiably, for use after the ranks' sums (in
    computations every rank repeats identically)."""
    return _GlobalLSE.apply(group, True, what, *xs)


def gathered_lse(ranks: torch.Tensor) -> torch.Tensor:
    """``log Σ_r sum_r e^(max_r)`` of the ranks' ``(max, sum)`` pairs ``[ranks, N, 2]`` (the Rust
    slice kernels' statistics, all-gathered): a NaN or +inf in any rank stays one."""
    mx, sm = ranks[..., 0], ranks[..., 1]
    return torch.logsumexp(torch.where(sm == 0, -torch.inf, mx + sm.log()), dim=0)


def gathered_softmax(ranks: torch.Tensor) -> torch.Tensor:
    """``(M, ln Z)`` ``[N, 2]`` of the ranks' ``(max, sum)`` pairs ``[ranks, N, 2]``, with
    ``M = max_r max_r`` and ``Z = Σ_r sum_r e^(max_r − M)`` (``(−inf, −inf)`` for an empty row);
    for rows checked finite, so that ``log q = (a − M) − ln Z`` keeps the digits of a small ``ln Z``."""
    mx, sm = ranks[..., 0], ranks[..., 1]
    m = mx.amax(0)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    z = (sm * torch.where(sm == 0, 0.0, (mx - shift).exp())).sum(0)
    return torch.stack([m, z.log()], 1)


def require_vocabulary(nonempty: bool, what: str) -> None:
    """The whole vocabulary needs an id: ``nonempty`` is decided after an all-reduce, so every
    rank raises together (a rank's own slice may be empty)."""
    if not nonempty:
        raise ValueError(f"{what}: empty vocabulary: the slices of every rank in the process group are empty "
                         f"(last dimensions of 0 on all ranks); the whole vocabulary needs at least one id")


def slice_sizes(group, device, what: str, *locals_: int, error: Optional[BaseException] = None) -> torch.Tensor:
    """Each of ``locals_`` (this rank's sizes, e.g. its student and teacher slices) on every rank:
    int64 ``[len(locals_), world]`` on the CPU, in one all-reduce; the first must add up to a
    non-empty vocabulary (:func:`require_vocabulary`, naming ``what``). ``error``: this rank's
    argument checks failed (``locals_`` are then ignored), which the same all-reduce tells every
    rank (:func:`agreed`)."""
    rank, size = world(group)
    sizes = torch.zeros(len(locals_) + 1, size, dtype=torch.int64, device=device)
    if error is None:
        sizes[:-1, rank] = torch.tensor(locals_, dtype=torch.int64)
    sizes[-1, rank] = error is not None
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    sizes = sizes.cpu()
    _raise_disagreement(sizes[-1], error)
    require_vocabulary(int(sizes[0].sum()) > 0, what)
    return sizes[:-1]


def slice_bounds(group, local: int, device, what: str, error: Optional[BaseException] = None) -> Tuple[int, int]:
    """``(offset, total)``: where this rank's slice of ``local`` ids starts in the vocabulary,
    and the vocabulary size (one all-reduce of one integer per rank); an empty vocabulary is a
    ``ValueError`` naming ``what`` on every rank together, and so is ``error`` (see
    :func:`slice_sizes`)."""
    sizes = slice_sizes(group, device, what, local, error=error)[0]
    return int(sizes[:dist.get_rank(group)].sum()), int(sizes.sum())


def device_of(x) -> torch.device:
    """The device of a tensor argument (the CPU for anything else: the checks then raise)."""
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def agreed(group, device, check: Callable[[], T]) -> T:
    """``check()`` — this rank's checks of its own arguments — agreed over ``group`` in one
    all-reduce of one flag per rank, before any other collective: the rank whose check raised
    re-raises its error, and every other rank raises a ``ValueError`` naming that rank, instead
    of waiting in the next collective for a rank that has left it (a hang until the backend's
    timeout)."""
    try:
        out, error = check(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        out, error = None, e
    rank, size = world(group)
    flags = torch.zeros(size, dtype=torch.int64, device=device)
    flags[rank] = error is not None
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    _raise_disagreement(flags.cpu(), error)
    return out


def _raise_disagreement(failed: torch.Tensor, error: Optional[BaseException]) -> None:
    """This rank's ``error``, or a ``ValueError`` naming the ranks whose ``failed`` flag is set."""
    if error is not None:
        raise error
    bad = failed.nonzero().flatten().tolist()
    if bad:
        who = f"rank {bad[0]}" if len(bad) == 1 else "ranks " + ", ".join(map(str, bad))
        raise ValueError(f"process_group: {who} of the process group rejected its arguments (its own error says "
                         f"why); every rank raises instead of waiting in a collective for it")


def local_vocab(vocab_size, offset: int, total: int, local: int) -> int:
    """How many of this rank's ``local`` ids (the slice starting at ``offset`` of ``total``) a
    global ``vocab_size`` keeps (None: all): the padded ids past ``vocab_size`` are cut."""
    if vocab_size is None:
        return local
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= total:
        raise ValueError(f"vocab_size: expected an integer in [1, {total}] (the vocabulary across the "
                         f"group), got {vocab_size!r}")
    return min(max(vocab_size - offset, 0), local)


def check_lse_rows(lse: torch.Tensor, what: str) -> None:
    """The rule of the kernels: every row needs a finite logit and no +inf or NaN (decided on the
    global log-sum-exp, so every rank raises together)."""
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"{what}: row {r} is entirely -inf or holds +inf or NaN (over the whole "
                         f"vocabulary); every unmasked row needs at least one finite logit and no +inf or NaN")


def raise_bad_rows(nan: torch.Tensor, inf: torch.Tensor, empty: Optional[torch.Tensor] = None,
                   name: str = "teacher_logits") -> None:
    """The kernels' rule for rows of logits, decided on data every rank holds (so that every
    rank raises together): the first row holding a NaN or +inf, or entirely -inf (``empty``),
    is a ``ValueError`` naming it."""
    bad = nan | inf if empty is None else nan | inf | empty
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        detail = "contains NaN" if bool(nan[r]) else "contains +inf" if bool(inf[r]) else "is entirely -inf"
        raise ValueError(f"{name}: row {r} {detail}; every unmasked row needs at least one finite logit "
                         f"and no +inf or NaN")


def is_sharded(group, *xs) -> bool:
    """Whether a call is vocabulary-parallel: a group is given or an argument is a ``DTensor``
    (decided without importing ``torch.distributed.tensor``)."""
    return group is not None or any(type(x).__name__ == "DTensor" for x in xs)


def check_backend(backend: str, allowed=("auto", "torch")) -> None:
    """The backends a vocabulary-parallel path runs: PyTorch operations on the local slices
    unless ``allowed`` says otherwise."""
    if backend not in allowed:
        runs = "PyTorch operations" if "rust" not in allowed else "Rust kernels" if "torch" in allowed else "the Rust sampler"
        raise ValueError(f"backend: this vocabulary-parallel path runs {runs} on the local slices; "
                         f"expected {' or '.join(map(repr, allowed))}, got {backend!r}")


def as_local(x, group) -> Tuple[torch.Tensor, Optional[object]]:
    """``(local tensor, group)``: a ``DTensor`` sharded on its last dimension becomes its local
    shard and its mesh's group (differentiably); anything else passes through with ``group``."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return x, group
    if not isinstance(x, DTensor):
        return x, group
    mesh, placements = x.device_mesh, x.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) \
            or placements[0].dim not in (-1, x.ndim - 1):
        raise ValueError(f"logits: a DTensor must be sharded on its last dimension over a 1-D mesh "
                         f"(placements (Shard(-1),)), got {placements} on a {mesh.ndim}-D mesh")
    mesh_group = mesh.get_group()
    if group is not None and group is not mesh_group:
        raise ValueError("process_group: a DTensor's mesh is its group; pass process_group=None")
    return x.to_local(), mesh_group
