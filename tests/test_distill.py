"""kdfast.DistillationLoss against manual float64 computations (api.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from conftest import extra_kwargs, make_labels, make_logits
from reference64 import LOSSES, reference

V = 37  # odd vocabulary
LEAD = (3, 7)


def _ce64(student, labels, ignore_index=-100):
    """Per-row cross-entropy (float64) at T=1, 0 on masked rows, and the keep mask."""
    s = student.detach().double().reshape(-1, student.shape[-1])
    y = labels.reshape(-1)
    keep = y != ignore_index
    logq = torch.log_softmax(s, -1)
    rows = torch.where(keep, -logq.gather(1, y.clamp_min(0)[:, None]).squeeze(1), torch.zeros(()).double())
    return rows, keep


def _ce_grad64(student, labels, weight, ignore_index=-100):
    """Gradient of weight · Σ_rows CE w.r.t. the student (float64)."""
    s = student.detach().double().reshape(-1, student.shape[-1])
    y = labels.reshape(-1)
    keep = (y != ignore_index).double()[:, None]
    g = torch.softmax(s, -1)
    g[torch.arange(s.shape[0]), y.clamp_min(0)] -= 1.0
    return (g * keep * weight).reshape(student.shape)


def _sparse_rows64(student, targets, temperature, tail="bucket"):
    """Manual sparse KL per row (float64) from api.md §2."""
    v = student.shape[-1]
    logq = torch.log_softmax(student.detach().double().reshape(-1, v) / temperature, -1)
    ids = targets.indices.reshape(-1, targets.k)
    lp = targets.logprobs.double().reshape(-1, targets.k)
    used = ids >= 0
    lq = torch.where(used, logq.gather(1, ids.clamp_min(0)), torch.zeros(()).double())
    p = torch.where(used, lp.exp(), torch.zeros(()).double())
    lp0 = torch.where(used, lp, torch.zeros(()).double())
    if targets.method == "sample":
        w = targets.weights.double().reshape(-1, targets.k)
        return (w * (lp0 - lq)).sum(-1)
    if tail == "renorm":
        mass = p.sum(-1, keepdim=True)
        pt = p / mass
        return torch.where(used, pt * (torch.log(pt.clamp_min(1e-300)) - lq), torch.zeros(()).double()).sum(-1)
    rows = (p * (lp0 - lq)).sum(-1)
    p_tail = targets.tail_logprob.double().reshape(-1).exp()
    q_tail = 1.0 - torch.where(used, lq.exp(), torch.zeros(()).double()).sum(-1)
    tail_term = torch.where(p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), torch.zeros(()).double())
    return rows + tail_term


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------- dense teacher


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.7, 0.3), (0.0, 1.0), (2.0, 0.5)], ids=str)
def test_dense_total_and_parts_match_manual(name, weights):
    soft_w, hard_w = weights
    student, teacher = make_logits((*LEAD, V), seed=1)
    labels = make_labels(LEAD, seed=1, vocab=V)
    kw = dict(temperature=2.0, t2_scale=True, **extra_kwargs(name, beta=0.3, skew=0.2))
    loss_fn = kdfast.DistillationLoss(name, soft_weight=soft_w, hard_weight=hard_w, **kw)
    s = _leaf(student)
    total, soft, hard = loss_fn(s, teacher, labels, return_parts=True)
    total.backward()

    ref_soft, ref_soft_grad = reference(name, student, teacher, labels=labels, **kw)
    ce_rows, keep = _ce64(student, labels)
    n = int(keep.sum())
    ref_hard = ce_rows.sum() / n
    ref_total = soft_w * ref_soft + hard_w * ref_hard
    ref_grad = soft_w * ref_soft_grad + _ce_grad64(student, labels, hard_w / n)

    assert total.dtype == torch.float32
    torch.testing.assert_close(soft.double(), ref_soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard.double(), ref_hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert not soft.requires_grad and not hard.requires_grad


def test_default_is_forward_kl_without_ce():
    student, teacher = make_logits((*LEAD, V), seed=2)
    labels = make_labels(LEAD, seed=2, vocab=V)
    out = kdfast.DistillationLoss()(student, teacher, labels)
    torch.testing.assert_close(out, kdfast.forward_kl(student, teacher, labels=labels))
    # without labels: every row distilled, no hard part
    total, soft, hard = kdfast.DistillationLoss()(student, teacher, return_parts=True)
    torch.testing.assert_close(total, kdfast.forward_kl(student, teacher))
    assert hard is None


def test_labels_mask_both_parts():
    student, teacher = make_logits((*LEAD, V), seed=3)
    labels = make_labels(LEAD, seed=3, vocab=V, masked_fraction=0.5)
    loss_fn = kdfast.DistillationLoss("reverse_kl", hard_weight=0.5)
    s = _leaf(student)
    loss_fn(s, teacher, labels).backward()
    masked = labels == -100
    assert masked.any()
    assert torch.all(s.grad[masked] == 0)
    assert torch.all(s.grad[~masked].abs().sum(-1) > 0)
    # changing masked rows of either input changes nothing
    student2, teacher2 = student.clone(), teacher.clone()
    student2[masked] = 100.0 * torch.randn(int(masked.sum()), V)
    teacher2[masked] = 0.0
    torch.testing.assert_close(loss_fn(student2, teacher2, labels), loss_fn(student, teacher, labels))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions(reduction):
    student, teacher = make_logits((*LEAD, V), seed=4)
    labels = make_labels(LEAD, seed=4, vocab=V)
    loss_fn = kdfast.DistillationLoss("jsd", soft_weight=0.6, hard_weight=0.4, reduction=reduction, beta=0.5)
    total, soft, hard = loss_fn(student, teacher, labels, return_parts=True)
    ref_soft, _ = reference("jsd", student, teacher, labels=labels, reduction=reduction, beta=0.5)
    ce_rows, keep = _ce64(student, labels)
    if reduction == "none":
        ref_hard = ce_rows.reshape(LEAD)
        assert total.shape == LEAD
    elif reduction == "sum":
        ref_hard = ce_rows.sum()
    else:
        ref_hard = ce_rows.sum() / keep.sum()
    torch.testing.assert_close(soft.double(), ref_soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard.double(), ref_hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), 0.6 * ref_soft + 0.4 * ref_hard, rtol=1e-5, atol=1e-6)


def test_num_items_in_batch_makes_micro_batches_add_up():
    """Gradient accumulation: Σ over micro-batches with num_items = the mean over the window."""
    student, teacher = make_logits((4, 9, V), seed=5)
    labels = make_labels((4, 9), seed=5, vocab=V, masked_fraction=0.4)
    labels[0, :7] = -100  # unequal counts per micro-batch
    loss_fn = kdfast.DistillationLoss("forward_kl", soft_weight=0.9, hard_weight=0.1, temperature=1.5)
    s_full = _leaf(student)
    loss_fn(s_full, teacher, labels).backward()
    n = int((labels != -100).sum())
    s_parts = _leaf(student)
    total = 0.0
    for sl in (slice(0, 1), slice(1, 4)):
        part = loss_fn(s_parts[sl], teacher[sl], labels[sl], num_items_in_batch=torch.tensor(n))
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, loss_fn(student, teacher, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_parts.grad, s_full.grad, rtol=1e-5, atol=1e-7)


def test_vocab_size_cuts_padded_columns_for_both_parts():
    student, teacher = make_logits((*LEAD, V + 5), seed=6)
    teacher = teacher[..., :V]
    labels = make_labels(LEAD, seed=6, vocab=V)
    loss_fn = kdfast.DistillationLoss(hard_weight=1.0, vocab_size=V)
    s = _leaf(student)
    total = loss_fn(s, teacher, labels)
    total.backward()
    ref_soft, _ = reference("forward_kl", student[..., :V], teacher, labels=labels)
    ce_rows, keep = _ce64(student[..., :V], labels)
    torch.testing.assert_close(total.double(), ref_soft + ce_rows.sum() / keep.sum(), rtol=1e-5, atol=1e-6)
    assert torch.all(s.grad[..., V:] == 0)


def test_half_precision_student():
    student, teacher = make_logits((*LEAD, V), seed=7)
    labels = make_labels(LEAD, seed=7, vocab=V)
    loss_fn = kdfast.DistillationLoss(hard_weight=0.5)
    s = _leaf(student.bfloat16())
    total = loss_fn(s, teacher.bfloat16(), labels)
    total.backward()
    assert total.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    ref = loss_fn(student.bfloat16().float(), teacher.bfloat16().float(), labels)
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-5)


def test_zero_weight_part_has_no_gradient_path():
    student, teacher = make_logits((*LEAD, V), seed=8)
    labels = make_labels(LEAD, seed=8, vocab=V)
    s = _leaf(student)
    total, soft, hard = kdfast.DistillationLoss(hard_weight=0.0)(s, teacher, labels, return_parts=True)
    total.backward()
    _, ref_grad = reference("forward_kl", student, teacher, labels=labels)
    torch.testing.assert_close(s.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert hard is not None and math.isfinite(float(hard))
    # labels only (soft weight 0) is plain cross-entropy
    s2 = _leaf(student)
    ce = kdfast.DistillationLoss(soft_weight=0.0, hard_weight=1.0)(s2, teacher, labels)
    ce.backward()
    torch.testing.assert_close(
        ce, torch.nn.functional.cross_entropy(student.reshape(-1, V), labels.reshape(-1)), rtol=1e-5, atol=1e-6
    )


def test_is_a_module_and_teacher_gets_no_gradient():
    loss_fn = kdfast.DistillationLoss("tvd", hard_weight=0.2)
    assert isinstance(loss_fn, torch.nn.Module)
    assert "tvd" in repr(loss_fn)
    student, teacher = make_logits((*LEAD, V), seed=9)
    t = _leaf(teacher)
    s = _leaf(student)
    loss_fn(s, t, make_labels(LEAD, seed=9, vocab=V)).backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- sparse teacher


@pytest.mark.parametrize("method", ["topk_bucket", "topk_renorm", "sample"])
def test_sparse_total_and_parts_match_manual(method):
    student, teacher = make_logits((*LEAD, V), seed=10)
    labels = make_labels(LEAD, seed=10, vocab=V)
    if method == "sample":
        targets = kdfast.compress_sample(teacher, 20, temperature=2.0, seed=3)
        kw = {}
    else:
        targets = kdfast.compress_topk(teacher, 5, temperature=2.0)
        kw = {"tail": method.split("_")[1]}
    loss_fn = kdfast.DistillationLoss(soft_weight=0.8, hard_weight=0.2, t2_scale=True, **kw)
    s = _leaf(student)
    total, soft, hard = loss_fn(s, targets, labels, return_parts=True)
    total.backward()
    # the student goes to the targets' temperature (2.0) by default
    rows = _sparse_rows64(student, targets, 2.0, tail=kw.get("tail", "bucket"))
    ce_rows, keep = _ce64(student, labels)
    n = keep.sum()
    ref_soft = 4.0 * (rows * keep).sum() / n
    ref_hard = ce_rows.sum() / n
    torch.testing.assert_close(soft.double(), ref_soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hard.double(), ref_hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), 0.8 * ref_soft + 0.2 * ref_hard, rtol=1e-5, atol=1e-6)
    assert torch.all(s.grad[labels == -100] == 0)


def test_sparse_explicit_temperature_and_sparse_kl_name():
    student, teacher = make_logits((*LEAD, V), seed=11)
    targets = kdfast.compress_topk(teacher, 4, temperature=1.0)
    out = kdfast.DistillationLoss("sparse_kl", temperature=3.0)(student, targets)
    torch.testing.assert_close(out, kdfast.sparse_kl(student, targets, temperature=3.0))
    torch.testing.assert_close(
        out.double(), _sparse_rows64(student, targets, 3.0).mean(), rtol=1e-5, atol=1e-6
    )


def test_full_topk_equals_dense_forward_kl():
    student, teacher = make_logits((*LEAD, V), seed=12)
    labels = make_labels(LEAD, seed=12, vocab=V)
    loss_fn = kdfast.DistillationLoss(hard_weight=0.3)
    dense = loss_fn(student, teacher, labels)
    sparse = loss_fn(student, kdfast.compress_topk(teacher, V), labels)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="kl"), "loss: expected one of"),
        (dict(hard_weight=-1.0), "hard_weight"),
        (dict(soft_weight=float("nan")), "soft_weight"),
        (dict(soft_weight=0.0, hard_weight=0.0), "at least one weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="avg"), "reduction"),
        (dict(loss="jsd", beta=1.5), "beta"),
        (dict(loss="skew_forward_kl", skew=1.0), "skew"),
        (dict(tail="zero"), "tail"),
        (dict(backend="cuda"), "backend"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kdfast.DistillationLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="forward_kl", beta=0.5), "'beta' not accepted by loss='forward_kl'"),
        (dict(loss="jsd", skew=0.1), "'skew' not accepted"),
        (dict(loss="skew_reverse_kl", tail="bucket"), "'tail' not accepted"),
        (dict(temprature=2.0), "'temprature' not accepted"),
        (dict(return_parts=True), "'return_parts' not accepted"),
    ],
)
def test_unknown_keyword_is_a_type_error(kwargs, match):
    """Python's convention for an unexpected keyword, as in fused_linear_distill_loss."""
    with pytest.raises(TypeError, match=match):
        kdfast.DistillationLoss(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match="hard_weight"):
        kdfast.DistillationLoss(hard_weight="0.5")
    with pytest.raises(TypeError, match="teacher"):
        kdfast.DistillationLoss()(torch.zeros(2, 3), [[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="labels"):
        kdfast.DistillationLoss(hard_weight=1.0)(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2))


def test_bad_calls():
    student, teacher = make_logits((*LEAD, V), seed=13)
    labels = make_labels(LEAD, seed=13, vocab=V)
    targets = kdfast.compress_topk(teacher, 3)
    with pytest.raises(ValueError, match="hard_weight=0.5 > 0 needs labels"):
        kdfast.DistillationLoss(hard_weight=0.5)(student, teacher)
    with pytest.raises(ValueError, match="support only loss in 'forward_kl', 'reverse_kl', 'jsd', 'tvd'"):
        kdfast.DistillationLoss("skew_forward_kl")(student, targets)
    with pytest.raises(ValueError, match="loss: sampled targets .* only loss='forward_kl'"):
        kdfast.DistillationLoss("reverse_kl")(student, kdfast.compress_sample(teacher, 3))
    with pytest.raises(ValueError, match="expects kdfast.SparseTargets"):
        kdfast.DistillationLoss("sparse_kl")(student, teacher)
    bad = labels.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"labels: expected class ids in \[0, 37\)"):
        kdfast.DistillationLoss(hard_weight=1.0)(student, teacher, bad)
    with pytest.raises(ValueError, match="labels: expected shape"):
        kdfast.DistillationLoss(hard_weight=1.0)(student, teacher, labels[:, :3])
    with pytest.raises(ValueError, match="vocab_size"):
        kdfast.DistillationLoss()(student, teacher[..., :-1])


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dense_under_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V)
    loss_fn = kdfast.DistillationLoss("jsd", soft_weight=0.7, hard_weight=0.3, beta=0.3, temperature=2.0,
                                      reduction=reduction)
    x = torch.randn(2, 5, 16)
    teacher = torch.randn(2, 5, V) * 3
    labels = make_labels((2, 5), seed=14, vocab=V)

    def step(x, teacher, labels, n):
        return loss_fn(head(x), teacher, labels, num_items_in_batch=n)

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        head.zero_grad()
        out = fn(x, teacher, labels, torch.tensor(7))
        out.sum().backward()
        results.append((out.detach(), head.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
