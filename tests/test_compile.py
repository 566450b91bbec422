"""Every dense loss, on every CPU backend, inside ``torch.compile(fullgraph=True)`` equals eager.

``aot_eager`` traces through Dynamo and AOTAutograd (custom-op schemas, fake implementations,
the backward graph) without paying for C++ code generation; one case also runs the default
inductor backend end to end.
"""

import pytest
import torch

import kdfast

LOSSES = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_forward_kl": {"skew": 0.2},
    "skew_reverse_kl": {"skew": 0.2},
    "tvd": {},
}


class Student(torch.nn.Module):
    def __init__(self, hidden=16, vocab=37):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, x, teacher, labels, loss, kwargs):
        return getattr(kdfast, loss)(self.head(x), teacher, labels=labels, **kwargs)


def _run(model, fn, x, teacher, labels, loss, kwargs):
    model.zero_grad()
    out = fn(x, teacher, labels, loss, kwargs)
    out.sum().backward()
    return out.detach(), model.head.weight.grad.clone()


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("backend", ["rust", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_matches_eager(loss, backend, reduction):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Student()
    x = torch.randn(2, 5, 16)
    teacher = torch.randn(2, 5, 37) * 3
    labels = torch.randint(0, 37, (2, 5))
    labels[0, :2] = -100
    kwargs = dict(LOSSES[loss], temperature=2.0, t2_scale=True, reduction=reduction, backend=backend)
    eager = _run(model, model, x, teacher, labels, loss, kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = _run(model, compiled, x, teacher, labels, loss, kwargs)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], eager[1], rtol=1e-5, atol=1e-6)


def test_num_items_tensor_and_vocab_size_under_compile():
    torch.manual_seed(1)
    torch._dynamo.reset()
    model = Student(vocab=40)
    x = torch.randn(6, 16)
    teacher = torch.randn(6, 38)
    labels = torch.tensor([1, -100, 3, 4, -100, 5])
    kwargs = dict(num_items_in_batch=torch.tensor(9), vocab_size=38, backend="rust")
    eager = _run(model, model, x, teacher, labels, "jsd", kwargs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = _run(model, compiled, x, teacher, labels, "jsd", kwargs)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)


def test_inductor_end_to_end():
    torch.manual_seed(2)
    torch._dynamo.reset()
    model = Student()
    x = torch.randn(8, 16)
    teacher = torch.randn(8, 37)
    kwargs = {"backend": "rust", "temperature": 1.5}
    eager = _run(model, model, x, teacher, None, "forward_kl", kwargs)
    compiled = torch.compile(model, fullgraph=True)
    got = _run(model, compiled, x, teacher, None, "forward_kl", kwargs)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
