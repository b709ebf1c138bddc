"""Matrix products: ``mm``, ``bmm``, ``addmm``, ``baddbmm``. Each factor gets a :class:`MatMul` edge whose weight is
the other factor transposed (times ``alpha``); a bias gets a broadcast :class:`Pointwise` edge of weight ``beta``."""

from __future__ import annotations

import torch

from ..graph.tape import OpRecord
from .jacobians import MatMul, Pointwise, Reduction
from .registry import Edge, rule

aten = torch.ops.aten


def _factors(rec: OpRecord, first: int, alpha: float) -> list[Edge]:
    x, y, out = rec.leaves[first], rec.leaves[first + 1], rec.outputs[0]
    edges = []
    if rec.is_node(first):  # out = x @ y: a'_x = a @ (alpha y)^T
        w = y.transpose(-1, -2) if alpha == 1 else alpha * y.transpose(-1, -2)
        edges.append(Edge(0, first, MatMul(w, True, x.shape, out.shape, static=not rec.is_node(first + 1))))
    if rec.is_node(first + 1):  # a'_y = (alpha x)^T @ a
        w = x.transpose(-1, -2) if alpha == 1 else alpha * x.transpose(-1, -2)
        edges.append(Edge(0, first + 1, MatMul(w, False, y.shape, out.shape, static=not rec.is_node(first))))
    return edges


@rule(aten.mm.default, aten.bmm.default)
def mm(rec: OpRecord):
    return _factors(rec, 0, 1.0)


@rule(aten.addmm.default, aten.baddbmm.default)
def addmm(rec: OpRecord):
    beta = float(rec.kwargs.get("beta", 1))
    alpha = float(rec.kwargs.get("alpha", 1))
    edges = _factors(rec, 1, alpha)
    if rec.is_node(0):
        bias, out = rec.leaves[0], rec.outputs[0]
        w = torch.tensor(beta, dtype=out.dtype, device=out.device)
        edges.append(Edge(0, 0, Pointwise(w, bias.shape, out.shape)))
    return edges


@rule(aten.mv.default)
def mv(rec: OpRecord):
    """``y = A x``: ``A[i, j] -> y[i]`` weighs ``x[j]`` (a reduction over j); ``x[j] -> y[i]`` weighs ``A[i, j]``."""
    mat, vec, out = rec.leaves[0], rec.leaves[1], rec.outputs[0]
    edges = []
    if rec.is_node(0):
        edges.append(Edge(0, 0, Reduction(vec.expand_as(mat), (1,), False, mat.shape, out.shape)))
    if rec.is_node(1):
        shapes = ((vec.shape[0], 1), (out.shape[0], 1))
        edges.append(Edge(0, 1, MatMul(mat.transpose(0, 1), False, vec.shape, out.shape,
                                       static=not rec.is_node(0), mat_shapes=shapes)))
    return edges


@rule(aten.dot.default)
def dot(rec: OpRecord):
    """``y = sum_j x_j z_j``: each factor's element feeds the scalar with the other factor's weight."""
    x, z, out = rec.leaves[0], rec.leaves[1], rec.outputs[0]
    edges = []
    for leaf, other in ((0, z), (1, x)):
        if rec.is_node(leaf):
            edges.append(Edge(0, leaf, Reduction(other, (0,), False, rec.leaves[leaf].shape, out.shape)))
    return edges
