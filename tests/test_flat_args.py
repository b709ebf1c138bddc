"""The recorder's argument walk equals torch.utils._pytree (same leaves, same order, same rebuilt containers)."""

import collections

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from inseq_semiring.graph.flat_args import call_leaves, flat_leaves, map_leaves

T = torch.ones(2)
Pair = collections.namedtuple("Pair", "a b")
CASES = [
    ((T, 1, [T, 2.0], {"b": T, "a": None}), {}),
    ((torch.Size([2, 3]), T), {"dim": [0, 1], "keepdim": True}),
    (Pair(T, (3, T)),),
    (collections.OrderedDict(y=T, x=2),),
    torch.return_types.max((T, T + 1)),
    ([], (), {}),
    T,
    None,
    ([[T, [T]], (T,)], torch.float32),
]


@pytest.mark.parametrize("tree", CASES, ids=range(len(CASES)))
def test_same_leaves_and_rebuild_as_pytree(tree):
    expected = tree_flatten(tree)[0]
    got = flat_leaves(tree)
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))
    mark = lambda x: ("tensor", x.shape) if isinstance(x, torch.Tensor) else x  # noqa: E731
    assert repr(map_leaves(mark, tree)) == repr(tree_map(mark, tree))
    assert type(map_leaves(mark, tree)) is type(tree_map(mark, tree))


CALLS = [((T, 1, [T, 2.0], (3, T)), {"b": T, "a": None}), ((torch.Size([2, 3]), T), {}), ((Pair(T, (3, T)),), {"x": [T]}),
         ((), {}), ((T,), {"dtype": torch.float32, "out": (T, T)})]


@pytest.mark.parametrize("call", CALLS, ids=range(len(CALLS)))
def test_call_leaves_are_the_flattened_args_and_kwargs(call):
    expected = tree_flatten(call)[0]
    got = call_leaves(*call)
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))
