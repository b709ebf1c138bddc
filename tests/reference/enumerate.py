"""Brute force: list every root-to-input path of a tiny graph explicitly, then read each semiring off the list.

The graph is the dense reference's structural edge list (:meth:`DenseGraph.edges`): scalar nodes
``(tensor id, flat index)`` and weighted edges. A path is a sequence of edges from an input element to a root
element; its product is ``math.prod`` of its weights. Nothing is accumulated along the way: no semiring, no
dynamic programming. Statistics per input element, from the list of path products ``P``:

* gradient ``sum P``; flow ``sum |p|``; entropy of ``p(pi) = |p_pi| / sum |p|`` (0 log 0 = 0; 0 if no mass);
* maxpath: ``max |p|``; ``M+ = max P``, ``M- = min P``; all 0 where there is no path.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .dense import DenseGraph


class TooManyPaths(RuntimeError):
    pass


def enumerate_paths(g: DenseGraph, max_paths: int = 200_000) -> dict[tuple[int, int], list[list[float]]]:
    """``{(input id, flat index): [path as its list of edge weights, ...]}`` for every input element."""
    out_edges: dict[tuple[int, int], list[tuple[tuple[int, int], float]]] = defaultdict(list)
    for src, dst, w in g.edges():
        out_edges[src].append((dst, w))
    root = g.root_id
    found: dict[tuple[int, int], list[list[float]]] = {}
    total = 0
    for tid in g.input_ids:
        for j in range(g.numel(tid)):
            start = (tid, j)
            paths: list[list[float]] = []
            stack = [(start, [])]  # explicit depth-first search over partial paths
            while stack:
                node, weights = stack.pop()
                if node[0] == root:
                    paths.append(weights)
                    total += 1
                    if total > max_paths:
                        raise TooManyPaths(f"more than {max_paths} paths")
                    continue
                for dst, w in out_edges.get(node, ()):
                    stack.append((dst, weights + [w]))
            found[start] = paths
    return found


def statistics(paths: list[list[float]]) -> dict[str, float]:
    prods = [math.prod(p) for p in paths]
    if not prods:
        return {"gradient": 0.0, "flow": 0.0, "entropy": 0.0, "maxpath": 0.0, "positive": 0.0, "negative": 0.0,
                "count": 0}
    mags = [abs(p) for p in prods]
    z = math.fsum(mags)
    h = 0.0
    if z > 0:
        h = -math.fsum((m / z) * math.log(m / z) for m in mags if m > 0)
    return {"gradient": math.fsum(prods), "flow": z, "entropy": h, "maxpath": max(mags),
            "positive": max(prods), "negative": min(prods), "count": len(prods)}


def enumerate_semirings(g: DenseGraph, max_paths: int = 200_000) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every statistic as a tuple of tensors shaped like the inputs (``"count"``: number of paths)."""
    found = enumerate_paths(g, max_paths)
    names = ["gradient", "flow", "entropy", "maxpath", "positive", "negative", "count"]
    result: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for tid in g.input_ids:
        n = g.numel(tid)
        stats = [statistics(found[(tid, j)]) for j in range(n)]
        for k in names:
            result[k].append(torch.tensor([s[k] for s in stats], dtype=torch.float64).reshape(g.shapes[tid]))
    return {k: tuple(v) for k, v in result.items()}
