"""The sweep of one plan, traced once into a TorchScript graph and replayed by TorchScript's C++ interpreter.

For tapes of one plan (same operators, node ids and rules: :mod:`~inseq_semiring.plan`) the sweep's *device branch*
(:func:`~inseq_semiring.rules.jacobians.device_branch`: no value is read on the host, so no branch depends on a
value) runs the same ATen calls with the same non-tensor arguments every time; only tensor values differ. So the
first call of a (plan, semiring) runs that sweep under a dispatch mode that logs every ATen call into an FX graph
whose inputs are the tape's tensors (the model's weights among them, so writes to them are followed), scripts the
graph with TorchScript, and later calls run the script on the new tape's tensors: one loop of the C++ interpreter
(graph optimisations off, so exactly the logged operators) instead of Python rules, kinds and pulls per record.

The compiled kernels stay: while the trace is taken each kernel call goes through its dispatcher operator
(:func:`~inseq_semiring.kernels.extension.kernels_visible`; ``torch.ops.inseq_semiring.max_times`` and the like), so
the graph holds it as one opaque call that the replay makes again (a value-dependent branch inside a kernel is
replayed with it). With back-pointers the trail (every node's value) is among the traced outputs.

Faithful or refused. The trace is given up, that call and the later ones of the key being swept eagerly (the
reason: :func:`refused`), when

* a value that depends on the tape is read on the host (``.item()``, ``bool(t)``, ``nonzero``, ``equal``, a boolean
  mask), or an operator returns a Python value computed from one;
* an operator writes into a tape tensor or a constant (a tensor the sweep did not make: e.g. a plan's index maps);
* the tape had special handling (``tape.irregular``), or the script cannot be built;
* the script's outputs on the tracing call differ from the logged sweep's in any bit
(one ``UserWarning`` per plan and semiring says why). Reads that bypass the dispatcher (``tolist``, ``numpy``) are
not seen; the engine's sweep makes none (the opt-in weight cache's fingerprint does, after a ``float(sum)`` that is
seen, so a cached sweep is refused).

A replay needs the new tape's tensors to have the traced shapes, strides and dtypes and the same aliasing pattern;
otherwise that call is swept eagerly. Results: those of the eager device-branch sweep, bit for bit (within float
rounding of the default CPU sweep, which skips rows it reads as zero). CPU only; the published program is never
mutated and each call runs it on its own tensors, so concurrent calls are independent.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import threading
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .graph.compiled import same_value
from .graph.tape import Tape
from .kernels.extension import kernels_visible
from .rules.jacobians import device_branch

aten = torch.ops.aten

#: Operators that read a tensor's values on the host or whose output shape depends on them.
_HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.item.default,
               aten.equal.default, aten.masked_select.default, aten.nonzero_static.default,
               aten.unique_consecutive.default, aten._unique2.default}
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
#: Operators whose result depends on their tensor arguments' shapes and dtypes only (not on the values).
_METADATA_ONLY = {aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.new_ones.default,
                  aten.new_zeros.default, aten.new_full.default}
#: Operators whose result is not a function of their arguments (never folded).
_UNFOLDED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default, aten.empty_strided.default,
             aten.new_empty_strided.default}

_LOCK = threading.Lock()


class _Refuse(Exception):
    """The trace cannot be faithful (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Program:
    """One traced sweep: the script, the metadata and aliasing pattern of the tape tensors it was traced on, and how
    to rebuild the semiring values from its flat outputs."""

    script: Any
    meta: tuple
    pattern: tuple
    rebuild: Callable[[list], Any]
    #: the replayed forward (graph/compiled.py) whose tape it was traced on, if any: its later tapes have the
    #: metadata of that one (the program runs only when Dynamo's guards on the inputs' shapes and strides hold)
    forward_program: Any = None


@dataclasses.dataclass(frozen=True)
class Refused:
    reason: str


def tape_tensors(tape: Tape) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """Every tensor of the tape's records (leaves, outputs) and its root, once each in tape order, and for every
    slot the position of its tensor in that list (the aliasing pattern). A replayed forward's tape comes with
    both (its program's source fixes them)."""
    if tape.tensors is not None:
        return tape.tensors
    Tensor = torch.Tensor
    flat = [t for rec in tape.records for group in (rec.leaves, rec.outputs) for t in group if isinstance(t, Tensor)]
    flat.append(tape.root)
    ids = list(map(id, flat))
    position: dict[int, int] = {}
    pattern = tuple([position.setdefault(i, len(position)) for i in ids])
    return list(dict(zip(ids, flat)).values()), pattern  # first appearances, in order


def _meta(tensors) -> tuple:
    return tuple([(t.shape, t.stride(), t.dtype, t.device) for t in tensors])


# -- the semiring values as flat tensors ---------------------------------------------------------------------------

def _flatten(value, out: list) -> Any:
    """Tensors of ``value`` appended to ``out``; returns the spec :func:`_rebuilder` rebuilds it from (tuples, lists,
    dataclasses such as :class:`~inseq_semiring.semirings.scaled.Scaled`; other leaves are kept as they are)."""
    if isinstance(value, torch.Tensor):
        out.append(value)
        return ("tensor",)
    if isinstance(value, (tuple, list)):
        return (type(value), [_flatten(v, out) for v in value])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ("dataclass", type(value), [(f.name, _flatten(getattr(value, f.name), out))
                                           for f in dataclasses.fields(value)])
    return ("const", value)


def _rebuilder(spec) -> Callable[[list], Any]:
    """The function that rebuilds the value ``spec`` describes from its flat tensors: one generated expression, so a
    trail of hundreds of values costs one call (dataclasses are made without running ``__init__``)."""
    names: dict[str, Any] = {"_new": _new}
    pos = [0]

    def expr(sp) -> str:
        kind = sp[0]
        if kind == "tensor":
            pos[0] += 1
            return f"f[{pos[0] - 1}]"
        if kind == "const":
            names[f"k{len(names)}"] = sp[1]
            return f"k{len(names) - 1}"
        if kind == "dataclass":
            names[f"k{len(names)}"] = sp[1]
            cls = f"k{len(names) - 1}"
            return f"_new({cls}, ({''.join(f'({name!r}, {expr(sub)}), ' for name, sub in sp[2])}))"
        items = "".join(f"{expr(sub)}, " for sub in sp[1])
        if sp[0] is tuple:
            return f"({items})"
        if sp[0] is list:
            return f"[{items}]"
        names[f"k{len(names)}"] = sp[0]
        return f"k{len(names) - 1}(({items}))"

    body = expr(spec)
    exec(f"def rebuild(f):\n    return {body}\n", names)  # noqa: S102 (our own expression of names and indices)
    return names["rebuild"]


def _new(cls, fields):
    obj = object.__new__(cls)
    for name, value in fields:
        object.__setattr__(obj, name, value)
    return obj


# -- tracing -------------------------------------------------------------------------------------------------------

def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Logger(TorchDispatchMode):
    """Logs every ATen call into an FX graph (inputs: the tape tensors; other tensors not made by a logged call:
    constants), tracks which storages hold values that depend on the tape, and refuses what a replay would get
    wrong (see the module docstring)."""

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: dict[int, fx.Node] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.keep: list = list(inputs)  # every tensor seen stays alive, so ids and storages stay unique
        self.dependent = {_storage(t) for t in inputs if t.numel()}
        self.external = set(self.dependent)  # storages the sweep must not write into
        self.fixed: dict[fx.Node, torch.Tensor] = {}  # results computed from nothing the replay can change
        self.pure: set[fx.Node] = set()  # calls that write nothing and depend on nothing outside the sweep
        self.written: set[int] = set()  # storages any call wrote into
        for i, t in enumerate(inputs):
            self.nodes.setdefault(id(t), self.graph.placeholder(f"t{i}"))

    def _node(self, t: torch.Tensor) -> fx.Node:
        node = self.nodes.get(id(t))
        if node is None:
            name = f"c{len(self.constants)}"
            self.constants[name] = t
            node = self.nodes[id(t)] = self.graph.get_attr(name)
            self.keep.append(t)
            if t.numel():
                self.external.add(_storage(t))
        return node

    def _depends(self, t: torch.Tensor) -> bool:
        return bool(t.numel()) and _storage(t) in self.dependent

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        for t in tensors:
            self._node(t)  # constants get their nodes (and storages) before the call can write into them
        depends = func not in _METADATA_ONLY and any(map(self._depends, tensors))
        if func is aten.detach.default:  # under no_grad an alias of its argument: replayed as the argument itself
            out = func(*args, **kwargs)
            self.keep.append(out)
            self.nodes[id(out)] = self.nodes[id(args[0])]
            return out
        if depends and func in _HOST_READS:
            raise _Refuse(f"the sweep reads a value on the host ({func})")
        if depends and func in _MASK_INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1:2])):
            raise _Refuse(f"the sweep indexes with a boolean mask ({func})")
        written = _written(func, args, kwargs)
        for t in written:
            if t.numel() and _storage(t) in self.external:
                raise _Refuse(f"the sweep writes into a tape tensor or a constant ({func})")
        out = func(*args, **kwargs)
        for t in written:
            if t.numel():
                self.written.add(_storage(t))
                if depends:
                    self.dependent.add(_storage(t))
        fixed = (not written and func not in _UNFOLDED and torch.Tag.nondeterministic_seeded not in func.tags
                 and all(self.nodes[id(t)] in self.fixed or func in _METADATA_ONLY for t in tensors))
        node = self.graph.call_function(func.overloadpacket, *_node_args(self, args, kwargs))
        if fixed:
            self.pure.add(node)
        self.keep.append(out)
        if isinstance(out, torch.Tensor):
            self._produced(out, node, depends, fixed)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    self._produced(o, self.graph.call_function(operator.getitem, (node, i)), depends, fixed)
                elif depends and o is not None:
                    raise _Refuse(f"{func} returns a Python value computed from the tape")
        elif depends and out is not None:
            raise _Refuse(f"{func} returns a Python value computed from the tape")
        return out

    def _produced(self, t: torch.Tensor, node: fx.Node, depends: bool, fixed: bool) -> None:
        self.nodes[id(t)] = node
        if depends and t.numel():
            self.dependent.add(_storage(t))
        if fixed:
            self.fixed[node] = t

    def fold(self, outputs: list[torch.Tensor]) -> None:
        """Replace every fixed result that no call wrote into and that is not (a view of) an output by a constant,
        and drop the calls left without users: the replay computes only what depends on the tape."""
        keep = self.written | {_storage(t) for t in outputs}
        folded = {n for n, t in self.fixed.items() if not t.numel() or _storage(t) not in keep}
        for node, t in self.fixed.items():
            if node in folded and any(u not in folded for u in node.users):
                name = f"k{len(self.constants)}"
                self.constants[name] = t
                with self.graph.inserting_before(node):
                    const = self.graph.get_attr(name)
                node.replace_all_uses_with(const, delete_user_cb=lambda u: u not in folded)
        for node in reversed(list(self.graph.nodes)):
            if (node in folded or node in self.pure) and not node.users:
                self.graph.erase_node(node)


