"""Weight-1 operators: every output element is a copy of at most one input element.

One generic rule serves them all: run the operator on an index tensor (``arange`` in place of the argument,
``-1`` in place of the other floating arguments) and read off, for every output element, which input element it
copies. Casts (``_to_copy``) and ``copy`` keep their shapes and are pointwise weight-1 edges instead.
"""

from __future__ import annotations

import torch

from ..graph.flat_args import flat_leaves
from ..graph.tape import OpRecord
from . import jacobians
from .jacobians import IndexMap, Pointwise
from .registry import Edge, constant_op, rule
from .weight_cache import sweep_memo

aten = torch.ops.aten

INDEX_OPS = [
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.cat.default, aten.stack.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default,
    aten.clone.default, aten.contiguous.default if hasattr(aten, "contiguous") else aten.clone.default,
    aten.index_select.default, aten.gather.default, aten.index.Tensor, aten.embedding.default,
    aten.repeat.default, aten.flip.default, aten.roll.default, aten.unfold.default, aten.diagonal.default,
    aten.movedim.int, aten.constant_pad_nd.default, aten.as_strided.default, aten.unflatten.int,
    aten.flatten.using_ints, aten.expand_as.default, aten.view_as.default, aten.repeat_interleave.self_int,
]


#: Operators that keep the logical (row-major) order of the elements: y.flatten() == x.flatten().
IDENTITY_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
                aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
                aten.clone.default, aten.contiguous.default, aten.flatten.using_ints, aten.unflatten.int,
                aten.view_as.default}
