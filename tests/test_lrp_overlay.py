"""A rule-set overlay changes the local rules without touching the global table or the traversal."""

import torch

import inseq_semiring as isr
from inseq_semiring.lrp.rulesets import IDENTITY_NONLINEARITIES, relevance
from inseq_semiring.rules import RULES

torch.set_num_threads(1)


def _mlp():
    torch.manual_seed(0)
    w1, w2, w3 = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)

    def f(x):
        h = torch.nn.functional.gelu(x @ w1)
        return (torch.tanh(h @ w2) @ w3).sum()

    return f


def test_identity_rule_conserves_relevance_in_a_bias_free_network():
    f = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    r, = relevance(f, x)
    assert torch.allclose(r.sum(), f(x), rtol=1e-12, atol=1e-12)
    # the plain gradient x input does not conserve it (the rule really changed something)
    g, = isr.semiring_backward(f, x, "gradient")
    assert not torch.allclose((g * x).sum(), f(x), rtol=1e-3)


def test_overlay_leaves_the_global_rule_table_alone():
    before = dict(RULES)
    f = _mlp()
    x = torch.randn(2, 5, dtype=torch.float64)
    relevance(f, x)
    assert RULES == before
    assert IDENTITY_NONLINEARITIES.lookup(torch.ops.aten.gelu.default) is not RULES[torch.ops.aten.gelu.default]
    e = x.clone().requires_grad_(True)
    ref, = torch.autograd.grad(f(e), e)
    g, = isr.semiring_backward(f, x, "gradient")
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
