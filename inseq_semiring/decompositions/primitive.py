"""``decomposition="primitive"``: every composite kernel as element-wise operators and reductions.

For studying how sensitive a tensor-granularity answer is to the graph. The textbook stable forms:

* ``softmax(x) = e / sum(e)``, ``e = exp(x - m)``, ``m = amax(x)`` (ties share the max, as in autograd);
* ``log_softmax(x) = (x - m) - log(sum(exp(x - m)))``;
* layer norm, two-pass: ``d = x - mean(x)``, ``var = mean(d^2)``, ``y = d * rsqrt(var + eps) * gamma + beta``;
* ``gelu(x) = x/2 (1 + erf(x / sqrt 2))`` (``approximate="tanh"``: ``x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``);
* ``silu(x) = x * sigmoid(x)``;
* cross-entropy / NLL as in ``"paper"``.
"""

from __future__ import annotations

import math

import torch

from . import ATEN, register_decomposition
from .paper import as_table, fully_masked_rows_to_zero, nll_loss_forward, upcast

aten = torch.ops.aten


def _shifted(x: torch.Tensor, dim: int) -> torch.Tensor:
    return aten.sub.Tensor(x, aten.amax.default(x, [dim], True))


def _softmax(self, dim, half_to_float):
    x = upcast(self, half_to_float)
    e = aten.exp.default(_shifted(x, dim % max(1, x.dim())))
    return aten.div.Tensor(e, aten.sum.dim_IntList(e, [dim], True))


def _log_softmax(self, dim, half_to_float):
    x = upcast(self, half_to_float)
    s = _shifted(x, dim % max(1, x.dim()))
    return aten.sub.Tensor(s, aten.log.default(aten.sum.dim_IntList(aten.exp.default(s), [dim], True)))


def _safe_softmax(self, dim, dtype):
    x = upcast(self, False, dtype)
    return fully_masked_rows_to_zero(x, _softmax(x, dim, False), dim)


def native_layer_norm(input, normalized_shape, weight, bias, eps):
    x = input
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mu = aten.mean.dim(x, dims, True)
    d = aten.sub.Tensor(x, mu)
    rstd = aten.rsqrt.default(aten.add.Scalar(aten.mean.dim(aten.pow.Tensor_Scalar(d, 2), dims, True), eps))
    y = aten.mul.Tensor(d, rstd)
    if weight is not None:
        y = aten.mul.Tensor(y, weight)
    if bias is not None:
        y = aten.add.Tensor(y, bias)
    return y, mu, rstd


def gelu(self, approximate):
    x = self
    if approximate == "tanh":
        cube = aten.mul.Scalar(aten.pow.Tensor_Scalar(x, 3), 0.044715)
        inner = aten.mul.Scalar(aten.add.Tensor(x, cube), math.sqrt(2.0 / math.pi))
        gate = aten.add.Scalar(aten.tanh.default(inner), 1.0)
    else:
        gate = aten.add.Scalar(aten.erf.default(aten.mul.Scalar(x, 1.0 / math.sqrt(2.0))), 1.0)
    return aten.mul.Tensor(aten.mul.Scalar(x, 0.5), gate)


def silu(self):
    return aten.mul.Tensor(self, aten.sigmoid.default(self))


TABLE = {
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
    aten._safe_softmax.default: _safe_softmax,
    aten.native_layer_norm.default: native_layer_norm,
    aten.gelu.default: gelu,
    aten.silu.default: silu,
    aten.nll_loss_forward.default: nll_loss_forward,
}

PRIMITIVE = register_decomposition(ATEN.extend("primitive", as_table(TABLE)))
