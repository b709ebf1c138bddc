"""LRP-epsilon, AttnLRP and CP-LRP on the engine (inseq_semiring.lrp) against an explicit per-operator reference,
conservation, each rule against its formula, and the invariances (eager/sdpa, batch, repeat, model state)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import inseq_semiring.lrp as lrp
import tiny_models as tm
from reference.relevance import reference_relevance

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64_default")


# -- 1. the per-operator reference ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "qwen2"])
@pytest.mark.parametrize("method", lrp.METHODS)
def test_equals_the_message_passing_reference(name, method):
    case = tm.build(name)
    ref = reference_relevance(case.fn, case.inputs, method, epsilon=1e-9, model=case.model)
    got = lrp.relevance(case.fn, case.inputs, method, epsilon=1e-9, model=case.model)
    for r, g in zip(ref, got):
        assert float(r.abs().max()) > 1e-3  # not trivially zero
        torch.testing.assert_close(g, r, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("method", lrp.METHODS)
def test_epsilon_stabiliser_equals_the_reference(name, method):
    """A large epsilon (0.05) makes the stabiliser visible: z_j + eps sign(z_j) on every matrix product."""
    case = tm.build(name)
    ref = reference_relevance(case.fn, case.inputs, method, epsilon=0.05, model=case.model)
    got = lrp.relevance(case.fn, case.inputs, method, epsilon=0.05, model=case.model)
    small = lrp.relevance(case.fn, case.inputs, method, epsilon=1e-9, model=case.model)
    for r, g, s in zip(ref, got, small):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-8)
        assert float((g - s).abs().max()) > 1e-4  # epsilon really changed it


def test_the_three_methods_differ():
    case = tm.build("llama")
    a, b, c = (lrp.relevance(case.fn, case.inputs, m, model=case.model)[0] for m in lrp.METHODS)
    assert float((a - b).abs().max()) > 1e-3 and float((b - c).abs().max()) > 1e-3


# -- 2. conservation --------------------------------------------------------------------------------------------

def _bias_free_logit(name):
    case = tm.build(name)
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.zero_()

    def fn(e):
        with tm.NoFloat32():
            return model(inputs_embeds=e, use_cache=False).logits[0, -1, tm.TARGET]

    return model, fn, case.inputs


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_cp_lrp_conserves_relevance_on_bias_free_models(name):
    model, fn, inputs = _bias_free_logit(name)
    res = lrp.explain(fn, inputs, "cp_lrp", epsilon=1e-12, model=model)
    ratio = float(res.relevance[0].sum() / res.root)
    assert abs(ratio - 1) < 1e-6, ratio
    # attn_lrp lets relevance into the softmax, whose rule absorbs part of it: not conserved here
    att = lrp.explain(fn, inputs, "attn_lrp", epsilon=1e-12, model=model)
    assert abs(float(att.relevance[0].sum() / att.root) - 1) > 1e-3


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_attn_lrp_relevance_entering_the_final_norm_is_the_root_logit(name):
    model, fn, inputs = _bias_free_logit(name)
    res = lrp.explain(fn, inputs, "attn_lrp", epsilon=1e-12, model=model, keep_trail=True)
    tape = res.plan.tape
    first = next(rec for rec in tape.records if rec.module_path == "model.norm")
    (leaf,) = [i for i, t in enumerate(first.leaf_ids) if t is not None]
    x, tid = first.leaves[leaf], first.leaf_ids[leaf]
    entering = float((x * res.result.trail[tid]).sum())
    assert abs(entering / float(res.root) - 1) < 1e-9


def test_lrp_epsilon_on_a_bias_free_relu_mlp_is_gradient_times_input():
    w1, w2, w3 = torch.randn(6, 9), torch.randn(9, 7), torch.randn(7)

    def f(x):
        return (torch.relu(torch.relu(x @ w1) @ w2) @ w3).sum()

    x = torch.randn(3, 6)
    r, = lrp.relevance(f, x, "lrp_epsilon", epsilon=1e-12)
    e = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(f(e), e)
    torch.testing.assert_close(r, x * g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.sum(), f(x), rtol=1e-9, atol=1e-12)
    big, = lrp.relevance(f, x, "lrp_epsilon", epsilon=1.0)
    assert not torch.allclose(big, x * g, rtol=1e-3)


# -- 3. each rule alone against its formula ---------------------------------------------------------------------

def test_epsilon_rule_on_a_linear_layer_with_bias():
    w, b, c = torch.randn(4, 5), torch.randn(4), torch.randn(4)
    x, eps = torch.randn(5), 0.3

    def f(v):
        return (F.linear(v.unsqueeze(0), w, b) * c).sum()

    r, = lrp.relevance(f, x, "lrp_epsilon", epsilon=eps)
    z = w @ x + b
    rz = c * z
    sign = torch.where(z >= 0, 1.0, -1.0)
    torch.testing.assert_close(r, x * (w.T @ (rz / (z + eps * sign))), rtol=1e-12, atol=1e-14)


def test_softmax_rule():
    """R_x_i = x_i (R_i - s_i sum_j R_j) with R = the relevance of the softmax output."""
    x, c = torch.randn(3, 6), torch.randn(3, 6)

    def f(v):
        return (torch.softmax(v, -1) * c).sum()

    r, = lrp.relevance(f, x, "attn_lrp")
    s = torch.softmax(x, -1)
    R = c * s
    torch.testing.assert_close(r, x * (R - s * R.sum(-1, keepdim=True)), rtol=1e-12, atol=1e-14)


def test_uniform_rule_splits_a_product_in_half():
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    ra, rb = lrp.relevance(lambda u, v: (u * v * c).sum(), (a, b), "attn_lrp")
    torch.testing.assert_close(ra, a * b * c / 2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rb, a * b * c / 2, rtol=1e-12, atol=1e-14)
    # ...and a matrix product of two input-dependent tensors: R_{A_ik} = sum_j A_ik B_kj R_ij / (2 z_ij)
    A, B, C = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    rA, rB = lrp.relevance(lambda u, v: ((u @ v) * C).sum(), (A, B), "attn_lrp", epsilon=1e-12)
    Z = A @ B
    ratio = C * Z / Z  # R_ij / z_ij with R = C * Z
    torch.testing.assert_close(rA, A * (ratio @ B.T) / 2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rB, B * (A.T @ ratio) / 2, rtol=1e-9, atol=1e-12)
    # lrp_epsilon gives each operand the whole product
    ea, eb = lrp.relevance(lambda u, v: (u * v * c).sum(), (a, b), "lrp_epsilon")
    torch.testing.assert_close(ea, a * b * c, rtol=1e-12, atol=1e-14)


def test_identity_rule():
    x, c = torch.randn(4, 5), torch.randn(4, 5)
    for act in (F.gelu, F.silu, torch.tanh, lambda v: F.gelu(v, approximate="tanh")):
        r, = lrp.relevance(lambda v: (act(v) * c).sum(), x, "attn_lrp")
        torch.testing.assert_close(r, act(x) * c, rtol=1e-12, atol=1e-14)


def test_layer_norm_with_sigma_detached():
    """y = w (x - mean x) rstd + b, rstd constant: R_x = x * (g - mean(g)), g = w rstd c (c = R_y / y)."""
    x, w, b, c = torch.randn(3, 6), torch.randn(6), torch.randn(6), torch.randn(3, 6)
    r, = lrp.relevance(lambda v: (F.layer_norm(v, (6,), w, b) * c).sum(), x, "attn_lrp")
    rstd = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = w * rstd * c
    torch.testing.assert_close(r, x * (g - g.mean(-1, keepdim=True)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["llama", "gemma", "t5"])
def test_rms_norms_with_sigma_detached_pass_relevance_unchanged(name):
    """HF RMSNorm (pow/mean/rsqrt/mul; Gemma's (1 + w); T5): with rsqrt constant, y_i = c_i x_i, so R_x = R_y."""
    model = tm.tiny_model(name)
    norm = model.model.norm if name != "t5" else model.encoder.final_layer_norm
    x, c = torch.randn(2, 3, tm.HIDDEN), torch.randn(2, 3, tm.HIDDEN)

    def f(v):
        with tm.NoFloat32():
            return (norm(v) * c).sum()

    r, = lrp.relevance(f, x, "attn_lrp", model=norm)
    with tm.NoFloat32():
        torch.testing.assert_close(r, norm(x) * c, rtol=1e-12, atol=1e-14)
    rows = lrp.coverage(norm, "attn_lrp", x, fn=f)
    assert any(row.rule == "norm, sigma detached" for row in rows)
    assert all(row.op != "aten.rsqrt.default" for row in rows)  # the normaliser is off the relevance path


# -- 4. invariances ---------------------------------------------------------------------------------------------

def test_eager_equals_sdpa_and_the_attention_setting_is_restored():
    case = tm.build("llama")
    model = copy.deepcopy(case.model)
    model.set_attn_implementation("sdpa")

    def fn(e):
        with tm.NoFloat32():
            return torch.log_softmax(model(inputs_embeds=e, use_cache=False).logits[0, -1], -1)[tm.TARGET]

    for method in lrp.METHODS:
        eager = lrp.relevance(case.fn, case.inputs, method, model=case.model)[0]
        sdpa = lrp.relevance(fn, case.inputs, method, model=model)[0]
        torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-12)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["gpt2", "bert", "qwen2"])