def _node_args(log: _Logger, args, kwargs):
    """The call's arguments with tensors as graph nodes; a non-finite float becomes a module attribute (FX would
    write it as a global name, which TorchScript does not resolve)."""
    def arg(x):
        if isinstance(x, torch.Tensor):
            return log._node(x)
        if isinstance(x, float) and not math.isfinite(x):
            name = f"f{len(log.constants)}"
            log.constants[name] = x
            return log.graph.get_attr(name)
        return x
    return tree_map(arg, (args, kwargs))


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (its schema's mutable arguments, ``out=`` included)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        out.extend(x for x in tree_leaves(value) if isinstance(x, torch.Tensor))
    return out


#: Semirings whose sweep ``compile="all"`` traces (abs maxpath also with back-pointers: the trail is among the traced
#: outputs). Signed maxpath is not: its device branch (masked forms for absent values) costs more than the
#: interpreter saves (tiny models, 16 tokens: 1.1-2.1x the time of ``compile=True``, kernels kept).
TRACED_SEMIRINGS = ("gradient", "flow", "entropy", "maxpath")


#: The largest tensor (elements) of a tape whose sweep is traced. Larger tapes are where the kernels and the
#: per-operator work, not the operator count, set the time, and there the device branch's dense work (no rows
#: skipped) costs what the interpreter saves: GPT-2 small at 64 tokens, traced, ran at 1.03-1.10x the time of
#: ``compile=True`` for every semiring (3-16 s to trace); the trace also keeps every intermediate alive.
MAX_TRACED_ELEMENTS = 1 << 16


def traces(semiring: str, sign: str = "abs") -> bool:
    """Whether ``compile="all"`` traces this semiring's sweep (otherwise the call runs as with ``compile=True``)."""
    return semiring in TRACED_SEMIRINGS and sign == "abs"


def fits(tape: Tape) -> bool:
    """Whether every tensor of ``tape`` has at most :data:`MAX_TRACED_ELEMENTS` elements (else ``compile="all"``
    runs the call as ``compile=True``); decided once per plan."""
    plan = tape.plan
    known = None if plan is None else plan.sweeps.get("fits")
    if known is None:
        known = all(t.numel() <= MAX_TRACED_ELEMENTS for rec in tape.records for group in (rec.leaves, rec.outputs)
                    for t in group if isinstance(t, torch.Tensor))
        if plan is not None:
            with _LOCK:
                plan.sweeps.setdefault("fits", known)
    return known


def _eager(tape: Tape, sweep_fn: Callable[[Tape], tuple]) -> tuple:
    """The sweep a trace would log, run eagerly: the device branch (with the compiled kernels called directly)."""
    with device_branch():
        return sweep_fn(tape)


def trace(tape: Tape, sweep_fn: Callable[[Tape], tuple]) -> tuple[tuple, Program | Refused]:
    """Run ``sweep_fn(tape)`` (the sweep: the raw values, as tensors in tuples and dataclasses) once under the
    logger, in the device branch with the kernels visible, and script what it ran; returns its result and the
    program (or why not)."""
    if tape.irregular:
        why = f"the forward needed special handling ({', '.join(sorted(tape.irregular))})"
        return _eager(tape, sweep_fn), Refused(why)
    tensors, pattern = tape_tensors(tape)
    log = _Logger(tensors)
    try:
        with device_branch(), kernels_visible(), log:
            raw = sweep_fn(tape)
    except _Refuse as why:
        return _eager(tape, sweep_fn), Refused(str(why))
    flat: list[torch.Tensor] = []
    spec = _flatten(raw, flat)
    for t in flat:
        log._node(t)
    outs = []
    for t in flat:  # an output that is an input or a constant is returned as a fresh tensor, never shared
        node = log.nodes[id(t)]
        outs.append(log.graph.call_function(aten.clone, (node,)) if node.op in ("placeholder", "get_attr") else node)
    log.graph.output(tuple(outs))
    log.fold(flat)
    root = torch.nn.Module()
    for name, c in log.constants.items():
        if isinstance(c, torch.Tensor):
            root.register_buffer(name, c, persistent=False)
        else:
            setattr(root, name, c)
    try:
        script = torch.jit.script(fx.GraphModule(root, log.graph))
        with torch.no_grad(), torch.jit.optimized_execution(False):
            check = list(script(*tensors))
    except Exception as exc:  # an operator or argument TorchScript cannot take
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return raw, Refused(f"TorchScript could not take the traced sweep ({type(exc).__name__}: {first})")
    if len(check) != len(flat) or not all(map(same_value, check, flat)):
        return raw, Refused("the scripted sweep differs from the traced one")
    return raw, Program(script, _meta(tensors), pattern, _rebuilder(spec), tape.forward_program)


def replay(program: Program, tape: Tape) -> tuple | None:
    """The raw values of ``program`` on ``tape``'s tensors; None when the tape does not fit the trace."""
    tensors, pattern = tape_tensors(tape)
    if pattern != program.pattern:
        return None
    same_forward = program.forward_program is not None and program.forward_program is tape.forward_program
    if not same_forward and _meta(tensors) != program.meta:
        return None
    with torch.no_grad(), torch.jit.optimized_execution(False):
        flat = program.script(*tensors)
    return program.rebuild(flat)


def _program_key(key: tuple, tape: Tape) -> tuple:
    """The key of a plan's sweeps for ``key`` (the semiring and its options) on tapes like ``tape`` (its forward)."""
    return (*key, tape.forward)


def swept(plan, key: tuple, tape: Tape, sweep_fn: Callable[[Tape], tuple], *, recurs: bool = True) -> tuple:
    """The raw values of the traceable sweep (the device branch) of ``tape`` under ``key`` (the semiring
    and its options): replayed from ``plan``'s program for ``key`` and the tape's forward (a recorded and a
    replayed forward of one shape hold different tensors, so each has its own program), traced on its first call,
    swept eagerly when refused, when the tape does not fit, off the CPU, without a plan (``plan=None``), or when
    later calls will not give tapes like this one (``recurs=False``: the call that captures the compiled forward
    records its tape, the later ones replay it)."""
    key = _program_key(key, tape)
    entry = None if plan is None else plan.sweeps.get(key)
    cpu = tape.root.device.type == "cpu"
    if isinstance(entry, Program) and cpu:
        raw = replay(entry, tape)
        if raw is not None:
            return raw
    if plan is None or entry is not None or not cpu or not recurs:
        return _eager(tape, sweep_fn)
    raw, entry = trace(tape, sweep_fn)
    with _LOCK:
        fresh = plan.sweeps.setdefault(key, entry) is entry
    if fresh and isinstance(entry, Refused):
        warnings.warn(f"compile='all': the {key[0]} sweep of this shape is not traced ({entry.reason}); it is swept "
                      "eagerly (the same values, at the eager speed)", UserWarning, stacklevel=4)
    return raw


def refused(tape: Tape, key: tuple) -> str | None:
    """Why the sweep under ``key`` of tapes like ``tape`` (its plan, its forward) is not replayed (None: it is,
    or it was never traced)."""
    entry = tape.plan.sweeps.get(_program_key(key, tape))
    return entry.reason if isinstance(entry, Refused) else None
