"""Properties every result must have, on the hand-built graphs and on every tiny architecture.

* flow >= |gradient| (no cancellation can only add), maxpath <= flow (one path <= all paths);
* maxpath (abs) == max(M+, -M-), and M- <= M+;
* 0 <= entropy <= log(#paths with non-zero weight) (the number of paths is counted exactly by the dense reference);
* determinism (same result twice, bit for bit); a batch of 2 rows == each row alone;
* how each semiring reacts to scaling the root by c: gradient * c, flow and maxpath * |c|, entropy unchanged,
  M+/M- * c (swapped when c < 0).
"""

from __future__ import annotations

import math

import pytest
import torch

import inseq_semiring as isr
import tiny_models as tm
from graphs import GRAPHS
from reference import dense
from shared import ALL_MODES, assert_close_scaled, graph_reference, model_reference

pytestmark = pytest.mark.usefixtures("float64_default")

ARCHS = list(tm.ARCHS)
EPS = 1e-12  # relative slack for inequalities that can be tight (one path: flow == |gradient| == maxpath)


def run_all(fn, inputs, modes=ALL_MODES):
    return {m: isr.semiring_backward(fn, inputs, s, **o) for m, (s, o) in modes.items()}


def cases():
    for name in GRAPHS:
        yield pytest.param("graph", name, id=f"graph-{name}")
    for name in ARCHS:
        yield pytest.param("model", name, id=f"model-{name}")


def subject(kind, name):
    """fn, inputs, dense graph."""
    if kind == "graph":
        fn, inputs = GRAPHS[name]
        return fn, inputs, graph_reference(name)[0]
    case, g, _ = model_reference(name)
    return case.fn, case.inputs, g


def _leq(a, b, what):
    for x, y in zip(a, b):
        slack = EPS * (y.abs() + float(y.abs().max()))
        assert bool((x <= y + slack).all()), f"{what}: max violation {float((x - y).max()):.3e}"


@pytest.mark.parametrize("kind, name", list(cases()))
def test_order_properties(kind, name):
    fn, inputs, g = subject(kind, name)
    r = run_all(fn, inputs)
    _leq([v.abs() for v in r["gradient"]], r["flow"], "|gradient| <= flow")
    _leq(r["maxpath"], r["flow"], "maxpath <= flow")
    _leq(r["tensor_abs"], r["flow"], "tensor maxpath <= flow")
    _leq(r["negative"], r["positive"], "M- <= M+")
    _leq(r["tensor_negative"], r["tensor_positive"], "tensor M- <= M+")
    both = tuple(torch.maximum(p, -n) for p, n in zip(r["positive"], r["negative"]))
    assert_close_scaled(r["maxpath"], both, 1e-12, "maxpath == max(M+, -M-)")
    # the gradient is a sum over paths, each of magnitude <= maxpath: |gradient| <= #paths * maxpath
    counts = dense.count_paths(g)
    _leq([v.abs() for v in r["gradient"]], [c * m for c, m in zip(counts, r["maxpath"])], "|grad| <= n M")
    for v in r["maxpath"] + r["flow"]:
        assert bool((v >= 0).all())


@pytest.mark.parametrize("kind, name", list(cases()))
def test_entropy_bounds(kind, name):
    fn, inputs, g = subject(kind, name)
    h = isr.semiring_backward(fn, inputs, "entropy")
    support = dense.count_nonzero_paths(g)
    for hh, n in zip(h, support):
        assert bool((hh >= -1e-12).all()), "entropy < 0"
        bound = torch.log(n.clamp_min(1))
        assert bool((hh <= bound + 1e-9).all()), f"entropy > log(#paths): {float((hh - bound).max()):.3e}"
        assert bool((hh[n <= 1] .abs() <= 1e-12).all()), "one path (or none): entropy must be 0"


@pytest.mark.parametrize("kind, name", list(cases()))
def test_same_result_twice(kind, name):
    fn, inputs, _ = subject(kind, name)
    a, b = run_all(fn, inputs), run_all(fn, inputs)
    for m in ALL_MODES:
        for x, y in zip(a[m], b[m]):
            assert torch.equal(x, y), m


BATCH_MODES = ALL_MODES


