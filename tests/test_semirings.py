"""The semiring objects on their own: each pull against the dense Jacobian of a real operator, and the laws.

Values are built through the semiring interface only: ``single(a)`` is the value of one path of weight ``a`` per
element (the seed pulled through a pointwise edge of weight ``a``); ``plus`` of two singles holds two paths.
Everything is compared through ``finalize`` (the user-facing numbers), never through the internal layout.

Laws checked where they hold: (+) commutative, associative, with the no-path value as identity; (x) (a pull)
associative (two pointwise edges == one edge with the product weight), with the weight-1 edge as identity and
distributing over (+); for the max semirings (+) is idempotent. The paper's tensor granularity is *not* a
semiring (a VJP then a max does not distribute over max): shown by a counterexample.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from inseq_semiring.api import make_semiring
from inseq_semiring.graph.recorder import record
from inseq_semiring.rules import DEFAULT_RULES
from inseq_semiring.rules.jacobians import IndexMap, Pointwise
from reference import dense
from shared import ALL_MODES

pytestmark = pytest.mark.usefixtures("float64_default")

RINGS = ALL_MODES
SCALAR_RINGS = [r for r in RINGS if not r.startswith("tensor")]
MAX_RINGS = ["maxpath", "positive", "negative", "tensor_abs", "tensor_positive", "tensor_negative"]
ORIGIN = (0, 0, 0)


def ring(name):
    semiring, options = RINGS[name]
    return make_semiring(semiring, **options)


def single(r, a: torch.Tensor):
    """One path of weight ``a`` (element-wise) ending at each element."""
    seed = r.seed(torch.zeros_like(a))
    return r.pull(Pointwise(a, a.shape, a.shape), seed, ORIGIN)


def none(r, shape):
    """No path at all (the semiring's zero), through an edge kind that has no edges."""
    seed = r.seed(torch.zeros(shape, dtype=torch.float64))
    return r.pull(IndexMap(torch.full(shape, -1, dtype=torch.long), torch.Size(shape)), seed, ORIGIN)


def fin(r, v, shape):
    return r.finalize(v, torch.zeros(shape, dtype=torch.float64))


def close(a, b, rtol=1e-13):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max()) if b.numel() else 1.0))


# -- the expected value of a pull, from the dense Jacobian --------------------------------------------------------

