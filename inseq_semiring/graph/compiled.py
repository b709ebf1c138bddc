"""A compiled forward: capture the forward pass once with TorchDynamo, then replay its ATen calls without a mode.

Recording runs the model under a ``TorchDispatchMode``, which costs more than the whole of ``autograd.grad`` on
small models. Replaying a captured list of ATen calls costs less than the plain forward, but a replay must not
follow a graph the live Python code would no longer take (another target token, a flag, a branch on a value). This
module leaves that question to TorchDynamo, PyTorch's own capture: ``torch.compile(fn, fullgraph=True,
dynamic=False)`` traces ``fn``'s bytecode into one graph and guards it on everything the trace read (input shapes,
dtypes and strides, Python constants such as a target id, module flags, grad mode). While the guards hold, the graph
is the same; when one fails, Dynamo traces again and a new entry is made.

Per Dynamo entry (one graph ``gm``) the first call is captured and checked, later calls are replayed:

1. **Capture**: ``gm`` runs under the recorder with a program log: every executed ATen call ``(op, args, out)`` in
   order, and for each record the call that made it. Decompositions act as when recording the model.
2. **Check** against the model: the same call is recorded as usual (the one-off path) and the two tapes must agree
   record by record: operator, node ids of arguments and outputs, decomposition, every non-tensor argument, every
   constant tensor (bit for bit), every output value (bit for bit). A forward that needed special handling (an
   in-place write into a node, grad mode off, a custom ``autograd.Function``), a host read of a value, an operator
   whose output shape depends on values, or a write into a captured constant makes the entry *refused*: the model
   is recorded, now and on later calls. The checked tape is this call's tape; its module paths are the replay's.
3. **Replay**: the program becomes one straight-line Python function of the graph's inputs (parameters arrive as
   inputs, so weight writes are live) that calls each operator and builds each record. It runs with grad mode off
   and no dispatch mode.

What is shared between calls: Dynamo's cache (on ``fn``'s code object, with its guards) and, per entry, the
program once checked (published once, never mutated). Each call passes its inputs and receives its records through
a ``ContextVar`` of its own, so concurrent calls never see each other's values.
"""

from __future__ import annotations

import math
import threading
import types
import warnings
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .flat_args import call_leaves, flat_leaves
from .recorder import record
from .tape import OpRecord, Tape

aten = torch.ops.aten

#: Host reads of values: a program that makes one would bake the value in.
_HOST_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
               aten.item.default}
#: Operators whose output shape depends on the values (a replay would feed later calls stale sizes).
_VALUE_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
                 aten._unique2.default, aten.unique_dim.default, aten.nonzero_static.default}


class _Call:
    """What one compiled call hands to its Dynamo entry and gets back (one per call, in a ``ContextVar``)."""

    __slots__ = ("entry", "args", "outputs", "records", "tensors")

    def __init__(self):
        self.entry = self.args = self.outputs = self.records = self.tensors = None


_CALL: ContextVar[_Call | None] = ContextVar("inseq_semiring_compiled_call", default=None)


