"""Which rule each recorded operator gets under each relevance method, and the tape rewrite that applies them.

:func:`plan` walks a recorded tape from the root down (only operators whose outputs reach the root under the
method's own edges need a rule), gives every such record a rule from :data:`RULE_TABLE` (``op kind -> rule per
method``), and returns a rewritten tape plus a :class:`PlannedRules` overlay that the gradient semiring sweeps.
Two rewrites, both local and both value-preserving:

* an **activation module** written as several element-wise operators (GPT-2's ``NewGELUActivation``:
  ``0.5 x (1 + tanh(...))``) becomes one identity-rule hop from the module's input to its output (module-level
  detection: the class name says activation, and the records in it form a single-input, single-output,
  shape-preserving subgraph);
* an epsilon-rule contraction gets a separate hop ``z -> z`` after it carrying ``z / (z + eps sign z)``.

Normalisers are found by pattern: an operand of ``mul`` that comes (through views and casts) from ``rsqrt``, or a
denominator of ``div`` that comes from ``sqrt``, is held constant (HF RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``,
Gemma's ``* (1 + w)``, T5's norm). Attention weights (CP-LRP) are the operands that come from ``_softmax``.
An input-dependent operator with no rule raises :class:`UnsupportedRelevanceOpError`; nothing falls back to the
gradient silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..errors import UnsupportedOpError
from ..graph.tape import OpRecord, Tape
from ..rules import structural
from ..rules.registry import Edge, RuleSet, functional_twin
from . import edited

aten = torch.ops.aten

METHODS = ("lrp_epsilon", "attn_lrp", "cp_lrp")


class UnsupportedRelevanceOpError(UnsupportedOpError):
    """An input-dependent operator on the relevance path has no rule under the chosen method."""


@dataclass(frozen=True)
class PseudoOp:
    """A hop the rewrite adds (not an ATen operator); printed like one in paths and coverage reports."""

    name: str

    def __str__(self) -> str:
        return self.name


EPSILON_HOP = PseudoOp("lrp.epsilon")
MODULE_IDENTITY = PseudoOp("lrp.module_identity")

# -- operator kinds ----------------------------------------------------------------------------------------------

CONTRACTIONS = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1,
                aten.mv.default: 0, aten.dot.default: 0}  # op -> position of the first factor
NONLINEARITIES = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
                  aten.leaky_relu.default, aten.elu.default, aten.softplus.default, aten.hardtanh.default,
                  aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default}
SOFTMAXES = {aten._softmax.default, aten._safe_softmax.default, aten._log_softmax.default}
LINEAR = set(structural.INDEX_OPS) | {
    aten._to_copy.default, aten.lift_fresh_copy.default, aten.copy.default, aten.add.Tensor, aten.sub.Tensor,
    aten.rsub.Tensor, aten.rsub.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.neg.default, aten.sum.dim_IntList,
    aten.sum.default, aten.mean.dim, aten.mean.default, aten.mul.Scalar, aten.div.Scalar, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tril.default, aten.triu.default,
    aten.native_dropout.default}
#: ops a normaliser / attention weights pass through on their way to the product that uses them
_CARRIERS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
             aten._to_copy.default, aten.clone.default, aten.alias.default, aten.unsqueeze.default,
             aten.transpose.int, aten.permute.default, aten.contiguous.default, aten.native_dropout.default,
             aten.expand_as.default, aten.view_as.default}
#: module class names treated as one element-wise activation (identity rule at module level)
ACTIVATION_MODULE = re.compile(r"(GELU|Gelu|SiLU|Silu|Swish|Mish|Activation)")


@dataclass(frozen=True)
class Assignment:
    """The rule one record got: ``rule`` (the name shown in coverage reports), ``leaves`` (argument positions that
    receive relevance), ``factor`` (uniform rule: 1/2), ``epsilon`` (an epsilon hop follows), ``build`` (edges)."""

    rule: str
    leaves: frozenset
    build: Callable[[OpRecord], list[Edge]]
    epsilon: bool = False


def _functional(op):
    if isinstance(op, PseudoOp):
        return op
    return functional_twin(op) or op


class _Context:
    """Producer lookups over the (rewritten) records: where a node tensor comes from."""

    def __init__(self, records: list[OpRecord]):
        self.producer: dict[int, OpRecord] = {}
        for rec in records:
            for tid in rec.output_ids:
                if tid is not None:
                    self.producer[tid] = rec

    def origin(self, tid: int | None):
        """The first operator that is not a view/cast/copy on the way back from node ``tid``."""
        seen = 0
        while tid is not None and seen < 64:
            rec = self.producer.get(tid)
            if rec is None:
                return None
            op = _functional(rec.op)
            if op not in _CARRIERS:
                return op
            nodes = [i for i in rec.leaf_ids if i is not None]
            tid = nodes[0] if len(nodes) == 1 else None
            seen += 1
        return None


def _node_leaves(rec: OpRecord) -> list[int]:
    return [i for i, tid in enumerate(rec.leaf_ids) if tid is not None]


def _keep(leaves, factor: float = 1.0):
    leaves = frozenset(leaves)

    def build(rec):
        return edited.scaled(edited.only_leaves(edited.gradient_edges(rec), set(leaves)), factor)

    return leaves, build


def assign(rec: OpRecord, method: str, ctx: _Context, extra: dict | None = None) -> Assignment | None:
    """The rule of ``rec`` under ``method`` (``None``: no rule). See :data:`RULE_TABLE` for the table."""
    op = _functional(rec.op)
    nodes = _node_leaves(rec)
    if extra and op in extra:
        return extra[op](rec) if callable(extra[op]) else _named(extra[op], rec, nodes)
    if op is MODULE_IDENTITY or op in NONLINEARITIES:
        if nodes != [0]:
            return None
        return Assignment("identity", frozenset(nodes), lambda r: [edited.identity_edge(r.leaves[0], r.outputs[0])])
    if op in CONTRACTIONS:
        first = CONTRACTIONS[op]
        factors = [i for i in (first, first + 1) if i in nodes]
        if not factors:  # only the added term (addmm's bias) depends on the input: a sum
            leaves, build = _keep(nodes)
            return Assignment("linear", leaves, build)
        if len(factors) == 1:
            leaves, build = _keep(nodes)
            return Assignment("epsilon", leaves, build, epsilon=True)
        weights = [i for i in factors if ctx.origin(rec.leaf_ids[i]) in SOFTMAXES]
        if method == "cp_lrp" and weights:
            leaves, build = _keep(set(nodes) - set(weights))
            return Assignment("epsilon, attention weights constant", leaves, build, epsilon=True)
        if method == "lrp_epsilon":
            leaves, build = _keep(nodes)
            return Assignment("epsilon per operand", leaves, build, epsilon=True)
        leaves, build = _keep(nodes, 0.5)
        return Assignment("uniform + epsilon", leaves, build, epsilon=True)
    if op is aten.mul.Tensor and len(nodes) == 2:
        norms = [i for i in nodes if ctx.origin(rec.leaf_ids[i]) is aten.rsqrt.default]
        if len(norms) == 1:
            leaves, build = _keep(set(nodes) - set(norms))
            return Assignment("norm, sigma detached", leaves, build)
        weights = [i for i in nodes if ctx.origin(rec.leaf_ids[i]) in SOFTMAXES]
        if method == "cp_lrp" and len(weights) == 1:
            leaves, build = _keep(set(nodes) - set(weights))
            return Assignment("linear, attention weights constant", leaves, build)
        if method == "lrp_epsilon":
            leaves, build = _keep(nodes)
            return Assignment("gradient per operand", leaves, build)
        leaves, build = _keep(nodes, 0.5)
        return Assignment("uniform", leaves, build)
    if op is aten.div.Tensor:
        if nodes == [0]:
            leaves, build = _keep(nodes)
            return Assignment("linear", leaves, build)
        if 1 in nodes and ctx.origin(rec.leaf_ids[1]) is aten.sqrt.default:
            leaves, build = _keep(set(nodes) - {1})
            return Assignment("norm, sigma detached", leaves, build)
        return None
    if op is aten.native_layer_norm.default:
        if nodes != [0]:
            return None
        return Assignment("layer norm, sigma detached", frozenset(nodes), edited.layer_norm_detached)
    if op in SOFTMAXES:
        leaves, build = _keep(nodes)
        return Assignment("softmax", leaves, build)
    if op in LINEAR or (op is aten.mul.Tensor and len(nodes) == 1):
        leaves, build = _keep(nodes)
        return Assignment("linear", leaves, build)
    return None


def _named(kind: str, rec: OpRecord, nodes) -> Assignment:
    """A rule given by name in ``extra_rules``: ``"linear"`` (the gradient is exact), ``"identity"``,
    ``"uniform"`` (half per operand), ``"constant"`` (no relevance passes)."""
    if kind == "identity":
        return Assignment("identity", frozenset(nodes), lambda r: [edited.identity_edge(r.leaves[0], r.outputs[0])])
    if kind in ("linear", "uniform"):
        leaves, build = _keep(nodes, 0.5 if kind == "uniform" else 1.0)
        return Assignment(kind, leaves, build)
    if kind == "constant":
        return Assignment("constant", frozenset(), lambda r: [])
    raise ValueError(f"unknown rule name {kind!r}: use 'linear', 'identity', 'uniform' or 'constant'")


#: operator kind -> rule per method (the README's table is this one)
RULE_TABLE = {
    "mm / bmm / addmm / baddbmm / mv with one input-dependent factor (linear layers, lm head)":
        {m: "epsilon" for m in METHODS},
    "contraction of two input-dependent tensors (Q K^T)":
        {"lrp_epsilon": "epsilon per operand", "attn_lrp": "uniform + epsilon", "cp_lrp": "uniform + epsilon"},
    "contraction with softmax output (A V)":
        {"lrp_epsilon": "epsilon per operand", "attn_lrp": "uniform + epsilon",
         "cp_lrp": "epsilon, attention weights constant"},
    "mul of two input-dependent tensors (gate * up)":
        {"lrp_epsilon": "gradient per operand", "attn_lrp": "uniform", "cp_lrp": "uniform"},
    "gelu / silu / relu / tanh / sigmoid / ... and activation modules (NewGELU)": {m: "identity" for m in METHODS},
    "_softmax / _log_softmax": {m: "softmax" for m in METHODS},
    "native_layer_norm": {m: "layer norm, sigma detached" for m in METHODS},
    "x * rsqrt(...) (RMSNorm, T5 norm, Gemma), x / sqrt(...)": {m: "norm, sigma detached" for m in METHODS},
    "views, add/sub, sum/mean, scaling, masking, dropout": {m: "linear" for m in METHODS},
}


# -- the planned overlay ------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PlannedRules(RuleSet):
    """A rule set for one rewritten tape: record index -> edges builder; other operators as the table."""

    by_index: dict = field(default_factory=dict)

    def edges(self, rec: OpRecord) -> list[Edge]:
        build = self.by_index.get(rec.index)
        if build is not None:
            return list(build(rec))
        return super().edges(rec)


@dataclass(frozen=True, eq=False)
class RecordOnly(RuleSet):
    """Recording without the gradient table's coverage check (the relevance plan does its own)."""

    def check_coverage(self, records, model_class: str = "") -> None:
        return None


