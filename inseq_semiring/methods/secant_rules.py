"""Secant ("rescale") local multipliers between two forward passes over the same graph: DeepLift on the engine.

For every operator ``y = f(x_1, ..., x_k)`` recorded twice, at the input (``x``) and at the baseline (``x'``), a rule
gives linear maps ``M_p`` with ``Δy = Σ_p M_p Δx_p`` *exactly* (``Δ = value at the input - value at the baseline``).
Chained by the ordinary reverse sweep (the gradient semiring), the multipliers of the root then satisfy
``Σ_inputs m ⊙ Δx = root(x) - root(x')`` (completeness telescopes through the graph). The rules:

* **linear** operators (add, views, sums, matmul with a constant factor, ...): their Jacobian is constant, the
  secant is the ordinary rule. Their non-node arguments must be equal in both passes (checked).
* **at most quadratic** operators (``mul``, ``mm``/``bmm``/``addmm``/``baddbmm``, ``mv``, ``dot``, ``x ** 2``): the
  Jacobian at the midpoint ``x̄ = (x + x')/2`` is the exact secant: ``Δ(ab) = ā Δb + b̄ Δa``,
  ``Δ(AB) = Ā ΔB + ΔA B̄``.
* **element-wise** operators (GELU, SiLU, tanh, exp, rsqrt, ``pow``, ``div``, ``maximum``, ...): the Shapley value
  of each node operand over the operands' two states; one operand: the rescale rule ``Δy/Δx``; two operands ``a, b``:
  ``φ_a = ½[f(a, b') - f(a', b')] + ½[f(a, b) - f(a', b)]``, ``M_a = φ_a / Δa``. Where ``|Δa|`` is below
  ``sqrt(eps) (1 + |a| + |a'|)`` the secant is replaced by the derivative at ``ā`` (same weights over the others'
  states), whose error is third order in ``Δa``.
* **softmax** (rows over the last dim): ``y_i = exp(z_i)`` with ``z_i = x_i - L``, ``L = log Σ_j exp(x_j)``.
  With a shift ``c`` common to both passes, ``u = exp(x - c)``, ``s = Σ u``: ``ΔL = ℓ Δs`` (``ℓ = Δlog s / Δs``) and
  ``Δs = Σ_j m_j Δx_j`` (``m`` the secant of exp), so ``Δz = Δx - 1 (ℓ m)·Δx`` exactly, and ``Δy = e ⊙ Δz`` with ``e``
  the secant of exp between ``z`` and ``z'``: ``M = diag(e) - e (ℓ m)^T``. Every factor is bounded (``z, z' <= 0``
  so ``0 <= e <= 1``; ``u, u' <= 1``), unlike the product split of ``u · (1/s)``, whose two terms grow like the
  ratio of the two passes' partition functions and cancel.
* **log-softmax**: ``y = z``: ``M = I - 1 (ℓ m)^T``.
* **normalisers are gates** (DeepLift's advice for gating units: the importance goes to the signal). A product
  ``x · ρ`` whose factor ``ρ`` is produced by ``rsqrt`` (RMS norm, traced as ``pow``, ``mean``, ``rsqrt``, ``mul``)
  uses the exact split ``Δ(xρ) = ρ Δx + x' Δρ`` (``ρ`` at the input, ``x'`` at the baseline). The symmetric split
  ``ρ̄ Δx + x̄ Δρ`` is exact too, but from a zero baseline (``ρ' = eps^(-1/2)``) it gives terms of order
  ``eps^(-1/2)`` that cancel (attributions of 1e11 summing to 0.1 on tiny T5).
* **layer norm** ``y = g ⊙ c ρ + β``, ``c = x - mean(x)``, ``ρ = (mean(c²) + eps)^(-1/2)``, with the same gate
  split: ``Δ(cρ) = ρ Δc + c' Δρ``, ``Δρ = k Δv`` (``k`` the secant of ``v ↦ (v + eps)^(-1/2)``),
  ``Δv = (2/n) c̄·Δc`` (exact: ``Δ(c²) = 2 c̄ Δc``), ``Δc = Δx - mean(Δx)``:
  ``M = diag(g) [ρ I + (2k/n) c' c̄^T] (I - 1 1^T / n)``.

Any other operator has no secant rule and raises :class:`~inseq_semiring.errors.UnsupportedOpError`: there is no
silent fallback to the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from itertools import combinations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModelError, UnsupportedOpError
from ..graph.tape import OpRecord, Tape
from ..rules.jacobians import Pointwise, RowDense
from ..rules.registry import ops_without_rule
from ..rules.pointwise import UNARY
from ..rules.registry import DEFAULT_RULES, Edge, RuleSet, functional_twin
from ..rules.structural import INDEX_OPS

aten = torch.ops.aten


# -- helpers ------------------------------------------------------------------------------------------------------

def _delta(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` with 0 where the two are equal (also ``inf - inf``)."""
    return torch.where(a == b, torch.zeros_like(a), a - b)


