"""Plan once, replay many: what a tape's *structure* determines, computed once per model and input shape.

A tape's structure -- its operators in order, which arguments and outputs are nodes, the rule of each record, the
int64 index maps of view/slice/cat operators -- depends on the model and the inputs' shapes, not on their values.
A :class:`Plan` holds that structure for one key (model, input shapes/dtypes/devices, rule set, rule-table version,
decomposition, custom-Function policy). A later call with the same key

* skips the coverage check (every operator of the plan has a rule),
* takes each record's rule from the plan (no lookup per record),
* starts its sweep with the plan's index maps (keyed, as within one sweep, by operator, leaf, shape, strides and
  non-tensor arguments: a different call gets a different key, never a wrong map).

What a plan never holds: values. The forward pass always runs for real under the recorder, so Jacobian weights,
constants (masks, positions) and value-dependent control flow are the live ones; a plan is used only when the new
tape's signature (per record: operator, node ids of arguments and outputs) equals the plan's, so a replay cannot
follow a different graph. On a mismatch the call takes the one-off path and the plan is rebuilt from it. Writes to
the weights, also through ``.data`` (which does not bump a version counter), are followed because rules read the
weights from the fresh tape.

The cache is per model (a ``WeakKeyDictionary`` guarded by a lock), at most :data:`PLANS_PER_MODEL` plans and
:data:`PLAN_BYTES_PER_MODEL` bytes of index maps each (least recently used dropped). A published plan is never
mutated, except for its ``sweeps`` dict, to which :mod:`~inseq_semiring.traced_sweep` adds each key once under a lock
(``compile="all"``): concurrent calls share it read-only, and each sweep works on its own copy of the index maps.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .graph.tape import Tape
from .rules import registry

#: Plans kept per model (distinct input shapes / options), least recently used dropped first.
PLANS_PER_MODEL = 8
#: Bytes of index maps kept per model (GPT-2 small: ~4 MiB per plan at 64 tokens, ~18 MiB at 256); a plan larger
#: than this is not kept.
PLAN_BYTES_PER_MODEL = 128 * 2**20

_INDEX_KEY = "index_map"  # the first element of the structural index-map memo keys (rules/structural.py)


def signature(tape: Tape) -> tuple:
    """Per record ``(operator, argument node ids, output node ids)``, plus the input and root ids: equal signatures
    mean the same graph up to values (node ids are given in call order)."""
    return (tape.input_ids, tape.root_id,
            tuple([(rec.op, rec.leaf_ids, rec.output_ids) for rec in tape.records]))


@dataclass(frozen=True, eq=False)
class Plan:
    """The structure of one tape: its signature, the rule of each record, and the structural index maps."""

    signature: tuple
    rules: tuple  # rule function per record
    index_maps: dict  # structural memo entries (read-only once published)
    nbytes: int = 0  # bytes of the index tensors
    #: traced sweeps (:mod:`~inseq_semiring.traced_sweep`, ``compile="all"``): a program or a refusal per semiring
    #: key, and ``"fits"`` (whether the tapes are small enough to trace); each entry set once
    sweeps: dict = field(default_factory=dict)

    def matches(self, tape: Tape) -> bool:
        return signature(tape) == self.signature

    def memo(self) -> dict:
        """A fresh sweep memo seeded with the plan's index maps (the sweep may add entries to its own copy)."""
        return dict(self.index_maps)


def build(tape: Tape, rule_set: registry.RuleSet, memo: dict) -> Plan:
    """The plan of a tape just swept (``memo``: that sweep's memo; only its index maps are kept)."""
    fns = tuple(rule_set.lookup(rec.op) for rec in tape.records)
    maps = {k: v for k, v in memo.items() if isinstance(k, tuple) and k and k[0] == _INDEX_KEY}
    nbytes = sum(idx.numel() * idx.element_size() for entry in maps.values() for idx, _ in entry)
    return Plan(signature(tape), fns, maps, nbytes)


def key(inputs: Sequence[torch.Tensor], rule_set: registry.RuleSet, decomposition: Any, custom_functions: str,
        extra: tuple = ()) -> tuple:
    """What a plan depends on besides the model: input shapes, dtypes and devices, the rule set (by identity) and the
    version of the global rule tables, the decomposition (by identity), the custom-Function policy."""
    return (tuple((tuple(x.shape), x.dtype, x.device) for x in inputs), id(rule_set), registry.table_version(),
            id(decomposition), custom_functions, extra)


class PlanCache:
    """Plans per model: ``WeakKeyDictionary[model -> OrderedDict[key -> (plan, rule set, decomposition)]]``.

    The rule set and decomposition objects are held with the plan, so the ids in the key stay theirs."""

    def __init__(self, per_model: int = PLANS_PER_MODEL, bytes_per_model: int = PLAN_BYTES_PER_MODEL):
        self.per_model = per_model
        self.bytes_per_model = bytes_per_model
        self._plans: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, model: torch.nn.Module, k: tuple) -> Plan | None:
        with self._lock:
            plans = self._plans.get(model)
            if plans is None or k not in plans:
                return None
            plans.move_to_end(k)
            return plans[k][0]

    def put(self, model: torch.nn.Module, k: tuple, plan: Plan, keep: tuple = ()) -> None:
        with self._lock:
            plans = self._plans.setdefault(model, OrderedDict())
            plans.pop(k, None)
            if plan.nbytes > self.bytes_per_model:
                return
            plans[k] = (plan, keep)
            total = sum(p.nbytes for p, _ in plans.values())
            while len(plans) > self.per_model or total > self.bytes_per_model:
                _, (old, _) = plans.popitem(last=False)
                total -= old.nbytes

    def clear(self, model: torch.nn.Module | None = None) -> None:
        with self._lock:
            if model is None:
                self._plans.clear()
            else:
                self._plans.pop(model, None)

    def size(self, model: torch.nn.Module) -> int:
        with self._lock:
            return len(self._plans.get(model, ()))


#: The plans of :func:`inseq_semiring.api.run` (per model; see the module docstring).
PLANS = PlanCache()
