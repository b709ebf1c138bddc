"""Operator decompositions: how composite ATen operators are split into smaller ones *while recording*.

The gradient graph's nodes are the tensors that operators produce, so the graph depends on how a computation is cut
into operators. Sums over paths (the gradient, the flow ``Z``, the entropy) do not care, but a **tensor-granularity
max** does: it is taken only where a tensor fans out to several operators, while inside an operator the
vector-Jacobian product is summed. One fused ``_softmax`` sums ``P_j (g_j - sum_i P_i g_i)`` before any max, where a
softmax written as ``exp(x - lse(x))`` lets its input fan out to three operators and takes the max there. The entropy
also counts paths that cancel in the gradient (the max-stabiliser of a log-sum-exp).

A :class:`Decomposition` is a named table ``ATen overload -> function`` (the idea of ``torch._decomp``). While
recording, an operator whose table entry exists and which reads at least one node is not run as itself: its
function runs instead, inside the recorder, so the smaller ATen operators it calls are what the tape holds.
Rules, semirings and the traversal are untouched. Tables are overlays (``base.extend(name, entries)``), never
global patches.

Built in (:data:`DECOMPOSITIONS`):

* ``"aten"`` (default): operators as PyTorch dispatches them, except fused attention (``scaled_dot_product_attention``
  and its CPU/CUDA kernels), which is recorded as eager attention's operators (:mod:`.attention`), so models loaded
  with the default SDPA attention record as they are;
* ``"paper"``: the operator graph of Du et al.'s library (brunoflow), see :mod:`.paper`;
* ``"primitive"``: every composite kernel into element-wise operators and reductions, see :mod:`.primitive`.

The gradient is the same under every decomposition (tested on every architecture); flow, entropy and maxpath
legitimately differ. A decomposition function receives the operator's arguments as the operator would and must
return what the operator returns (same structure, shapes and dtypes); outputs nobody reads may be constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..errors import InvalidInputError

aten = torch.ops.aten

DecompositionFn = Callable[..., object]


@dataclass(frozen=True)
class Decomposition:
    """A named table ``OpOverload -> function`` applied at record time (see the module docstring)."""

    name: str
    table: Mapping[torch._ops.OpOverload, DecompositionFn] = field(default_factory=dict)

    def lookup(self, op: torch._ops.OpOverload) -> DecompositionFn | None:
        return self.table.get(op)

    def extend(self, name: str, entries: Mapping[torch._ops.OpOverload, DecompositionFn]) -> "Decomposition":
        """A new decomposition: this table with ``entries`` added or replaced."""
        for op in entries:
            if not isinstance(op, torch._ops.OpOverload):
                raise InvalidInputError(f"decomposition keys must be ATen overloads (aten.x.default), got {op!r}",
                                        where=f"Decomposition({name!r})", fix="key the entry by e.g. "
                                        "torch.ops.aten._softmax.default")
        return Decomposition(name, {**self.table, **entries})

    def __repr__(self) -> str:
        return f"Decomposition({self.name!r}, {len(self.table)} operators)"


def bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by schema name, defaults filled in (decomposition functions read them by name)."""
    out = {}
    for pos, arg in enumerate(op._schema.arguments):
        if pos < len(args) and not arg.kwarg_only:
            out[arg.name] = args[pos]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


#: name -> decomposition; :func:`register_decomposition` adds user tables so that names work everywhere
#: (``decomposition="mine"`` in the API, ``--decomposition mine`` in the CLI).
DECOMPOSITIONS: dict[str, Decomposition] = {}


def register_decomposition(decomposition: Decomposition, *, replace: bool = False) -> Decomposition:
    if decomposition.name in DECOMPOSITIONS and not replace:
        raise InvalidInputError(f"a decomposition named {decomposition.name!r} is already registered",
                                where="register_decomposition", fix="choose another name or pass replace=True")
    DECOMPOSITIONS[decomposition.name] = decomposition
    return decomposition


def resolve(decomposition: "str | Decomposition | None") -> Decomposition:
    """A :class:`Decomposition` from a name or object (``None``: ``"aten"``); a clear error for unknown names."""
    if decomposition is None:
        return DECOMPOSITIONS["aten"]
    if isinstance(decomposition, Decomposition):
        return decomposition
    if isinstance(decomposition, str) and decomposition in DECOMPOSITIONS:
        return DECOMPOSITIONS[decomposition]
    raise InvalidInputError(f"unknown decomposition {decomposition!r}", where="decomposition=",
                            fix=f"use one of {sorted(DECOMPOSITIONS)} or a Decomposition object "
                            "(inseq_semiring.decompositions.Decomposition)")


from . import attention  # noqa: E402  (fused attention: in every table, see .attention)

ATEN = register_decomposition(Decomposition("aten", attention.ENTRIES))

from . import paper, primitive  # noqa: E402  (register the built-in tables)

PAPER = DECOMPOSITIONS["paper"]
PRIMITIVE = DECOMPOSITIONS["primitive"]

__all__ = ["Decomposition", "DECOMPOSITIONS", "ATEN", "PAPER", "PRIMITIVE", "register_decomposition", "resolve",
           "bind"]
