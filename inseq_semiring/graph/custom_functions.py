"""What autograd would do that the operators alone do not say: grad mode and custom ``autograd.Function`` calls.

The recorder runs ``fn`` with grad mode on and records every operator that reads a node, noting those that ran with
grad mode off. Two things then decide which of those records are edges, exactly as autograd decides:

* **Grad mode off** (a ``torch.no_grad()`` block inside the forward): autograd treats the results as constants.
  Those records are dropped and their outputs stop being nodes.
* **Custom Functions** (``torch.autograd.Function.apply``): autograd runs the Function's ``forward`` with grad mode
  off and differentiates it with the Function's own ``backward``, which the engine cannot see. The Function calls
  on the path to the root are found in the root's autograd graph (``BackwardCFunction`` nodes whose outputs are
  recorded nodes). Each call is then, by ``custom_functions=``:

  - ``"error"`` (default) without a registered rule: :class:`~inseq_semiring.errors.UnsupportedOpError` naming the
    Function class, its module and the model class;
  - a rule registered with :func:`~inseq_semiring.rules.registry.function_rule`: one record for the whole call
    (inputs in ``apply`` order, outputs by ``output_nr``) replaces the operators of its ``forward``;
  - ``"forward"``: its forward operators are kept as ordinary edges (a one-line warning says the backward is
    ignored).

  A call's forward operators are the grad-mode-off records on a path to its outputs, within the run of grad-mode-off
  records that ends at its last output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError, UnsupportedOpError
from .tape import OpRecord

CUSTOM_FUNCTION_POLICIES = ("error", "forward")


def check_policy(custom_functions: str) -> str:
    if custom_functions not in CUSTOM_FUNCTION_POLICIES:
        raise InvalidInputError(f"custom_functions={custom_functions!r} is not one of {CUSTOM_FUNCTION_POLICIES}",
                                where="custom_functions=", fix="use 'error' (default) or 'forward'")
    return custom_functions


@dataclass
class FunctionCall:
    node: object  # the BackwardCFunction node (also the Function's ctx)
    cls: type
    outputs: dict[int, tuple[int, torch.Tensor]]  # output_nr -> (node id, tensor)


def _custom_nodes(root: torch.Tensor) -> dict[int, object]:
    """``id(node) -> node`` for every custom-Function node of the root's autograd graph."""
    found: dict[int, object] = {}
    seen: set[int] = set()
    todo = [root.grad_fn] if root.grad_fn is not None else []
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found[id(node)] = node
        todo.extend(nxt for nxt, _ in node.next_functions)
    return found


def function_calls(root: torch.Tensor, tracked: dict[int, tuple[int, torch.Tensor]]) -> list[FunctionCall]:
    """The custom-Function calls on the path to ``root`` whose outputs are recorded nodes."""
    if not isinstance(root, torch.Tensor) or root.grad_fn is None:
        return []
    custom = torch.autograd.function.BackwardCFunction
    if not any(isinstance(t.grad_fn, custom) for _, t in tracked.values()):  # the common case: no walk needed
        return []
    nodes = _custom_nodes(root)
    calls: dict[int, FunctionCall] = {}
    for tid, t in tracked.values():
        node = t.grad_fn
        if node is not None and id(node) in nodes:
            call = calls.setdefault(id(node), FunctionCall(node, node._forward_cls, {}))
            call.outputs[t.output_nr] = (tid, t)
    return list(calls.values())


def _forward_records(call: FunctionCall, producer: dict[int, OpRecord], grad_off: set[int]) -> set[int]:
    """Indices of the records of the call's ``forward`` (see the module docstring)."""
    ends = [producer[tid].index for tid, _ in call.outputs.values() if tid in producer]
    if not ends:
        return set()
    last = max(ends)
    start = last
    while start - 1 in grad_off:
        start -= 1
    inside, todo = set(), [tid for tid, _ in call.outputs.values()]
    while todo:
        rec = producer.get(todo.pop())
        if rec is None or rec.index in inside or not (start <= rec.index <= last) or rec.index not in grad_off:
            continue
        inside.add(rec.index)
        todo.extend(i for i in rec.leaf_ids if i is not None)
    return inside


def _arguments(call: FunctionCall, tracked: dict[int, tuple[int, torch.Tensor]], by_node: dict) -> list:
    """``(node id or None, tensor or None)`` per tensor argument of the call, in ``apply`` order. An argument whose
    autograd node produced no recorded node tensor is a constant (e.g. computed from the weights only)."""
    out = []
    for nxt, nr in call.node.next_functions:
        if nxt is None:  # an argument autograd does not track: a constant
            out.append((None, None))
            continue
        variable = getattr(nxt, "variable", None)  # AccumulateGrad: a leaf tensor (an input or a parameter)
        if variable is not None:
            entry = tracked.get(id(variable))
            out.append((None if entry is None else entry[0], variable))
            continue
        entry = by_node.get((id(nxt), nr))
        out.append((None, None) if entry is None else entry)
    return out


