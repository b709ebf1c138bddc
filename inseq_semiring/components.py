"""Component analysis: through which consumer of a fan-out tensor does the best gradient path leave it?

Du et al. (2023, §5.1) look at the tensor that enters a BERT attention block (the *attention input* of layer k):
it fans out to the query, key and value projections and to the residual ("skip") connection. After a max-product
(``"maxpath"``) sweep with back-pointers, every element of that tensor knows which consumer operator its best
path went through. The paper's **"oplus"** readout, per token position ``t``:

* take the hidden unit ``h* = argmax_h M+[t, h]`` at that node (``argmin M-`` for ``sign="negative"``);
* credit its value ``M+[t, h*]`` to the component whose consumer won element ``(t, h*)``, and 0 to the others.

``agg="bucket_sum"`` is the paper's alternative: every hidden unit credits its own value to its own winner.

Generalisation. A :class:`ComponentSplit` names the components as module paths *relative to a layer*:

* :data:`BERT_SPLIT` (post-LN): the attention input is the tensor the ``attention.self.query`` linear consumes;
  Query/Key/Value = ``attention.self.{query,key,value}``, Skip = the residual ``add`` run directly by
  ``attention.output``. Every component is a direct consumer, so the readout is exactly the paper's.
* :data:`GPT2_SPLIT` (pre-LN): the fan-out tensor is the residual stream entering ``ln_1``; its consumers are
  ``ln_1`` (on the way to the attention) and the residual ``add`` run by the block itself (Skip). ``ln_1`` is
  not a component, so the path is *followed* (below) until it enters one. ``attn.c_attn`` is one fused linear
  producing ``[q | k | v]`` along its last dimension, later ``split`` into three: a path that enters
  ``c_attn`` is followed to ``c_attn``'s output, and it is attributed by the column it passes through there —
  columns ``[0, D)`` Query, ``[D, 2D)`` Key, ``[2D, 3D)`` Value. Each column feeds exactly one output slot of the
  split, so this is the same as following the split's output slot (``Branch(part=(i, 3))``).
* :data:`LLAMA_SPLIT` (pre-RMSNorm): the residual stream entering ``input_layernorm`` fans out to that norm and
  to the residual ``add`` of the decoder layer (Skip); after the norm, ``self_attn.{q,k,v}_proj``.

Following a path (only needed where the winning consumer is not itself a component):

* ``granularity="scalar"``: exact. The back-pointer ``(code, idx)`` names the consumer record, its output slot
  and the flat index of the output element the best path continues from. With a signed semiring the side is
  tracked too: an edge of negative weight swaps ``M+`` and ``M-``.
* ``granularity="tensor"``: the paper's operators are super-nodes; an element's value is a *sum* (a VJP) over
  the winning consumer's output elements, and only the winning consumer is kept. Inside that consumer we follow
  its **dominant term**: the output element ``i`` (and output slot) with the largest ``J[i, j] * M+(i)`` (or
  ``J[i, j] * M-(i)``, whichever is larger; the smallest term for ``M-``), computed by one scalar max-times pull
  of the consumer's (tensor-granularity) output values; a negative ``J[i, j]`` swaps ``M+``/``M-`` as above.
  From there the tensor-level back-pointer names the next consumer, and so on. (If the sum is positive its
  largest term is positive, so a structurally-zero branch — e.g. the query columns of a token whose query
  cannot reach the root — is never followed for a positive value.)

``sign`` and ``granularity`` are read off the sweep (:func:`inseq_semiring.run` with ``backpointers=True``).
Values are reported in real units (``hi * exp(log_scale)``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .api import SemiringResult, run
from .graph.tape import Tape
from .rules.registry import DEFAULT_RULES, RuleSet
from .semirings.maxpath import MaxPath, MaxValue, decode_origin

OTHER = "Other"


@dataclass(frozen=True)
class Branch:
    """One component: the records run by module ``module`` (relative to the layer; ``""`` = the layer module
    itself). ``exact``: only records run directly by that module, not by its sub-modules (always so for ``""``).
    ``part=(i, n)``: a fused projection; the component is the ``i``-th of ``n`` equal chunks of the module's
    output along its last dimension."""

    label: str
    module: str
    exact: bool = False
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class ComponentSplit:
    """Where the fan-out tensor is and how its consumers are labelled.

    ``layer_pattern``: a regular expression for a layer's module path with a ``{layer}`` placeholder, matched
    against the recorded module paths (``r"encoder\\.layer\\.{layer}"`` matches ``bert.encoder.layer.0`` as well
    as ``roberta.encoder.layer.0``). ``anchor``: the module (relative to the layer) whose first recorded operator
    consumes the fan-out tensor; that operator's first node argument *is* the tensor.
    """

    name: str
    layer_pattern: str
    anchor: str
    branches: tuple[Branch, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        seen: list[str] = []
        for b in self.branches:
            if b.label not in seen:
                seen.append(b.label)
        return tuple(seen)


BERT_SPLIT = ComponentSplit(
    "bert", r"encoder\.layer\.{layer}", "attention.self.query",
    (Branch("Query", "attention.self.query"), Branch("Key", "attention.self.key"),
     Branch("Value", "attention.self.value"), Branch("Skip", "attention.output", exact=True)),
)
GPT2_SPLIT = ComponentSplit(
    "gpt2", r"h\.{layer}", "ln_1",
    (Branch("Query", "attn.c_attn", part=(0, 3)), Branch("Key", "attn.c_attn", part=(1, 3)),
     Branch("Value", "attn.c_attn", part=(2, 3)), Branch("Skip", "", exact=True)),
)
LLAMA_SPLIT = ComponentSplit(
    "llama", r"layers\.{layer}", "input_layernorm",
    (Branch("Query", "self_attn.q_proj"), Branch("Key", "self_attn.k_proj"), Branch("Value", "self_attn.v_proj"),
     Branch("Skip", "", exact=True)),
)
SPLITS = {"bert": BERT_SPLIT, "gpt2": GPT2_SPLIT, "llama": LLAMA_SPLIT}
_FAMILY = {  # model_type / class-name fragment -> split
    "bert": "bert", "roberta": "bert", "electra": "bert", "camembert": "bert", "xlm-roberta": "bert",
    "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm": "llama",
    "gemma": "llama", "olmo": "llama",
}


def make_split(mapping: Mapping[str, str | Branch | tuple], *, layer_pattern: str, anchor: str,
               name: str = "custom") -> ComponentSplit:
    """A split from ``label -> module path`` (relative to the layer). A value may be a string (a leading ``=``
    means ``exact``), a :class:`Branch`, or ``(module, (i, n))`` for the ``i``-th of ``n`` chunks of a fused
    projection."""
    branches = []
    for label, spec in mapping.items():
        if isinstance(spec, Branch):
            branches.append(replace(spec, label=label))
        elif isinstance(spec, tuple):
            module, part = spec
            branches.append(Branch(label, module, part=tuple(part)))
        else:
            exact = spec.startswith("=")
            branches.append(Branch(label, spec.lstrip("="), exact=exact))
    return ComponentSplit(name, layer_pattern, anchor, tuple(branches))


def split_for(model_or_name: Any) -> ComponentSplit:
    """The preset split of a model (or a model-type / class name): BERT-like, GPT-2 or Llama-like."""
    if isinstance(model_or_name, ComponentSplit):
        return model_or_name
    names = []
    if isinstance(model_or_name, str):
        names.append(model_or_name)
    else:
        cfg = getattr(model_or_name, "config", None)
        if cfg is not None and getattr(cfg, "model_type", None):
            names.append(cfg.model_type)
        names.append(type(model_or_name).__name__)
    for name in names:
        low = name.lower()
        if low in SPLITS:
            return SPLITS[low]
        for key in sorted(_FAMILY, key=len, reverse=True):
            if key.replace("-", "") in low.replace("-", ""):
                return SPLITS[_FAMILY[key]]
    raise ValueError(f"no preset component split for {names}; build one with make_split(...)")


# -- locating things on the tape --------------------------------------------------------------------------------

def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix and rel else (prefix or rel)


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def layer_prefix(tape: Tape, split: ComponentSplit, layer: int) -> str:
    """The full module path of layer ``layer`` as recorded (e.g. ``bert.encoder.layer.0``)."""
    rx = re.compile(r"(?:^|\.)" + split.layer_pattern.format(layer=int(layer)) + r"(?=\.|$)")
    for rec in tape.records:
        m = rx.search(rec.module_path)
        if m:
            return rec.module_path[:m.end()]
    raise ValueError(f"no recorded module path matches layer {layer} of split {split.name!r} "
                     f"(pattern {split.layer_pattern!r}); was `model=` passed to run()?")


def layers_on_tape(tape: Tape, split: ComponentSplit) -> list[int]:
    rx = re.compile(r"(?:^|\.)" + split.layer_pattern.format(layer=r"(\d+)") + r"(?=\.|$)")
    found = set()
    for rec in tape.records:
        m = rx.search(rec.module_path)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def fanout_node(tape: Tape, split: ComponentSplit, layer: int) -> int:
    """Node id of the fan-out tensor of ``layer``: the first node argument of the anchor module's first record."""
    anchor = _join(layer_prefix(tape, split, layer), split.anchor)
    for rec in tape.records:
        if _inside(rec.module_path, anchor):
            for tid in rec.leaf_ids:
                if tid is not None:
                    return tid
    raise ValueError(f"module {anchor!r} ran no recorded operator on a node")


