"""Element-wise operators (with broadcasting): ``y_i = f(x_{b(i)}, ...)``, one :class:`Pointwise` edge per argument
whose weight is the partial derivative at the forward values."""

from __future__ import annotations

import math

import torch

from ..graph.tape import OpRecord
from .jacobians import IndexMap, Pointwise
from .registry import Edge, rule
from .weight_cache import sweep_memo

aten = torch.ops.aten


def _edges(rec: OpRecord, weights: dict) -> list[Edge]:
    """``weights``: leaf -> callable returning the derivative of output 0 w.r.t. that leaf (computed lazily)."""
    out = rec.outputs[0]
    edges = []
    for leaf, weight in weights.items():
        if leaf < len(rec.leaf_ids) and rec.leaf_ids[leaf] is not None:
            w = weight()
            if not isinstance(w, torch.Tensor):
                w = _constant(w, out)
            elif w.dtype != out.dtype:
                w = w.to(out.dtype)
            edges.append(Edge(0, leaf, Pointwise(w, rec.leaves[leaf].shape, out.shape)))
    return edges


def _constant(w, like: torch.Tensor) -> torch.Tensor:
    """A Python number as a 0-dim tensor of ``like``'s dtype and device; within a sweep one tensor per value
    (the sweep's memo; weights are never written to)."""
    memo = sweep_memo()
    key = ("scalar_weight", w, math.copysign(1.0, w) if isinstance(w, float) else 1.0, like.dtype, like.device)
    t = None if memo is None else memo.get(key)
    if t is None:
        t = torch.tensor(w, dtype=like.dtype, device=like.device)
        if memo is not None:
            memo[key] = t
    return t


def _scalar(rec: OpRecord, pos: int, default=1):
    args = rec.args
    if pos < len(args):
        return args[pos]
    return default


def _unary(derivative):
    """Rule for ``y = f(x)`` from ``derivative(x, y)``."""

    def build(rec: OpRecord):
        return _edges(rec, {0: lambda: derivative(rec.leaves[0], rec.outputs[0], rec)})

    build.__name__ = derivative.__name__
    return build


# -- arithmetic ---------------------------------------------------------------------------------------------------

@rule(aten.add.Tensor, aten.sub.Tensor)
def add_sub(rec: OpRecord):
    alpha = rec.kwargs.get("alpha", _scalar(rec, 2))
    sign = -1 if rec.op is aten.sub.Tensor else 1
    return _edges(rec, {0: lambda: 1.0, 1: lambda: float(sign * alpha)})


