"""Bad input gets a clear error: what, where, what to do; never a deep traceback or a wrong number."""

import pytest
import torch

import inseq_semiring as isr
from inseq_semiring.errors import InvalidInputError, UnsupportedOpError

torch.set_num_threads(1)


def f(x):
    return torch.tanh(x).sum()


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(semiring="maximum"), "unknown semiring 'maximum'.*What to do: use one of"),
    (dict(semiring="maxpath", sign="both"), "sign='both' is not one of"),
    (dict(semiring="maxpath", granularity="layer"), "granularity='layer' is not one of"),
    (dict(semiring="flow", sign="positive"), "apply to the maxpath semiring only"),
    (dict(semiring="entropy", granularity="tensor"), "apply to the maxpath semiring only"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        isr.semiring_backward(f, torch.randn(3), **kwargs)


@pytest.mark.parametrize("x, pattern", [
    (torch.empty(0), "input 0 is empty"),
    (torch.tensor([1.0, float("nan")]), "input 0 contains NaN or inf"),
    (torch.tensor([1, 2]), "input 0 is not a floating-point tensor.*not token ids"),
])
def test_bad_inputs(x, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        isr.semiring_backward(f, x, "gradient")


def test_no_inputs():
    with pytest.raises(InvalidInputError, match="no inputs given"):
        isr.semiring_backward(f, (), "gradient")


def test_root_must_be_scalar_or_one_per_row():
    with pytest.raises(InvalidInputError, match=r"shape \(2, 3\).*out.logits\[0, -1, token\]"):
        isr.semiring_backward(lambda x: x * 2, torch.randn(2, 3), "gradient")


def test_nan_in_the_model_is_reported():
    with pytest.raises(InvalidInputError, match="root.*NaN or inf"):
        isr.semiring_backward(lambda x: torch.log(x - 10).sum(), torch.rand(3), "flow")


def test_root_independent_of_inputs():
    w = torch.randn(3)
    with pytest.raises(InvalidInputError, match="does not depend on the inputs"):
        isr.semiring_backward(lambda x: w.sum(), torch.randn(3), "gradient")


def test_unsupported_operator_names_op_module_and_remedy():
    class Block(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0).sum()

    model = Block()
    with pytest.raises(UnsupportedOpError) as err:
        isr.run(model, torch.randn(4), "maxpath", model=model)
    message = str(err.value)
    assert "aten.cumsum.default" in message
    assert "of model class Block" in message
    assert "@rule(aten.<op>.<overload>)" in message


def test_in_place_write_into_a_view_is_refused():
    def g(x):
        y = x * 1.0
        y[0].mul_(2.0)  # writes through a view into y
        return y.sum()

    with pytest.raises(isr.UnsupportedModelError, match="in-place write into a view"):
        isr.semiring_backward(g, torch.randn(2, 2), "gradient")


def test_in_place_ops_on_whole_tensors_are_recorded_functionally():
    def g(x):
        y = x * 3.0
        y.add_(x)  # y = 3x + x
        y.mul_(y)  # y = (4x)^2, the old y twice
        return y.sum()

    x = torch.randn(3, dtype=torch.float64)
    got, = isr.semiring_backward(g, x, "gradient")
    torch.testing.assert_close(got, 32 * x, rtol=1e-12, atol=1e-12)
