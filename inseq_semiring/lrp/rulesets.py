"""Relevance propagation as rule-set overlays (the plug-in point for LRP, AttnLRP, CP-LRP).

An LRP variant is the gradient semiring run over *edited* local Jacobians, then multiplied by the input:
``R(x) = x * d~root/dx``. Each variant is a :class:`~inseq_semiring.rules.registry.RuleSet` overlay that replaces
the rules of a few operators; the traversal and the semirings are untouched.

* :data:`IDENTITY_NONLINEARITIES` (AttnLRP's identity rule, Achtibat et al. 2024, Eq. 9): an element-wise
  non-linearity ``y = f(x)`` passes relevance unchanged, i.e. its edge weight becomes ``f(x)/x`` (0 where x = 0).
  With bias-free linear layers this is LRP-0 and relevance is conserved: ``sum R(x) = root``.
"""

from __future__ import annotations

import torch

from ..graph.tape import OpRecord
from ..rules.jacobians import Pointwise
from ..rules.registry import Edge, RuleSet

aten = torch.ops.aten


def _identity_rule(rec: OpRecord):
    x, y = rec.leaves[0], rec.outputs[0]
    if not rec.is_node(0):
        return []
    ratio = torch.where(x != 0, y / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))
    return [Edge(0, 0, Pointwise(ratio, x.shape, y.shape))]


_NONLINEAR = [aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
              aten.leaky_relu.default, aten.elu.default]

IDENTITY_NONLINEARITIES = RuleSet("lrp-identity", {op: _identity_rule for op in _NONLINEAR})


def relevance(fn, inputs, rules: RuleSet = IDENTITY_NONLINEARITIES, **kw) -> tuple[torch.Tensor, ...]:
    """``x * (gradient under the edited rules)`` for each input."""
    from ..api import run

    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    grads = run(fn, inputs, "gradient", rules=rules, **kw).values
    return tuple(x * g for x, g in zip(inputs, grads))
