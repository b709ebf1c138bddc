"""The engine against brute-force path enumeration on tiny graphs, and the issue's known cases.

Every semiring value is a statistic of the list of root-to-input paths; on graphs with at most a few thousand
paths we list them all (``reference/enumerate.py``) and require the engine's sweep to agree to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

import inseq_semiring as isr
from graphs import GRAPHS
from reference import dense
from reference.enumerate import enumerate_paths, statistics
from shared import SCALAR_MODES, TENSOR_MODES, assert_close_scaled, graph_reference as references

pytestmark = pytest.mark.usefixtures("float64_default")

MODES = SCALAR_MODES


def engine(fn, inputs, mode: str):
    semiring, options = {**MODES, **TENSOR_MODES}[mode]
    return isr.semiring_backward(fn, inputs, semiring, **options)


def assert_same(actual, expected, rtol=1e-12, what=""):
    assert_close_scaled(actual, expected, rtol, what)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_engine_equals_enumeration(name, mode):
    fn, inputs = GRAPHS[name]
    _, enum, _ = references(name)
    assert_same(engine(fn, inputs, mode), enum[mode], what=f"{name}/{mode}")


@pytest.mark.parametrize("name", list(GRAPHS))
def test_dense_reference_equals_enumeration(name):
    """The two references agree with each other (DP over the dense graph == listing the paths)."""
    g, enum, ref = references(name)
    for mode in MODES:
        assert_same(ref[mode], enum[mode], what=f"{name}/{mode}")
    assert_same(dense.count_paths(g), enum["count"], what=f"{name}/count")
    fn, inputs = GRAPHS[name]
    xs = [x.clone().requires_grad_() for x in inputs]
    assert_same(torch.autograd.grad(fn(*xs), xs), enum["gradient"], rtol=1e-11, what=f"{name}/autograd")


@pytest.mark.parametrize("mode", list(TENSOR_MODES))
@pytest.mark.parametrize("name", list(GRAPHS))
def test_tensor_granularity_equals_dense_reference(name, mode):
    fn, inputs = GRAPHS[name]
    _, _, ref = references(name)
    assert_same(engine(fn, inputs, mode), ref[mode], what=f"{name}/{mode}")


def test_graphs_have_the_intended_structure():
    """Fan-out, a tensor passed twice, and exact-zero structural edges really occur in the test graphs."""
    g, _, _ = references("mlp_fanout")
    twice = [r for r in g.tape.records if r.leaf_ids.count(r.leaf_ids[0]) == 2 and r.leaf_ids[0] is not None]
    assert twice, "mul(x, x) must be recorded as one operator with the same node twice"
    consumers: dict[int, set[int]] = {}
    for r in g.tape.records:
        for t in r.leaf_ids:
            if t is not None:
                consumers.setdefault(t, set()).add(r.index)
    assert max(len(c) for c in consumers.values()) >= 2
    for name in ("relu_zero_edges", "causal_attention_d2"):
        g, _, _ = references(name)
        assert any(bool((b.struct & (b.weight == 0)).any()) for b in g.blocks), name


# -- the known cases ---------------------------------------------------------------------------------------

def _scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _mp(fn, inputs, sign, granularity):
    return [float(v) for v in isr.semiring_backward(fn, inputs, "maxpath", sign=sign, granularity=granularity)]


def test_tensor_granularity_x_times_y_plus_x_over_y():
    fn = lambda x, y: x * y + x / y  # noqa: E731
    inputs = (_scalar(4.0), _scalar(2.0))
    assert _mp(fn, inputs, "positive", "tensor") == pytest.approx([2.0, 4.0], rel=1e-15)
    assert _mp(fn, inputs, "negative", "tensor") == pytest.approx([0.5, -1.0], rel=1e-15)
    # every consumer here touches x and y once, so scalar granularity gives the same numbers
    assert _mp(fn, inputs, "positive", "scalar") == pytest.approx([2.0, 4.0], rel=1e-15)
    assert _mp(fn, inputs, "negative", "scalar") == pytest.approx([0.5, -1.0], rel=1e-15)


@pytest.mark.parametrize("x, plus, minus", [(0.0, 2.0, 1.0), (math.pi, -1.0, -2.0)])
def test_tensor_granularity_sin_fanout(x, plus, minus):
    def fn(x):
        s = torch.sin(x)
        return (s + 1) + 2 * s

    inputs = (_scalar(x),)
    assert _mp(fn, inputs, "positive", "tensor") == pytest.approx([plus], rel=1e-15)
    assert _mp(fn, inputs, "negative", "tensor") == pytest.approx([minus], rel=1e-15)
    assert _mp(fn, inputs, "abs", "tensor") == pytest.approx([2.0], rel=1e-15)


def test_tensor_granularity_sums_inside_one_operator():
    """Inside one matmul the tensor granularity is a VJP (sum over the row), the scalar one a max over it."""
    w = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [0.25, -0.75]], dtype=torch.float64)
    fn = lambda x: (x @ w).sum()  # noqa: E731
    x = torch.ones(1, 3, dtype=torch.float64)
    (t_plus,) = isr.semiring_backward(fn, x, "maxpath", sign="positive", granularity="tensor")
    (s_plus,) = isr.semiring_backward(fn, x, "maxpath", sign="positive", granularity="scalar")
    (s_minus,) = isr.semiring_backward(fn, x, "maxpath", sign="negative", granularity="scalar")
    torch.testing.assert_close(t_plus[0], w.sum(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(s_plus[0], w.amax(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(s_minus[0], w.amin(1), rtol=1e-15, atol=0)


def test_tensor_granularity_untouched_elements_offer_zero():
    """Tensor granularity takes the VJP of each consumer: a consumer that reads only x[0] (a slice) hands x[1]
    the value 0, which competes in the max/min across consumers. Scalar granularity has no such candidate.
    x[0]: paths -2 (slice) and -3; x[1]: path -3 only."""
    fn = lambda x: (-2.0 * x[:1]).sum() + (-3.0 * x).sum()  # noqa: E731
    x = torch.tensor([0.3, -0.8], dtype=torch.float64)
    (t_plus,) = isr.semiring_backward(fn, x, "maxpath", sign="positive", granularity="tensor")
    (t_minus,) = isr.semiring_backward(fn, x, "maxpath", sign="negative", granularity="tensor")
    (s_plus,) = isr.semiring_backward(fn, x, "maxpath", sign="positive")
    (s_minus,) = isr.semiring_backward(fn, x, "maxpath", sign="negative")
    assert t_plus.tolist() == pytest.approx([-2.0, 0.0], rel=1e-15, abs=0)
    assert t_minus.tolist() == pytest.approx([-3.0, -3.0], rel=1e-15)
    assert s_plus.tolist() == pytest.approx([-2.0, -3.0], rel=1e-15)
    assert s_minus.tolist() == pytest.approx([-3.0, -3.0], rel=1e-15)
    g = dense.dense_graph(fn, (x,))
    (ref_plus,), (ref_minus,) = dense.maxpath_tensor(g)
    assert ref_plus.tolist() == pytest.approx([-2.0, 0.0], rel=1e-15) and ref_minus.tolist() == [-3.0, -3.0]


def test_entropy_two_equal_paths_is_log_2():
    fn = lambda x: x * 2 + x * 2  # noqa: E731
    (h,) = isr.semiring_backward(fn, _scalar(0.3), "entropy")
    assert float(h) == pytest.approx(math.log(2), rel=1e-14)


def test_entropy_paths_4_and_minus_2():
    fn = lambda x: x * 4 + x * (-2)  # noqa: E731
    (h,) = isr.semiring_backward(fn, _scalar(-1.7), "entropy")
    expected = (-4 * math.log(4) - 2 * math.log(2)) / 6 + math.log(6)
    assert float(h) == pytest.approx(expected, rel=1e-14)
    # the same number from the path list: p = (4/6, 2/6)
    assert expected == pytest.approx(statistics([[4.0], [-2.0]])["entropy"], rel=1e-14)


def test_entropy_zero_without_paths_and_at_the_root():
    fn = lambda x, y: x * 3.0  # noqa: E731
    h = isr.semiring_backward(fn, (_scalar(1.0), _scalar(2.0)), "entropy")
    assert [float(v) for v in h] == [0.0, 0.0]  # one path of weight 3 for x; no path at all for y


def test_signed_maxpath_zero_weight_edge_offers_its_candidate():
    """relu'(x) = 0 below 0 is still an edge: M+(x) = max(0 * 1, -2) = 0 although the only non-zero path is -2."""
    fn = lambda x: torch.relu(x) - 2 * x  # noqa: E731
    x = _scalar(-0.5)
    assert _mp(fn, (x,), "positive", "scalar") == [0.0]
    assert _mp(fn, (x,), "negative", "scalar") == pytest.approx([-2.0], rel=1e-15)
    g = dense.dense_graph(fn, (x,))
    paths = enumerate_paths(g)[(g.input_ids[0], 0)]
    assert sorted(math.prod(p) for p in paths) == [-2.0, 0.0]


