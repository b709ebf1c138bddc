"""``decomposition="paper"``: the operator graph of Du et al.'s library (brunoflow, ACL 2023).

What that library's operators are (facts about it, re-derived here with ATen operators):

* ``log_softmax(x) = x - lse(x)``, ``lse(x)`` broadcast back over the reduced dimension;
  ``lse(x) = log(sum(exp(x - m))) + m`` with ``m = max(x)`` routed to its argmax (first index on ties). So ``x``
  feeds three operators: the max, the ``x - m`` inside the sum and the ``x - lse`` outside it;
* ``softmax(x) = exp(log_softmax(x))``;
* layer norm: ``mu = sum(x) / n``; ``var = sum(x^2) / n - mu^2`` with ``x^2`` one power operator;
  ``xh = (x - mu) / sqrt(var + eps)``; ``gamma * xh + beta``;
* cross-entropy / NLL (``nll_loss_forward``, which ``F.cross_entropy`` reaches after ``_log_softmax``): the label
  entries are picked by indexing, negated, then averaged (or summed); class weights multiply the picked entries
  and the mean divides by their total; ignored rows have no edge.

Kept as ATen has them, because the ATen graph already agrees: GELU is one element-wise operator; a linear layer is
``x W^T`` then ``+ b`` (ATen's ``addmm`` fuses the two, but a chain of operators with no fan-out between them has
the same paths and weights, so no semiring's value changes); broadcast adjoints are summed.
"""

from __future__ import annotations

import torch

from . import ATEN, bind, register_decomposition

aten = torch.ops.aten


def upcast(x: torch.Tensor, to_float: bool, dtype=None) -> torch.Tensor:
    """``half_to_float`` / ``dtype`` arguments of the softmax family: cast the input first."""
    if dtype is None and to_float and x.dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    if dtype is None or dtype == x.dtype:
        return x
    return aten._to_copy.default(x, dtype=dtype)


def log_sum_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(sum(exp(x - m))) + m`` over ``dim`` (kept), ``m`` = the max routed to its first argmax."""
    m = aten.max.dim(x, dim, True)[0]
    total = aten.sum.dim_IntList(aten.exp.default(aten.sub.Tensor(x, m)), [dim], True)
    return aten.add.Tensor(aten.log.default(total), m)


def _log_softmax(self, dim, half_to_float):
    x = upcast(self, half_to_float)
    return aten.sub.Tensor(x, log_sum_exp(x, dim % max(1, x.dim())))


def _softmax(self, dim, half_to_float):
    return aten.exp.default(_log_softmax(self, dim, half_to_float))


def fully_masked_rows_to_zero(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """``_safe_softmax``: rows of ``x`` that are all ``-inf`` give 0 (no edge) instead of NaN."""
    masked = aten.all.dim(aten.eq.Scalar(x, float("-inf")), dim, True)
    return aten.where.self(masked, aten.zeros_like.default(y), y)


def _safe_softmax(self, dim, dtype):
    x = upcast(self, False, dtype)
    return fully_masked_rows_to_zero(x, _softmax(x, dim, False), dim)


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    x = input
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    n = 1
    for size in normalized_shape:
        n *= int(size)
    mu = aten.div.Scalar(aten.sum.dim_IntList(x, dims, True), n)
    mean_sq = aten.div.Scalar(aten.sum.dim_IntList(aten.pow.Tensor_Scalar(x, 2), dims, True), n)
    var = aten.sub.Tensor(mean_sq, aten.pow.Tensor_Scalar(mu, 2))
    denom = aten.sqrt.default(aten.add.Scalar(var, eps))
    y = aten.div.Tensor(aten.sub.Tensor(x, mu), denom)
    if weight is not None:
        y = aten.mul.Tensor(y, weight)
    if bias is not None:
        y = aten.add.Tensor(y, bias)
    return y, mu, aten.reciprocal.default(denom)


def nll_loss_forward(self, target, weight, reduction, ignore_index):
    """``out = -sum_i w[t_i] x[i, t_i]`` (/ ``sum_i w[t_i]`` for the mean; per row for ``reduction=0``)."""
    x = self
    x2 = x if x.dim() == 2 else aten.unsqueeze.default(x, 0)
    t = aten.reshape.default(target, [-1]).long()
    keep = aten.ne.Scalar(t, ignore_index)
    t_safe = aten.where.self(keep, t, aten.zeros_like.default(t))
    rows = torch.arange(x2.shape[0], device=x.device)
    picked = aten.neg.default(aten.index.Tensor(x2, [rows, t_safe]))
    if not bool(keep.all()):  # ignored rows: no edge (a where), not an edge of weight 0
        picked = aten.where.self(keep, picked, aten.zeros_like.default(picked))
    w_row = torch.ones(t.shape, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)[t_safe]
    w_row = torch.where(keep, w_row, torch.zeros_like(w_row))
    if weight is not None:
        picked = aten.mul.Tensor(picked, w_row)
    total_weight = w_row.sum()
    if reduction == 0:
        out = picked if x.dim() == 2 else aten.reshape.default(picked, [])
    else:
        out = aten.sum.default(picked)
        if reduction == 1:
            out = aten.div.Tensor(out, total_weight)
    return out, total_weight


def as_table(functions: dict) -> dict:
    """``{op: f(**named arguments)}`` -> ``{op: f(*args, **kwargs)}`` (arguments bound by the op's schema)."""
    def entry(op, f):
        return lambda *args, **kwargs: f(**bind(op, args, kwargs))

    return {op: entry(op, f) for op, f in functions.items()}


TABLE = {
    aten._log_softmax.default: _log_softmax,
    aten._softmax.default: _softmax,
    aten._safe_softmax.default: _safe_softmax,
    aten.native_layer_norm.default: native_layer_norm,
    aten.nll_loss_forward.default: nll_loss_forward,
}

PAPER = register_decomposition(ATEN.extend("paper", as_table(TABLE)))
