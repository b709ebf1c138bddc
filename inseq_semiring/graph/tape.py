"""The gradient graph, as recorded: one :class:`OpRecord` per ATen operator call.

Nodes of the gradient graph are the scalar elements of the *node tensors*: the inputs and every floating
tensor an operator produced from at least one node tensor. Each node tensor has an integer id, fresh for every
output (in-place operators are recorded functionally, so an overwritten value keeps its old id and the new value
gets a new one). Arguments are kept by position: ``mul(x, x)`` has two node leaves with the same id, i.e. two edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True, eq=False)
class OpRecord:
    """One operator call.

    ``leaves`` are the flattened ``(args, kwargs)`` as seen by the kernel (tensor values at call time; for in-place
    operators the value *before* the write); ``leaf_ids[i]`` is the node id of leaf ``i`` or ``None`` for constants
    and non-tensors. ``outputs`` are the flattened outputs, ``output_ids`` their node ids (``None``: not a node).
    ``decomposed_from``: the composite operator this one was recorded for, when a decomposition split it.
    """

    index: int
    op: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    leaves: tuple
    leaf_ids: tuple
    outputs: tuple
    output_ids: tuple
    module_path: str
    decomposed_from: torch._ops.OpOverload | None = None

    @classmethod
    def new(cls, index, op, args, kwargs, leaves, leaf_ids, outputs, output_ids, module_path,
            decomposed_from=None) -> "OpRecord":
        """The same record as ``OpRecord(...)``, built without the frozen dataclass's per-field ``__setattr__``
        (the recorder makes one per operator call)."""
        rec = object.__new__(cls)
        rec.__dict__.update(index=index, op=op, args=args, kwargs=kwargs, leaves=leaves, leaf_ids=leaf_ids,
                            outputs=outputs, output_ids=output_ids, module_path=module_path,
                            decomposed_from=decomposed_from)
        return rec

    def is_node(self, leaf: int) -> bool:
        return self.leaf_ids[leaf] is not None

    @property
    def name(self) -> str:
        return str(self.op)


@dataclass
class Tape:
    """All records of one forward pass, in execution order, plus the ids of the inputs and the root."""

    records: list[OpRecord] = field(default_factory=list)
    input_ids: tuple[int, ...] = ()
    root_id: int | None = None
    root: torch.Tensor | None = None
    model_class: str = ""
    decomposition: str = "aten"  # the name of the decomposition it was recorded under
    plan: Any = None  # the plan (inseq_semiring.plan) whose signature this tape was found to match, if any
    #: what the forward needed special handling for (in-place writes into nodes, grad mode off, custom Functions)
    irregular: frozenset = frozenset()
    #: how the forward was obtained: "recorded" (under the recorder) or "compiled" (a replay, see graph/compiled.py)
    forward: str = "recorded"
    record_calls: tuple = ()  # with a captured program: the program index of each record's call
    #: a replayed forward: (its tensors, their aliasing pattern) as ``traced_sweep.tape_tensors`` gives them,
    #: and its program
    tensors: tuple | None = field(default=None, repr=False)
    forward_program: Any = field(default=None, repr=False)

    def producers(self) -> dict[int, tuple[OpRecord, int]]:
        """Node id -> (record that produced it, output slot)."""
        out = {}
        for rec in self.records:
            for slot, tid in enumerate(rec.output_ids):
                if tid is not None:
                    out[tid] = (rec, slot)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.records:
            counts[rec.name] = counts.get(rec.name, 0) + 1
        return dict(sorted(counts.items()))


def flatten_call(args: tuple, kwargs: dict) -> list[Any]:
    """The leaves of an operator call, in the order rules refer to them."""
    return tree_flatten((args, kwargs))[0]
