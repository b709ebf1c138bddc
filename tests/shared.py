"""Caches shared by the test modules: the references are built once per graph / architecture per session."""

from __future__ import annotations

from functools import lru_cache

import torch

import tiny_models as tm
from graphs import GRAPHS
from reference import dense
from reference.enumerate import enumerate_semirings


@lru_cache(maxsize=None)
def model_reference(name: str):
    """(case, dense graph, every semiring by the dense reference) for a tiny float64 architecture."""
    case = tm.build(name)
    g = dense.dense_graph(case.fn, case.inputs)
    return case, g, dense.all_semirings(g)


@lru_cache(maxsize=None)
def graph_reference(name: str):
    """(dense graph, enumeration results, dense results) for a hand-built graph of ``graphs.GRAPHS``."""
    fn, inputs = GRAPHS[name]
    g = dense.dense_graph(fn, inputs)
    return g, enumerate_semirings(g), dense.all_semirings(g)


def assert_close_scaled(actual, expected, rtol, what=""):
    """Element-wise ``|a - e| <= rtol * (|e| + max |e|)``: relative, with the tensor's scale as the floor."""
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, what
        assert bool(torch.isfinite(a).all()), f"{what}: non-finite values"
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a.to(torch.float64), e.to(torch.float64), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"{what}: {m}")


#: test name -> (semiring, options) for every mode; the names are also the keys of the references' results.
ALL_MODES = {
    "gradient": ("gradient", {}),
    "flow": ("flow", {}),
    "entropy": ("entropy", {}),
    "maxpath": ("maxpath", {}),
    "positive": ("maxpath", {"sign": "positive"}),
    "negative": ("maxpath", {"sign": "negative"}),
    "tensor_abs": ("maxpath", {"granularity": "tensor"}),
    "tensor_positive": ("maxpath", {"sign": "positive", "granularity": "tensor"}),
    "tensor_negative": ("maxpath", {"sign": "negative", "granularity": "tensor"}),
}
SCALAR_MODES = {k: v for k, v in ALL_MODES.items() if not k.startswith("tensor")}
TENSOR_MODES = {k: v for k, v in ALL_MODES.items() if k.startswith("tensor")}
