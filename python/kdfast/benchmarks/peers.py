"""The peer libraries that ``kdfast bench`` runs beside eager PyTorch, ``torch.compile`` and
kdfast: one small adapter per peer.

Each :class:`Peer` names the function it calls, the kdfast losses it can compute, and how its
value maps onto kdfast's convention (api.md §1: per-row value ℓ, ``reduction="mean"`` = Σℓ / rows).
The adapters feed every peer ``[N, V]`` logits without labels (no row masked), at the
benchmark's temperature, and keep its arithmetic as it is (no upcast where the peer does none):

* ``trl`` — ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd`` since TRL 1.x, ``trl``
  before). Checked in TRL 1.16's source: ``beta=0`` is ``KL(p‖q)`` (forward), ``beta=1`` is
  ``KL(q‖p)`` (reverse), otherwise ``β·KL(p‖m) + (1−β)·KL(q‖m)`` with ``m = βp + (1−β)q`` —
  kdfast's ``jsd(beta=β)`` exactly. ``reduction="batchmean"`` divides by the number of unmasked
  tokens when ``labels`` are given and by ``jsd.size(0)`` otherwise: the rows of ``[N, V]`` input
  (kdfast's mean, so the mapping is the identity here) but the *batch size* B of ``[B, S, V]``
  input (S × kdfast's mean). It computes in the input dtype (bf16 in, bf16 arithmetic and loss).
* ``torchtune`` — ``torchtune.modules.loss.ForwardKLLoss`` / ``ReverseKLLoss`` (labels required:
  all rows kept; no temperature: the logits are divided by T first). ``ForwardKLLoss`` is the
  cross-entropy form ``−Σ p log q`` (DistiLLM's), i.e. kdfast's ``forward_kl`` + the teacher
  entropy H(p) — same gradient; the adapter subtracts H(p) *outside* the timed step.
  ``ReverseKLLoss`` is ``KL(q‖p)``. Both average over unmasked tokens, in float32.
* ``liger`` — ``LigerKLDIVLoss(reduction="batchmean", log_target=True)`` and ``LigerJSD(beta)``
  (``beta=1`` for reverse KL; Liger's β weights the teacher as kdfast's does), fed
  ``log_softmax(logits / T)``, which its API requires and which is timed with it. Liger's
  ``reduction="mean"`` (``nn.KLDivLoss``'s default) divides by rows × V; ``batchmean`` by rows.
  Its kernels need CUDA: in the CPU benchmark it is skipped with that reason.

:func:`skip_reason` says why a peer cannot run here (not installed, needs CUDA) without importing
it; :func:`loss_fn` builds the timed ``f(student, teacher)``; :func:`value_offset` is the
constant (a function of the teacher alone) that maps its value onto kdfast's;
:func:`kdfast_loss` is both together, the loss in kdfast's convention.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message is the reason, as printed by the benchmark."""


@dataclass(frozen=True)
class Peer:
    """One peer library: ``losses`` maps each kdfast loss it computes to its mapping, one line."""

    name: str
    distribution: str  # what `pip install` takes
    module: str  # imported to tell whether it is installed
    where: str  # the function or classes the adapter calls
    losses: Mapping[str, str]
    needs_cuda: bool = False
    # True when the peer computes in the input dtype: bf16/fp16 inputs then get half-precision
    # arithmetic, and the agreement check uses the half-precision tolerance for it.
    half_arithmetic: bool = False
    extra: Sequence[str] = field(default_factory=tuple)  # other modules it needs (a skip reason)