def _matcher(split: ComponentSplit, prefix: str) -> Callable[[str], Branch | None]:
    resolved = [(b, _join(prefix, b.module), b.exact or b.module == "") for b in split.branches]
    cache: dict[str, Branch | None] = {}

    def match(path: str) -> Branch | None:
        if path not in cache:
            best, best_len = None, -1
            for b, full, exact in resolved:
                ok = path == full if exact else _inside(path, full)
                if ok and len(full) > best_len:
                    best, best_len = b, len(full)
            cache[path] = best
        return cache[path]

    return match


def _settled(v: MaxValue) -> MaxValue:
    """Tensor granularity keeps an operator's raw VJP pair (``hi``/``lo`` un-ordered) until a fan-out settles it;
    a node with one consumer stays raw in the trail. ``M+ = max``, ``M- = min`` of the pair."""
    if not getattr(v, "raw", False):
        return v
    if v.lo is None:
        return replace(v, raw=False)
    return replace(v, hi=torch.maximum(v.hi, v.lo), lo=torch.minimum(v.hi, v.lo), raw=False)


# -- the readout ------------------------------------------------------------------------------------------------

@dataclass
class ComponentReadout:
    """Per row (token position; rows = the fan-out tensor flattened to ``[-1, hidden]``):

    ``credit[r, c]``: value credited to component ``labels[c]``; ``winner[r]``: index of the winning component
    (``-1``: no path); ``unit[r]``: the hidden unit ``h*`` (oplus; ``-1`` for bucket_sum); ``value[r]``: the
    credited total. ``hidden_winners[r, h]``: the component index of every hidden unit's best path."""

    labels: tuple[str, ...]
    credit: Tensor
    winner: Tensor
    unit: Tensor
    value: Tensor
    hidden_winners: Tensor
    node_id: int
    layer: int
    sign: str
    granularity: str
    agg: str
    shape: tuple[int, ...] = field(default=())

    def rows(self) -> list[dict[str, float]]:
        return [dict(zip(self.labels, map(float, row))) for row in self.credit]

    def winner_labels(self) -> list[str | None]:
        return [self.labels[i] if i >= 0 else None for i in self.winner.tolist()]