RECORD_ONLY = RecordOnly("relevance-record")


@dataclass
class Plan:
    tape: Tape
    rules: PlannedRules
    assignments: list[tuple[OpRecord, Assignment | None]]  # every record on the relevance path, tape order


# -- rewrites -----------------------------------------------------------------------------------------------------

def _class_of(path: str, model) -> str:
    if model is not None and path:
        try:
            return type(model.get_submodule(path)).__name__
        except AttributeError:
            return ""
    return path.split(".")[-1]


def _collapse_activations(records: list[OpRecord], consumers_of, root_id, model) -> list[OpRecord]:
    """Replace each multi-operator activation-module call by one :data:`MODULE_IDENTITY` record."""
    out: list[OpRecord] = []
    is_activation: dict[str, bool] = {}  # module path -> its class is an activation (one lookup per module)
    i = 0
    while i < len(records):
        rec = records[i]
        path = rec.module_path
        if path and path not in is_activation:
            is_activation[path] = bool(ACTIVATION_MODULE.search(_class_of(path, model)))
        if not path or not is_activation[path]:
            out.append(rec)
            i += 1
            continue
        j = i
        while j < len(records) and records[j].module_path == path:
            j += 1
        group = records[i:j]
        made = {t for r in group for t in r.output_ids if t is not None}
        ins = {t for r in group for t in r.leaf_ids if t is not None and t not in made}
        members = {r.index for r in group}
        outs = [t for t in made if t == root_id or any(c not in members for c in consumers_of.get(t, ()))]
        if len(group) > 1 and len(ins) == 1 and len(outs) == 1:
            (xid,), (yid,) = tuple(ins), tuple(outs)
            x = next(r.leaves[k] for r in group for k, t in enumerate(r.leaf_ids) if t == xid)
            y = next(r.outputs[k] for r in group for k, t in enumerate(r.output_ids) if t == yid)
            if x.shape == y.shape:
                out.append(OpRecord(index=group[-1].index, op=MODULE_IDENTITY, args=(x,), kwargs={}, leaves=(x,),
                                    leaf_ids=(xid,), outputs=(y,), output_ids=(yid,), module_path=path))
                i = j
                continue
        out.extend(group)
        i = j
    return out