#: Operators in which no input element is copied to two outputs.
INJECTIVE_OPS = IDENTITY_OPS | {
    aten.permute.default, aten.transpose.int, aten.t.default, aten.slice.Tensor, aten.select.int,
    aten.narrow.default, aten.cat.default, aten.stack.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.chunk.default, aten.flip.default, aten.roll.default, aten.diagonal.default,
    aten.movedim.int, aten.constant_pad_nd.default}


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _index_tensor(t: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(t.numel(), device=t.device).reshape(t.shape)
    if t.dim() and not t.is_contiguous():  # keep the argument's strides: as_strided and friends read them
        try:
            strided = torch.empty_strided(t.shape, t.stride(), dtype=torch.long, device=t.device)
            strided.copy_(idx)
            return strided
        except RuntimeError:
            pass
    return idx


def _index_call(rec: OpRecord, leaf: int) -> list:
    """Run ``rec.op`` with leaf ``leaf`` replaced by its element indices; other floating arguments by -1."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten((rec.args, rec.kwargs))
    subst = []
    for i, x in enumerate(flat):
        if i == leaf:
            subst.append(_index_tensor(rec.leaves[i]))
        elif _floating(x):
            subst.append(torch.full(x.shape, -1, dtype=torch.long, device=x.device))
        else:
            subst.append(x)
    if rec.op is aten.constant_pad_nd.default:  # padding value of the index map: "no input"
        args, kwargs = tree_unflatten(subst, spec)
        args = (args[0], args[1], -1)
        out = rec.op(*args, **kwargs)
    else:
        args, kwargs = tree_unflatten(subst, spec)
        out = rec.op(*args, **kwargs)
    return tree_flatten(out)[0]


#: Operators whose other floating tensors enter an index map by their shapes only (:func:`_index_call` puts ``-1``
#: tensors of their shapes in their place): their maps are memoised with those shapes in the key.
_SHAPES_ONLY = {aten.cat.default, aten.stack.default}


def _memo_key(rec: OpRecord, leaf: int):
    """What an index map depends on when the leaf is the call's only tensor: the op, the leaf's shape and strides,
    the other (non-tensor) arguments; for :data:`_SHAPES_ONLY` operators also the other floating tensors' shapes and
    strides. ``None`` (no memo) when another tensor takes part by its values or an argument is unhashable."""
    flat = flat_leaves((rec.args, rec.kwargs))
    parts = []
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            if i != leaf and not (rec.op in _SHAPES_ONLY and x.is_floating_point()):
                return None
            parts.append((tuple(x.shape), x.stride() if x.dim() else ()))
        else:
            parts.append(x)
    key = ("index_map", rec.op, leaf, len(rec.args), tuple(rec.kwargs), tuple(parts))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _index_maps(rec: OpRecord, leaf: int) -> list[tuple[torch.Tensor, bool]]:
    """The int64 index of every output for leaf ``leaf`` and whether it has no ``-1``; within one sweep, records of
    the same operator on the same shapes (one per layer) share them
    (:func:`~inseq_semiring.rules.weight_cache.sweep_memo`)."""
    memo = sweep_memo()
    key = None if memo is None else _memo_key(rec, leaf)
    if key is not None and key in memo:
        return memo[key]
    out = []
    for idx in _index_call(rec, leaf):
        idx = idx.long()
        # off the CPU "not known to be all valid" (the pulls then mask), rather than a host read inside the sweep
        out.append((idx, bool((idx >= 0).all()) if jacobians.reads_on_host(idx) else False))
    if key is not None:
        memo[key] = out
    return out


def _adjoint(rec: OpRecord):
    """For a permutation of dims (``transpose``, ``t``, ``permute`` of the call's one tensor): the inverse
    permutation as a view, ``a -> a'`` with ``a'[j] = a[i]`` where output element ``i`` copies input element ``j``."""
    if rec.op is aten.t.default:  # its own inverse
        return lambda a: a.t()
    if rec.op is aten.transpose.int:  # its own inverse
        d0, d1 = rec.args[1], rec.args[2]
        return lambda a: a.transpose(d0, d1)
    if rec.op is aten.permute.default:
        n = rec.outputs[0].dim()
        dims = [d % n for d in rec.args[1]] if n else []
        inverse = [dims.index(d) for d in range(n)]
        return lambda a: a.permute(inverse)
    return None


_PERMUTATIONS = {aten.transpose.int, aten.t.default, aten.permute.default}
_EXPAND = aten.expand.default


#: id(operator) -> (injective, identity, permutation); an OpOverload hashes in Python, an id does not
_KIND_OF = {id(op): (op in INJECTIVE_OPS, op in IDENTITY_OPS, op in _PERMUTATIONS) for op in INDEX_OPS}


@rule(*INDEX_OPS)
def index_map(rec: OpRecord):
    edges = []
    injective, identity, permutation = _KIND_OF.get(id(rec.op)) or (
        rec.op in INJECTIVE_OPS, rec.op in IDENTITY_OPS, rec.op in _PERMUTATIONS)
    adjoint = _adjoint(rec) if permutation else None
    for leaf, tid in enumerate(rec.leaf_ids):
        if tid is None:
            continue
        x = rec.leaves[leaf]
        if identity or (rec.op is _EXPAND and x.shape == rec.outputs[0].shape):  # an expand to its own shape
            edges.append(Edge(0, leaf, IndexMap.reshape(x.shape, rec.outputs[0].shape)))  # copies in order
            continue
        for slot, (idx, all_valid) in enumerate(_index_maps(rec, leaf)):
            if rec.output_ids[slot] is not None:
                edges.append(Edge(slot, leaf, IndexMap(idx, x.shape, injective=injective, all_valid=all_valid,
                                                       adjoint=adjoint)))
    return edges


@rule(aten._to_copy.default, aten.lift_fresh_copy.default)
def cast(rec: OpRecord):
    x = rec.leaves[0]
    return [Edge(0, 0, Pointwise(torch.ones((), dtype=x.dtype, device=x.device), x.shape, rec.outputs[0].shape))]


@rule(aten.copy.default)
def copy(rec: OpRecord):
    """``copy(self, src)``: the result holds ``src`` broadcast to ``self``'s shape; ``self``'s old values are gone."""
    src, out = rec.leaves[1], rec.outputs[0]
    if not rec.is_node(1):
        return []
    return [Edge(0, 1, Pointwise(torch.ones((), dtype=out.dtype, device=out.device), src.shape, out.shape))]


constant_op(
    aten.detach, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
    aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.fill_, aten.zero_, aten.sign, aten.floor,
    aten.ceil, aten.round, aten.trunc, aten.bernoulli, aten.empty_strided, aten.new_empty_strided,
)