class _Entry:
    """The callable Dynamo runs for one graph: ``gm`` itself until a checked program exists, then the program."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.program: "Program | None" = None
        self.refused: str | None = None
        self.lock = threading.Lock()

    def __call__(self, *args):
        call = _CALL.get()
        program = self.program
        if call is None or program is None:
            if call is not None:
                call.entry, call.args = self, args
            return self.gm(*args)
        call.entry = self
        call.outputs, call.records, call.tensors = program.run(args)
        return call.outputs

    def publish(self, program: "Program | None", refused: str | None) -> None:
        with self.lock:
            if self.program is None and self.refused is None:
                self.program, self.refused = program, refused


def _backend(gm: torch.fx.GraphModule, example_inputs):  # one backend object: Dynamo's cache entries match it
    return _Entry(gm)


@dataclass(frozen=True, eq=False)
class Program:
    """A checked capture: ``run(args) -> (the graph's outputs, the records, their tensors)`` with ``args`` the
    graph's inputs; the tensors are every tensor of the records and the root once each, in tape order (what
    :func:`~inseq_semiring.traced_sweep.tape_tensors` gives, known from the source instead of found per call)."""

    run: Callable
    input_positions: tuple  # position among the graph's inputs of each attributed input
    input_ids: tuple
    root_id: int
    root_slot: tuple  # (record index, output slot) of the root
    calls: int  # ATen calls replayed
    source: str = field(repr=False, default="")
    #: the aliasing pattern of the records' tensors (traced_sweep.tape_tensors), fixed by the replay's source
    tensor_pattern: tuple = field(repr=False, default=())


class _Refused(Exception):
    """The capture cannot be replayed faithfully (the message says why)."""


# -- building the replay ---------------------------------------------------------------------------------------------
class _Writer:
    """Python source for a program: names for values and constants, one line per call."""

    def __init__(self):
        self.names: dict[int, str] = {}  # id(tensor) -> expression
        self.constants: dict[str, Any] = {}
        self.keep: list = []  # objects whose ids are in self.names / constants (kept alive while building)
        self.lines: list[str] = []

    def constant(self, obj) -> str:
        name = f"k{len(self.constants)}"
        self.constants[name] = obj
        return name

    def expr(self, x) -> str:
        t = type(x)
        if isinstance(x, torch.Tensor):
            name = self.names.get(id(x))
            if name is None:  # a tensor the graph holds (a constant of gm); the same object on every call
                name = self.names[id(x)] = self.constant(x)
                self.keep.append(x)
            return name
        if t is bool or t is int or x is None or t is str:
            return repr(x)
        if t is float:
            return repr(x) if math.isfinite(x) else self.constant(x)
        if t is tuple:
            return "(" + "".join(self.expr(v) + ", " for v in x) + ")"
        if t is list:
            return "[" + ", ".join(self.expr(v) for v in x) + "]"
        if t is dict:
            return "{" + ", ".join(f"{k!r}: {self.expr(v)}" for k, v in x.items()) + "}"
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise _Refused("a symbolic size in the graph (dynamic shapes)")
        return self.constant(x)  # dtypes, devices, layouts, memory formats, torch.Size, ...

    def call_args(self, args, kwargs) -> str:
        parts = [self.expr(a) for a in args] + [f"{k}={self.expr(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)


def _build(log: list, record_calls: Sequence[int], checked: Tape, graph_inputs: Sequence, input_positions,
           outputs) -> Program:
    """The replay of ``log`` (the capture of ``gm`` on ``graph_inputs``), building ``checked``'s records."""
    w = _Writer()
    for pos, x in enumerate(graph_inputs):
        if isinstance(x, torch.Tensor):
            w.names[id(x)] = f"a{pos}"
    w.keep.extend(graph_inputs)
    inputs_by_id = {id(x) for x in graph_inputs if isinstance(x, torch.Tensor)}
    record_of = {call: r for r, call in enumerate(record_calls)}
    records = checked.records
    tensor_slots: list[str] = []  # the expression of every tensor slot of the records, in tape order
    outs_of: dict[int, list[str]] = {}
    for i, (func, args, kwargs, out) in enumerate(log):
        if func in _HOST_READS:
            raise _Refused(f"{func} reads a value on the host")
        if func in _VALUE_SHAPED:
            raise _Refused(f"{func} has an output shape that depends on values")
        if func._schema.is_mutable:
            for a, arg in zip(func._schema.arguments, args):
                if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, torch.Tensor) and (
                        id(arg) in inputs_by_id or w.names.get(id(arg), "a").startswith(("a", "k"))):
                    raise _Refused(f"{func} writes into a tensor the graph does not make on each call")
        w.lines.append(f"    v{i} = g{i}({w.call_args(args, kwargs)})")
        w.constants[f"f{i}"] = func  # the operator, as records name it
        w.constants[f"g{i}"] = getattr(func, "_op", func)  # its kernel entry (OpOverload.__call__ calls it)
        w.keep.append(out)
        if isinstance(out, torch.Tensor):
            w.names.setdefault(id(out), f"v{i}")
            out_exprs = [f"v{i}"]
        elif type(out) in (tuple, list) and all(not isinstance(o, (tuple, list, dict)) for o in out):
            out_exprs = []
            for j, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    w.names.setdefault(id(o), f"v{i}[{j}]")
                    out_exprs.append(f"v{i}[{j}]")
                else:
                    out_exprs.append(w.expr(o))
        else:
            if isinstance(out, (tuple, list, dict)):
                raise _Refused(f"{func} returns a nested structure")
            out_exprs = [w.expr(out)]
        r = record_of.get(i)
        if r is not None:
            rec = records[r]
            leaf_values = call_leaves(args, kwargs)
            leaves = "(" + "".join(w.expr(x) + ", " for x in leaf_values) + ")"
            outs = "(" + "".join(e + ", " for e in out_exprs) + ")"
            out_values = list(out) if type(out) in (tuple, list) else [out]
            tensor_slots.extend(w.expr(x) for x in leaf_values if isinstance(x, torch.Tensor))
            tensor_slots.extend(e for e, o in zip(out_exprs, out_values) if isinstance(o, torch.Tensor))
            outs_of[r] = out_exprs
            ids_in, ids_out, path, parent = (w.constant(rec.leaf_ids), w.constant(rec.output_ids),
                                             w.constant(rec.module_path), w.constant(rec.decomposed_from))
            w.lines.append(f"    R.append(new({r}, f{i}, {w.expr(tuple(args))}, {w.expr(dict(kwargs))}, {leaves}, "
                           f"{ids_in}, {outs}, {ids_out}, {path}, {parent}))")
    root_slot = next((rec.index, slot) for rec in records for slot, tid in enumerate(rec.output_ids)
                     if tid == checked.root_id)
    # one expression per tensor object (names are given per object), so the aliasing pattern is the expressions'
    tensor_slots.append(outs_of[root_slot[0]][root_slot[1]])
    position: dict[str, int] = {}
    pattern = tuple(position.setdefault(e, len(position)) for e in tensor_slots)
    head = "def replay(" + "".join(f"a{pos}, " for pos in range(len(graph_inputs))) + "):\n    R = []\n"
    tensors = "[" + ", ".join(position) + "]"
    source = head + "\n".join(w.lines) + f"\n    return {w.expr(outputs)}, R, {tensors}\n"
    namespace = dict(w.constants, new=OpRecord.new)
    exec(compile(source, "<inseq_semiring compiled forward>", "exec"), namespace)  # noqa: S102 (our own source)
    run = namespace["replay"]

    def run_no_grad(args):
        with torch.no_grad():
            return run(*args)

    return Program(run_no_grad, tuple(input_positions), checked.input_ids, checked.root_id, root_slot, len(log),
                   source, pattern)