@rule(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(rec: OpRecord):  # other - alpha * self
    alpha = rec.kwargs.get("alpha", _scalar(rec, 2))
    return _edges(rec, {0: lambda: -float(alpha), 1: lambda: 1.0})


@rule(aten.add.Scalar, aten.sub.Scalar)
def add_scalar(rec: OpRecord):
    return _edges(rec, {0: lambda: 1.0})


@rule(aten.mul.Tensor)
def mul(rec: OpRecord):
    a, b = rec.leaves[0], rec.leaves[1]
    return _edges(rec, {0: lambda: b, 1: lambda: a})


@rule(aten.mul.Scalar)
def mul_scalar(rec: OpRecord):
    return _edges(rec, {0: lambda: float(rec.args[1])})


@rule(aten.div.Tensor)
def div(rec: OpRecord):
    a, b = rec.leaves[0], rec.leaves[1]
    return _edges(rec, {0: lambda: 1.0 / b, 1: lambda: -a / (b * b)})


@rule(aten.div.Scalar)
def div_scalar(rec: OpRecord):
    return _edges(rec, {0: lambda: 1.0 / float(rec.args[1])})


@rule(aten.neg.default)
def neg(rec: OpRecord):
    return _edges(rec, {0: lambda: -1.0})


@rule(aten.pow.Tensor_Scalar)
def pow_scalar(rec: OpRecord):
    x, p = rec.leaves[0], float(rec.args[1])
    return _edges(rec, {0: lambda: p * x.pow(p - 1) if p != 0 else torch.zeros_like(x)})


@rule(aten.pow.Tensor_Tensor)
def pow_tensor(rec: OpRecord):
    x, p, y = rec.leaves[0], rec.leaves[1], rec.outputs[0]
    return _edges(rec, {0: lambda: p * x.pow(p - 1), 1: lambda: y * torch.log(x)})


def _selected(rec: OpRecord, keep: dict) -> list[Edge]:
    """Selection operators: ``y_i`` copies (weight 1) the broadcast element of argument ``leaf`` where
    ``keep[leaf]()`` is true and does not depend on it elsewhere (no edge, not a weight-0 edge: the unselected
    side of ``where``/``masked_fill`` and the zeroed part of ``tril`` do not feed the output)."""
    out = rec.outputs[0]
    edges = []
    for leaf, mask in keep.items():
        if leaf < len(rec.leaf_ids) and rec.is_node(leaf):
            x = rec.leaves[leaf]
            idx = torch.arange(x.numel(), device=out.device).reshape(x.shape).expand(out.shape)
            idx = torch.where(mask().expand(out.shape), idx, torch.full_like(idx, -1))
            edges.append(Edge(0, leaf, IndexMap(idx.contiguous(), x.shape)))
    return edges


@rule(aten.where.self)
def where(rec: OpRecord):
    cond = rec.leaves[0]
    return _selected(rec, {1: lambda: cond, 2: lambda: ~cond})


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(rec: OpRecord):  # masked_fill(self, mask, value): value (a 0-dim tensor) may be a node too
    mask = rec.leaves[1]
    return _selected(rec, {0: lambda: ~mask, 2: lambda: mask})


@rule(aten.maximum.default, aten.minimum.default)
def maximum(rec: OpRecord):
    a, b, y = rec.leaves[0], rec.leaves[1], rec.outputs[0]
    tie = (a == b).to(y.dtype) * 0.5  # autograd splits ties evenly
    return _edges(rec, {0: lambda: (a == y).to(y.dtype) - tie, 1: lambda: (b == y).to(y.dtype) - tie})


@rule(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def clamp(rec: OpRecord):
    x = rec.leaves[0]
    lo = hi = None
    if rec.op is aten.clamp_min.default:
        lo = rec.args[1]
    elif rec.op is aten.clamp_max.default:
        hi = rec.args[1]
    elif rec.op is aten.hardtanh.default:
        lo, hi = _scalar(rec, 1, -1.0), _scalar(rec, 2, 1.0)
    else:
        lo, hi = _scalar(rec, 1, None), _scalar(rec, 2, None)
        lo, hi = rec.kwargs.get("min", lo), rec.kwargs.get("max", hi)

    def weight():
        keep = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            keep &= x >= lo
        if hi is not None:
            keep &= x <= hi
        return keep.to(x.dtype)

    return _edges(rec, {0: weight})


# -- activations and transcendental functions ---------------------------------------------------------------------

def _gelu(x, y, rec):
    if rec.kwargs.get("approximate", _scalar(rec, 1, "none")) == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _silu(x, y, rec):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _relu(x, y, rec):
    return (x > 0).to(x.dtype)


def _leaky_relu(x, y, rec):
    slope = _scalar(rec, 1, 0.01)
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, float(slope)))


def _elu(x, y, rec):
    alpha = float(_scalar(rec, 1, 1.0))
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x))


def _tanh(x, y, rec):
    return 1 - y * y


def _sigmoid(x, y, rec):
    return y * (1 - y)


def _exp(x, y, rec):
    return y


def _log(x, y, rec):
    return 1.0 / x


def _sqrt(x, y, rec):
    return 0.5 / y


def _rsqrt(x, y, rec):
    return -0.5 * y * y * y


def _reciprocal(x, y, rec):
    return -y * y


def _sin(x, y, rec):
    return torch.cos(x)


def _cos(x, y, rec):
    return -torch.sin(x)


def _abs(x, y, rec):
    return torch.sign(x)


def _erf(x, y, rec):
    return 2.0 / math.sqrt(math.pi) * torch.exp(-x * x)


def _softplus(x, y, rec):
    beta = float(_scalar(rec, 1, 1.0))
    return torch.sigmoid(beta * x)


def _log1p(x, y, rec):
    return 1.0 / (1 + x)


def _expm1(x, y, rec):
    return y + 1


UNARY = {
    aten.gelu.default: _gelu, aten.silu.default: _silu, aten.relu.default: _relu,
    aten.leaky_relu.default: _leaky_relu, aten.elu.default: _elu, aten.tanh.default: _tanh,
    aten.sigmoid.default: _sigmoid, aten.exp.default: _exp, aten.log.default: _log, aten.sqrt.default: _sqrt,
    aten.rsqrt.default: _rsqrt, aten.reciprocal.default: _reciprocal, aten.sin.default: _sin,
    aten.cos.default: _cos, aten.abs.default: _abs, aten.erf.default: _erf, aten.softplus.default: _softplus,
    aten.log1p.default: _log1p, aten.expm1.default: _expm1,
}
for _op, _derivative in UNARY.items():
    rule(_op)(_unary(_derivative))


@rule(aten.native_dropout.default)
def native_dropout(rec: OpRecord):
    p, train = float(rec.args[1]), rec.args[2]
    out, mask = rec.outputs[0], rec.outputs[1]
    return _edges(rec, {0: lambda: mask.to(out.dtype) / (1 - p) if train else 1.0})


@rule(aten.tril.default, aten.triu.default)
def tril_triu(rec: OpRecord):
    x = rec.leaves[0]
    return _selected(rec, {0: lambda: rec.op(torch.ones_like(x, dtype=torch.bool), *rec.args[1:], **rec.kwargs)})
