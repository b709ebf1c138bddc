"""DeepLiftSHAP on the engine: exact secant multipliers (completeness per baseline), Captum's DeepLift on ReLU MLPs,
each operator's rule against its secant formula, clear errors instead of a gradient fallback."""

import pytest
import torch
from captum.attr import DeepLift

from inseq_semiring.errors import InvalidInputError, UnsupportedModelError, UnsupportedOpError
from inseq_semiring.methods import deeplift, deeplift_shap
from inseq_semiring.methods._engine import record_tape
from inseq_semiring.methods.secant_rules import SecantRuleSet, gate_ids
from inseq_semiring.semirings.base import linear_pull
from tiny_models import build

torch.set_num_threads(1)
D = torch.float64
aten = torch.ops.aten


def _baselines(inputs, seed=3):
    gen = torch.Generator().manual_seed(seed)
    zero = tuple(torch.zeros_like(x) for x in inputs)
    rand = [tuple(0.7 * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs) for _ in range(2)]
    return [zero, *rand]


def _sums(attr, rows):
    return sum(a.reshape(rows, -1).sum(1) for a in attr)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "qwen2", "t5", "mistral", "gemma", "roberta",
                                  "distilbert", "bart"])
def test_completeness_per_baseline(name):
    case = build(name, per_row=True, batch=2)
    with torch.no_grad():
        fx = case.fn(*case.inputs)
    for base in _baselines(case.inputs):
        attr = deeplift(case.fn, case.inputs, base, model=case.model)
        with torch.no_grad():
            delta = fx - case.fn(*base)
        torch.testing.assert_close(_sums(attr, 2), delta, rtol=1e-5, atol=1e-12)
        assert float(delta.abs().min()) > 1e-4  # a meaningful difference to explain


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_shap_is_the_mean_over_baselines_and_complete_on_average(name):
    case = build(name, per_row=True, batch=2)
    dist = _baselines(case.inputs)
    shap = deeplift_shap(case.fn, case.inputs, baselines=dist, model=case.model)
    each = [deeplift(case.fn, case.inputs, b, model=case.model) for b in dist]
    for i, a in enumerate(shap):
        torch.testing.assert_close(a, sum(e[i] for e in each) / len(each), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        mean_delta = case.fn(*case.inputs) - sum(case.fn(*b) for b in dist) / len(dist)
    torch.testing.assert_close(_sums(shap, 2), mean_delta, rtol=1e-5, atol=1e-12)
    two = deeplift_shap(case.fn, case.inputs, baselines=dist, n_baselines=2, seed=1, model=case.model)
    assert all(t.shape == x.shape for t, x in zip(two, case.inputs))
    again = deeplift_shap(case.fn, case.inputs, baselines=dist, n_baselines=2, seed=1, model=case.model)
    assert all(torch.equal(a, b) for a, b in zip(two, again))
    with pytest.raises(InvalidInputError, match="n_baselines"):
        deeplift_shap(case.fn, case.inputs, baselines=dist, n_baselines=9)


def test_zero_baseline_through_rms_norm_is_well_conditioned():
    """The normaliser-as-gate split keeps the attributions of the order of the output difference."""
    case = build("t5", per_row=True, batch=2)
    attr = deeplift_shap(case.fn, case.inputs, model=case.model)
    assert sum(float(a.abs().sum()) for a in attr) < 100


def test_relu_mlp_equals_captum_deeplift():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6), torch.nn.ReLU(),
                              torch.nn.Linear(6, 3)).to(D)
    x = torch.randn(4, 5, dtype=D)
    b = 0.5 * torch.randn(4, 5, dtype=D)
    for target in (0, 2):
        ref = DeepLift(net).attribute(x, baselines=b, target=target)
        ours, = deeplift(lambda e: net(e)[:, target], x, b, model=net)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        e = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(net(e)[:, target].sum(), e)
        assert not torch.allclose(ours, (x - b) * g, atol=1e-6)  # not gradient x input


# -- each rule against its secant formula ---------------------------------------------------------------------------