def _small(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
    eps = torch.finfo(d.dtype).eps if d.is_floating_point() else 1e-16
    scale = 1 + a.abs().nan_to_num(0, 0, 0) + b.abs().nan_to_num(0, 0, 0)
    return d.abs() <= math.sqrt(eps) * scale


def _mid(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a == b, a, (a + b) / 2)


def _call(rec: OpRecord, leaves: list):
    """Run ``rec.op`` with its flattened arguments replaced by ``leaves``; return its first output."""
    _, spec = tree_flatten((rec.args, rec.kwargs))
    args, kwargs = tree_unflatten(list(leaves), spec)
    out = rec.op(*args, **kwargs)
    return tree_flatten(out)[0][0]


def _node_leaves(rec: OpRecord) -> list[int]:
    return [i for i, tid in enumerate(rec.leaf_ids) if tid is not None]


def _midpoint_record(rec: OpRecord, base: OpRecord) -> OpRecord:
    leaves = list(rec.leaves)
    for i in _node_leaves(rec):
        leaves[i] = _mid(rec.leaves[i], base.leaves[i])
    return replace(rec, leaves=tuple(leaves))


# -- rule families -----------------------------------------------------------------------------------------------

def linear(rec: OpRecord, base: OpRecord) -> list[Edge]:
    """Constant Jacobian: the ordinary rule is the secant."""
    return DEFAULT_RULES.edges(rec)


def quadratic(rec: OpRecord, base: OpRecord) -> list[Edge]:
    """Degree <= 2 in the node operands: the Jacobian at the midpoint is the exact secant."""
    return DEFAULT_RULES.edges(_midpoint_record(rec, base))


def elementwise(rec: OpRecord, base: OpRecord) -> list[Edge]:
    """Shapley secant of each node operand of an element-wise (broadcasting) operator."""
    nodes = _node_leaves(rec)
    k = len(nodes)
    out, out_b = rec.outputs[0], base.outputs[0]
    cache: dict[frozenset, Tensor] = {frozenset(nodes): out, frozenset(): out_b}

    def value(at_input: frozenset) -> Tensor:  # operands in ``at_input`` at the input, the others at the baseline
        if at_input not in cache:
            leaves = list(rec.leaves)
            for i in nodes:
                leaves[i] = rec.leaves[i] if i in at_input else base.leaves[i]
            cache[at_input] = _call(rec, leaves)
        return cache[at_input]

    def derivative(p: int, at_input: frozenset) -> Tensor:  # d f / d x_p at x̄_p, the others as in ``at_input``
        leaves = list(rec.leaves)
        for i in nodes:
            leaves[i] = rec.leaves[i] if i in at_input else base.leaves[i]
        leaves[p] = _mid(rec.leaves[p], base.leaves[p])
        point = replace(rec, leaves=tuple(leaves), outputs=(_call(rec, leaves),) + tuple(rec.outputs[1:]))
        for e in DEFAULT_RULES.edges(point):
            if e.leaf == p:
                return e.kind.weight
        raise UnsupportedOpError(f"the rule of {rec.op} gives no edge for argument {p}", where=rec.module_path)

    edges = []
    for p in nodes:
        a, a_b = rec.leaves[p], base.leaves[p]
        d = _delta(a, a_b).expand(out.shape) if a.dim() <= out.dim() else _delta(a, a_b)
        small = _small(d, a.expand_as(d), a_b.expand_as(d))
        safe = torch.where(small, torch.ones_like(d), d)
        others = [i for i in nodes if i != p]
        weight = torch.zeros_like(out)
        for size in range(k):
            w = math.factorial(size) * math.factorial(k - size - 1) / math.factorial(k)
            for subset in combinations(others, size):
                s = frozenset(subset)
                secant = _delta(value(s | {p}), value(s)) / safe
                if bool(small.any()):
                    secant = torch.where(small, derivative(p, s).to(out.dtype).expand_as(secant), secant)
                weight = weight + w * secant
        edges.append(Edge(0, p, Pointwise(weight, a.shape, out.shape)))
    return edges


def _exp_rows(x: Tensor, xb: Tensor):
    """``u = exp(x - c)``, ``u'`` with a shift ``c`` common to both passes, and the secant ``m`` of exp."""
    c = torch.maximum(x.amax(-1, keepdim=True), xb.amax(-1, keepdim=True))
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    u, ub = torch.exp(x - c), torch.exp(xb - c)
    d = _delta(x, xb)
    small = _small(d, x, xb)
    m = torch.where(small, torch.exp(_mid(x, xb) - c), _delta(u, ub) / torch.where(small, torch.ones_like(d), d))
    return u, ub, m


def _check_last_dim(rec: OpRecord) -> None:
    x = rec.leaves[0]
    if rec.args[1] % max(1, x.dim()) != x.dim() - 1:
        raise UnsupportedOpError(f"{rec.op} over dim {rec.args[1]} (only the last dim has a secant rule)",
                                 where=f"module '{rec.module_path}'", fix="apply it over the last dimension")


def _log_partition(rec: OpRecord, base: OpRecord):
    """``z = x - L`` and ``z'`` for both passes, the exact linear functional ``v = ℓ m`` with ``ΔL = v·Δx``, and the
    rows that are live (not fully masked) in both passes."""
    x, xb = rec.leaves[0], base.leaves[0]
    u, ub, m = _exp_rows(x, xb)
    s, sb = u.sum(-1, keepdim=True), ub.sum(-1, keepdim=True)
    live = (s > 0) & (sb > 0)  # fully masked rows (``_safe_softmax``) are 0 in both passes
    one = torch.ones_like(s)
    s, sb = torch.where(live, s, one), torch.where(live, sb, one)
    ds = _delta(s, sb)
    small = _small(ds, s, sb)
    ell = torch.where(small, 1 / _mid(s, sb), _delta(torch.log(s), torch.log(sb)) / torch.where(small, one, ds))
    v = torch.where(live, ell * m, torch.zeros_like(m))
    return x - torch.log(s), xb - torch.log(sb), v, live, m


def softmax(rec: OpRecord, base: OpRecord) -> list[Edge]:
    if not rec.is_node(0):
        return []
    _check_last_dim(rec)
    x, xb = rec.leaves[0], base.leaves[0]
    c = torch.maximum(x.amax(-1, keepdim=True), xb.amax(-1, keepdim=True))
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    z, zb, v, live, _ = _log_partition(rec, base)
    z, zb = z - c, zb - c
    dz = _delta(z, zb)
    small = _small(dz, z, zb)
    e = torch.where(small, torch.exp(_mid(z, zb)), _delta(torch.exp(z), torch.exp(zb)) / torch.where(small, 1, dz))
    e = torch.where(live, e, torch.zeros_like(e)).to(rec.outputs[0].dtype)
    return [Edge(0, 0, RowDense(e, (-e).unsqueeze(0), v.to(e.dtype).unsqueeze(0)))]


def log_softmax(rec: OpRecord, base: OpRecord) -> list[Edge]:
    if not rec.is_node(0):
        return []
    _check_last_dim(rec)
    _, _, v, _, _ = _log_partition(rec, base)
    v = v.to(rec.outputs[0].dtype)
    return [Edge(0, 0, RowDense(torch.ones_like(v), -torch.ones_like(v).unsqueeze(0), v.unsqueeze(0)))]


def layer_norm(rec: OpRecord, base: OpRecord) -> list[Edge]:
    DEFAULT_RULES.edges(rec)  # the ordinary rule's checks (one normalised dim, constant affine parameters)
    if not rec.is_node(0):
        return []
    x, xb, weight = rec.leaves[0], base.leaves[0], rec.args[2]
    n = x.shape[-1]
    c, cb = x - rec.outputs[1], xb - base.outputs[1]
    rho, rhob = rec.outputs[2], base.outputs[2]
    eps = float(rec.args[4])
    v, vb = (c * c).mean(-1, keepdim=True), (cb * cb).mean(-1, keepdim=True)
    dv = _delta(v, vb)
    small = _small(dv, v, vb)
    k = torch.where(small, -0.5 * (_mid(v, vb) + eps) ** -1.5, _delta(rho, rhob) / torch.where(small, v, dv))
    cbar = (c + cb) / 2
    g = torch.ones_like(x) if weight is None else weight.expand_as(x)
    d = g * rho
    u = torch.stack([-d / n, g * (2 * k / n) * cb])
    w = torch.stack([torch.ones_like(x), cbar - cbar.mean(-1, keepdim=True)])
    dt = rec.outputs[0].dtype
    return [Edge(0, 0, RowDense(d.to(dt), u.to(dt), w.to(dt)))]


def gated_product(rec: OpRecord, base: OpRecord, gate: int) -> list[Edge]:
    """``y = x · ρ`` with ``ρ`` (leaf ``gate``) a normaliser: ``Δy = ρ Δx + x' Δρ``."""
    signal = 1 - gate
    out = rec.outputs[0]
    return [Edge(0, signal, Pointwise(rec.leaves[gate], rec.leaves[signal].shape, out.shape)),
            Edge(0, gate, Pointwise(base.leaves[signal], rec.leaves[gate].shape, out.shape))]


#: operators whose outputs are normalisers (gates) when they multiply a signal
GATE_PRODUCERS = (aten.rsqrt.default,)


def gate_ids(tape: Tape) -> frozenset:
    """Node ids of the tensors produced by a :data:`GATE_PRODUCERS` operator."""
    return frozenset(tid for rec in tape.records if rec.op in GATE_PRODUCERS for tid in rec.output_ids
                     if tid is not None)


def _pow_scalar(rec: OpRecord, base: OpRecord) -> list[Edge]:
    p = float(rec.args[1])
    if p in (0.0, 1.0):
        return linear(rec, base)
    if p == 2.0:
        return quadratic(rec, base)
    return elementwise(rec, base)


def _div(rec: OpRecord, base: OpRecord) -> list[Edge]:
    return linear(rec, base) if not rec.is_node(1) else elementwise(rec, base)


def _dropout(rec: OpRecord, base: OpRecord) -> list[Edge]:
    if rec.args[2]:
        raise UnsupportedOpError("dropout in training mode has no secant rule (its mask differs between passes)",
                                 where=f"module '{rec.module_path}'", fix="put the model in eval mode")
    return linear(rec, base)


LINEAR_OPS = [
    aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor, aten.rsub.Scalar, aten.add.Scalar, aten.sub.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.neg.default, *INDEX_OPS, aten._to_copy.default, aten.lift_fresh_copy.default,
    aten.copy.default, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tril.default, aten.triu.default,
    aten.nll_loss_forward.default,
]
QUADRATIC_OPS = [aten.mul.Tensor, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
                 aten.mv.default, aten.dot.default]
ELEMENTWISE_OPS = [*UNARY, aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.clamp_min.default,
                   aten.clamp_max.default, aten.hardtanh.default, aten.pow.Tensor_Tensor]

SECANT_RULES: dict = {}
SECANT_RULES.update({op: linear for op in LINEAR_OPS})
SECANT_RULES.update({op: quadratic for op in QUADRATIC_OPS})
SECANT_RULES.update({op: elementwise for op in ELEMENTWISE_OPS})
SECANT_RULES.update({aten.pow.Tensor_Scalar: _pow_scalar, aten.div.Tensor: _div, aten.native_dropout.default: _dropout,
                     aten._softmax.default: softmax, aten._safe_softmax.default: softmax,
                     aten._log_softmax.default: log_softmax, aten.native_layer_norm.default: layer_norm})


# -- the paired rule set -------------------------------------------------------------------------------------------

def _same_constant(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a is b:
            return True
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if (a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
                and a.storage_offset() == b.storage_offset()):
            return True
        return bool(torch.equal(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - incomparable objects
        return a is b


def check_same_graph(tape: Tape, base: Tape) -> None:
    """The baseline's forward pass must record the same operators on the same node pattern and shapes, and every
    constant argument must be equal (else the secant of an operator would mix two different functions)."""
    def fail(i, what):
        raise UnsupportedModelError(
            f"the forward pass over the baseline records a different graph from the input's: {what}",
            where=f"record {i} ({tape.records[i].op if i < len(tape.records) else 'end of tape'}, module "
                  f"'{tape.records[i].module_path if i < len(tape.records) else ''}')",
            fix="use baselines that take the same control flow, with everything other than the attributed inputs "
                "(masks, positions, other arguments) identical")

    if len(tape.records) != len(base.records):
        fail(min(len(tape.records), len(base.records)), f"{len(tape.records)} vs {len(base.records)} operators")
    if tape.root_id != base.root_id or base.root is None or base.root.shape != tape.root.shape:
        fail(len(tape.records) - 1, "the roots differ")
    for rec, other in zip(tape.records, base.records):
        if rec.op is not other.op or rec.leaf_ids != other.leaf_ids or rec.output_ids != other.output_ids:
            fail(rec.index, f"{rec.op} vs {other.op}")
        for pos, (a, b) in enumerate(zip(rec.leaves, other.leaves)):
            if rec.leaf_ids[pos] is None and not _same_constant(a, b):
                fail(rec.index, f"argument {pos} is a constant that differs between the two passes")
        for a, b in zip(rec.outputs, other.outputs):
            if isinstance(a, Tensor) and a.shape != b.shape:
                fail(rec.index, "output shapes differ")


@dataclass(frozen=True)
class SecantRuleSet(RuleSet):
    """The rule table of DeepLift for one (input, baseline) pair of tapes: ``edges(rec)`` uses ``rec`` (the input's
    record) and the baseline's record at the same index."""

    name: str = "deeplift-secant"
    baseline: Tape | None = None
    table: dict = field(default_factory=lambda: SECANT_RULES)
    gates: frozenset = frozenset()  # node ids of normalisers (see :func:`gate_ids`)

    def lookup(self, op):
        for candidate in (op, functional_twin(op)):
            if candidate is not None and candidate in self.table:
                return self.table[candidate]
        return None

    def edges(self, rec: OpRecord) -> list[Edge]:
        fn = self.lookup(rec.op)
        if fn is None:
            raise UnsupportedOpError(f"no DeepLift (secant) rule for ATen operator {rec.op}",
                                     where=f"module '{rec.module_path}'",
                                     fix="add one to inseq_semiring/methods/secant_rules.py (SECANT_RULES)")
        base = self.baseline.records[rec.index]
        if rec.op is aten.mul.Tensor and self.gates and all(rec.is_node(i) for i in (0, 1)):
            gated = [i for i in (0, 1) if rec.leaf_ids[i] in self.gates]
            if len(gated) == 1 and rec.leaf_ids[0] != rec.leaf_ids[1]:
                return gated_product(rec, base, gated[0])
        return list(fn(rec, base))

    def check_coverage(self, records, model_class: str = "") -> None:
        count, listing = ops_without_rule(records, self.lookup)
        if count:
            model = f" of model class {model_class}" if model_class else ""
            raise UnsupportedOpError(
                f"{count} ATen operator(s) on the attribution path{model} have no DeepLift (secant) rule: "
                f"{listing}", where="inseq_semiring.methods.secant_rules (SECANT_RULES)",
                fix="add a secant rule for each (exact: Δy = Σ M Δx), or run the model so that it dispatches "
                "supported operators (e.g. attn_implementation='eager')")
