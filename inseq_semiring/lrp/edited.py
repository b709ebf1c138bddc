"""Edited local Jacobians: one function per LRP rule kind, in gradient form.

Every relevance rule here has the form ``R_in = in * J~^T (R_out / out)``: the relevance of a node tensor ``t`` is
``R(t) = t * g~(t)``, where ``g~`` is the gradient of the root through the *edited* Jacobians ``J~``. So each rule
is a local Jacobian, and the gradient semiring computes every rule in one reverse sweep. Formulas (``z`` the
operator's output, ``x`` a node argument, ``R_j`` the relevance of ``z_j``):

* **linear** (views, add, sum, mean, scaling, masking; Bach et al. 2015, LRP-0): ``R_i = sum_j x_i J_ji R_j / z_j``
  with the plain Jacobian. On a sum ``z = a + b`` this splits ``R_z`` in proportion ``a/z``, ``b/z``.
* **epsilon** (contractions ``z = W x + b``; Bach et al. 2015): ``R_x = x * W^T (R_z / (z + eps sign(z)))``,
  ``sign(0) = 1``: the plain Jacobian times the per-output factor ``z / (z + eps sign(z))``
  (:func:`epsilon_factor`), applied on a separate hop after the contraction.
* **identity** (element-wise non-linearity ``y = f(x)``; Achtibat et al. 2024, Eq. 9): ``R_x = R_y``, i.e. the edge
  weight ``y / x`` (0 where ``x = 0``).
* **uniform** (a product of two input-dependent tensors, element-wise or a contraction ``Q K^T``, ``A V``;
  Achtibat et al. 2024, Prop. 3.3 with N = 2): each operand gets half of the relevance, ``R_a = R_b = R_z / 2``
  element-wise, ``R_{a_ik} = sum_j a_ik b_kj R_ij / (2 z_ij)`` for a contraction: half the gradient per operand.
* **softmax** (Achtibat et al. 2024, Prop. 3.1, Taylor expansion at the input with the bias term absorbed):
  ``R_x_i = x_i (R_i - s_i sum_j R_j)``, which is exactly the plain Jacobian ``diag(s) - s s^T`` in gradient form.
* **norm, sigma detached** (Ali et al. 2022; Achtibat et al. 2024): the normaliser ``1/sigma`` (LayerNorm's rstd,
  RMSNorm's ``rsqrt(mean(x^2) + eps)``) is a constant, so ``y = g (x - mean(x)) / sigma + b`` is linear in ``x``:
  ``J~ = diag(g / sigma) (I - 1 1^T / n)`` (LayerNorm, :func:`layer_norm_detached`), ``J~ = diag(g / sigma)``
  (RMSNorm: the edge into the normaliser is dropped, the other operand keeps its gradient).
* **constant operand** (CP-LRP, Ali et al. 2022): in ``A V`` the attention weights ``A`` are a constant, so the
  product is a contraction linear in ``V`` (epsilon rule) and no relevance enters ``A``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..graph.tape import OpRecord
from ..rules.jacobians import Pointwise, RowDense
from ..rules.registry import DEFAULT_RULES, Edge

DEFAULT_EPSILON = 1e-6


def gradient_edges(rec: OpRecord) -> list[Edge]:
    """The operator's plain local Jacobians (the engine's rule table)."""
    return DEFAULT_RULES.edges(rec)


def sign0(z: torch.Tensor) -> torch.Tensor:
    """``sign(z)`` with ``sign(0) = 1``."""
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def epsilon_factor(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z / (z + eps sign(z))``: the epsilon rule's per-output factor on top of the plain Jacobian (1 where the
    denominator is 0, i.e. ``z = 0`` with ``eps = 0``: LRP-0 is the plain gradient there)."""
    if epsilon == 0:
        return torch.where(z != 0, z / torch.where(z != 0, z, torch.ones_like(z)), torch.ones_like(z))
    # z / (z + eps sign z) = |z| / (|z| + eps): for z < 0 both the numerator and z - eps = -(|z| + eps) only change
    # sign (exact in floating point); for z = 0 both are 0. Two passes over z instead of four.
    mag = z.abs()
    return mag.div_(mag + epsilon)


def epsilon_hop(z: torch.Tensor, epsilon: float) -> Edge:
    """The edge of the separate epsilon hop ``z -> z`` (weight :func:`epsilon_factor`)."""
    return Edge(0, 0, Pointwise(epsilon_factor(z, epsilon), z.shape, z.shape))


def identity_edge(x: torch.Tensor, y: torch.Tensor) -> Edge:
    """Identity rule ``R_x = R_y`` for ``y = f(x)`` element-wise: weight ``y / x`` (0 where ``x = 0``)."""
    ratio = y / x  # inf / nan where x = 0, overwritten below
    return Edge(0, 0, Pointwise(ratio.masked_fill_(x == 0, 0), x.shape, y.shape))


def scaled(edges: Iterable[Edge], factor: float) -> list[Edge]:
    """Every edge's weights times ``factor`` (the uniform rule: ``factor = 1/2``)."""
    if factor == 1:
        return list(edges)
    return [Edge(e.out, e.leaf, e.kind.map_weights(lambda w: factor * w)) for e in edges]


def only_leaves(edges: Iterable[Edge], leaves: set[int]) -> list[Edge]:
    """Keep the edges into these argument positions (the others are held constant)."""
    return [e for e in edges if e.leaf in leaves]


def layer_norm_detached(rec: OpRecord) -> list[Edge]:
    """``native_layer_norm`` with ``rstd`` a constant: ``J~ = diag(g rstd) (I - 1 1^T / n)``."""
    if not rec.is_node(0):
        return []
    x, weight, rstd = rec.leaves[0], rec.args[2], rec.outputs[2]
    n = x.shape[-1]
    gain = rstd.expand_as(x) if weight is None else weight * rstd
    gain = gain.expand_as(x).contiguous()
    return [Edge(0, 0, RowDense(gain, (-gain / n).unsqueeze(0), torch.ones_like(gain).unsqueeze(0)))]