@pytest.mark.parametrize("name", ARCHS)
def test_batch_of_two_equals_each_row_alone(name):
    """Root of shape (B,): one log-prob / logit per row; rows never mix, so row b's values are row b alone's."""
    both = tm.build(name, batch=2, per_row=True, seed=5)
    got = run_all(both.fn, both.inputs, BATCH_MODES)
    for row in range(2):
        alone_inputs = tuple(x[row:row + 1].clone() for x in both.inputs)
        want = run_all(both.fn, alone_inputs, BATCH_MODES)
        for m in BATCH_MODES:
            assert_close_scaled(tuple(v[row:row + 1] for v in got[m]), want[m], 1e-10, f"{name}/{m}/row {row}")


@pytest.mark.parametrize("name", list(GRAPHS))
def test_batch_on_graphs(name):
    """The same on the hand-built graphs: stack two copies of an input along a new batch dimension via vmap-free
    concatenation and sum the two roots as a (2,) root."""
    fn, inputs = GRAPHS[name]
    other = tuple(x * 0.7 - 0.2 for x in inputs)

    def pair(*xs):
        half = len(xs) // 2
        return torch.stack([fn(*xs[:half]), fn(*xs[half:])])

    got = run_all(pair, inputs + other)
    for m in ALL_MODES:
        assert_close_scaled(got[m][:len(inputs)], run_all(fn, inputs, {m: ALL_MODES[m]})[m], 1e-12, f"{name}/{m}")
        assert_close_scaled(got[m][len(inputs):], run_all(fn, other, {m: ALL_MODES[m]})[m], 1e-12, f"{name}/{m}")


@pytest.mark.parametrize("c", [3.0, -2.0, 0.5])
@pytest.mark.parametrize("kind, name", [("graph", "mlp_skip"), ("graph", "attention_d3"), ("model", "gpt2"),
                                        ("model", "bert"), ("model", "t5")])
def test_scaling_the_root(kind, name, c):
    fn, inputs, _ = subject(kind, name)
    base = run_all(fn, inputs)
    scaled = run_all(lambda *xs: c * fn(*xs), inputs)
    mul = lambda vs, k: tuple(v * k for v in vs)  # noqa: E731
    assert_close_scaled(scaled["gradient"], mul(base["gradient"], c), 1e-12, "gradient")
    assert_close_scaled(scaled["flow"], mul(base["flow"], abs(c)), 1e-12, "flow")
    assert_close_scaled(scaled["maxpath"], mul(base["maxpath"], abs(c)), 1e-12, "maxpath")
    assert_close_scaled(scaled["tensor_abs"], mul(base["tensor_abs"], abs(c)), 1e-12, "tensor maxpath")
    h = scaled["entropy"]  # every path gains the same factor |c|: the distribution does not change
    assert_close_scaled(h, base["entropy"], 1e-10, "entropy")
    for prefix in ("", "tensor_"):
        p, n = base[prefix + "positive"], base[prefix + "negative"]
        want_p, want_n = (mul(p, c), mul(n, c)) if c > 0 else (mul(n, c), mul(p, c))
        assert_close_scaled(scaled[prefix + "positive"], want_p, 1e-12, prefix + "M+")
        assert_close_scaled(scaled[prefix + "negative"], want_n, 1e-12, prefix + "M-")


def test_unreached_inputs_are_zero():
    """An input that the root does not depend on gets 0 from every semiring (and no error)."""
    x, y = torch.randn(2, 3), torch.randn(4)
    fn = lambda x, y: torch.tanh(x).sum()  # noqa: E731
    for m, vals in run_all(fn, (x, y)).items():
        assert torch.equal(vals[1], torch.zeros_like(y)), m


def test_entropy_of_uniform_fanout_is_log_n():
    """n parallel paths of equal weight: entropy log n exactly (a uniform path distribution)."""
    for n in (2, 3, 5, 8):
        w = torch.ones(1, n)

        def fn(x):
            return ((x @ w) * 1.0).sum()

        (h,) = isr.semiring_backward(fn, torch.randn(1, 1), "entropy")
        assert float(h) == pytest.approx(math.log(n), rel=1e-14)