def _call_record(call: FunctionCall, arguments: list, module: str) -> OpRecord:
    """One record for the whole call: leaves = the Function's tensor arguments (``apply`` order)."""
    slots = sorted(call.outputs)
    return OpRecord(index=-1, op=call.cls, args=tuple(t for _, t in arguments), kwargs={"ctx": call.node},
                    leaves=[t for _, t in arguments], leaf_ids=tuple(tid for tid, _ in arguments),
                    outputs=[call.outputs[s][1] for s in slots], output_ids=tuple(call.outputs[s][0] for s in slots),
                    module_path=module)


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_grad_mode(records: list[OpRecord], grad_off: set[int], tracked: dict[int, tuple[int, torch.Tensor]],
                      late: dict[int, int], root: torch.Tensor, *, policy: str, rules,
                      model_class: str) -> tuple[list[OpRecord], set[int]]:
    """The final records (renumbered) and the ids that stopped being nodes (outputs of dropped records).

    ``late``: node id -> record index, for custom-Function outputs that no record produced (the forward made them
    from constants only, e.g. ``round``); they were tracked when first read, at that record."""
    found = function_calls(root, tracked)
    if not found and not grad_off:  # nothing to resolve: the records as they are
        return records, set()
    producer = {tid: rec for rec in records for tid in rec.output_ids if tid is not None}
    by_node = {(id(t.grad_fn), t.output_nr): (tid, t) for tid, t in tracked.values() if t.grad_fn is not None} \
        if found else {}
    calls, arguments, dropped = [], {}, set()
    for call in found:
        args = _arguments(call, tracked, by_node)
        if any(tid is not None for tid, _ in args):
            calls.append(call)
            arguments[id(call)] = args
        else:  # a Function of constants only (e.g. of the weights): a constant, as every other such value
            dropped.update(tid for tid, _ in call.outputs.values() if tid in late)
    modules = {}
    for call in calls:
        ends = [producer[tid] for tid, _ in call.outputs.values() if tid in producer]
        firsts = [records[late[tid]] for tid, _ in call.outputs.values() if tid in late and late[tid] < len(records)]
        modules[id(call)] = ends[-1].module_path if ends else (firsts[0].module_path if firsts else "")
    unresolved = [c for c in calls if rules.lookup(c.cls) is None]
    if unresolved and policy == "error":
        listing = "; ".join(f"{_describe(c.cls)} (in module '{modules[id(c)] or '<top level>'}')"
                            for c in {c.cls: c for c in unresolved}.values())
        model = f" of model class {model_class}" if model_class else ""
        raise UnsupportedOpError(
            f"custom torch.autograd.Function(s) on the attribution path{model}: {listing}. The engine sees only "
            "their forward operators, not their backward, so it could not equal autograd",
            where=f"module '{modules[id(unresolved[0])] or '<top level>'}'",
            fix="register the Function's local Jacobian with @inseq_semiring.function_rule(<Function class>), or "
            "pass custom_functions='forward' to differentiate its forward operators (its backward is ignored)")
    if unresolved:
        names = ", ".join(sorted({_describe(c.cls) for c in unresolved}))
        warnings.warn(f"custom_functions='forward': differentiating the forward operators of {names}; their "
                      "backward is ignored", UserWarning, stacklevel=4)
    keep_off: set[int] = set()  # grad-off records kept as edges ("forward" policy)
    insert: dict[int, list[OpRecord]] = {}  # record index -> call records to place just before it
    produced_by_calls: set[int] = set()
    for call in calls:
        inside = _forward_records(call, producer, grad_off)
        if rules.lookup(call.cls) is None:
            keep_off |= inside
            continue
        where = [max(inside)] if inside else []
        where += [late[tid] for tid, _ in call.outputs.values() if tid in late]
        insert.setdefault(min(where), []).append(_call_record(call, arguments[id(call)], modules[id(call)]))
        produced_by_calls.update(tid for tid, _ in call.outputs.values())
    final = []
    for rec in records:
        final.extend(insert.pop(rec.index, []))
        if rec.index in grad_off and rec.index not in keep_off:
            dropped.update(t for t in rec.output_ids if t is not None)
            continue
        final.append(rec)
    for pending in insert.values():  # a call whose output is the root
        final.extend(pending)
    dropped -= produced_by_calls
    for index, rec in enumerate(final):
        object.__setattr__(rec, "index", index)
        if dropped and any(i in dropped for i in rec.leaf_ids):
            object.__setattr__(rec, "leaf_ids", tuple(None if i in dropped else i for i in rec.leaf_ids))
    return final, dropped