class _Follower:
    def __init__(self, result: SemiringResult, split: ComponentSplit, prefix: str, rules: RuleSet,
                 max_steps: int):
        ring = result.semiring
        self.tape, self.trail = result.tape, result.trail
        self.scalar = ring.granularity == "scalar"
        self.signed = ring.sign != "abs"
        self.split, self.prefix = split, prefix
        self.match = _matcher(split, prefix)
        self.rules, self.max_steps = rules, max_steps
        # tensor granularity: dominant terms inside an operator come from a scalar max-times pull
        self.term_ring = MaxPath(sign="positive" if self.signed else "abs", granularity="scalar", backpointers=True)
        self._values: dict[int, MaxValue | None] = {}
        self._edges: dict[int, list] = {}
        self._terms: dict[tuple[int, int], MaxValue | None] = {}

    def value(self, tid: int) -> MaxValue | None:
        if tid not in self._values:
            v = self.trail.get(tid)
            self._values[tid] = None if v is None else _settled(v)
        return self._values[tid]

    def edges(self, rec) -> list:
        if rec.index not in self._edges:
            with torch.no_grad():
                self._edges[rec.index] = list(self.rules.edges(rec))
        return self._edges[rec.index]

    def weight(self, rec, slot: int, leaf: int, j: int, i: int) -> float:
        for e in self.edges(rec):
            if e.out == slot and e.leaf == leaf:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return float(e.kind.entry(j, i))
        return 1.0

    def terms(self, rec, node: int) -> MaxValue | None:
        """For every element of ``node``: the largest single term ``J[i, j] * M(i)`` over ``rec``'s outputs."""
        key = (rec.index, node)
        if key not in self._terms:
            acc = None
            with torch.no_grad():
                for e in self.edges(rec):
                    out_id = rec.output_ids[e.out]
                    if rec.leaf_ids[e.leaf] != node or out_id is None:
                        continue
                    val = self.value(out_id)
                    if val is None:
                        continue
                    val = MaxValue(val.hi, val.lo if self.signed else None, val.log_scale)
                    p = self.term_ring.pull(e.kind, val, (rec.index, e.out, e.leaf))
                    acc = p if acc is None else self.term_ring.plus(acc, p)
            self._terms[key] = acc
        return self._terms[key]

    def follow(self, node: int, elem: int, side: str) -> str | None:
        """The label of the first component the best path from element ``elem`` of ``node`` enters."""
        entered: tuple[str, list[Branch]] | None = None
        for _ in range(self.max_steps):
            v = self.value(node)
            if v is None:
                return None
            src = v.pointers(side)
            if src is None:
                raise ValueError("the sweep kept no back-pointers; call run(..., backpointers=True)")
            code = int(src[0].reshape(-1)[elem])
            if code < 0:
                return None
            r, slot, leaf = decode_origin(code)
            rec = self.tape.records[r]
            if entered is not None:
                module, parts = entered
                if not _inside(rec.module_path, module):  # ``node`` is the fused module's output
                    width = v.hi.shape[-1]
                    col = elem % width
                    for b in parts:
                        i, n = b.part
                        if col * n // width == i:
                            return b.label
                    return OTHER
            else:
                b = self.match(rec.module_path)
                if b is not None:
                    if b.part is None:
                        return b.label
                    parts = [x for x in self.split.branches if x.module == b.module and x.part is not None]
                    entered = (_join(self.prefix, b.module), parts)
            if self.scalar:
                idx = int(src[1].reshape(-1)[elem])
            else:  # the dominant term of the consumer's VJP sum
                t = self.terms(rec, node)
                if t is None:
                    return None
                tsrc = t.pointers(side)
                tcode, idx = int(tsrc[0].reshape(-1)[elem]), int(tsrc[1].reshape(-1)[elem])
                if tcode < 0:
                    return None
                _, slot, leaf = decode_origin(tcode)
            if idx < 0 or rec.output_ids[slot] is None:
                return None
            if self.signed and self.weight(rec, slot, leaf, elem, idx) < 0:
                side = "lo" if side == "hi" else "hi"
            elem, node = idx, rec.output_ids[slot]
        return OTHER


