"""Leaves of an ATen call's arguments, as ``torch.utils._pytree`` flattens them, without its per-node overhead.

An ATen call's arguments are plain tuples, lists and dicts of tensors and scalars (and ``torch.Size``), a few
hundred times per forward pass. :func:`flat_leaves` and :func:`map_leaves` walk those containers directly and hand
any other pytree container (a namedtuple, an ``OrderedDict``, a registered class) to ``torch.utils._pytree``, so the
leaves, their order and the rebuilt containers are exactly pytree's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

_SEQUENCES = (tuple, list, torch.Size)


def _is_other_container(obj) -> bool:
    return isinstance(obj, (tuple, list, dict)) or type(obj) in pytree.SUPPORTED_NODES


#: Leaf types met in almost every call, appended without further checks.
_PLAIN = {torch.Tensor, torch.nn.Parameter, int, float, bool, type(None), str, torch.dtype, torch.device,
          torch.layout, torch.memory_format}


def _flatten_into(obj, out: list) -> None:
    t = type(obj)
    if t in _SEQUENCES:
        _flatten_items(obj, out)
    elif t is dict:
        _flatten_items(obj.values(), out)  # pytree flattens a dict in its insertion order
    elif t in _PLAIN or not _is_other_container(obj):
        out.append(obj)
    else:
        out.extend(pytree.tree_flatten(obj)[0])


def _flatten_items(items, out: list) -> None:
    """The leaves of a sequence's items, plain leaves appended inline (one call per container, not per leaf)."""
    for x in items:
        if type(x) in _PLAIN:
            out.append(x)
        else:
            _flatten_into(x, out)


def call_leaves(args: tuple, kwargs: dict) -> list[Any]:
    """``flat_leaves((args, kwargs))`` for an operator call (a tuple and a dict), without the outer containers."""
    out: list[Any] = []
    for x in args:
        if type(x) in _PLAIN:
            out.append(x)
        else:
            _flatten_into(x, out)
    if kwargs:
        _flatten_items(kwargs.values(), out)
    return out


def flat_leaves(tree) -> list[Any]:
    """``torch.utils._pytree.tree_flatten(tree)[0]``."""
    out: list[Any] = []
    _flatten_into(tree, out)
    return out


def map_leaves(f: Callable[[Any], Any], tree):
    """``torch.utils._pytree.tree_map(f, tree)``."""
    t = type(tree)
    if t is tuple:
        return tuple(map_leaves(f, x) for x in tree)
    if t is list:
        return [map_leaves(f, x) for x in tree]
    if t is dict:
        return {k: map_leaves(f, v) for k, v in tree.items()}
    if _is_other_container(tree):  # torch.Size included: pytree rebuilds it from its mapped entries
        return pytree.tree_map(f, tree)
    return f(tree)
