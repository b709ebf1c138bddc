"""Row-wise dense operators over the last dimension, as ``J_row = diag(d) + sum_r u_r v_r^T`` (:class:`RowDense`).

* ``_softmax`` / ``_safe_softmax`` (0 on fully masked rows): ``J = diag(y) - y y^T``  (d = y, u = -y, v = y)
* ``_log_softmax``: ``J = I - 1 s^T``, ``s = exp(y)``       (d = 1, u = -1, v = s)
* ``native_layer_norm``: ``J = diag(g r) (I - 1 1^T / n - xh xh^T / n)`` with ``r`` = rstd, ``xh`` the normalised
  row and ``g`` the affine weight (:class:`LayerNormRow`); the bias is a constant shift.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from ..graph.tape import OpRecord
from .jacobians import LayerNormRow, RowDense
from .registry import Edge, rule

aten = torch.ops.aten


def _last_dim(rec: OpRecord, dim: int) -> None:
    x = rec.leaves[0]
    if dim % max(1, x.dim()) != x.dim() - 1:
        raise UnsupportedOpError(f"{rec.op} over dim {dim} of a {x.dim()}-d tensor (only the last dim is supported)",
                                 where=f"module '{rec.module_path}'",
                                 fix="apply it over the last dimension (transpose before and after)")


@rule(aten._softmax.default, aten._safe_softmax.default)
def softmax(rec: OpRecord):
    if not rec.is_node(0):
        return []
    _last_dim(rec, rec.args[1])
    y = rec.outputs[0]
    return [Edge(0, 0, RowDense(y, (-y).unsqueeze(0), y.unsqueeze(0)))]


@rule(aten._log_softmax.default)
def log_softmax(rec: OpRecord):
    if not rec.is_node(0):
        return []
    _last_dim(rec, rec.args[1])
    y = rec.outputs[0]
    s = torch.exp(y)
    return [Edge(0, 0, RowDense(torch.ones_like(y), -torch.ones_like(y).unsqueeze(0), s.unsqueeze(0)))]


@rule(aten.native_layer_norm.default)
def native_layer_norm(rec: OpRecord):
    x, normalized_shape, weight = rec.leaves[0], rec.args[1], rec.args[2]
    if len(normalized_shape) != 1:
        raise UnsupportedOpError("native_layer_norm over more than one dimension",
                                 where=f"module '{rec.module_path}'", fix="normalise over the last dimension only")
    for leaf in range(1, len(rec.leaf_ids)):
        if rec.is_node(leaf):
            raise UnsupportedOpError("native_layer_norm with a traced affine weight or bias",
                                     where=f"module '{rec.module_path}'",
                                     fix="attribute to the layer input only (weights are constants)")
    if not rec.is_node(0):
        return []
    mean, rstd = rec.outputs[1], rec.outputs[2]
    xh = (x - mean) * rstd
    gain = rstd.expand_as(x) if weight is None else weight * rstd
    return [Edge(0, 0, LayerNormRow(gain.expand_as(x).contiguous(), xh))]