def component_readout(
    result: SemiringResult,
    split: ComponentSplit | str | Any | None = None,
    layer: int = 0,
    *,
    agg: str = "oplus",
    rules: RuleSet = DEFAULT_RULES,
    max_steps: int = 256,
) -> ComponentReadout:
    """Read the component attribution of ``layer`` off a maxpath sweep run with ``backpointers=True`` and
    ``model=`` (so module paths were recorded). ``split``: a :class:`ComponentSplit`, a preset name, a model, or
    ``None`` (guessed from the recorded model class)."""
    ring = result.semiring
    if getattr(ring, "name", "") != "maxpath":
        raise ValueError("component_readout needs a 'maxpath' sweep")
    if not result.trail:
        raise ValueError("the sweep kept no per-node values; call run(..., backpointers=True)")
    if agg not in ("oplus", "bucket_sum"):
        raise ValueError(f"agg must be 'oplus' or 'bucket_sum', got {agg!r}")
    split = split_for(result.tape.model_class if split is None else split)
    prefix = layer_prefix(result.tape, split, layer)
    node = fanout_node(result.tape, split, layer)
    fol = _Follower(result, split, prefix, rules, max_steps)
    labels = split.labels + (OTHER,)
    index = {lab: i for i, lab in enumerate(labels)}
    v = fol.value(node)
    side = "lo" if ring.sign == "negative" else "hi"
    if v is None:
        raise ValueError(f"no path from the root reaches the fan-out tensor of layer {layer}")
    vals = (v.lo if side == "lo" else v.hi)
    width = vals.shape[-1]
    m = vals.reshape(-1, width)
    real = (m.double() * torch.exp(v.log_scale)).masked_fill(~torch.isfinite(m), 0.0)
    rows = m.shape[0]

    # fast path: the winning consumer record is itself a (non-fused) component
    codes = v.pointers(side)[0].reshape(-1, width)
    rec_label: dict[int, int | None] = {}
    for r in torch.unique(codes).tolist():
        if r < 0:
            continue
        b = fol.match(fol.tape.records[decode_origin(r)[0]].module_path)
        rec_label[r] = index[b.label] if b is not None and b.part is None else None

    def label_of(row: int, h: int) -> int:
        c = int(codes[row, h])
        if c < 0 or not bool(torch.isfinite(m[row, h])):
            return -1
        known = rec_label.get(c)
        if known is not None:
            return known
        lab = fol.follow(node, row * width + h, side)
        return -1 if lab is None else index[lab]

    hidden = torch.full((rows, width), -1, dtype=torch.long)
    credit = torch.zeros(rows, len(labels), dtype=torch.float64)
    winner = torch.full((rows,), -1, dtype=torch.long)
    unit = torch.full((rows,), -1, dtype=torch.long)
    key = torch.nan_to_num(m, nan=float("-inf") if side == "hi" else float("inf"))
    best = key.argmax(-1) if side == "hi" else key.argmin(-1)
    for row in range(rows):
        if agg == "oplus":
            h = int(best[row])
            c = label_of(row, h)
            hidden[row, h] = c
            unit[row] = h
            winner[row] = c
            if c >= 0:
                credit[row, c] = real[row, h]
        else:
            for h in range(width):
                c = label_of(row, h)
                hidden[row, h] = c
                if c >= 0:
                    credit[row, c] += real[row, h]
            if (hidden[row] >= 0).any():
                winner[row] = int(hidden[row, int(best[row])])
    return ComponentReadout(labels, credit, winner, unit, credit.sum(-1), hidden, node, layer, ring.sign,
                            ring.granularity, agg, tuple(vals.shape))


def analyze_components(
    fn: Callable[..., Tensor],
    inputs: Tensor | Sequence[Tensor],
    model: torch.nn.Module,
    *,
    split: ComponentSplit | str | None = None,
    layers: Sequence[int] | None = None,
    sign: str = "positive",
    granularity: str = "tensor",
    agg: str = "oplus",
    tape: Tape | None = None,
    decomposition=None,
) -> list[ComponentReadout]:
    """Run one maxpath sweep of ``fn(*inputs)`` and read every requested layer (default: all recorded).
    ``decomposition``: the operator graph (``"paper"`` for Du et al.'s; see :func:`inseq_semiring.run`)."""
    result = run(fn, inputs, "maxpath", sign=sign, granularity=granularity, backpointers=True, model=model,
                 tape=tape, decomposition=decomposition)
    split = split_for(model if split is None else split)
    layers = layers_on_tape(result.tape, split) if layers is None else layers
    return [component_readout(result, split, k, agg=agg) for k in layers]