def _pair(fn, x, xb):
    inputs = x if isinstance(x, tuple) else (x,)
    bases = xb if isinstance(xb, tuple) else (xb,)
    t, tb = record_tape(fn, inputs), record_tape(fn, bases)
    return t, tb, SecantRuleSet(baseline=tb, gates=gate_ids(t))


def _dual_check(t, tb, rules):
    """<a, Δy> == Σ_p <pull_p(a), Δx_p> for every record and a random adjoint a (the rule is an exact secant)."""
    gen = torch.Generator().manual_seed(0)
    for rec in t.records:
        base = tb.records[rec.index]
        y, yb = rec.outputs[0], base.outputs[0]
        a = torch.randn(y.shape, generator=gen, dtype=y.dtype)
        lhs = (a * (y - yb)).sum()
        rhs = sum((linear_pull(e.kind, a) * (rec.leaves[e.leaf] - base.leaves[e.leaf])).sum()
                  for e in rules.edges(rec) if e.out == 0)
        torch.testing.assert_close(rhs, lhs, rtol=1e-10, atol=1e-12, msg=lambda m: f"{rec.op}: {m}")


UNARY = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu, "tanh": torch.tanh, "exp": torch.exp,
         "sigmoid": torch.sigmoid, "relu": torch.relu, "rsqrt": lambda v: torch.rsqrt(v * v + 0.1),
         "pow3": lambda v: v ** 3, "erf": torch.erf}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_rule_is_the_rescale_multiplier(name):
    f = UNARY[name]
    x = torch.linspace(-2, 2, 9, dtype=D)
    xb = torch.flip(x, [0]) * 0.5 + 0.1
    xb[4] = x[4]  # Δx = 0: the derivative at the midpoint
    t, tb, rules = _pair(lambda v: f(v).sum(), x, xb)
    _dual_check(t, tb, rules)
    rec = [r for r in t.records if r.op is not aten.sum.default][-1]
    w = rules.edges(rec)[0].kind.weight
    y, yb = rec.outputs[0], tb.records[rec.index].outputs[0]
    xin, xbin = rec.leaves[0], tb.records[rec.index].leaves[0]
    keep = xin != xbin
    torch.testing.assert_close(w[keep], ((y - yb) / (xin - xbin))[keep], rtol=1e-12, atol=1e-12)
    e = xin.clone().requires_grad_(True)
    g, = torch.autograd.grad(rec.op(e, *rec.args[1:], **rec.kwargs).sum(), e)
    torch.testing.assert_close(w[~keep], g[~keep], rtol=1e-9, atol=1e-12)


def test_product_rule_is_mean_weighted():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=gen, dtype=D), torch.randn(3, 4, generator=gen, dtype=D)
    a2, b2 = torch.randn(3, 4, generator=gen, dtype=D), torch.randn(3, 4, generator=gen, dtype=D)
    t, tb, rules = _pair(lambda p, q: (torch.tanh(p) * torch.sin(q)).sum(), (a, b), (a2, b2))
    _dual_check(t, tb, rules)
    rec = next(r for r in t.records if r.op is aten.mul.Tensor)
    base = tb.records[rec.index]
    w = {e.leaf: e.kind.weight for e in rules.edges(rec)}
    torch.testing.assert_close(w[0], (rec.leaves[1] + base.leaves[1]) / 2, rtol=0, atol=1e-15)  # b̄
    torch.testing.assert_close(w[1], (rec.leaves[0] + base.leaves[0]) / 2, rtol=0, atol=1e-15)  # ā


def test_two_operand_elementwise_rules_are_shapley():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(6, generator=gen, dtype=D) + 0.5, torch.rand(6, generator=gen, dtype=D) + 0.5
    a2, b2 = torch.rand(6, generator=gen, dtype=D) + 0.5, torch.rand(6, generator=gen, dtype=D) + 0.5
    for f in (torch.div, torch.maximum, torch.pow):
        t, tb, rules = _pair(lambda p, q: f(torch.exp(p), torch.exp(q)).sum(), (a, b), (a2, b2))
        _dual_check(t, tb, rules)
        rec = next(r for r in t.records if r.op not in (aten.exp.default, aten.sum.default))
        base = tb.records[rec.index]
        (p, q), (pb, qb) = rec.leaves[:2], base.leaves[:2]
        phi_p = 0.5 * (f(p, qb) - f(pb, qb)) + 0.5 * (f(p, q) - f(pb, q))
        w = {e.leaf: e.kind.weight for e in rules.edges(rec)}
        torch.testing.assert_close(w[0] * (p - pb), phi_p, rtol=1e-10, atol=1e-12)