# -- checking the capture against the model ---------------------------------------------------------------------------
def same_value(a, b) -> bool:
    """Equal bit for bit: tensors of one shape, dtype and device with equal values (NaN equal to NaN), or equal
    Python values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and
                                               torch.equal(a.nan_to_num(), b.nan_to_num()))))
    if type(a) is float and type(b) is float and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _disagreement(captured: Tape, checked: Tape) -> str | None:
    """Where the capture of the graph and the recording of the model differ (None: they agree)."""
    from ..plan import signature

    if checked.irregular:
        return "the forward needs special handling: " + ", ".join(sorted(checked.irregular))
    if captured.irregular:
        return "the captured graph needs special handling: " + ", ".join(sorted(captured.irregular))
    if signature(captured) != signature(checked):
        for a, b in zip(captured.records, checked.records):
            if (a.op, a.leaf_ids, a.output_ids) != (b.op, b.leaf_ids, b.output_ids):
                return (f"the captured graph differs from the model's at record {b.index}: {a.op} where the model "
                        f"ran {b.op} (module '{b.module_path}')")
        return (f"the captured graph has {len(captured.records)} records, the model's {len(checked.records)}, or "
                "other inputs or root")
    for a, b in zip(captured.records, checked.records):
        if a.decomposed_from is not b.decomposed_from:
            return f"record {b.index} ({b.op}) was decomposed differently"
        if len(a.leaves) != len(b.leaves) or not all(map(same_value, a.leaves, b.leaves)):
            return f"record {b.index} ({b.op}, module '{b.module_path}') has other arguments"
        if len(a.outputs) != len(b.outputs) or not all(map(same_value, a.outputs, b.outputs)):
            return f"record {b.index} ({b.op}, module '{b.module_path}') has other values"
    return None


# -- per call ---------------------------------------------------------------------------------------------------------
#: model -> {code object of fn: why it is not compiled}; a speed memo only (a refused fn is recorded as usual).
_REFUSED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_REFUSED_LOCK = threading.Lock()
#: model -> {fn's code object: a copy of it}: Dynamo keeps its cache, and counts recompiles against its limit, per
#: code object; a copy per model keeps one model's entries (and recompiles) from using up another's.
_CODES: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
#: fn -> its torch.compile wrapper (creating one costs ~0.1 ms).
_WRAPPERS: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def _refuse(model, fn, why: str) -> None:
    with _REFUSED_LOCK:
        _REFUSED.setdefault(model, {})[getattr(fn, "__code__", fn)] = why
    warnings.warn(f"compile=True: the forward of {type(model).__name__} is recorded instead ({why})", UserWarning,
                  stacklevel=4)


def refused(model, fn) -> str | None:
    """Why ``fn`` on ``model`` is recorded rather than replayed (None: not refused)."""
    with _REFUSED_LOCK:
        return _REFUSED.get(model, {}).get(getattr(fn, "__code__", fn))


def _with_own_code(fn, model):
    """``fn`` with the model's copy of its code object (the same closure, defaults and globals)."""
    if type(fn) is not types.FunctionType:
        return fn
    with _REFUSED_LOCK:
        codes = _CODES.setdefault(model, {})
        code = codes.get(fn.__code__)
        if code is None:
            code = codes[fn.__code__] = fn.__code__.replace()
    own = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return own


