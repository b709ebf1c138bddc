"""Equal to autograd, or a refusal: custom autograd Functions, grad mode off inside the forward, in-place overwrites,
inference mode. The gradient is compared with ``torch.autograd.grad``; the other semirings with the dense oracle run
on the same function written with the constants made explicit (so the oracle does not rely on the recorder's cut)."""

import warnings

import pytest
import torch

import inseq_semiring as isr
from inseq_semiring.errors import InvalidInputError, UnsupportedModelError, UnsupportedOpError
from inseq_semiring.rules import FUNCTION_RULES, Edge, Pointwise
from reference import dense

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64_default")


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class TripleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return 3 * g


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


#: Function -> (the derivative of its forward operators, the derivative its backward states)
FUNCTIONS = {StraightThroughRound: (0.0, 1.0), TripleGradient: (1.0, 3.0), GradientReversal: (1.0, -1.0)}


class Block(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return (self.function.apply(torch.tanh(x)) * x).sum()


def _autograd(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x)
    return g


def _expected(x, slope):
    """d/dx sum(F(tanh x) * x) when F has local derivative ``slope`` and forward value F(tanh x)."""
    return None if slope is None else slope * (1 - torch.tanh(x) ** 2) * x


@pytest.mark.parametrize("function", list(FUNCTIONS), ids=lambda f: f.__name__)
def test_custom_function_refused_by_default_naming_class_module_and_model(function):
    model = Block(function)
    with pytest.raises(UnsupportedOpError) as err:
        isr.run(model, torch.randn(3, 2), "gradient", model=model)
    msg = str(err.value)
    assert f"{function.__module__}.{function.__qualname__}" in msg
    assert "model class Block" in msg and "function_rule" in msg and "custom_functions='forward'" in msg


@pytest.mark.parametrize("function", list(FUNCTIONS), ids=lambda f: f.__name__)
def test_custom_function_forward_policy_warns_and_differentiates_the_forward(function):
    model = Block(function)
    x = torch.randn(3, 2)
    with pytest.warns(UserWarning, match=f"forward operators of .*{function.__qualname__}.*backward is ignored"):
        (g,) = isr.semiring_backward(model, x, "gradient", custom_functions="forward")
    forward_slope, _ = FUNCTIONS[function]
    value = function.forward(None, torch.tanh(x))
    torch.testing.assert_close(g, value + _expected(x, forward_slope))


@pytest.fixture
def registered():
    def rule_for(slope):
        def build(rec):
            x = rec.leaves[0]
            return [Edge(0, 0, Pointwise(torch.tensor(slope, dtype=x.dtype), x.shape, rec.outputs[0].shape))]
        return build

    for function, (_, slope) in FUNCTIONS.items():
        isr.function_rule(function)(rule_for(slope))
    yield
    for function in FUNCTIONS:
        FUNCTION_RULES.pop(function, None)


@pytest.mark.parametrize("function", list(FUNCTIONS), ids=lambda f: f.__name__)
def test_custom_function_with_a_registered_rule_equals_autograd(registered, function):
    model = Block(function)
    x = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = isr.semiring_backward(model, x, "gradient")
    torch.testing.assert_close(g, _autograd(model, x))
    _, slope = FUNCTIONS[function]
    (flow,) = isr.semiring_backward(model, x, "flow")  # |edges|: the rule's weight, not the forward's
    value = function.forward(None, torch.tanh(x))
    torch.testing.assert_close(flow, value.abs() + abs(slope) * (1 - torch.tanh(x) ** 2) * x.abs())


def test_function_of_the_weights_only_is_a_constant():
    """A straight-through quantiser on the weights: d root / d input does not involve its backward."""
    w = torch.nn.Parameter(torch.randn(2))
    fn = lambda x: (StraightThroughRound.apply(w * 2.7) * torch.tanh(x)).sum()  # noqa: E731
    x = torch.randn(3, 2)
    (g,) = isr.semiring_backward(fn, x, "gradient")
    torch.testing.assert_close(g, _autograd(fn, x))


def test_bad_custom_functions_option():
    with pytest.raises(InvalidInputError, match="custom_functions='maybe'"):
        isr.semiring_backward(lambda x: x.sum(), torch.randn(2), "gradient", custom_functions="maybe")


# -- grad mode off and in-place overwrites --------------------------------------------------------------------------

def no_grad_block(x):
    h = torch.tanh(x)
    with torch.no_grad():
        c = h * 3
    return (c * h).sum()


def no_grad_block_explicit(x):
    h = torch.tanh(x)
    return (torch.tanh(x).detach() * 3 * h).sum()


def overwrite(kind, explicit=False):
    def f(x):
        h = torch.tanh(x) * 2
        g = h + x
        if explicit:  # the same function with the overwritten tensor made a fresh constant
            torch.manual_seed(5)
            h = {"fill_": lambda: torch.full_like(h, 0.5), "zero_": lambda: torch.zeros_like(h),
                 "uniform_": lambda: torch.empty_like(h).uniform_(), "normal_": lambda: torch.empty_like(h).normal_(),
                 "copy_": lambda: torch.full_like(h, 0.25)}[kind]().detach()
        else:
            torch.manual_seed(5)
            {"fill_": lambda: h.fill_(0.5), "zero_": lambda: h.zero_(), "uniform_": lambda: h.uniform_(),
             "normal_": lambda: h.normal_(), "copy_": lambda: h.copy_(torch.full_like(h, 0.25))}[kind]()
        return (g * x).sum() + (h * x).sum()
    return f


CASES = {"no_grad": (no_grad_block, no_grad_block_explicit),
         **{k: (overwrite(k), overwrite(k, explicit=True)) for k in ("fill_", "zero_", "uniform_", "normal_", "copy_")}}


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_equals_autograd(case):
    fn, _ = CASES[case]
    x = torch.randn(3, 4)
    (g,) = isr.semiring_backward(fn, x, "gradient")
    torch.testing.assert_close(g, _autograd(fn, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("semiring", ["flow", "entropy", "maxpath"])
@pytest.mark.parametrize("case", list(CASES))
def test_other_semirings_equal_the_dense_oracle_of_the_explicit_function(case, semiring):
    fn, explicit = CASES[case]
    x = torch.randn(3, 4)
    (got,) = isr.semiring_backward(fn, x, semiring)
    graph = dense.dense_graph(explicit, (x,))
    want = {"flow": dense.flow, "entropy": dense.entropy, "maxpath": dense.maxpath_abs}[semiring](graph)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_outer_no_grad_around_the_call_changes_nothing():
    fn = lambda x: (torch.tanh(x) * x).sum()  # noqa: E731
    x = torch.randn(3)
    with torch.no_grad():
        (g,) = isr.semiring_backward(fn, x, "gradient")
    torch.testing.assert_close(g, _autograd(fn, x))


def test_in_place_write_with_grad_off_into_a_node_is_refused():
    def fn(x):
        h = torch.tanh(x)
        with torch.no_grad():
            h.mul_(2)
        return (h * x).sum()

    with pytest.raises(UnsupportedModelError, match="in-place write with grad mode off"):
        isr.semiring_backward(fn, torch.randn(3), "gradient")


def test_inference_mode_is_named():
    with torch.inference_mode():
        with pytest.raises(InvalidInputError, match=r"torch.inference_mode\(\)"):
            isr.semiring_backward(lambda x: torch.tanh(x).sum(), torch.randn(3), "gradient")


class Quantiser(torch.nn.Module):
    def forward(self, x):
        return StraightThroughRound.apply(x * 4) / 4


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.quant = Quantiser()

    def forward(self, x):
        return torch.tanh(self.quant(self.lin(x))).sum()


def test_custom_function_inside_a_submodule_is_located():
    model = TinyNet()
    with pytest.raises(UnsupportedOpError, match=r"model class TinyNet: .*StraightThroughRound \(in module 'quant'\)"):
        isr.run(model, torch.randn(2, 3), "gradient", model=model)


def test_custom_function_inside_a_submodule_with_a_rule_equals_autograd(registered):
    model = TinyNet()
    x = torch.randn(2, 3)
    (g,) = isr.semiring_backward(model, x, "gradient", model=model)
    torch.testing.assert_close(g, _autograd(model, x))