def test_matmul_softmax_layer_norm_and_gated_rules_are_exact_secants():
    gen = torch.Generator().manual_seed(4)
    ln = torch.nn.LayerNorm(5, dtype=D)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(5, generator=gen, dtype=D))
        ln.bias.copy_(torch.randn(5, generator=gen, dtype=D))
    w = torch.randn(5, 5, generator=gen, dtype=D)

    def f(x):
        q = ln(x) @ w
        s = torch.softmax(q @ x.transpose(-1, -2), -1) @ x
        r = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.log_softmax(r, -1)[..., 0].sum()

    x = torch.randn(2, 3, 5, generator=gen, dtype=D)
    for xb in (torch.zeros_like(x), torch.randn(2, 3, 5, generator=gen, dtype=D)):
        t, tb, rules = _pair(f, x, xb)
        ops = {r.op for r in t.records}
        assert {aten._softmax.default, aten.native_layer_norm.default, aten._log_softmax.default,
                aten.bmm.default, aten.rsqrt.default} <= ops
        _dual_check(t, tb, rules)
        attr, = deeplift(f, x, xb)
        with torch.no_grad():
            torch.testing.assert_close(attr.sum(), f(x) - f(xb), rtol=1e-10, atol=1e-12)


# -- errors --------------------------------------------------------------------------------------------------------

def test_an_operator_without_a_secant_rule_is_an_error_not_a_gradient_fallback():
    f = lambda x: x.amax(-1).sum()  # noqa: E731  (the gradient has a rule for amax; DeepLift has none)
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(UnsupportedOpError, match="amax"):
        deeplift(f, x, torch.zeros_like(x))


def test_a_baseline_that_changes_the_graph_is_an_error():
    def f(x):
        return torch.tanh(x).sum() if float(x.sum()) > 0 else torch.sigmoid(x).sum()

    x = torch.ones(3, dtype=D)
    with pytest.raises(UnsupportedModelError, match="different graph"):
        deeplift(f, x, -x)


def test_a_constant_that_differs_between_the_passes_is_an_error():
    def f(x):
        return (x * (x > 0).to(x.dtype)).sum()  # the mask depends on the input but is not a node

    x = torch.tensor([1.0, -1.0, 2.0], dtype=D)
    with pytest.raises(UnsupportedModelError, match="constant"):
        deeplift(f, x, -x)


def test_model_state_is_restored_after_an_error():
    from inseq_semiring.methods import guided_backprop

    case = build("llama", per_row=True, batch=1)
    model = case.model

    def failing(e):
        case.fn(e)  # runs the model in attribution mode (eval, eager), then fails
        raise RuntimeError("boom")

    model.train()
    model.set_attn_implementation("sdpa")
    try:
        for method in (deeplift_shap, guided_backprop):
            with pytest.raises(RuntimeError, match="boom"):
                method(failing, case.inputs, model=model)
            assert model.training and model.config._attn_implementation == "sdpa"
        with pytest.raises(InvalidInputError):
            deeplift_shap(case.fn, case.inputs, baselines=[(torch.zeros(9),)], model=model)
        assert model.training
    finally:
        model.eval()
        model.set_attn_implementation("eager")


def test_sdpa_models_keep_completeness_and_their_attention_setting():
    case = build("llama", per_row=True, batch=2)
    model = case.model
    model.set_attn_implementation("sdpa")
    try:
        base = tuple(torch.zeros_like(x) for x in case.inputs)
        attr = deeplift_shap(case.fn, case.inputs, baselines=base, model=model)
        assert model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            delta = case.fn(*case.inputs) - case.fn(*base)
        torch.testing.assert_close(_sums(attr, 2), delta, rtol=1e-5, atol=1e-12)
    finally:
        model.set_attn_implementation("eager")