@pytest.mark.parametrize("sign", ["abs", "positive", "negative"])
def test_back_pointers_mark_exactly_the_elements_without_a_path(sign):
    """The sweep leaves absent elements' pointers unset and ``MaxValue.pointers`` masks them when read: NO_PATH
    exactly where the enumeration finds no path (abs: no path of non-zero product; signed: no path at all, a zero
    edge still offers its candidate), and a real pointer wherever it finds one; decode_path refuses the former."""
    from inseq_semiring.paths import decode_path
    from inseq_semiring.semirings.maxpath import NO_PATH

    w = torch.tensor([2.0, -1.5, 0.5, 3.0, 1.0], dtype=torch.float64)
    fn = lambda x: (torch.relu(x) * w)[:3].sum() + (x[1:2] * 0.5).sum()  # noqa: E731  (two consumers merge)
    x = torch.tensor([-0.5, 0.3, 0.7, 1.2, -2.0], dtype=torch.float64)
    g = dense.dense_graph(fn, (x,))
    paths = enumerate_paths(g)
    has_path = [any(sign != "abs" or math.prod(p) != 0 for p in paths.get((g.input_ids[0], i), [])) for i in range(5)]
    assert has_path == ([False, True, True, False, False] if sign == "abs" else [True, True, True, False, False])
    res = isr.run(fn, x, "maxpath", sign=sign, backpointers=True)
    code, index = res.trail[res.tape.input_ids[0]].pointers("lo" if sign == "negative" else "hi")
    assert [int(c) != NO_PATH for c in code] == has_path
    assert [int(i) != NO_PATH for i in index] == has_path
    for i in range(5):
        if has_path[i]:
            assert decode_path(res, 0, i).hops
        else:
            with pytest.raises(isr.InvalidInputError, match="has no path to the root"):
                decode_path(res, 0, i)