def _wrapper(fn, model):
    try:
        compiled = _WRAPPERS.get(fn)
    except TypeError:  # not weak-referenceable
        compiled = None
    if compiled is None:
        compiled = torch.compile(_with_own_code(fn, model), backend=_backend, fullgraph=True, dynamic=False)
        try:
            _WRAPPERS[fn] = compiled
        except TypeError:
            pass
    return compiled


def record_compiled(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, model: torch.nn.Module,
                    plan=None, **options) -> Tape:
    """The tape of ``fn(*inputs)``, replayed from a checked capture when Dynamo's guards hold (``tape.forward ==
    "compiled"``), otherwise recorded (:func:`~.recorder.record`, with ``options``)."""
    if refused(model, fn) is not None:
        return record(fn, inputs, model=model, plan=plan, **options)
    detached = tuple(x.detach() for x in inputs)
    call = _Call()
    token = _CALL.set(call)
    try:
        with torch.no_grad():
            root = _wrapper(fn, model)(*detached)
    except Exception as exc:  # Dynamo could not trace fn in one graph (a graph break, an unsupported construct)
        if isinstance(exc, MemoryError):
            raise
        _refuse(model, fn, f"TorchDynamo could not capture it in one graph: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
        return record(fn, inputs, model=model, plan=plan, **options)
    finally:
        _CALL.reset(token)
    entry = call.entry
    if entry is None:  # Dynamo ran fn itself (e.g. its recompile limit was reached)
        _refuse(model, fn, "TorchDynamo ran the function without a graph (recompile limit?)")
        return record(fn, inputs, model=model, plan=plan, **options)
    if call.records is not None:
        return _replayed_tape(entry.program, call.records, call.tensors, root, model, options, plan)
    tape = record(fn, inputs, model=model, plan=plan, **options)
    if entry.refused is None and entry.program is None:
        program, why = _capture(entry, call.args, detached, tape, options)
        entry.publish(program, why)
    if entry.refused is not None:
        _refuse(model, fn, entry.refused)
    return tape


def _capture(entry: _Entry, graph_inputs: tuple, inputs: tuple, checked: Tape, options) -> tuple:
    """``(program, None)`` or ``(None, why refused)`` for the graph of ``entry``."""
    for node in entry.gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch._C._set_grad_enabled, torch.set_grad_enabled):
            return None, "the graph switches grad mode"
    positions = []
    for x in inputs:
        pos = [i for i, a in enumerate(graph_inputs) if a is x]
        if len(pos) != 1:
            return None, "an attributed input is not one input of the captured graph"
        positions.append(pos[0])
    out_node = next(n for n in entry.gm.graph.nodes if n.op == "output")
    if not (isinstance(out_node.args[0], (tuple, list)) and len(out_node.args[0]) == 1):
        return None, "the captured graph returns more than the root"
    log: list = []
    seen: dict = {}

    def graph_fn(*traced):
        args = list(graph_inputs)
        for p, t in zip(positions, traced):
            args[p] = t
        seen["inputs"], seen["outputs"] = args, entry.gm(*args)
        return seen["outputs"][0]

    try:
        captured = record(graph_fn, inputs, model=entry.gm, program=log, **options)
    except Exception as exc:  # the graph does not record as the model did: refuse, the model's tape stands
        return None, f"the captured graph could not be recorded ({type(exc).__name__}: {exc})"
    why = _disagreement(captured, checked)
    if why is not None:
        return None, why
    try:  # the program reads the graph's inputs (the recording saw the attributed ones as its traced aliases)
        program = _build(log, captured.record_calls, checked, seen["inputs"], positions, seen["outputs"])
    except _Refused as exc:
        return None, str(exc)
    return program, None


def _replayed_tape(program: Program, records: list, tensors: list, root, model, options, plan) -> Tape:
    rec, slot = program.root_slot
    if records[rec].outputs[slot] is not root:  # Dynamo returned something else than the graph's root value
        raise RuntimeError("internal error: the compiled forward's root is not the replayed root")
    from ..decompositions import resolve

    tape = Tape(records=records, input_ids=program.input_ids, root_id=program.root_id, root=root,
                model_class=type(model).__name__, decomposition=resolve(options.get("decomposition")).name,
                forward="compiled", tensors=(tensors, program.tensor_pattern), forward_program=program)
    if plan is not None and plan.matches(tape):
        tape.plan = plan
    return tape