def _error(missing: list[OpRecord], method: str, model_class: str) -> UnsupportedRelevanceOpError:
    by_op: dict[str, list[str]] = {}
    for rec in missing:
        mods = by_op.setdefault(str(rec.op), [])
        if rec.module_path not in mods:
            mods.append(rec.module_path)
    listing = "; ".join(f"{op} (in {', '.join(m or '<top level>' for m in mods[:3])})" for op, mods in by_op.items())
    model = f" of model class {model_class}" if model_class else ""
    return UnsupportedRelevanceOpError(
        f"relevance method {method!r} has no rule for {len(by_op)} input-dependent operator(s) on the relevance "
        f"path{model}: {listing}",
        where="inseq_semiring.lrp.methods (the relevance rule table)",
        fix="pass extra_rules={torch.ops.aten.<op>.<overload>: 'linear' | 'identity' | 'uniform' | 'constant' | "
        "callable(rec) -> Assignment} to relevance(), or add the operator kind to assign() in "
        "inseq_semiring/lrp/methods.py with its derivation; inseq_semiring.lrp.coverage(...) lists every rule")


def plan(tape: Tape, method: str, *, epsilon: float = edited.DEFAULT_EPSILON, model=None,
         extra_rules: dict | None = None, strict: bool = True) -> Plan:
    """Assign rules to every record on the relevance path and rewrite the tape (see the module docstring).
    ``strict``: raise when an operator has no rule (``False``: report it as ``None``, for :func:`coverage`)."""
    if method not in METHODS:
        raise ValueError(f"unknown relevance method {method!r}; use one of {METHODS}")
    consumers_of: dict[int, list[int]] = {}
    for rec in tape.records:
        for t in rec.leaf_ids:
            if t is not None:
                consumers_of.setdefault(t, []).append(rec.index)
    records = _collapse_activations(list(tape.records), consumers_of, tape.root_id, model)
    extra = {_functional(op): rule for op, rule in (extra_rules or {}).items()}
    ctx = _Context(records)
    live = {tape.root_id}
    chosen: dict[int, Assignment | None] = {}
    for rec in reversed(records):  # reachability under the method's own edges
        if not any(t in live for t in rec.output_ids if t is not None):
            continue
        a = assign(rec, method, ctx, extra)
        chosen[rec.index] = a
        leaves = range(len(rec.leaf_ids)) if a is None else a.leaves
        live.update(rec.leaf_ids[k] for k in leaves if rec.leaf_ids[k] is not None)
    missing = [rec for rec in records if rec.index in chosen and chosen[rec.index] is None]
    if missing and strict:
        raise _error(missing, method, tape.model_class)
    next_id = 1 + max([t for rec in records for t in (*rec.leaf_ids, *rec.output_ids) if t is not None]
                      + list(tape.input_ids) + [tape.root_id])
    new: list[OpRecord] = []
    by_index: dict[int, Callable] = {}
    assignments = []
    for rec in records:
        a = chosen.get(rec.index)
        if rec.index in chosen:
            assignments.append((rec, a))
        if a is not None and a.epsilon and rec.output_ids[0] is not None:
            z, zid = rec.outputs[0], rec.output_ids[0]
            head = replace(rec, index=len(new), output_ids=(next_id, *rec.output_ids[1:]))
            by_index[head.index] = a.build
            new.append(head)
            hop = OpRecord(index=len(new), op=EPSILON_HOP, args=(z,), kwargs={}, leaves=(z,), leaf_ids=(next_id,),
                           outputs=(z,), output_ids=(zid,), module_path=rec.module_path)
            by_index[hop.index] = lambda r, _eps=epsilon: [edited.epsilon_hop(r.outputs[0], _eps)]
            new.append(hop)
            next_id += 1
            continue
        moved = replace(rec, index=len(new))
        if a is not None:
            by_index[moved.index] = a.build
        new.append(moved)
    new_tape = Tape(records=new, input_ids=tape.input_ids, root_id=tape.root_id, root=tape.root,
                    model_class=tape.model_class, decomposition=tape.decomposition)
    return Plan(new_tape, PlannedRules(f"lrp-{method}", by_index=by_index), assignments)