PEERS: dict[str, Peer] = {
    "trl": Peer(
        "trl", "trl", "trl", "GKDTrainer.generalized_jsd_loss",
        {"forward_kl": "beta=0 is KL(p‖q); batchmean over [N, V] rows = kdfast mean (identity)",
         "reverse_kl": "beta=1 is KL(q‖p); identity",
         "jsd": "same β convention as kdfast.jsd; identity"},
        half_arithmetic=True),
    "torchtune": Peer(
        "torchtune", "torchtune", "torchtune", "torchtune.modules.loss.ForwardKLLoss/ReverseKLLoss",
        {"forward_kl": "ForwardKLLoss is −Σ p log q = kdfast forward_kl + H(p): value − H(p), same gradient",
         "reverse_kl": "ReverseKLLoss is KL(q‖p); identity"},
        extra=("torchao",)),
    "liger": Peer(
        "liger", "liger-kernel", "liger_kernel", "LigerKLDIVLoss(batchmean)/LigerJSD",
        {"forward_kl": "LigerKLDIVLoss(reduction='batchmean', log_target=True) on log-softmax; identity "
                       "('mean' would divide by rows × V)",
         "reverse_kl": "LigerJSD(beta=1); identity",
         "jsd": "LigerJSD(beta) weights the teacher by β as kdfast does; identity"},
        needs_cuda=True, half_arithmetic=True),
}
NAMES = tuple(PEERS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skip_reason(name: str, device: str = "cpu") -> str | None:
    """Why peer ``name`` cannot run on ``device`` (not installed, needs CUDA), or None.
    Cheap: looks the modules up without importing them (a broken install is reported by
    :func:`loss_fn` instead)."""
    peer = PEERS[name]
    hint = f"pip install {peer.distribution} (or kdfast[peers])"
    if not _installed(peer.module):
        return f"{peer.distribution} is not installed ({hint})"
    missing = [m for m in peer.extra if not _installed(m)]
    if missing:
        return f"{peer.distribution} needs {', '.join(missing)}, which is not installed ({hint})"
    if peer.needs_cuda and not str(device).startswith("cuda"):
        return f"{peer.distribution}'s kernels need CUDA and this benchmark runs on the CPU (`kdfast bench --gpu` includes it)"
    return None


def version(name: str) -> str | None:
    """The installed version of the peer's distribution, or None."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(PEERS[name].distribution)
    except PackageNotFoundError:
        return None


def supports(name: str, loss: str) -> bool:
    return loss in PEERS[name].losses


def _import(module: str, peer: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import is a reason to skip the peer
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PeerUnavailable(f"{PEERS[peer].distribution} does not import here: "
                              f"{type(exc).__name__}: {first}") from exc


def _trl_jsd() -> Callable[..., torch.Tensor]:
    """TRL's ``generalized_jsd_loss``, wherever the installed version keeps it."""
    with warnings.catch_warnings():
        # TRL warns on every import of trl.experimental (its GKD trainer lives there since 1.x).
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        for module in ("trl.experimental.gkd", "trl"):
            try:
                trainer = getattr(importlib.import_module(module), "GKDTrainer", None)
            except ImportError:
                continue
            if trainer is not None and hasattr(trainer, "generalized_jsd_loss"):
                return trainer.generalized_jsd_loss
    _import("trl", "trl")  # a failed import of trl itself says why
    raise PeerUnavailable(f"trl {version('trl')} has no GKDTrainer.generalized_jsd_loss")


def _build_trl(loss: str, temperature: float, beta: float) -> LossFn:
    jsd = _trl_jsd()
    b = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(loss, beta)
    return lambda s, t: jsd(s, t, beta=b, temperature=temperature)


def _build_torchtune(loss: str, temperature: float, beta: float) -> LossFn:
    mod = _import("torchtune.modules.loss", "torchtune")
    fn = mod.ForwardKLLoss() if loss == "forward_kl" else mod.ReverseKLLoss()

    def step(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)  # no row ignored
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        return fn(s, t, labels)

    return step


def _build_liger(loss: str, temperature: float, beta: float) -> LossFn:
    mod = _import("liger_kernel.transformers", "liger")
    if loss == "forward_kl":
        fn = mod.LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        fn = mod.LigerJSD(beta=1.0 if loss == "reverse_kl" else beta)
    return lambda s, t: fn(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1))


_BUILDERS: dict[str, Callable[[str, float, float], LossFn]] = {
    "trl": _build_trl, "torchtune": _build_torchtune, "liger": _build_liger}


def loss_fn(name: str, loss: str, *, temperature: float = 1.0, beta: float = 0.5) -> LossFn:
    """The timed ``f(student, teacher) -> scalar``: the peer's own loss for kdfast's ``loss``
    (forward_kl, reverse_kl, jsd with ``beta``) at ``temperature``, as the peer computes it. Add
    :func:`value_offset` to its value for kdfast's convention (the gradient needs nothing).
    Raises :class:`PeerUnavailable` when the peer does not import, ``ValueError`` for a loss it
    does not have."""
    if name not in PEERS:
        raise ValueError(f"peer must be one of {list(PEERS)}, got {name!r}")
    if not supports(name, loss):
        raise ValueError(f"{name} has no {loss!r}; it has {list(PEERS[name].losses)}")
    return _BUILDERS[name](loss, temperature, beta)


def value_offset(name: str, loss: str, teacher: torch.Tensor, *, temperature: float = 1.0) -> float:
    """What to add to the peer's value to get kdfast's (``reduction="mean"``): minus the mean
    teacher entropy for torchtune's cross-entropy-form forward KL, else 0."""
    if name == "torchtune" and loss == "forward_kl":
        with torch.no_grad():
            logp = F.log_softmax(teacher.float() / temperature, dim=-1)
            entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
            return -float(entropy.mean())
    return 0.0


def kdfast_loss(name: str, loss: str, student: torch.Tensor, teacher: torch.Tensor, *,
                temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Peer ``name``'s ``loss`` in kdfast's convention (float32, differentiable w.r.t. the
    student, same gradient as the peer's): what ``kdfast.<loss>(student, teacher,
    temperature=temperature[, beta=beta])`` returns, up to the peer's arithmetic."""
    value = loss_fn(name, loss, temperature=temperature, beta=beta)(student, teacher)
    return value.float() + value_offset(name, loss, teacher, temperature=temperature)


def selection(text: str) -> str | list[str]:
    """An ``argparse`` type for ``--peers``: ``auto``, ``none`` or a comma-separated subset."""
    import argparse

    text = text.strip()
    if text in ("auto", "none"):
        return text
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(x not in PEERS for x in names):
        raise argparse.ArgumentTypeError(f"--peers must be auto, none or a comma-separated subset of "
                                         f"{','.join(PEERS)}, got {text!r}")
    return names


def select(which: str | Sequence[str] = "auto", device: str = "cpu") -> tuple[list[str], dict[str, str]]:
    """The peers to run (``"auto"``: all; ``"none"``; or names) that can run on ``device``, and
    ``{name: why not}`` for the others (with ``"auto"``, every absent peer is listed)."""
    names = list(PEERS) if which == "auto" else [] if which == "none" else list(which)
    run, skipped = [], {}
    for name in names:
        why = skip_reason(name, device)
        if why is None:
            run.append(name)
        else:
            skipped[name] = why
    return run, skipped


def report(device: str = "cpu") -> dict[str, dict]:
    """Every peer: installed version, what it calls, its losses and mappings, and why it is
    skipped here (None when it runs)."""
    return {name: {"distribution": p.distribution, "version": version(name), "where": p.where,
                   "losses": dict(p.losses), "half_arithmetic": p.half_arithmetic,
                   "skipped": skip_reason(name, device)} for name, p in PEERS.items()}
