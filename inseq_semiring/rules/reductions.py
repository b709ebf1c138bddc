"""Reductions: every input element feeds exactly one output element (:class:`Reduction`).

``sum``: weight 1; ``mean``: ``1/N``; ``amax``/``amin``: weight ``1/t`` on each of the ``t`` tied extreme elements
and 0 elsewhere (as autograd distributes it); ``max.dim``/``min.dim``: weight 1 on the returned index;
``nll_loss_forward`` (``F.cross_entropy`` / ``F.nll_loss`` as the root): only the target entries are edges.
"""

from __future__ import annotations

import torch

from ..graph.tape import OpRecord
from .jacobians import Reduction
from .registry import Edge, rule

aten = torch.ops.aten


def _dims(x: torch.Tensor, dims) -> tuple[int, ...]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(x.dim()))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(d % max(1, x.dim()) for d in dims))


def _reduction(rec: OpRecord, dims, keepdim: bool, weight) -> list[Edge]:
    if not rec.is_node(0):
        return []
    x, out = rec.leaves[0], rec.outputs[0]
    if x.dim() == 0:
        dims, keepdim = (), True
    w = weight if isinstance(weight, torch.Tensor) else torch.tensor(weight, dtype=out.dtype, device=out.device)
    return [Edge(0, 0, Reduction(w.to(out.dtype), dims, keepdim, x.shape, out.shape))]


def _arg(rec: OpRecord, pos: int, name: str, default):
    if pos < len(rec.args):
        return rec.args[pos]
    return rec.kwargs.get(name, default)


@rule(aten.sum.dim_IntList, aten.sum.default)
def sum_(rec: OpRecord):
    x = rec.leaves[0]
    dims = _dims(x, _arg(rec, 1, "dim", None)) if rec.op is aten.sum.dim_IntList else _dims(x, None)
    keepdim = bool(_arg(rec, 2, "keepdim", False)) if rec.op is aten.sum.dim_IntList else False
    return _reduction(rec, dims, keepdim, 1.0)


@rule(aten.mean.dim, aten.mean.default)
def mean(rec: OpRecord):
    x = rec.leaves[0]
    dims = _dims(x, _arg(rec, 1, "dim", None)) if rec.op is aten.mean.dim else _dims(x, None)
    keepdim = bool(_arg(rec, 2, "keepdim", False)) if rec.op is aten.mean.dim else False
    count = 1
    for d in dims:
        count *= x.shape[d] if x.dim() else 1
    return _reduction(rec, dims, keepdim, 1.0 / max(1, count))


@rule(aten.amax.default, aten.amin.default)
def amax(rec: OpRecord):
    x, out = rec.leaves[0], rec.outputs[0]
    dims = _dims(x, _arg(rec, 1, "dim", ()))
    keepdim = bool(_arg(rec, 2, "keepdim", False))
    kept = out if keepdim else out.reshape([1 if d in dims else s for d, s in enumerate(x.shape)])
    hit = (x == kept).to(out.dtype)
    ties = hit.sum(dim=dims, keepdim=True)
    return _reduction(rec, dims, keepdim, hit / ties)


@rule(aten.max.dim, aten.min.dim)
def max_dim(rec: OpRecord):
    x = rec.leaves[0]
    dim = _dims(x, _arg(rec, 1, "dim", 0))
    keepdim = bool(_arg(rec, 2, "keepdim", False))
    index = rec.outputs[1] if keepdim else rec.outputs[1].unsqueeze(dim[0])
    w = torch.zeros_like(x).scatter_(dim[0], index, 1.0)
    return _reduction(rec, dim, keepdim, w)


@rule(aten.nll_loss_forward.default)
def nll_loss(rec: OpRecord):
    """``nll_loss(x, t, w, reduction, ignore)``: ``out_i = -w[t_i] x[i, t_i]`` per row (``reduction`` 0), summed (2), or
    summed and divided by ``sum_i w[t_i]`` (1, mean); rows with ``t_i == ignore`` have no edge. ``x``: [N, C] or [C]."""
    if not rec.is_node(0):
        return []
    x, target, out = rec.leaves[0], _arg(rec, 1, "target", None), rec.outputs[0]
    class_weight = _arg(rec, 2, "weight", None)
    reduction, ignore = int(_arg(rec, 3, "reduction", 1)), int(_arg(rec, 4, "ignore_index", -100))
    x2 = x.reshape(1, -1) if x.dim() == 1 else x
    t = target.reshape(-1).to(torch.long)
    keep = t != ignore
    t_safe = torch.where(keep, t, torch.zeros_like(t))
    w_row = torch.ones(t.shape, dtype=torch.float64, device=x.device)
    if class_weight is not None:
        w_row = class_weight.to(torch.float64)[t_safe]
    w_row = torch.where(keep, w_row, torch.zeros_like(w_row))
    if reduction == 1:
        w_row = w_row / w_row.sum()
    support = torch.zeros(x2.shape, dtype=torch.bool, device=x.device)
    rows = torch.arange(x2.shape[0], device=x.device)
    support[rows[keep], t_safe[keep]] = True
    weight = torch.zeros(x2.shape, dtype=torch.float64, device=x.device)
    weight[rows, t_safe] = torch.where(keep, -w_row, torch.zeros_like(w_row))
    dims = (x.dim() - 1,) if reduction == 0 and x.dim() == 2 else tuple(range(x.dim()))
    kind = Reduction(weight.reshape(x.shape).to(out.dtype), dims, False, x.shape, out.shape, support.reshape(x.shape))
    return [Edge(0, 0, kind)]