def expected_pull(name: str, block: dense.Block, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The finalized value at the input of ``block`` when each output element holds two paths, weights a and b."""
    w, s = block.weight, block.struct
    a, b = a.reshape(-1), b.reshape(-1)
    if name == "gradient":
        return w.T @ (a + b)
    aw = w.abs()
    if name == "flow":
        return aw.T @ (a.abs() + b.abs())
    if name == "entropy":
        z = a.abs() + b.abs()
        u = -torch.xlogy(a.abs(), a.abs()) - torch.xlogy(b.abs(), b.abs())
        zz = aw.T @ z
        uu = aw.T @ u + (-torch.xlogy(aw, aw)).T @ z
        safe = torch.where(zz > 0, zz, torch.ones_like(zz))
        return torch.where(zz > 0, uu / safe + torch.log(safe), torch.zeros_like(zz))
    if name == "maxpath":
        m = torch.maximum(a.abs(), b.abs())
        cand = torch.where(s, aw * m[:, None], torch.zeros_like(w))
        return cand.amax(0)
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    if name in ("positive", "negative"):
        c1, c2 = w * hi[:, None], w * lo[:, None]
        reach = s.any(0)
        if name == "positive":
            best = torch.where(s, torch.maximum(c1, c2), torch.full_like(w, -math.inf)).amax(0)
        else:
            best = torch.where(s, torch.minimum(c1, c2), torch.full_like(w, math.inf)).amin(0)
        return torch.where(reach, best, torch.zeros_like(best))
    if name == "tensor_abs":
        return aw.T @ torch.maximum(a.abs(), b.abs())
    h, l = w.T @ hi, w.T @ lo
    return torch.maximum(h, l) if name == "tensor_positive" else torch.minimum(h, l)


# -- sample operators: one of every Jacobian kind ----------------------------------------------------------------

def _r(*shape, positive=False):
    x = torch.randn(*shape, dtype=torch.float64, generator=_GEN)
    return x.abs() + 0.1 if positive else x


_GEN = torch.Generator().manual_seed(11)
SAMPLES = {
    "mul_broadcast": (lambda x, y: x * y, (_r(2, 3), _r(1, 3))),
    "div": (lambda x, y: x / y, (_r(2, 3), _r(2, 3, positive=True))),
    "tanh": (torch.tanh, (_r(2, 3),)),
    "relu": (torch.relu, (_r(2, 3),)),
    "sum_dim": (lambda x: x.sum(1), (_r(2, 3),)),
    "mean_keepdim": (lambda x: x.mean(-1, keepdim=True), (_r(2, 3),)),
    "amax": (lambda x: x.amax(-1), (_r(2, 4),)),
    "transpose_cat": (lambda x: torch.cat([x.t(), x.t()], 0), (_r(2, 3),)),
    "pad": (lambda x: F.pad(x, (1, 2)), (_r(2, 2),)),
    "expand": (lambda x: x.expand(3, 2, 2), (_r(1, 2, 1).expand(1, 2, 2).contiguous(),)),
    "where": (lambda x, y: torch.where(torch.tensor([[True, False, True]]), x, y), (_r(2, 3), _r(2, 3))),
    "where_broadcast": (lambda x, y: torch.where(torch.tensor([[True], [False]]), x, y), (_r(1, 3), _r(2, 3))),
    "masked_fill_tensor": (lambda x, v: x.masked_fill(torch.tensor([[True, False, False], [False, True, True]]), v),
                           (_r(2, 3), _r(()))),
    "tril": (lambda x: torch.tril(x, diagonal=-1), (_r(3, 3),)),
    "mm": (lambda x, y: x @ y, (_r(2, 3), _r(3, 4))),
    "bmm": (torch.bmm, (_r(2, 2, 3), _r(2, 3, 2))),
    "addmm": (lambda x, w, b: F.linear(x, w, b), (_r(2, 3), _r(4, 3), _r(4))),
    "softmax": (lambda x: torch.softmax(x, -1), (_r(2, 4),)),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), (_r(2, 4),)),
    "layer_norm": (lambda x: F.layer_norm(x, (4,), torch.tensor([1.5, -0.5, 1.0, 0.25], dtype=torch.float64)),
                   (_r(2, 4),)),
}


def sample_edges():
    """(sample, record, edge, dense block) for every edge of every sample operator."""
    out = []
    for name, (fn, inputs) in SAMPLES.items():
        tape = record(fn, inputs)
        for rec in tape.records:
            edges = DEFAULT_RULES.edges(rec)
            live = {rec.output_ids[e.out] for e in edges}
            blocks = {(b.slot, b.leaf): b for b in dense.local_blocks(rec, live)}
            for e in edges:
                out.append((f"{name}/{rec.op._opname}/{e.out}.{e.leaf}", rec, e, blocks[(e.out, e.leaf)]))
    return out


EDGES = sample_edges()


def test_samples_cover_every_kind():
    kinds = {type(e.kind).__name__ for _, _, e, _ in EDGES}
    assert {"Pointwise", "Reduction", "IndexMap", "MatMul"} <= kinds
    assert kinds & {"RowDense", "LayerNormRow"}


@pytest.mark.parametrize("name", list(RINGS))
@pytest.mark.parametrize("idx", range(len(EDGES)), ids=[e[0] for e in EDGES])
def test_pull_equals_dense_jacobian(idx, name):
    _, rec, edge, block = EDGES[idx]
    r = ring(name)
    out = rec.outputs[edge.out]
    gen = torch.Generator().manual_seed(idx)
    a = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    b = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    value = r.plus(single(r, a), single(r, b))
    in_shape = rec.leaves[edge.leaf].shape
    got = fin(r, r.pull(edge.kind, value, ORIGIN), in_shape)
    close(got.reshape(-1), expected_pull(name, block, a, b), rtol=1e-12)


# -- laws -----------------------------------------------------------------------------------------------------------

SHAPE = (2, 3)


def _vals(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, dtype=torch.float64, generator=g) for _ in range(3)]


@pytest.mark.parametrize("name", list(RINGS))
def test_plus_commutative_associative_identity(name):
    r = ring(name)
    a, b, c = (single(r, v) for v in _vals(1))
    f = lambda v: fin(r, v, SHAPE)  # noqa: E731
    close(f(r.plus(a, b)), f(r.plus(b, a)))
    close(f(r.plus(r.plus(a, b), c)), f(r.plus(a, r.plus(b, c))))
    zero = none(r, SHAPE)
    assert torch.equal(f(zero), torch.zeros(SHAPE, dtype=torch.float64))
    if name in ("tensor_positive", "tensor_negative"):
        # the paper's tensor granularity: a VJP that carries nothing is the *value* 0, a candidate for the
        # max/min across consumers (as when autograd's accumulation is replaced by max); see
        # test_traversal.py::test_tensor_granularity_untouched_elements_offer_zero
        close(f(r.plus(a, zero)), torch.maximum(f(a), f(zero)) if name == "tensor_positive"
              else torch.minimum(f(a), f(zero)))
        return
    close(f(r.plus(a, zero)), f(a))
    close(f(r.plus(zero, a)), f(a))


@pytest.mark.parametrize("name", MAX_RINGS)
def test_plus_idempotent_for_max(name):
    r = ring(name)
    a = r.plus(*(single(r, v) for v in _vals(2)[:2]))
    close(fin(r, r.plus(a, a), SHAPE), fin(r, a, SHAPE))


@pytest.mark.parametrize("name", list(RINGS))
def test_seed_is_the_one(name):
    r = ring(name)
    root = torch.zeros(SHAPE, dtype=torch.float64)
    want = torch.zeros(SHAPE) if name == "entropy" else torch.ones(SHAPE)  # H of a single empty path is 0
    close(fin(r, r.seed(root), SHAPE), want.double())
    a = r.plus(*(single(r, v) for v in _vals(3)[:2]))
    one = Pointwise(torch.ones((), dtype=torch.float64), torch.Size(SHAPE), torch.Size(SHAPE))
    close(fin(r, r.pull(one, a, ORIGIN), SHAPE), fin(r, a, SHAPE))  # the weight-1 edge is the identity


@pytest.mark.parametrize("name", list(RINGS))
def test_times_associative(name):
    """Two edges in a row == one edge weighing their product (for entropy: <a,b>(x)<c,d> = <ac, ad + bc>)."""
    r = ring(name)
    w1, w2, v = _vals(4)
    start = r.plus(single(r, v), single(r, -0.5 * v))
    pw = lambda w: Pointwise(w, torch.Size(SHAPE), torch.Size(SHAPE))  # noqa: E731
    two = r.pull(pw(w2), r.pull(pw(w1), start, ORIGIN), ORIGIN)
    one = r.pull(pw(w1 * w2), start, ORIGIN)
    close(fin(r, two, SHAPE), fin(r, one, SHAPE))


@pytest.mark.parametrize("name", SCALAR_RINGS)
@pytest.mark.parametrize("idx", range(len(EDGES)), ids=[e[0] for e in EDGES])
def test_pull_distributes_over_plus(idx, name):
    """pull(k, a (+) b) == pull(k, a) (+) pull(k, b) for every kind (scalar granularity)."""
    _, rec, edge, _ = EDGES[idx]
    r = ring(name)
    out = rec.outputs[edge.out]
    g = torch.Generator().manual_seed(100 + idx)
    a, b = (single(r, torch.randn(out.shape, dtype=torch.float64, generator=g)) for _ in range(2))
    in_shape = rec.leaves[edge.leaf].shape
    lhs = r.pull(edge.kind, r.plus(a, b), ORIGIN)
    rhs = r.plus(r.pull(edge.kind, a, ORIGIN), r.pull(edge.kind, b, ORIGIN))
    close(fin(r, lhs, in_shape), fin(r, rhs, in_shape), rtol=1e-12)


@pytest.mark.parametrize("name", ["gradient", "flow", "entropy", "maxpath", "tensor_abs"])
def test_zero_weight_annihilates(name):
    r = ring(name)
    a = r.plus(*(single(r, v) for v in _vals(5)[:2]))
    zero_edge = Pointwise(torch.zeros((), dtype=torch.float64), torch.Size(SHAPE), torch.Size(SHAPE))
    assert torch.equal(fin(r, r.pull(zero_edge, a, ORIGIN), SHAPE), torch.zeros(SHAPE, dtype=torch.float64))


@pytest.mark.parametrize("name", ["positive", "negative"])
def test_signed_zero_weight_edge_is_a_zero_candidate(name):
    """Signed maxpath: a weight-0 edge is still an edge; it offers the candidate 0 (not 'no path')."""
    r = ring(name)
    neg = single(r, -torch.ones(SHAPE, dtype=torch.float64))  # every element: one path of weight -1
    zero_edge = Pointwise(torch.zeros((), dtype=torch.float64), torch.Size(SHAPE), torch.Size(SHAPE))
    got = fin(r, r.plus(neg, r.pull(zero_edge, single(r, torch.ones(SHAPE)), ORIGIN)), SHAPE)
    want = torch.zeros(SHAPE) if name == "positive" else -torch.ones(SHAPE)
    close(got, want.double())


def test_tensor_granularity_is_not_distributive():
    """The paper's tensor granularity sums inside an operator, so max does not distribute over it:
    two consumers with values a = (1, 0), b = (0, 1) summed by one reduction give max(1, 1) = 1 after the max,
    but 2 before it."""
    r = ring("tensor_abs")
    a, b = single(r, torch.tensor([1.0, 0.0])), single(r, torch.tensor([0.0, 1.0]))
    total = IndexMap(torch.zeros(2, dtype=torch.long), torch.Size([1]))  # y_0 = y_1 = x_0: x feeds both
    lhs = fin(r, r.pull(total, r.plus(a, b), ORIGIN), (1,))
    rhs = fin(r, r.plus(r.pull(total, a, ORIGIN), r.pull(total, b, ORIGIN)), (1,))
    assert float(lhs) == 2.0 and float(rhs) == 1.0
    s = ring("maxpath")  # the scalar max-times semiring does distribute
    a, b = single(s, torch.tensor([1.0, 0.0])), single(s, torch.tensor([0.0, 1.0]))
    assert float(fin(s, s.pull(total, s.plus(a, b), ORIGIN), (1,))) == 1.0


@pytest.mark.parametrize("name", ["flow", "entropy", "maxpath", "positive", "tensor_abs"])
def test_scaled_values_survive_underflow(name):
    """A chain of 400 edges of weight 1e-3 (1e-1200 overall: below float64) then two equal paths.
    Flow/maxpath finalise to 0 in float64 (the true value underflows), but the entropy is log 2 exactly and the
    ratio of two elements is kept because values carry a per-tensor log scale."""
    r = ring(name)
    shape = torch.Size([2])
    v = single(r, torch.tensor([1.0, 0.5], dtype=torch.float64))
    small = Pointwise(torch.tensor(1e-3, dtype=torch.float64), shape, shape)
    for _ in range(400):
        v = r.pull(small, v, ORIGIN)
    v = r.plus(v, v) if name in ("flow", "entropy") else v
    out = fin(r, v, shape)
    assert bool(torch.isfinite(out).all())
    if name == "entropy":  # H = U/Z + log Z cancels two numbers of size 400 * log(1e3): rounding ~1e-11
        close(out, torch.full(shape, math.log(2), dtype=torch.float64), rtol=1e-9)
    # rescale by a huge edge: the ratio 1 : 0.5 is still there
    big = Pointwise(torch.tensor(1e300, dtype=torch.float64), shape, shape)
    for _ in range(4):
        v = r.pull(big, v, ORIGIN)
    if name != "entropy":
        out = fin(r, v, shape)
        assert float(out[1] / out[0]) == pytest.approx(0.5, rel=1e-12)
