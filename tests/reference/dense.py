"""An independent dense-Jacobian reference for every semiring.

It uses only the recorded tape (:func:`inseq_semiring.graph.recorder.record`): which ATen operators ran, on which
values, and which arguments/outputs are nodes. It never imports the engine's rules or semirings. For every record
and every node argument it

* re-runs the operator under autograd with that argument varied and takes the dense local Jacobian
  (``torch.autograd.functional.jacobian``), one ``[n_out, n_in]`` block per (node output, node argument);
* finds the *structural* edges independently of the weights: output element ``i`` structurally depends on input
  element ``j`` when putting a NaN in ``j`` (all else as recorded) turns ``i`` into NaN, or when ``J[i, j] != 0``.
  This keeps exact-zero weights that still are edges (masked softmax entries, ``relu`` below 0, ``x * 0``) and
  drops entries that do not depend on the argument at all (the unselected side of ``where``, padding);
* runs every semiring by dynamic programming over the graph of scalar nodes in reverse tape order.

Everything is float64 and dense: use it on small graphs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from inseq_semiring.graph.recorder import record
from inseq_semiring.graph.tape import OpRecord, Tape


@dataclass
class Block:
    """The edges from every element of node tensor ``src`` (argument ``leaf`` of record ``index``) to every element
    of node tensor ``dst`` (output ``slot``): ``weight[i, j] = d dst_i / d src_j``, ``struct[i, j]``: an edge."""

    index: int
    slot: int
    leaf: int
    src: int
    dst: int
    weight: torch.Tensor  # float64 [n_dst, n_src]
    struct: torch.Tensor  # bool [n_dst, n_src]


@dataclass
class DenseGraph:
    tape: Tape
    blocks: list[Block]  # in tape order (records ascending)
    shapes: dict[int, torch.Size] = field(default_factory=dict)  # node id -> shape

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.tape.input_ids

    @property
    def root_id(self) -> int:
        return self.tape.root_id

    def by_record_reversed(self) -> list[list[Block]]:
        groups: dict[int, list[Block]] = {}
        for b in self.blocks:
            groups.setdefault(b.index, []).append(b)
        return [groups[k] for k in sorted(groups, reverse=True)]

    def edges(self) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
        """Every structural scalar edge ``((src id, src flat index), (dst id, dst flat index), weight)``."""
        out = []
        for b in self.blocks:
            for i, j in b.struct.nonzero().tolist():
                out.append(((b.src, j), (b.dst, i), float(b.weight[i, j])))
        return out

    def numel(self, tid: int) -> int:
        return math.prod(self.shapes[tid])


# -- local Jacobians ------------------------------------------------------------------------------------------------

def _written_positions(rec: OpRecord) -> set[int]:
    """Leaves the operator writes into (schema alias annotations), to be cloned before re-running it."""
    schema = rec.op._schema
    if not schema.is_mutable:
        return set()
    names = [a.name for a in schema.arguments]
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    return {pos for pos, name in enumerate(names) if name in written and pos < len(rec.leaves)}


def _caller(rec: OpRecord):
    """``call(leaves) -> flat outputs`` re-running ``rec.op`` outside any dispatch mode."""
    _, spec = tree_flatten((rec.args, rec.kwargs))
    written = _written_positions(rec)

    def call(leaves: list):
        leaves = [x.clone() if pos in written and isinstance(x, torch.Tensor) else x for pos, x in enumerate(leaves)]
        args, kwargs = tree_unflatten(list(leaves), spec)
        return tree_flatten(rec.op(*args, **kwargs))[0]

    return call


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=1e-12, atol=0, equal_nan=True))


def _check_directional(f, x: torch.Tensor, mats: list[torch.Tensor], rec: OpRecord, eps: float = 1e-6) -> None:
    """Autograd's Jacobian is checked, not trusted: ``J v`` against a central difference along a random ``v``.
    (This catches outputs whose backward formula is absent, e.g. ``native_layer_norm``'s mean and rstd, for which
    autograd would silently report a zero Jacobian.) A difference can only resolve changes above the output's own
    rounding, ``|y| 1e-16 / eps``: elements like ``score + finfo.min`` (masks) are checked only to that level."""
    gen = torch.Generator().manual_seed(rec.index)
    v = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    with torch.no_grad():
        base, plus, minus = f(x), f(x + eps * v), f(x - eps * v)
    for m, y, p, q in zip(mats, base, plus, minus):
        fd = ((p - q) / (2 * eps)).reshape(-1).to(torch.float64)
        jv = m @ v.reshape(-1).to(torch.float64)
        y = y.reshape(-1).to(torch.float64).abs()
        ok = torch.isfinite(fd) & torch.isfinite(y)
        if not bool(ok.any()):
            continue
        fd, jv, y = fd[ok], jv[ok], y[ok]
        scale = float(torch.cat([fd.abs(), jv.abs()]).max())
        tol = 1e-5 * scale + 1e-9 + 1e-8 * y
        if bool(((fd - jv).abs() > tol).any()):
            err = float((fd - jv).abs().max())
            raise AssertionError(f"record {rec.index} ({rec.op}): autograd's Jacobian disagrees with finite "
                                 f"differences ({err:.2e} vs scale {scale:.2e})")


def local_blocks(rec: OpRecord, live: set[int] | None = None) -> list[Block]:
    """Every (node output, node argument) block of one record; ``live``: only outputs with these node ids
    (default: all node outputs). :func:`dense_graph` passes the outputs on a path to the root."""
    call = _caller(rec)
    leaves = list(rec.leaves)
    slots = [s for s, tid in enumerate(rec.output_ids) if tid is not None and (live is None or tid in live)]
    if not slots:
        return []
    with torch.no_grad():
        replay = call(leaves)
    for s in slots:  # the tape must be replayable, or the reference would be checking something else
        if not _same(replay[s], rec.outputs[s]):
            raise AssertionError(f"record {rec.index} ({rec.op}): re-running the operator does not reproduce "
                                 f"output {s}")
    blocks = []
    for leaf, tid in enumerate(rec.leaf_ids):
        if tid is None:
            continue
        x = leaves[leaf]

        def f(v, _leaf=leaf):
            vs = list(leaves)
            vs[_leaf] = v
            outs = call(vs)
            return tuple(outs[s] for s in slots)

        jac = torch.autograd.functional.jacobian(f, x, vectorize=False, strategy="reverse-mode")
        n_in = x.numel()
        mats = [j.reshape(rec.outputs[s].numel(), n_in).to(torch.float64) for j, s in zip(jac, slots)]
        if x.dtype == torch.float64:
            _check_directional(f, x, mats, rec)
        structs = [m != 0 for m in mats]
        with torch.no_grad():  # NaN propagation: which outputs are functions of input element j
            for j in range(n_in):
                v = x.detach().clone(memory_format=torch.contiguous_format)
                v.view(-1)[j] = float("nan")  # flat index j in row-major order, as the Jacobian's columns
                vs = list(leaves)
                vs[leaf] = v
                outs = call(vs)
                for k, s in enumerate(slots):
                    structs[k][:, j] |= torch.isnan(outs[s]).reshape(-1)
        for k, s in enumerate(slots):
            blocks.append(Block(rec.index, s, leaf, tid, rec.output_ids[s], mats[k], structs[k]))
    return blocks


def dense_graph(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], model=None,
                decomposition=None) -> DenseGraph:
    """Record ``fn(*inputs)`` and build every local Jacobian block (only records that lie on a path to the root).
    ``decomposition``: passed to the recorder (the blocks come from re-running whatever ATen operators it recorded)."""
    tape = record(fn, tuple(inputs), model=model, decomposition=decomposition)
    # records whose outputs reach the root (reverse reachability over tensor ids)
    live = {tape.root_id}
    keep = []
    for rec in reversed(tape.records):
        if any(t in live for t in rec.output_ids if t is not None):
            keep.append(rec)
            live.update(t for t in rec.leaf_ids if t is not None)
    shapes = {tid: x.shape for tid, x in zip(tape.input_ids, inputs)}
    blocks: list[Block] = []
    for rec in reversed(keep):
        for s, tid in enumerate(rec.output_ids):
            if tid is not None:
                shapes[tid] = rec.outputs[s].shape
        blocks.extend(local_blocks(rec, live))
    return DenseGraph(tape, blocks, shapes)


# -- semirings by dynamic programming ------------------------------------------------------------------------------

def _seed(g: DenseGraph) -> int:
    return g.numel(g.root_id)


def _finish(g: DenseGraph, env: dict, default=0.0) -> tuple[torch.Tensor, ...]:
    out = []
    for tid in g.input_ids:
        shape = g.shapes[tid]
        v = env.get(tid)
        out.append(torch.full(shape, default, dtype=torch.float64) if v is None else v.reshape(shape).clone())
    return tuple(out)


def gradient(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    env = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in env:
            env[b.src] = env.get(b.src, 0) + b.weight.T @ env[b.dst]
    return _finish(g, env)


def flow(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    env = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in env:
            env[b.src] = env.get(b.src, 0) + b.weight.abs().T @ env[b.dst]
    return _finish(g, env)


def entropy(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    """Expectation semiring <Z, U>, edge <|w|, -|w| log |w|>; H = U / Z + log Z (0 where Z = 0)."""
    z = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    u = {g.root_id: torch.zeros(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in z:
            aw = b.weight.abs()
            nwlw = -torch.xlogy(aw, aw)
            z[b.src] = z.get(b.src, 0) + aw.T @ z[b.dst]
            u[b.src] = u.get(b.src, 0) + aw.T @ u[b.dst] + nwlw.T @ z[b.dst]
    zs, us = _finish(g, z), _finish(g, u)
    out = []
    for zz, uu in zip(zs, us):
        safe = torch.where(zz > 0, zz, torch.ones_like(zz))
        out.append(torch.where(zz > 0, uu / safe + torch.log(safe), torch.zeros_like(zz)))
    return tuple(out)


def maxpath_abs(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    env = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in env:
            cand = torch.where(b.struct, b.weight.abs() * env[b.dst][:, None], torch.zeros_like(b.weight))
            best = cand.amax(0) if cand.shape[0] else torch.zeros(cand.shape[1], dtype=torch.float64)
            env[b.src] = best if b.src not in env else torch.maximum(env[b.src], best)
    return _finish(g, env)


def maxpath_signed(g: DenseGraph) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(M+, M-) per input: largest / smallest signed path product; 0 where no path."""
    n = _seed(g)
    hi = {g.root_id: torch.ones(n, dtype=torch.float64)}
    lo = {g.root_id: torch.ones(n, dtype=torch.float64)}
    reach = {g.root_id: torch.ones(n, dtype=torch.bool)}
    for b in reversed(g.blocks):
        if b.dst not in hi:
            continue
        r = reach[b.dst]
        h = torch.where(r, hi[b.dst], torch.zeros_like(hi[b.dst]))[:, None]
        l = torch.where(r, lo[b.dst], torch.zeros_like(lo[b.dst]))[:, None]
        c1, c2 = b.weight * h, b.weight * l
        valid = b.struct & r[:, None]
        ch = torch.where(valid, torch.maximum(c1, c2), torch.full_like(c1, -math.inf)).amax(0)
        cl = torch.where(valid, torch.minimum(c1, c2), torch.full_like(c1, math.inf)).amin(0)
        rr = valid.any(0)
        if b.src in hi:
            hi[b.src], lo[b.src] = torch.maximum(hi[b.src], ch), torch.minimum(lo[b.src], cl)
            reach[b.src] = reach[b.src] | rr
        else:
            hi[b.src], lo[b.src], reach[b.src] = ch, cl, rr
    for d in (hi, lo):
        for tid in d:
            d[tid] = torch.where(reach[tid], d[tid], torch.zeros_like(d[tid]))
    return _finish(g, hi), _finish(g, lo)


