"""Guided Backpropagation (Springenberg et al., 2015, "Striving for Simplicity: The All Convolutional Net"), defined
for any element-wise activation.

At every activation ``y = f(x)`` (ReLU, GELU, SiLU, tanh, sigmoid, leaky ReLU, ELU, softplus; in-place variants
resolve to these) the backward signal is clipped to its positive part before the local derivative is applied::

    g_x = f'(x) * max(g_y, 0)

Every other operator keeps its ordinary local Jacobian. On a ReLU network this is the original method
(``1[x > 0] * max(g_y, 0)``, i.e. Captum's ``GuidedBackprop``). For smooth activations the local derivative is kept
as it is (GELU's is negative for x < -0.75), only the incoming signal is clipped. The attribution is the guided
signal at the inputs, ``g_x`` (not multiplied by the input).

Implemented as a :class:`~inseq_semiring.rules.registry.RuleSet` overlay whose activation rules wrap the default
edge in a :class:`~inseq_semiring.methods._engine.Gated` kind (gate ``max(., 0)``), swept by the gradient semiring.
An activation written as a formula of other operators (GPT-2's ``gelu_new``: ``0.5 x (1 + tanh(...))``) is not one
activation operator: the clipping then happens at the ``tanh`` inside it.
"""

from __future__ import annotations

import torch

from ..graph.tape import OpRecord
from ..rules.registry import RULES, Edge, RuleSet
from ._engine import Gated, as_inputs, engine_sweep

aten = torch.ops.aten

#: the element-wise activations whose incoming backward signal is clipped
ACTIVATIONS = (aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
               aten.leaky_relu.default, aten.elu.default, aten.softplus.default)


def positive_part(a: torch.Tensor) -> torch.Tensor:
    return a.clamp_min(0)


def _guided(default_rule):
    def build(rec: OpRecord):
        return [Edge(e.out, e.leaf, Gated(e.kind, positive_part)) for e in default_rule(rec)]

    build.__name__ = f"guided_{default_rule.__name__}"
    return build


GUIDED_BACKPROP = RuleSet("guided-backprop", {op: _guided(RULES[op]) for op in ACTIVATIONS})


def guided_backprop(fn, inputs, *, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Guided Backprop signal ``g_x`` for each input, shaped like it. ``fn(*inputs)``: a scalar or one per batch row."""
    inputs = as_inputs(inputs, "guided_backprop")
    return engine_sweep(fn, inputs, GUIDED_BACKPROP, model=model)
