"""The rule table: ATen operator -> function that builds the operator's local Jacobians.

A rule receives the recorded call (:class:`~inseq_semiring.graph.tape.OpRecord`) and returns the edges it creates,
``Edge(out, leaf, kind)``: from argument leaf ``leaf`` to output slot ``out``, with a Jacobian ``kind`` from
:mod:`~inseq_semiring.rules.jacobians`. It only needs to build edges for leaves that are nodes (``rec.is_node``).

* ``@rule(aten.x.default, aten.y)`` registers into the global :data:`RULES`; a packet expands to all its
  overloads; registering an op twice raises.
* ``@constant_op(...)`` marks operators whose outputs do not depend on the values of their inputs
  (``zeros_like``, ``detach``): their outputs are not nodes.
* A :class:`RuleSet` is a named overlay ``{**RULES, **overrides}`` passed per call (e.g. LRP rule sets); it
  never mutates the global table.
* In-place overloads (``add_.Tensor``) resolve to the rule of their functional twin (``add.Tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch

from ..errors import UnsupportedOpError
from ..graph.tape import OpRecord
from .jacobians import Kind

aten = torch.ops.aten


class Edge(NamedTuple):
    out: int
    leaf: int
    kind: Kind


Rule = Callable[[OpRecord], Iterable[Edge]]
RULES: dict[torch._ops.OpOverload, Rule] = {}
CONSTANT_OPS: set[torch._ops.OpOverload] = set()
#: custom ``torch.autograd.Function`` class -> rule (its local Jacobian); see :func:`function_rule`
FUNCTION_RULES: dict[type, Rule] = {}
_VERSION = [0]  # bumped by every registration: plans (inseq_semiring.plan) made before it are not reused


def table_version() -> int:
    """How many registrations the global tables have seen (a plan records it; a new rule invalidates plans)."""
    return _VERSION[0]


def _overloads(op) -> list[torch._ops.OpOverload]:
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


def rule(*ops, table: dict | None = None):
    """Register the decorated function as the rule of ``ops`` (overloads or packets)."""
    target = RULES if table is None else table

    def register(fn: Rule) -> Rule:
        for packet in ops:
            for op in _overloads(packet):
                if op in target:
                    raise ValueError(f"a rule for {op} is already registered ({target[op].__qualname__})")
                target[op] = fn
        _VERSION[0] += 1
        return fn

    return register


def constant_op(*ops) -> None:
    """Outputs of these operators are constants: no edges, not nodes (autograd gives them no gradient either)."""
    for packet in ops:
        CONSTANT_OPS.update(_overloads(packet))
    _VERSION[0] += 1


def function_rule(*function_classes, replace: bool = False):
    """Register the decorated function as the rule of custom ``torch.autograd.Function`` classes.

    The rule receives one record per call of the Function: ``rec.leaves`` are the Function's tensor arguments in
    ``apply`` order (``None`` for an argument autograd does not track), ``rec.outputs`` its tensor outputs, and
    ``rec.kwargs["ctx"]`` the Function's ``ctx`` (saved tensors, attributes). It returns ``Edge(out, leaf, kind)``
    like an ATen rule, so every semiring uses it (e.g. straight-through: ``Pointwise(1)`` from leaf 0 to output 0).
    """
    def register(fn: Rule) -> Rule:
        for cls in function_classes:
            if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
                raise TypeError(f"function_rule expects torch.autograd.Function subclasses, got {cls!r}")
            if cls in FUNCTION_RULES and not replace:
                raise ValueError(f"a rule for {cls.__qualname__} is already registered (pass replace=True)")
            FUNCTION_RULES[cls] = fn
        _VERSION[0] += 1
        return fn

    return register


def functional_twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor`` (None if there is no such overload)."""
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, op._overloadname, None)


@dataclass(frozen=True)
class RuleSet:
    """A named view of the rule table with some entries replaced (or added)."""

    name: str = "gradient"
    overrides: dict = field(default_factory=dict)

    def lookup(self, op: torch._ops.OpOverload) -> Rule | None:
        if isinstance(op, type):  # a custom autograd.Function recorded as one call
            return self.overrides.get(op) or FUNCTION_RULES.get(op)
        for candidate in (op, functional_twin(op)):
            if candidate is None:
                continue
            found = self.overrides.get(candidate) or RULES.get(candidate)
            if found is not None:
                return found
        return None

    def is_constant(self, op: torch._ops.OpOverload) -> bool:
        return op in CONSTANT_OPS and op not in self.overrides

    def edges(self, rec: OpRecord) -> list[Edge]:
        fn = self.lookup(rec.op)
        if fn is None:
            raise UnsupportedOpError(f"no rule for ATen operator {rec.op}", where=f"module '{rec.module_path}'")
        return list(fn(rec))

    def check_coverage(self, records: Iterable[OpRecord], model_class: str = "") -> None:
        """Raise once, listing every operator without a rule, with the modules it ran in."""
        count, listing = ops_without_rule(records, self.lookup)
        if count:
            model = f" of model class {model_class}" if model_class else ""
            raise UnsupportedOpError(
                f"{count} ATen operator(s) on the attribution path{model} have no semiring rule: {listing}",
                where="inseq_semiring.rules (the rule table)",
                fix="register a rule with @rule(aten.<op>.<overload>) in inseq_semiring/rules/<family>.py "
                "returning Edge(out, leaf, Pointwise|Reduction|IndexMap|MatMul|RowDense) for each input, "
                "or run the model so that it dispatches supported operators (e.g. attn_implementation='eager'; with "
                "model=..., attention implementations other than eager and sdpa are switched to eager for the call)",
            )


def ops_without_rule(records: Iterable[OpRecord], lookup) -> tuple[int, str]:
    """How many distinct operators of ``records`` ``lookup`` maps to None, and the listing
    ``"op (in module, module, module); ..."`` for an error message (the first three modules each ran in)."""
    missing: dict[str, list[str]] = {}
    for rec in records:
        if lookup(rec.op) is None:
            mods = missing.setdefault(str(rec.op), [])
            if rec.module_path not in mods:
                mods.append(rec.module_path)
    listing = "; ".join(f"{op} (in {', '.join(m[:3]) or '<top level>'})" for op, m in missing.items())
    return len(missing), listing


DEFAULT_RULES = RuleSet()
