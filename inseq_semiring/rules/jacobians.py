"""The closed vocabulary of local Jacobians, shared by rules (which build them) and semirings (which pull through them).

Notation: an operator maps an input tensor ``x`` (one argument) to an output tensor ``y``; ``J[i, j] = dy_i/dx_j``
at the forward values. A pull turns the output's value ``a`` (the adjoint, indexed by output elements) into the
input's value: ``a'_j = (+)_i a_i (x) edge(J[i, j])`` over the edges that structurally exist. Each kind says which
edges exist and carries their weights without ever materialising a dense Jacobian. Rules never see a semiring.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .weight_cache import sweep_memo as _sweep_memo


def reads_on_host(t: Tensor) -> bool:
    """Whether rules and pulls may read values of ``t`` on the host (a count, an all-valid flag) to skip work: on
    the CPU, where that read is free, unless :func:`device_branch` is in force. On other devices they take the dense
    path instead, so that a sweep never waits for the device (no ``.item()``, ``bool(t.any())``, ``nonzero`` inside
    the sweep)."""
    return t.device.type == "cpu" and not _DEVICE_BRANCH.get()


#: Set (per thread / task) by :func:`device_branch`.
_DEVICE_BRANCH: ContextVar[bool] = ContextVar("inseq_semiring_device_branch", default=False)


@contextmanager
def device_branch():
    """Inside the block CPU tensors take the device branch too: no value is read on the host, so the operators a
    sweep runs depend on shapes only (what :mod:`~inseq_semiring.traced_sweep` traces)."""
    token = _DEVICE_BRANCH.set(True)
    try:
        yield
    finally:
        _DEVICE_BRANCH.reset(token)


def _flat_to_index(flat: int, shape) -> tuple[int, ...]:
    idx = []
    for size in reversed(tuple(shape)):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


@dataclass(frozen=True, eq=False)
class Pointwise:
    """``y_i`` depends on ``x_{b(i)}`` only, with weight ``weight_i``; ``x`` broadcasts to ``y`` (``b`` = broadcast).

    Covers unary ops (diagonal Jacobian) and broadcasting binary ops. ``weight`` broadcasts to ``out_shape``.
    """

    weight: Tensor
    in_shape: torch.Size
    out_shape: torch.Size

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "Pointwise":
        return Pointwise(f(self.weight), self.in_shape, self.out_shape)

    def entry(self, j: int, i: int) -> float:
        return float(self.weight.expand(self.out_shape).reshape(-1)[i])


@dataclass(frozen=True, eq=False)
class Reduction:
    """``x_j`` feeds exactly one output, ``y_{r(j)}``, with weight ``weight_j`` (``sum``/``mean`` over ``dims``).

    ``weight`` broadcasts to ``in_shape``; ``dims`` are non-negative and sorted. ``support`` (bool, optional): only
    these ``x_j`` are edges (e.g. the target entries a loss reads); elsewhere ``weight`` must be 0, which is all the
    additive semirings need, while the signed max semiring tells "no edge" from "an edge of weight 0".
    """

    weight: Tensor
    dims: tuple[int, ...]
    keepdim: bool
    in_shape: torch.Size
    out_shape: torch.Size
    support: Tensor | None = None

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "Reduction":
        return Reduction(f(self.weight), self.dims, self.keepdim, self.in_shape, self.out_shape, self.support)

    def expand_out(self, a: Tensor) -> Tensor:
        """View an output-shaped tensor as input-shaped (each input element sees its one output)."""
        lead = a.dim() - len(self.out_shape)  # leading component dims, if any
        if not self.keepdim:
            for d in self.dims:
                a = a.unsqueeze(lead + d)
        return a.expand(tuple(a.shape[:lead]) + tuple(self.in_shape))

    def out_index(self) -> Tensor:
        """For every input element, the flat index of the output element it feeds."""
        return self.expand_out(torch.arange(_numel(self.out_shape)).reshape(self.out_shape))

    def entry(self, j: int, i: int) -> float:
        return float(self.weight.expand(self.in_shape).reshape(-1)[j])


@dataclass(frozen=True, eq=False)
class IndexMap:
    """``y_i = x_{index_i}`` with weight 1, or no edge where ``index_i == -1`` (views, slices, cat, gather, ...).
    A reshape (``identity``: ``y.flatten() == x.flatten()``) carries no index tensor (:meth:`reshape`), only its
    output shape: its pulls are reshapes, and an int64 ``arange`` of a logits-sized view would cost twice the view."""

    index: Tensor | None  # int64, out_shape; None for an identity map (its pulls are reshapes)
    in_shape: torch.Size
    weight: float = 1.0  # 1 for the structural edge; a semiring may map it (e.g. -1 log 1 = 0)
    injective: bool = False  # each input element feeds at most one output element (no fan-out inside the op)
    identity: bool = False  # y.flatten() == x.flatten() (views and copies in logical order): a pull is a reshape
    shape: torch.Size | None = None  # the output shape when ``index`` is None
    all_valid: bool = False  # known: no ``-1`` in ``index`` (every output element copies an input element)
    #: for a bijection (transpose, permute): the output-shaped value moved to the input's layout, a view (a (+)
    #: pull through weight 1 is exactly that, without the index); None otherwise
    adjoint: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def reshape(cls, in_shape, out_shape) -> "IndexMap":
        m = object.__new__(cls)  # the frozen dataclass's fields, set without its per-field __setattr__
        m.__dict__.update(index=None, in_shape=torch.Size(in_shape), weight=1.0, injective=True, identity=True,
                          shape=torch.Size(out_shape), all_valid=False, adjoint=None)
        return m

    @property
    def out_shape(self) -> torch.Size:
        return self.index.shape if self.index is not None else self.shape

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "IndexMap":
        """The map applied to the one weight; within a sweep each ``(f, weight)`` is evaluated once (the sweep's
        memo, :func:`~inseq_semiring.rules.weight_cache.sweep_memo`)."""
        memo = _sweep_memo()
        key = ("scalar_map", f, self.weight)
        w = None if memo is None else memo.get(key)
        if w is None:
            w = float(f(torch.tensor(self.weight, dtype=torch.float64)))
            if memo is not None:
                memo[key] = w
        if w == self.weight and type(w) is type(self.weight):  # e.g. |1| = 1: the same map
            return self
        return IndexMap(self.index, self.in_shape, w, self.injective, self.identity, self.shape, self.all_valid,
                        self.adjoint)

    def entry(self, j: int, i: int) -> float:
        return self.weight


@dataclass(frozen=True, eq=False)
class MatMul:
    """A (batched) matrix product seen from one factor; ``weight`` holds the local derivatives (``alpha`` folded in).

    ``left`` (argument ``x`` is the left factor, ``y = x @ B``): ``a' = a @ weight`` with ``weight = B^T``
    (``[*, n, k]``), i.e. the edge ``x[r, k] -> y[r, c]`` weighs ``weight[c, k]``.
    Right factor (``y = A @ x``): ``a' = weight @ a`` with ``weight = A^T`` (``[*, k, m]``), i.e. the edge
    ``x[k, c] -> y[r, c]`` weighs ``weight[k, r]``.
    """

    weight: Tensor
    left: bool
    in_shape: torch.Size
    out_shape: torch.Size
    static: bool = False  # the weight is a constant (a parameter): mapped lazily, or cached across sweeps (opt-in)
    mat_shapes: tuple | None = None  # (in, out) as matrices when the tensors are vectors (``mv``)
    entry_map: Callable[[Tensor], Tensor] | None = None  # a semiring's map of the entries, not yet applied

    @property
    def mat_in(self):
        return self.in_shape if self.mat_shapes is None else self.mat_shapes[0]

    @property
    def mat_out(self):
        return self.out_shape if self.mat_shapes is None else self.mat_shapes[1]

    @property
    def blockwise(self) -> bool:
        """One 2-D weight shared by every row of the left factor: a pull can map and use it block by block."""
        return self.left and self.weight.dim() == 2 and self.mat_shapes is None

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "MatMul":
        """The same product with entries ``f(w)``. A constant weight that the product can stream is mapped lazily
        (``entry_map``; the pulls map one block at a time, see :mod:`~inseq_semiring.semirings.weight_maps`)
        unless the opt-in cache of :mod:`~inseq_semiring.rules.weight_cache` takes it; others are mapped now."""
        from .weight_cache import cached_map, will_cache

        if self.entry_map is not None:
            inner = self.entry_map
            return self._with(self.weight, lambda t: f(inner(t)))
        if self.static and will_cache(self.weight):
            return self._with(cached_map(self.weight, f), None)
        if self.static and self.blockwise:
            return self._with(self.weight, f)
        return self._with(f(self.weight), None)

    def mapped(self) -> "MatMul":
        """The same product with ``entry_map`` applied to the whole weight now."""
        if self.entry_map is None:
            return self
        return self._with(self.entry_map(self.weight), None)

    def _with(self, weight: Tensor, entry_map) -> "MatMul":
        """``dataclasses.replace(self, weight=..., entry_map=...)`` without its per-call field introspection."""
        return MatMul(weight, self.left, self.in_shape, self.out_shape, self.static, self.mat_shapes, entry_map)

    def entry(self, j: int, i: int) -> float:
        jj = _flat_to_index(j, self.mat_in)
        ii = _flat_to_index(i, self.mat_out)
        batch = ii[:-2] if self.weight.dim() > 2 else ()
        w = self.weight[(*batch, ii[-1], jj[-1])] if self.left else self.weight[(*batch, jj[-2], ii[-2])]
        return float(w if self.entry_map is None else self.entry_map(w))


@dataclass(frozen=True, eq=False)
class RowDense:
    """Every row (last dim, length n) of ``y`` depends densely on the same row of ``x``:
    ``J_row = diag(d) + sum_r u_r v_r^T``, i.e. ``dy_i/dx_j = d_i [i = j] + sum_r u_r[i] v_r[j]``
    (softmax: rank 1, log-softmax: rank 1, layer norm: rank 2). Shapes: ``d`` [*rows, n], ``u``/``v`` [r, *rows, n].
    ``entry_map`` (optional) transforms the dense entries when a semiring needs ``|J|`` etc.
    """

    d: Tensor
    u: Tensor
    v: Tensor
    entry_map: Callable[[Tensor], Tensor] | None = None

    @property
    def in_shape(self) -> torch.Size:
        return self.d.shape

    out_shape = in_shape

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "RowDense":
        g = f if self.entry_map is None else (lambda t, _g=self.entry_map: f(_g(t)))
        return RowDense(self.d, self.u, self.v, g)

    def dense(self, rows: Tensor, outs: Tensor | None = None) -> Tensor:
        """``J`` for the flat row indices ``rows``: [len(rows), n_out, n] (``outs``: restrict output positions)."""
        n = self.d.shape[-1]
        d = self.d.reshape(-1, n)[rows]
        u = self.u.reshape(self.u.shape[0], -1, n)[:, rows]
        v = self.v.reshape(self.v.shape[0], -1, n)[:, rows]
        if outs is None:
            jac = torch.diag_embed(d) + torch.einsum("rbi,rbj->bij", u, v)
        else:
            eye = (outs[:, None] == torch.arange(n, device=d.device)[None, :]).to(d.dtype)
            jac = d[:, outs, None] * eye + torch.einsum("rbi,rbj->bij", u[:, :, outs], v)
        return jac if self.entry_map is None else self.entry_map(jac)

    def entry(self, j: int, i: int) -> float:
        n = self.d.shape[-1]
        row, ci, cj = i // n, i % n, j % n
        if j // n != row:
            return 0.0
        jac = self.dense(torch.tensor([row], device=self.d.device), torch.tensor([ci], device=self.d.device))
        return float(jac[0, 0, cj])


@dataclass(frozen=True, eq=False)
class LayerNormRow:
    """Layer norm over the last dim (length n): ``J_row[i, j] = gain_i (delta_ij - (1 + xh_i xh_j) / n)`` with
    ``gain = g * rstd`` and ``xh`` the normalised row, i.e. ``J = diag(gain) C`` with the symmetric core
    ``C = I - (1 1^T + xh xh^T) / n``. ``|J| = diag(|gain|) |C|``, so a semiring needs one dense ``|C|`` per row
    (O(n^2)), shared by every weight map; the signed pull is O(n).
    """

    gain: Tensor  # [*rows, n]
    xh: Tensor  # [*rows, n]
    entry_map: Callable[[Tensor], Tensor] | None = None

    @property
    def in_shape(self) -> torch.Size:
        return self.xh.shape

    out_shape = in_shape

    def map_weights(self, f: Callable[[Tensor], Tensor]) -> "LayerNormRow":
        if self.entry_map is not None:
            raise ValueError("LayerNormRow weights are mapped once")
        return LayerNormRow(self.gain, self.xh, f)

    def core(self, rows: Tensor) -> Tensor:
        """``C`` for the flat row indices ``rows``: [len(rows), n, n]."""
        n = self.xh.shape[-1]
        xh = self.xh.reshape(-1, n)[rows]
        c = torch.baddbmm(torch.full((1, 1, 1), -1.0 / n, dtype=xh.dtype, device=xh.device),
                          xh.unsqueeze(-1), xh.unsqueeze(-2), alpha=-1.0 / n)
        c.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return c

    def dense(self, rows: Tensor, outs: Tensor | None = None) -> Tensor:
        n = self.xh.shape[-1]
        jac = self.gain.reshape(-1, n)[rows].unsqueeze(-1) * self.core(rows)
        if outs is not None:
            jac = jac[:, outs]
        return jac if self.entry_map is None else self.entry_map(jac)

    def entry(self, j: int, i: int) -> float:
        n = self.xh.shape[-1]
        if j // n != i // n:
            return 0.0
        jac = self.dense(torch.tensor([i // n], device=self.xh.device))
        return float(jac[0, i % n, j % n])


Kind = Pointwise | Reduction | IndexMap | MatMul | RowDense | LayerNormRow


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
