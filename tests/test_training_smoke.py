"""A tiny student trained with kdfast.forward_kl (Rust backend) moves towards its teacher."""

import math

import pytest
import torch

from conftest import extra_kwargs, loss_fn


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_student_learns_teacher(name, dtype):
    torch.manual_seed(0)
    hidden, vocab = 16, 50
    teacher = torch.nn.Linear(hidden, vocab)
    student = torch.nn.Linear(hidden, vocab)
    x = torch.randn(64, hidden)
    with torch.no_grad():
        teacher_logits = (teacher(x) * 2).to(dtype).view(4, 16, vocab)  # [B, S, V]
    labels = torch.randint(0, vocab, (4, 16))
    labels[:, -3:] = -100
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-2)
    fn = loss_fn(name)
    history = []
    for _ in range(40):
        optimizer.zero_grad()
        student_logits = student(x).to(dtype).view(4, 16, vocab)
        loss = fn(student_logits, teacher_logits, labels=labels, temperature=2.0,
                  t2_scale=True, backend="rust", **extra_kwargs(name))
        loss.backward()
        assert teacher_logits.grad is None
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0], history


def test_no_grad_skips_the_gradient():
    """Evaluation under torch.no_grad() returns a plain loss and leaves the student untouched."""
    import kdfast
    student = torch.randn(8, 50, requires_grad=True)
    teacher = torch.randn(8, 50)
    with torch.no_grad():
        loss = kdfast.forward_kl(student, teacher, backend="rust")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kdfast.forward_kl(student.detach(), teacher, backend="rust"))