def test_a_batch_equals_each_row_alone_and_repeats_exactly(name):
    case = tm.build(name, batch=3, per_row=True)
    for method in lrp.METHODS:
        batch = lrp.relevance(case.fn, case.inputs, method, model=case.model)[0]
        again = lrp.relevance(case.fn, case.inputs, method, model=case.model)[0]
        assert torch.equal(batch, again)
        for row in range(3):
            alone = lrp.relevance(case.fn, (case.inputs[0][row:row + 1],), method, model=case.model)[0]
            torch.testing.assert_close(batch[row:row + 1], alone, rtol=0, atol=1e-12)


def _state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()}, model.config._attn_implementation)


def test_model_state_is_unchanged_also_after_an_exception():
    case = tm.build("llama")
    model = copy.deepcopy(case.model).train()
    model.set_attn_implementation("sdpa")
    params, training, attn = _state(model)
    out = model.eval()(inputs_embeds=case.inputs[0]).logits
    model.train()

    def boom(e):
        model(inputs_embeds=e)
        raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        lrp.relevance(boom, case.inputs, "attn_lrp", model=model)
    with pytest.raises(lrp.UnsupportedRelevanceOpError):  # raised after recording, by the rule plan
        lrp.relevance(lambda e: model(inputs_embeds=e.cumsum(1)).logits[0, -1, 3], case.inputs, "attn_lrp",
                      model=model)
    lrp.relevance(lambda e: model(inputs_embeds=e).logits[0, -1, 3], case.inputs, "cp_lrp", model=model)
    p2, t2, a2 = _state(model)
    assert a2 == attn and t2 == training and all(torch.equal(params[n], p2[n]) for n in params)
    torch.testing.assert_close(model.eval()(inputs_embeds=case.inputs[0]).logits, out, rtol=0, atol=0)