def maxpath_tensor(g: DenseGraph, signed: bool = True) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The paper's tensor granularity: inside one operator an ordinary VJP of M+ and M- (summed over its edges),
    then M+ = max, M- = min of the two; the max/min is taken across the consumer operators of a tensor.
    ``signed=False``: the VJP of M with |w|, max across consumers. Returns (M+, M-) (M- = M+ when unsigned)."""
    n = _seed(g)
    hi = {g.root_id: torch.ones(n, dtype=torch.float64)}
    lo = {g.root_id: torch.ones(n, dtype=torch.float64)}
    for group in g.by_record_reversed():
        acc_h: dict[int, torch.Tensor] = {}
        acc_l: dict[int, torch.Tensor] = {}
        for b in group:
            if b.dst not in hi:
                continue
            w = b.weight if signed else b.weight.abs()
            acc_h[b.src] = acc_h.get(b.src, 0) + w.T @ hi[b.dst]
            acc_l[b.src] = acc_l.get(b.src, 0) + w.T @ lo[b.dst]
        for tid in acc_h:
            h, l = acc_h[tid], acc_l[tid]
            if signed:
                h, l = torch.maximum(h, l), torch.minimum(h, l)
            if tid in hi:
                hi[tid], lo[tid] = torch.maximum(hi[tid], h), torch.minimum(lo[tid], l)
            else:
                hi[tid], lo[tid] = h, l
    return _finish(g, hi), _finish(g, lo)


def count_paths(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    """Number of structural paths from every input element to the root (float64, exact up to 2**53)."""
    env = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in env:
            env[b.src] = env.get(b.src, 0) + b.struct.to(torch.float64).T @ env[b.dst]
    return _finish(g, env)


def count_nonzero_paths(g: DenseGraph) -> tuple[torch.Tensor, ...]:
    """Number of paths whose every edge weight is nonzero (the support of the entropy's distribution)."""
    env = {g.root_id: torch.ones(_seed(g), dtype=torch.float64)}
    for b in reversed(g.blocks):
        if b.dst in env:
            env[b.src] = env.get(b.src, 0) + (b.struct & (b.weight != 0)).to(torch.float64).T @ env[b.dst]
    return _finish(g, env)


def all_semirings(g: DenseGraph) -> dict[str, tuple[torch.Tensor, ...]]:
    plus, minus = maxpath_signed(g)
    t_plus, t_minus = maxpath_tensor(g, signed=True)
    t_abs, _ = maxpath_tensor(g, signed=False)
    return {"gradient": gradient(g), "flow": flow(g), "entropy": entropy(g), "maxpath": maxpath_abs(g),
            "positive": plus, "negative": minus, "tensor_positive": t_plus, "tensor_negative": t_minus,
            "tensor_abs": t_abs}
