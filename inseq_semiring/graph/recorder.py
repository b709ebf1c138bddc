"""Record the gradient graph of ``fn(*inputs)`` at ATen-operator granularity.

A private :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen call below autograd. A call
is recorded when one of its tensor arguments is a node; its floating outputs then become nodes with fresh ids.
Module paths come from a stack kept by forward hooks on the model's modules (global hooks without a model), which
act for the recording thread only and are removed on exit.
An operator listed in the call's :class:`~inseq_semiring.decompositions.Decomposition` is not run as itself when
it reads a node: its decomposition runs inside the recorder, which records the smaller operators it calls.
In-place operators are recorded functionally: the written tensor gets a new id, and every earlier record that
saved that tensor object is given a snapshot of its value before the write. An in-place *overwrite* whose result does
not depend on the old value (``fill_``, ``zero_``, ``copy_`` from a constant, ``uniform_``, ``normal_``, ...) makes
the tensor a constant, as in autograd.

``fn`` runs with grad mode on (inputs that do not require grad are given aliases that do), so that the recorder
sees what autograd sees: operators run with grad mode off (``torch.no_grad()`` inside the forward) are constants,
and custom ``autograd.Function`` calls are found in the root's autograd graph (:mod:`.custom_functions`).
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..decompositions import Decomposition, resolve
from ..errors import InvalidInputError, UnsupportedModelError
from ..rules.registry import DEFAULT_RULES, RuleSet
from .custom_functions import check_policy, resolve_grad_mode
from .flat_args import call_leaves, flat_leaves, map_leaves
from .tape import OpRecord, Tape

aten = torch.ops.aten

#: Operators that only inspect or re-describe data; they never create nodes.
_PASSIVE = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
            aten.is_same_size.default, aten._local_scalar_dense.default, aten.is_nonzero.default}

#: In-place operators whose result does not depend on the written tensor's old value.
_OVERWRITES = {getattr(packet, name) for packet in (aten.fill_, aten.zero_, aten.copy_, aten.uniform_, aten.normal_,
                                                     aten.random_, aten.exponential_, aten.cauchy_, aten.log_normal_,
                                                     aten.geometric_, aten.bernoulli_)
               for name in packet.overloads()}


_CUSTOM_NODE = torch.autograd.function.BackwardCFunction


def _is_floating(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class _RecordingMode(TorchDispatchMode):
    def __init__(self, rules: RuleSet, names: dict[int, str], decomposition: Decomposition):
        super().__init__()
        self.rules = rules
        self.decomposition = decomposition
        self.within: list = []  # the decomposed operators being expanded (outermost first)
        self.names = names
        self.stack: list[str] = []
        self.records: list[OpRecord] = []
        self.ids: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (node id, tensor kept alive)
        self.counter = itertools.count()
        self.grad_off: set[int] = set()  # indices of records made with grad mode off
        self.late: dict[int, int] = {}  # node id of a custom Function output first seen as an argument -> record index
        self.info: dict[int, tuple] = {}  # id(operator) -> what this recording needs to know of it (see _op_info)
        self.detached: dict[int, torch.Tensor] = {}  # id(node tensor) -> its detached alias (never removed)
        self.irregular: set[str] = set()  # what this forward needed special handling for (see Tape.irregular)
        self.program: list | None = None  # with a list: every executed call (func, args, kwargs, out), in order
        self.record_calls: list[int] = []  # with a program: the program index of each record's call

    # -- node bookkeeping ---------------------------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> int:
        tid = next(self.counter)
        self.ids[id(t)] = (tid, t)
        if t.requires_grad:  # what records hold: one detached alias per node tensor (see _freeze)
            self.detached[id(t)] = t.detach()
        return tid

    def node_id(self, t) -> int | None:
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.ids.get(id(t))
        return None if entry is None else entry[0]

    def _snapshot_before_write(self, t: torch.Tensor) -> torch.Tensor:
        """Give every earlier holder of ``t`` (a record's leaves or outputs) a copy of its current value; return
        that copy. In-place writes into recorded tensors are rare, so the holders are found by a scan of the
        records rather than indexed on every call."""
        old = t.detach().clone()
        self.irregular.add("in-place write into a traced tensor")
        alias = self.detached.get(id(t), t)  # records hold node tensors as their detached aliases
        for rec in self.records:
            for holder in (rec.leaves, rec.outputs):
                for pos, x in enumerate(holder):
                    if x is t or x is alias:
                        holder[pos] = old
        return old

    # -- dispatch -----------------------------------------------------------------------------------------------
    def _op_info(self, func) -> tuple:
        """``(func, passive, write candidates, decomposition, overwrite, fill with a tensor, constant)``: looked up
        once per operator and recording (an ``OpOverload`` hashes in Python; an ``id`` does not)."""
        info = self.info.get(id(func))
        if info is None:
            schema = func._schema
            candidates = ()
            if schema.is_mutable:
                written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
                # leaves are ordered like the flattened arguments; map the leading positional tensor arguments
                candidates = tuple(pos for pos, arg in enumerate(schema.arguments) if arg.name in written)
            info = (func, func in _PASSIVE, candidates, self.decomposition.lookup(func), func in _OVERWRITES,
                    func in (aten.fill_.Tensor, aten.fill.Tensor),
                    self.rules.is_constant(func) or func is aten.detach.default)
            self.info[id(func)] = info
        return info

    def _exec(self, func, args, kwargs):
        """Run the operator (and log the call when a program is being captured, see :mod:`.compiled`)."""
        out = func(*args, **kwargs)
        if self.program is not None:
            self.program.append((func, args, kwargs, out))
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _, passive, candidates, decompose, overwrites, fill_tensor, constant = self._op_info(func)
        if passive:
            return self._exec(func, args, kwargs)
        leaves = call_leaves(args, kwargs)
        ids = self.ids
        leaf_ids = []
        reads_node = False
        for x in leaves:
            tid = None
            if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
                entry = ids.get(id(x))
                if entry is not None:
                    tid = entry[0]
                elif isinstance(x.grad_fn, _CUSTOM_NODE):  # a custom Function's output no recorded operator made
                    tid = self.track(x)
                    self.late[tid] = len(self.records)
                reads_node = reads_node or tid is not None
            leaf_ids.append(tid)
        written = [pos for pos in candidates if pos < len(leaves) and isinstance(leaves[pos], torch.Tensor)] \
            if candidates else candidates
        if not reads_node:
            for pos in written:  # a constant overwrote a node: it is a node no more
                self.ids.pop(id(leaves[pos]), None)
            return self._exec(func, args, kwargs)

        if decompose is not None and not written:
            self.within.append(func)
            try:
                with self:
                    return decompose(*args, **kwargs)
            finally:
                self.within.pop()

        module = self.stack[-1] if self.stack else ""
        grad_on = torch.is_grad_enabled()
        if written and not grad_on and any(leaf_ids[pos] is not None for pos in written):
            where = f"module '{module or '<top level>'}', operator {func}"
            raise UnsupportedModelError(
                "an in-place write with grad mode off (torch.no_grad() or a custom autograd.Function's forward) "
                "into a traced tensor changes its value behind autograd's back; it cannot be represented faithfully",
                where=where, fix="write out of place (y = f(x)) or outside the no_grad block")
        detached = self.detached
        saved_leaves = [detached.get(id(x), x) for x in leaves]
        for pos in written:
            t = leaves[pos]
            if t._base is not None and (self.node_id(t._base) is not None or leaf_ids[pos] is not None
                                        or any(i is not None for i in leaf_ids)):
                where = f"module '{module or '<top level>'}', operator {func}"
                raise UnsupportedModelError(
                    "an in-place write into a view of a traced tensor cannot be represented faithfully",
                    where=where,
                    fix="run the model without caches (use_cache=False) or replace the in-place write by its "
                    "out-of-place form",
                )
            old = self._snapshot_before_write(t)
            for other, leaf in enumerate(leaves):  # the same tensor may be read by this very call (y.mul_(y))
                if leaf is t:
                    saved_leaves[other] = old

        out = self._exec(func, args, kwargs)
        if overwrites and all(leaf_ids[i] is None for i in range(len(leaves)) if i not in written):
            for pos in written:  # overwritten by constants: the old value's edges are cut, as in autograd
                self.ids.pop(id(leaves[pos]), None)
            return out
        if fill_tensor:
            where = f"module '{module or '<top level>'}', operator {func}"
            raise UnsupportedModelError("fill with a traced value has no rule", where=where,
                                        fix="use value.expand_as(x) (or torch.full_like with a constant)")
        if constant:
            for pos in written:  # e.g. an in-place rounding: the result is a constant
                self.ids.pop(id(leaves[pos]), None)
            return out
        out_leaves = [out] if type(out) is torch.Tensor else flat_leaves(out)
        out_ids = []
        for t in out_leaves:
            out_ids.append(self.track(t) if _is_floating(t) else None)
        if all(i is None for i in out_ids):
            return out
        rec = OpRecord.new(len(self.records), func, args, kwargs, saved_leaves, tuple(leaf_ids),
                           [detached.get(id(t), t) for t in out_leaves],
                           tuple(out_ids), module, self.within[0] if self.within else None)
        if not grad_on:
            self.grad_off.add(rec.index)
        self.records.append(rec)
        if self.program is not None:
            self.record_calls.append(len(self.program) - 1)
        return out


@contextmanager
def _module_stack(mode: _RecordingMode, model: torch.nn.Module | None):
    """Keep ``mode.stack`` (the path of the module running now) with forward hooks that act for this thread only.

    Two global module hooks (a pair per call, not a pair per module); with ``model`` they act only for the model's
    own modules (those in ``mode.names``), without it for every module (the only way to see modules of an unknown
    model). Either way a forward run by another thread (another attribution, or the user's own work) never touches
    this recording's stack.
    """
    thread = threading.get_ident()
    names, only_model = mode.names, model is not None

    def pre(module, _inputs):
        if threading.get_ident() == thread:
            name = names.get(id(module))
            if name is not None or not only_model:
                mode.stack.append(type(module).__name__ if name is None else name)

    def post(module, _inputs, _output):
        if threading.get_ident() == thread and mode.stack and (not only_model or id(module) in names):
            mode.stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _freeze(records: list[OpRecord], detached: dict[int, torch.Tensor]) -> None:
    """Make the holders tuples (they were lists, for snapshots) and detach node tensors from the autograd graph the
    recording built: ``detached`` holds one alias per node tensor, the same object wherever the tensor appears, so
    identities between records hold. Operator records got their aliases when they were made; here the arguments and
    the records of custom Functions (made from the live tensors) get theirs."""
    # constants (the model's weights among them) stay the objects they are: caches key on them
    get = detached.get
    for rec in records:
        if isinstance(rec.op, type):  # a custom Function's record
            object.__setattr__(rec, "leaves", tuple([get(id(t), t) for t in rec.leaves]))
            object.__setattr__(rec, "outputs", tuple([get(id(t), t) for t in rec.outputs]))
        else:
            object.__setattr__(rec, "leaves", tuple(rec.leaves))
            object.__setattr__(rec, "outputs", tuple(rec.outputs))
        object.__setattr__(rec, "args", _swap(rec.args, get))
        if "ctx" not in rec.kwargs and rec.kwargs:
            object.__setattr__(rec, "kwargs", _swap(rec.kwargs, get))


def _swap(tree, get):
    """``map_leaves(lambda t: get(id(t), t) if tensor else t, tree)`` with a fast path for plain containers."""
    t = type(tree)
    if t is tuple or t is list:
        out = [get(id(x), x) if isinstance(x, torch.Tensor) else
               (x if type(x) in _SCALARS else _swap(x, get)) for x in tree]
        return tuple(out) if t is tuple else out
    if t is dict:
        return {k: _swap(v, get) for k, v in tree.items()}
    if t is torch.Size:  # integers only
        return tree
    if isinstance(tree, torch.Tensor):
        return get(id(tree), tree)
    if t in _SCALARS:
        return tree
    return map_leaves(lambda x: get(id(x), x) if isinstance(x, torch.Tensor) else x, tree)


_SCALARS = {int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format}


def record(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    model: torch.nn.Module | None = None,
    rules: RuleSet = DEFAULT_RULES,
    decomposition: "str | Decomposition | None" = None,
    custom_functions: str = "error",
    plan=None,
    program: list | None = None,
) -> Tape:
    """Run ``fn(*inputs)`` once and return its :class:`Tape`. ``decomposition``: a name in
    :data:`~inseq_semiring.decompositions.DECOMPOSITIONS` or a table (default ``"aten"``). ``custom_functions``:
    what to do with a custom ``torch.autograd.Function`` without a registered rule (``"error"`` or ``"forward"``,
    see :mod:`.custom_functions`).

    ``plan``: a :class:`~inseq_semiring.plan.Plan` expected to match; if the tape's signature equals it, the
    coverage check is skipped (the plan's operators were checked when it was made).

    ``program``: a list that receives every executed ATen call ``(func, args, kwargs, out)`` in order, and
    ``tape.record_calls`` the index in it of each record's call (used by :mod:`.compiled` to build a replay).

    Raises :class:`~inseq_semiring.errors.UnsupportedOpError` listing every operator without a rule.
    """
    check_policy(custom_functions)
    if torch.is_inference_mode_enabled() or any(isinstance(t, torch.Tensor) and t.is_inference() for t in inputs):
        raise InvalidInputError(
            "called inside torch.inference_mode() (or with inference tensors as inputs): inference mode records no "
            "gradient graph, so there is nothing to attribute", where="torch.inference_mode()",
            fix="call outside torch.inference_mode() (torch.no_grad() around the call is fine), and pass tensors "
            "created outside it (e.g. x.clone() outside the block)")
    names = {}
    if model is not None:
        names = {id(m): name for name, m in model.named_modules()}
        names[id(model)] = ""
    decomposition = resolve(decomposition)
    mode = _RecordingMode(rules, names, decomposition)
    mode.program = program
    model_class = type(model).__name__ if model is not None else ""
    traced = [t if t.requires_grad or not (t.is_floating_point() or t.is_complex()) else t.detach().requires_grad_(True)
              for t in inputs]
    input_ids = []
    for t in traced:
        input_ids.append(mode.track(t))
    with torch.enable_grad(), _module_stack(mode, model), mode:
        root = fn(*traced)
    if not isinstance(root, torch.Tensor):
        raise TypeError(f"fn must return a tensor (the root), got {type(root).__name__}")
    root_id = mode.node_id(root)
    if root_id is None and isinstance(root.grad_fn, _CUSTOM_NODE):
        root_id = mode.track(root)
        mode.late[root_id] = len(mode.records)
    records, dropped = resolve_grad_mode(mode.records, mode.grad_off, mode.ids, mode.late, root,
                                         policy=custom_functions, rules=rules, model_class=model_class)
    if root_id in dropped:
        root_id = None
    if mode.grad_off:
        mode.irregular.add("operators run with grad mode off")
    if mode.late or records is not mode.records:
        mode.irregular.add("custom autograd.Function calls")
    tape = Tape(records=records, input_ids=tuple(input_ids), root_id=root_id, root=root.detach(),
                model_class=model_class, decomposition=decomposition.name, irregular=frozenset(mode.irregular))
    if program is not None:
        tape.record_calls = tuple(mode.record_calls)
    _freeze(tape.records, mode.detached)
    if plan is not None and plan.matches(tape):  # a matching plan's operators all have rules
        tape.plan = plan
    else:
        rules.check_coverage(tape.records, tape.model_class)
    return tape