# -- 5. unsupported operators -----------------------------------------------------------------------------------

def test_an_operator_without_a_rule_raises_naming_op_module_and_model():
    case = tm.build("llama")

    def fn(e):
        return case.model(inputs_embeds=torch.cumsum(e, 1)).logits[0, -1, 3]

    for method in lrp.METHODS:
        with pytest.raises(lrp.UnsupportedRelevanceOpError) as err:
            lrp.relevance(fn, case.inputs, method, model=case.model)
        msg = str(err.value)
        assert "aten.cumsum.default" in msg and "<top level>" in msg and "LlamaForCausalLM" in msg
        assert "extra_rules" in msg and method in msg
    rows = lrp.coverage(case.model, "attn_lrp", case.inputs[0], fn=fn)
    assert [r.op for r in rows if r.rule is None] == ["aten.cumsum.default"]


def test_a_nonlinear_operator_inside_a_module_raises_and_extra_rules_fix_it():
    class Exp(torch.nn.Module):
        def forward(self, v):
            return torch.exp(v)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
            self.act = Exp()

        def forward(self, v):
            return self.act(self.lin(v)).sum()

    net = Net()
    x = torch.randn(2, 4)
    with pytest.raises(lrp.UnsupportedRelevanceOpError, match=r"model class Net: aten.exp.default \(in act\)"):
        lrp.relevance(net, x, "attn_lrp", model=net)
    r, = lrp.relevance(net, x, "attn_lrp", model=net, extra_rules={torch.ops.aten.exp.default: "identity"})
    assert torch.isfinite(r).all()


def test_coverage_lists_every_rule_of_a_model():
    model = tm.tiny_model("gpt2")
    ids = torch.tensor([[1, 2, 3, 4]])
    rows = lrp.coverage(model, "attn_lrp", ids)
    assert all(r.rule is not None for r in rows)  # the default root (top logit) needs no extra rule
    rules = {(r.op, r.rule) for r in rows}
    assert ("lrp.module_identity", "identity") in rules  # NewGELUActivation, detected as a module
    assert ("aten.bmm.default", "uniform + epsilon") in rules
    assert ("aten.native_layer_norm.default", "layer norm, sigma detached") in rules
    assert ("aten.addmm.default", "epsilon") in rules
    cp = {(r.op, r.rule) for r in lrp.coverage(model, "cp_lrp", ids)}
    assert ("aten.bmm.default", "epsilon, attention weights constant") in cp
    assert all(op != "aten._softmax.default" for op, _ in cp)  # no relevance enters the attention weights


@pytest.mark.parametrize("name", sorted(tm.ARCHS))
def test_every_tiny_architecture_runs_under_every_method(name):
    case = tm.build(name)
    for method in lrp.METHODS:
        rel = lrp.relevance(case.fn, case.inputs, method, model=case.model)
        assert all(torch.isfinite(r).all() and float(r.abs().max()) > 0 for r in rel)
