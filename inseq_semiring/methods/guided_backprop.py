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
activation operator. When ``model`` is given, every parameter-free leaf module whose class names an activation
(``GELU``, ``SiLU``, ``ReLU``, ``Tanh``, ``Sigmoid``, ``...Activation``: :func:`activation_modules`) is treated as
one activation: the signal is clipped once, at the module's output (the last operator recorded in each call), and
the operators inside it keep their ordinary Jacobians, so ``g_x = f'(x) max(g_y, 0)`` for the whole formula. Without
``model``, the clipping happens at the element-wise activation operators inside the formula (the ``tanh``).
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field

from ..graph.tape import OpRecord, Tape
from ..rules.registry import DEFAULT_RULES, RULES, Edge, RuleSet
from ._engine import Gated, as_inputs, engine_sweep, record_tape

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


_ACTIVATION_WORDS = ("gelu", "silu", "swish", "relu", "tanh", "sigmoid", "mish", "softplus", "activation")


def activation_modules(model: torch.nn.Module | None) -> frozenset[str]:
    """Names of the parameter-free leaf modules of ``model`` whose class names an activation."""
    if model is None:
        return frozenset()
    names = set()
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if (name and not any(True for _ in module.children()) and not any(True for _ in module.parameters())
                and any(word in cls for word in _ACTIVATION_WORDS)):
            names.add(name)
    return frozenset(names)


@dataclass(frozen=True)
class ModuleGuidedRules(RuleSet):
    """:data:`GUIDED_BACKPROP` plus activation *modules*: the record that ends each call of one is gated, the other
    records inside it keep their ordinary rules."""

    name: str = "guided-backprop-modules"
    overrides: dict = field(default_factory=dict)
    gated: frozenset = frozenset()  # record indices whose outputs are an activation module's output
    inside: frozenset = frozenset()  # record indices inside an activation module

    def lookup(self, op):
        return GUIDED_BACKPROP.lookup(op)

    def edges(self, rec: OpRecord) -> list[Edge]:
        if rec.index in self.gated:
            return [Edge(e.out, e.leaf, Gated(e.kind, positive_part)) for e in DEFAULT_RULES.edges(rec)]
        if rec.index in self.inside:
            return DEFAULT_RULES.edges(rec)
        return GUIDED_BACKPROP.edges(rec)


def module_rules(tape: Tape, modules: frozenset[str]) -> RuleSet:
    """The rule set for ``tape`` given the activation modules' names (the plain overlay when there are none)."""
    inside = [rec.index for rec in tape.records if rec.module_path in modules]
    if not inside:
        return GUIDED_BACKPROP
    gated = [i for i in inside if i + 1 >= len(tape.records)
             or tape.records[i + 1].module_path != tape.records[i].module_path]
    return ModuleGuidedRules(gated=frozenset(gated), inside=frozenset(inside))


def guided_backprop(fn, inputs, *, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Guided Backprop signal ``g_x`` for each input, shaped like it. ``fn(*inputs)``: a scalar or one per batch row.
    ``model``: its activation modules count as activations (see the module docstring)."""
    inputs = as_inputs(inputs, "guided_backprop")
    tape = record_tape(fn, inputs, model=model)
    return engine_sweep(fn, inputs, module_rules(tape, activation_modules(model)), tape=tape)
