"""Relevance paths: maxpath / entropy semirings over the LRP-edited graph against brute-force path enumeration."""

import pytest
import torch

import inseq_semiring.lrp as lrp
from inseq_semiring.paths import decode_path, top_paths
from reference.dense import dense_graph
from reference.enumerate import enumerate_semirings

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("float64_default")

_G = torch.Generator().manual_seed(77)
D, T = 3, 2
WQ, WK, WV, WO, W1, W2, WOUT = (torch.randn(*s, generator=_G, dtype=torch.float64) * 0.8 for s in
                                [(D, D), (D, D), (D, D), (D, D), (D, 4), (4, D), (D,)])
GAIN = torch.randn(D, generator=_G, dtype=torch.float64)
MASK = torch.triu(torch.full((T, T), -1e9, dtype=torch.float64), 1)


def block(x, detach: bool):
    """A bias-free pre-norm block: RMSNorm (pow/mean/rsqrt/mul), causal attention, ReLU MLP, residuals; the root
    is a logit. ``detach``: the normaliser and the attention weights as constants (CP-LRP's graph, by hand)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    h = x * (r.detach() if detach else r) * GAIN
    a = torch.softmax((h @ WQ) @ (h @ WK).T / D ** 0.5 + MASK, -1)
    x = x + ((a.detach() if detach else a) @ (h @ WV)) @ WO
    x = x + torch.relu(x @ W1) @ W2
    return x[-1] @ WOUT


def test_maxpath_and_entropy_over_cp_lrp_rules_equal_brute_force_enumeration():
    x = torch.randn(T, D, generator=_G, dtype=torch.float64)
    g = dense_graph(lambda v: block(v, True), (x,))
    ref = enumerate_semirings(g)
    assert int(ref["count"][0].min()) > 1  # several paths per element: a real search
    for semiring in ("maxpath", "entropy"):
        res, _ = lrp.relevance_semiring(lambda v: block(v, False), (x,), "cp_lrp", semiring, epsilon=0.0)
        torch.testing.assert_close(res.values[0], ref[semiring][0], rtol=1e-9, atol=1e-12)
    # the gradient over the same rules: x * g~ is cp_lrp's relevance, and it sums to the root
    rel, = lrp.relevance(lambda v: block(v, False), (x,), "cp_lrp", epsilon=0.0)
    torch.testing.assert_close(rel, x * ref["gradient"][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rel.sum(), block(x, False), rtol=1e-10, atol=1e-12)
    # the plain gradient graph is a different graph (the rules really edit it)
    plain = enumerate_semirings(dense_graph(lambda v: block(v, False), (x,)))
    assert not torch.allclose(plain["maxpath"][0], ref["maxpath"][0], rtol=1e-3)


def test_decoded_relevance_paths_multiply_to_their_value():
    x = torch.randn(T, D, generator=_G, dtype=torch.float64)
    for method in lrp.METHODS:
        res, plan = lrp.relevance_semiring(lambda v: block(v, False), (x,), method, "maxpath", backpointers=True)
        for path in top_paths(res, k=3, rules=plan.rules):
            assert abs(abs(path.product()) - path.value) <= 1e-10 * max(1.0, path.value)
            assert any(h.op == "lrp.epsilon" for h in path.hops)  # hops of the edited graph
        one = decode_path(res, 0, (1, 2), rules=plan.rules)
        assert abs(abs(one.product()) - float(res.values[0][1, 2])) <= 1e-10 * max(1.0, one.value)
