"""Guided Backprop on the engine: Captum's on ReLU networks, clipping at every element-wise activation elsewhere."""

import pytest
import torch
from captum.attr import GuidedBackprop

from inseq_semiring.methods import guided_backprop
from tiny_models import build

torch.set_num_threads(1)
D = torch.float64


def _relu_mlp(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 7), torch.nn.ReLU(),
                              torch.nn.Linear(7, 3)).to(D)
    return net


@pytest.mark.parametrize("target", [0, 2])
def test_equals_captum_on_relu_mlp(target):
    net = _relu_mlp()
    x = torch.randn(5, 6, dtype=D)
    ref = GuidedBackprop(net).attribute(x, target=target)
    ours, = guided_backprop(lambda e: net(e)[:, target], x, model=net)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    e = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(net(e)[:, target].sum(), e)
    assert not torch.allclose(ours, g, atol=1e-6)  # the clipping did something on this network


def test_only_positive_signals_pass_through_activations():
    """y = sum_j v_j act(w_j x): the signal reaching act_j is v_j; units with v_j < 0 must contribute nothing, and the
    others contribute act'(w_j x) v_j w_j."""
    w = torch.tensor([[1.5, -0.5, 0.7, -1.2]], dtype=D)  # [1, 4]
    v = torch.tensor([2.0, -3.0, 0.5, -0.25], dtype=D)
    x = torch.tensor([[0.3], [-0.8]], dtype=D)  # two rows, one feature each
    for act, deriv in ((torch.tanh, lambda z: 1 - torch.tanh(z) ** 2),
                       (torch.nn.functional.gelu, None), (torch.nn.functional.silu, None),
                       (torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)))):
        def f(e):
            return (act(e @ w) * v).sum(-1)

        z = x @ w
        if deriv is None:
            zz = z.clone().requires_grad_(True)
            d, = torch.autograd.grad(act(zz).sum(), zz)
        else:
            d = deriv(z)
        expected = ((d * v.clamp_min(0)) * w).sum(-1, keepdim=True)
        ours, = guided_backprop(f, x)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        e = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(f(e).sum(), e)
        assert not torch.allclose(ours, g)


def test_differs_from_the_gradient_on_a_gelu_transformer():
    case = build("bert", per_row=True, batch=2)
    ours, = guided_backprop(case.fn, case.inputs, model=case.model)
    e = case.inputs[0].clone().requires_grad_(True)
    g, = torch.autograd.grad(case.fn(e).sum(), e)
    assert ours.shape == g.shape
    assert (ours - g).abs().max() > 1e-3 * g.abs().max()


def test_gradient_unchanged_where_no_activation():
    torch.manual_seed(1)
    w = torch.randn(4, 3, dtype=D)
    x = torch.randn(2, 4, dtype=D)
    f = lambda e: torch.softmax(e @ w, -1)[:, 0]  # noqa: E731
    ours, = guided_backprop(f, x)
    e = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(f(e).sum(), e)
    torch.testing.assert_close(ours, g, rtol=1e-12, atol=1e-12)


class _Net(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.lin1, self.act, self.lin2 = torch.nn.Linear(4, 7).to(D), act, torch.nn.Linear(7, 1).to(D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=D))

    def forward(self, x, clip_hook=False):
        h = self.act(self.lin1(x))
        if clip_hook:
            h.register_hook(lambda g: g.clamp_min(0))  # the reference: clip the signal at the activation's output
        return self.lin2(h)[:, 0]


@pytest.mark.parametrize("act_name", ["NewGELUActivation", "GELUActivation", "SiLU"])
def test_activation_written_as_a_formula_is_clipped_once_at_its_output(act_name):
    import transformers.activations as acts

    act = getattr(acts, act_name)() if hasattr(acts, act_name) else getattr(torch.nn, act_name)()
    net = _Net(act)
    x = torch.randn(6, 4, dtype=D, generator=torch.Generator().manual_seed(6))
    ours, = guided_backprop(net, x, model=net)
    e = x.clone().requires_grad_(True)
    ref, = torch.autograd.grad(net(e, clip_hook=True).sum(), e)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    plain = torch.autograd.grad(net(e).sum(), e)[0]
    assert not torch.allclose(ours, plain)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "mistral", "gemma", "bert", "roberta", "distilbert", "t5",
                                  "bart"])
def test_runs_on_every_architecture_and_clips_something(name):
    case = build(name, per_row=True, batch=2)
    ours = guided_backprop(case.fn, case.inputs, model=case.model)
    xs = tuple(x.clone().requires_grad_(True) for x in case.inputs)
    grads = torch.autograd.grad(case.fn(*xs).sum(), xs)
    assert all(o.shape == g.shape and bool(torch.isfinite(o).all()) for o, g in zip(ours, grads))
    assert any(not torch.allclose(o, g, rtol=1e-6, atol=1e-9) for o, g in zip(ours, grads))