def test_where_unselected_side_is_not_an_edge():
    """where(c, f(x), g(x)) with c false: only the g path exists, so M+(x) is that path's product, not 0."""
    cond = torch.tensor([False])
    fn = lambda x: torch.where(cond, torch.tanh(x), -3.0 * x).sum()  # noqa: E731
    x = torch.tensor([0.4], dtype=torch.float64)
    assert _mp(fn, (x,), "positive", "scalar") == pytest.approx([-3.0], rel=1e-15)
    assert _mp(fn, (x,), "negative", "scalar") == pytest.approx([-3.0], rel=1e-15)
    assert [float(v) for v in isr.semiring_backward(fn, x, "entropy")] == [0.0]  # a single path


def test_enumeration_is_what_it_says():
    """The brute force on a hand-countable graph: out = x*y + x/y has paths {y, 1/y} from x and {x, -x/y^2}."""
    fn = lambda x, y: x * y + x / y  # noqa: E731
    g = dense.dense_graph(fn, (_scalar(4.0), _scalar(2.0)))
    found = enumerate_paths(g)
    px = sorted(math.prod(p) for p in found[(g.input_ids[0], 0)])
    py = sorted(math.prod(p) for p in found[(g.input_ids[1], 0)])
    assert px == [0.5, 2.0] and py == [-1.0, 4.0]


# -- the evidence itself -----------------------------------------------------------------------------------------

def test_references_are_independent_of_the_engine_arithmetic():
    """The references may read the tape, never the engine's rules or semirings."""
    import ast
    import pathlib

    here = pathlib.Path(__file__).parent / "reference"
    for path in (here / "dense.py", here / "enumerate.py"):
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        engine = [n for n in names if n.startswith("inseq_semiring")]
        assert all(n.startswith("inseq_semiring.graph") for n in engine), (path.name, engine)


def _override(op, fn):
    from inseq_semiring.rules import RuleSet

    return RuleSet("mutant", {op: fn})


def test_a_wrong_derivative_is_caught():
    """Mutation check: tanh' off by 1% in one rule changes every semiring enough for these tests to fail."""
    from inseq_semiring.rules import RULES, Edge

    aten = torch.ops.aten
    good = RULES[aten.tanh.default]

    def mutant(rec):
        return [Edge(e.out, e.leaf, e.kind.map_weights(lambda w: w * 1.01)) for e in good(rec)]

    fn, inputs = GRAPHS["mlp_fanout"]
    _, enum, _ = references("mlp_fanout")
    for mode in MODES:
        semiring, options = MODES[mode]
        got = isr.run(fn, inputs, semiring, rules=_override(aten.tanh.default, mutant), **options).values
        with pytest.raises(AssertionError):
            assert_same(got, enum[mode], what=mode)


def test_a_weight_zero_edge_for_an_unselected_where_input_is_caught():
    """Mutation check for structure: the old ``where`` rule (a weight-0 edge to the unselected side) agrees on
    gradient/flow/entropy/abs-max but not on signed maxpath, and the enumeration notices."""
    from inseq_semiring.rules import Edge, Pointwise

    aten = torch.ops.aten

    def old_where(rec):
        cond, out = rec.leaves[0], rec.outputs[0]
        edges = []
        for leaf, w in ((1, cond), (2, ~cond)):
            if rec.is_node(leaf):
                edges.append(Edge(0, leaf, Pointwise(w.to(out.dtype), rec.leaves[leaf].shape, out.shape)))
        return edges

    fn, inputs = GRAPHS["select"]
    _, enum, _ = references("select")
    rules = _override(aten.where.self, old_where)
    for mode in ("gradient", "flow", "entropy", "maxpath"):
        semiring, options = MODES[mode]
        assert_same(isr.run(fn, inputs, semiring, rules=rules, **options).values, enum[mode], what=mode)
    got = isr.run(fn, inputs, "maxpath", sign="negative", rules=rules).values
    with pytest.raises(AssertionError):
        assert_same(got, enum["negative"], what="negative")
