"""The reverse sweep: one pass over the tape, ignorant of semirings and of operators.

For each record, last to first: take the values of its outputs (complete by now, since every consumer comes later
in the tape; ``semiring.complete`` finishes them), ask the rule table for its edges, pull each output's value through each edge with the semiring,
combine pulls into the same input tensor inside the operator (``plus_within``) and then across consumers (``plus``).
A value crossing a dtype boundary (a cast, an autocast region) takes the input's dtype, as autograd's gradients do.
An output's value is released once its producer has been processed (``on_complete`` sees it first).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import UnsupportedOpError
from .graph.tape import Tape
from .rules.registry import DEFAULT_RULES, RuleSet
from .semirings.base import Semiring


def sweep(
    tape: Tape,
    semiring,
    seed: Any,
    *,
    rules: RuleSet = DEFAULT_RULES,
    on_complete: Callable[[int, Any], None] | None = None,
    plan_rules: Sequence[Callable] | None = None,
) -> dict[int, Any]:
    """Propagate ``seed`` (the root's value) to every node; return ``{input id: value}`` (absent: semiring zero).
    ``plan_rules``: the rule of each record, from a :class:`~inseq_semiring.plan.Plan` that matches the tape."""
    env: dict[int, Any] = {tape.root_id: seed}
    edges_of = rules.edges if plan_rules is None else (lambda rec: plan_rules[rec.index](rec))
    complete, pull, cast, plus_within, plus = (semiring.complete, semiring.pull, semiring.cast,
                                               semiring.plus_within, semiring.plus)
    keeps = getattr(type(semiring), "complete", None) is Semiring.complete  # completing is the identity
    absent = object()
    pop, get = env.pop, env.get
    for rec in reversed(tape.records):
        outs = {}
        for slot, tid in enumerate(rec.output_ids):
            if tid is not None:
                value = pop(tid, absent)
                if value is not absent:
                    outs[slot] = value if keeps else complete(value)
        if not outs:
            continue
        if on_complete is not None:
            for slot, value in outs.items():
                on_complete(rec.output_ids[slot], value)
        pulled: dict[int, Any] = {}
        covered = 0  # bit mask of the output slots that had an edge
        leaf_ids, leaves, outputs, index = rec.leaf_ids, rec.leaves, rec.outputs, rec.index
        for out, leaf, kind in edges_of(rec):
            tid = leaf_ids[leaf]
            if tid is None:
                continue
            value = outs.get(out, absent)
            if value is absent:
                continue
            covered |= 1 << out
            value = pull(kind, value, (index, out, leaf))
            leaf_dtype = leaves[leaf].dtype
            if leaf_dtype != outputs[out].dtype:  # a precision island (autocast, float32 norms): as autograd
                value = cast(value, leaf_dtype)
            before = pulled.get(tid, absent)
            pulled[tid] = value if before is absent else plus_within(before, value)
        if covered.bit_count() < len(outs) and any(i is not None for i in leaf_ids):
            missing = sorted(slot for slot in outs if not covered >> slot & 1)
            raise UnsupportedOpError(
                f"the rule for {rec.op} gives no edges from output(s) {missing}, but they lie on the attribution path",
                where=f"module '{rec.module_path}'",
                fix="extend that operator's rule in inseq_semiring/rules to cover those outputs",
            )
        for tid, value in pulled.items():
            before = get(tid, absent)
            env[tid] = value if before is absent else plus(before, value)
    done = {tid: semiring.complete(env[tid]) for tid in tape.input_ids if tid in env}
    if on_complete is not None:
        for tid, value in done.items():
            on_complete(tid, value)
    return done
