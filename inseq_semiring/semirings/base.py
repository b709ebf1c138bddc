"""What a semiring is to the traversal, and the pulls shared by semirings whose inner sum is ``+`` or ``max``.

A semiring object owns all arithmetic on its values (one value per node tensor; its layout is the semiring's
business). The traversal calls only::

    seed(root)                     the value of the root (the semiring's one)
    cast(value, dtype)             the value stored in another dtype (at precision boundaries)
    complete(value)                a node's value once all its consumers are in (default: as it is)
    pull(kind, value, origin)      the value an input receives through one edge kind (inner (+) over outputs)
    plus_within(a, b)              combine two pulls into the same input tensor inside one operator
    plus(a, b)                     combine the values coming from different consumer operators
    finalize(value, like)          the user-facing tensor (e.g. H = U/Z + log Z)

``pull`` dispatches on the kind's class name: a semiring implements ``pull_pointwise``, ``pull_reduction``,
``pull_indexmap``, ``pull_matmul`` and ``pull_rowdense``. The helpers below implement those pulls once for the
(+, x) case (:func:`linear_pull`) and the (max, x) case (:func:`max_pull`); semirings compose them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.maxtimes import max_times
from ..kernels.rowcore import core_pull_max, core_pull_sum
from ..rules import jacobians as _jacobians
from ..rules.jacobians import IndexMap, LayerNormRow, MatMul, Pointwise, Reduction, RowDense
from .weight_maps import (abs_and_neg_w_log_w, abs_weight, mapped_max_times, mapped_mm, mapped_mm_pair,  # noqa: F401
                          neg_w_log_w)

#: Target number of elements of a dense temporary (row-dense chunks, masked max products).
CHUNK_ELEMENTS = 1 << 22


class Semiring:
    name = "semiring"

    def pull(self, kind, value, origin):
        return getattr(self, "pull_" + type(kind).__name__.lower())(kind, value, origin)

    def plus_within(self, a, b):
        return self.plus(a, b)

    def complete(self, value):
        """A node's value once every consumer has contributed (e.g. the paper-mode maxpath sorts M+ and M-)."""
        return value

    def cast(self, value, dtype: torch.dtype):
        """The same value in another floating dtype (used where the graph changes precision)."""
        return value.to(dtype)


def skips_rows(t: Tensor) -> bool:
    """Whether a pull may skip the rows that carry nothing (:func:`~inseq_semiring.rules.jacobians.reads_on_host`)."""
    return _jacobians.reads_on_host(t)


def live_mask(t: Tensor, dim: int = -1) -> Tensor:
    """Which slices of ``t`` along ``dim`` hold a nonzero entry (NaN counts as nonzero), as ``(t != 0).any(dim)``:
    ``max != 0 or min != 0``, two reductions with small outputs (the comparison's full-size boolean temporary cost ~25x
    more on a 64 x 50257 LM-head value, most of it in fresh pages)."""
    if t.shape[dim] == 0:
        return torch.zeros(t.shape[:dim % t.dim()] + t.shape[dim % t.dim() + 1:], dtype=torch.bool, device=t.device)
    return (t.amax(dim) != 0) | (t.amin(dim) != 0)


#: Flat zero tensors of at least this many entries are made lazily on CPU (:func:`scatter_zeros`).
LAZY_ZERO_ELEMENTS = 1 << 17
_NUMPY_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16"}


def scatter_zeros(numel: int, like: Tensor) -> Tensor:
    """A flat zero tensor of ``like``'s dtype and device for a pull to scatter into. A large CPU one comes from
    ``calloc``'d memory (``numpy.zeros``): the operating system maps zero pages on first touch, so only the pages the
    scatter writes become resident and reading the rest costs no page faults. (A next-token root's pull into the
    [1, 256, 50257] logits writes one row: measured 2.6 ms with the mapped row check, against 38 ms when
    ``torch.zeros`` faults in and zeroes all 51 MB; two such tensors per entropy sweep.)"""
    name = _NUMPY_DTYPES.get(like.dtype)
    if numel < LAZY_ZERO_ELEMENTS or like.device.type != "cpu" or name is None:
        return like.new_zeros(numel)
    import numpy

    return torch.from_numpy(numpy.zeros(numel, dtype=name))


# -- shape helpers ----------------------------------------------------------------------------------------------

def _broadcast_dims(in_shape, out_shape) -> tuple[list[int], int]:
    """Dims of ``out_shape`` that ``in_shape`` was broadcast along, and the number of leading extra dims."""
    lead = len(out_shape) - len(in_shape)
    dims = list(range(lead))
    for d, size in enumerate(in_shape):
        if size == 1 and out_shape[lead + d] != 1:
            dims.append(lead + d)
    return dims, lead


def sum_to_shape(x: Tensor, shape) -> Tensor:
    """Sum a broadcast result back to the argument's shape (the (+) reduction of a broadcast)."""
    if tuple(x.shape) == tuple(shape):
        return x
    dims, lead = _broadcast_dims(shape, x.shape)
    out = x.sum(dim=dims, keepdim=True) if dims else x
    return out.reshape(shape) if lead or dims else out


def amax_to_shape(x: Tensor, shape, largest: bool = True, index: bool = True) -> tuple[Tensor, Tensor | None]:
    """Max (or min) of a broadcast result over the broadcast dims, with the flat index into ``x`` of the winner
    (None when ``index`` is False and no broadcast happened).

    Ties: the smallest flat index wins (``torch.max`` returns the first occurrence on CPU and CUDA for our layout,
    which we make explicit by reducing one flattened dim).
    """
    out_shape = x.shape
    if tuple(out_shape) == tuple(shape):
        return x, (_arange(x.numel(), x.device).reshape(out_shape) if index else None)
    flat_index = _arange(x.numel(), x.device).reshape(out_shape)
    dims, _ = _broadcast_dims(shape, out_shape)
    keep = [d for d in range(len(out_shape)) if d not in dims]
    perm = keep + dims
    xp = x.permute(perm).reshape(*[out_shape[d] for d in keep], -1)
    ip = flat_index.permute(perm).reshape(*[out_shape[d] for d in keep], -1)
    best, arg = _first_extreme(xp, largest)
    idx = ip.gather(-1, arg.unsqueeze(-1)).squeeze(-1)
    return best.reshape(shape), idx.reshape(shape)


def _first_extreme(x: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Max/min over the last dim; the first (smallest-index) position among ties, stated rather than assumed."""
    best = x.amax(-1) if largest else x.amin(-1)
    hit = x == best.unsqueeze(-1)
    n = x.shape[-1]
    pos = torch.where(hit, torch.arange(n, device=x.device), n).amin(-1)
    pos = pos.clamp(max=n - 1)  # all-NaN rows: index 0 (NaN inputs are rejected upstream)
    return best, pos


# -- (+, x) pulls -----------------------------------------------------------------------------------------------

def linear_pull(kind, a: Tensor) -> Tensor:
    """``a'_j = sum_i a_i J[i, j]`` for any kind, with the kind's weights as they are."""
    if isinstance(kind, Pointwise):
        return sum_to_shape(a * kind.weight, kind.in_shape)
    if isinstance(kind, Reduction):
        return kind.expand_out(a) * kind.weight
    if isinstance(kind, IndexMap):
        if kind.identity:
            return a.reshape(kind.in_shape) * kind.weight if kind.weight != 1 else a.reshape(kind.in_shape)
        if kind.adjoint is not None and kind.weight != 0 and a.dim() == kind.index.dim():  # a bijection: a view
            out = kind.adjoint(a)
            return out * kind.weight if kind.weight != 1 else out
        out = scatter_zeros(_numel(kind.in_shape), a)
        if kind.weight != 0:
            index, src = kind.index.reshape(-1), a.reshape(-1)
            if not kind.all_valid:
                if not skips_rows(a):  # no host read: the missing entries add a zero to position 0
                    valid = index >= 0
                    index, src = index.clamp(min=0), src.masked_fill(~valid, 0)
                    out.index_add_(0, index, src)
                    return (out * kind.weight if kind.weight != 1 else out).reshape(kind.in_shape)
                entries = _valid_entries(kind.index)
                if entries is not None:
                    pos, index = entries
                    src = src[pos]
            if kind.injective:  # distinct positions: a scatter into zeros is the sum (0 + x = x)
                out.scatter_(0, index, src)
            else:
                out.index_add_(0, index, src)
            if kind.weight != 1:
                out = out * kind.weight
        return out.reshape(kind.in_shape)
    if isinstance(kind, MatMul):
        return _matmul_linear(kind, a)
    if isinstance(kind, RowDense):
        if kind.entry_map in (abs_weight, neg_w_log_w) and kind.u.shape[0] == 1:
            return _rank1_scaled(RowDense(kind.d, kind.u, kind.v), a, None, kind.entry_map)[0]
        return _rowdense_linear(kind, a)
    if isinstance(kind, LayerNormRow):
        if kind.entry_map is None:  # c = a * gain;  a'_j = c_j - (sum c + xh_j sum c xh) / n
            c = a * kind.gain
            n = c.shape[-1]
            return c - (c.sum(-1, keepdim=True) + kind.xh * (c * kind.xh).sum(-1, keepdim=True)) / n
        return scaled_pulls(LayerNormRow(kind.gain, kind.xh), a, None, kind.entry_map)[0]
    raise TypeError(f"unknown Jacobian kind {type(kind).__name__}")


def scaled_pulls(kind, z: Tensor, u: Tensor | None, only=None) -> tuple[Tensor, Tensor | None]:
    """The expectation-semiring pull through ``kind``: ``z' = z |J|`` and ``u' = u |J| + z (-|J| log |J|)``.

    Row-dense kinds are done without the dense Jacobian where its structure allows (rank-1 rows: O(n)) and with one
    shared dense core per row otherwise (layer norm). ``only``: compute just ``z (only(J))`` (one weight map).
    """
    if isinstance(kind, RowDense) and kind.entry_map is None and kind.u.shape[0] == 1:
        return _rank1_scaled(kind, z, u, only)
    if isinstance(kind, LayerNormRow) and kind.entry_map is None:
        return _layernorm_scaled(kind, z, u, only)
    if isinstance(kind, MatMul) and u is not None and only is None:
        return _matmul_scaled(kind, z, u)
    if only is not None:
        return linear_pull(kind.map_weights(only), z), None
    k_abs = kind.map_weights(abs_weight)
    z2 = linear_pull(k_abs, z)
    u2 = None if u is None else linear_pull(k_abs, u) + linear_pull(kind.map_weights(neg_w_log_w), z)
    return z2, u2


def _matmul_scaled(kind: MatMul, z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``[z; u] |W|`` as one product (twice the rows, one pass over ``|W|``), plus ``z (-|W| log|W|)``; a constant
    ``W`` is mapped block by block (:func:`~inseq_semiring.semirings.weight_maps.mapped_mm_pair`)."""
    kind = kind.mapped()
    if not kind.blockwise and not kind.static and kind.mat_shapes is None and kind.weight.dim() >= 2:
        return _dynamic_matmul_scaled(kind, z, u)
    k_abs, k_nlogn = kind.map_weights(abs_weight), kind.map_weights(neg_w_log_w)
    if not kind.blockwise:
        z2 = linear_pull(k_abs, z)
        return z2, linear_pull(k_abs, u) + linear_pull(k_nlogn, z)
    n, k = kind.weight.shape
    zf, uf = z.reshape(-1, n), u.reshape(-1, n)
    rows = live_mask(zf) | live_mask(uf) if skips_rows(z) else None
    n_active = int(rows.sum()) if rows is not None else zf.shape[0]
    shape = (*z.shape[:-1], k)
    if n_active == zf.shape[0] and n_active:  # every row: the products are the results
        if k_abs.entry_map is not None:
            both, nlogn = mapped_mm_pair(torch.cat([zf, uf]), zf, kind.weight)
        else:
            both, nlogn = torch.cat([zf, uf]) @ k_abs.weight, zf @ k_nlogn.weight
        return both[:n_active].reshape(shape), (both[n_active:] + nlogn).reshape(shape)
    out_z = z.new_zeros(zf.shape[0], k)
    out_u = torch.zeros_like(out_z)
    if n_active:
        sel = slice(None) if n_active == zf.shape[0] else rows
        za, ua = zf[sel], uf[sel]
        if k_abs.entry_map is not None:  # lazily mapped constant weight
            both, nlogn = mapped_mm_pair(torch.cat([za, ua]), za, kind.weight)
        else:
            both, nlogn = torch.cat([za, ua]) @ k_abs.weight, za @ k_nlogn.weight
        out_z[sel] = both[:za.shape[0]]
        out_u[sel] = both[za.shape[0]:] + nlogn
    return out_z.reshape(shape), out_u.reshape(shape)


def _dynamic_matmul_scaled(kind: MatMul, z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """A (batched) product with a computed factor (attention's ``q k^T`` and ``p v``): both maps of the weight in
    one pass; ``z |W|``, ``u |W|`` and ``z (-|W| log|W|)`` as three products, the last accumulated into the second
    (``baddbmm_``), so that both results are fresh tensors the renormalisation may scale in place. (Stacking
    ``[z; u]`` into one batched product saved ~3% of it and cost a copy of both.)"""
    mag, nlogn = abs_and_neg_w_log_w(kind.weight)
    if kind.left:  # a' = a @ W
        z2, u2 = z @ mag, u @ mag
        pair = (z, nlogn)
    else:  # a' = W @ a
        z2, u2 = mag @ z, mag @ u
        pair = (nlogn, z)
    if u2.dim() == 3 and all(t.dim() == 3 and t.shape[0] == u2.shape[0] for t in pair) and u2._base is None:
        u2.baddbmm_(*pair)
    else:
        u2 = u2 + pair[0] @ pair[1]
    shape = kind.in_shape
    return (z2 if z2.shape == shape else z2.reshape(shape)), (u2 if u2.shape == shape else u2.reshape(shape))


def _matmul_linear(kind: MatMul, a: Tensor) -> Tensor:
    """``a @ weight`` (left factor) or ``weight @ a`` (right factor); rows of ``a`` that carry nothing are skipped
    (e.g. all positions but the last under an LM-head root); a lazily mapped weight is mapped block by block."""
    if not kind.blockwise:
        kind = kind.mapped()
        if kind.left:
            return a @ kind.weight
        return (kind.weight @ a.reshape(kind.mat_out)).reshape(kind.in_shape)
    n, k = kind.weight.shape
    if kind.entry_map is None:
        product = lambda x: x @ kind.weight  # noqa: E731
    else:
        product = lambda x: mapped_mm(x, kind.weight, kind.entry_map)  # noqa: E731
    return _active_rows(a.reshape(-1, n), product, k).reshape(*a.shape[:-1], k)


def _active_rows(rows: Tensor, product, width: int) -> Tensor:
    if not skips_rows(rows):
        return product(rows)
    active = live_mask(rows)
    n_active = int(active.sum())
    if n_active == rows.shape[0]:
        return product(rows)
    out = rows.new_zeros(rows.shape[0], width)
    if n_active:
        out[active] = product(rows[active])
    return out


def _rank1_scaled(kind: RowDense, z, u, only):
    """``J = diag(d) + u v^T``: off the diagonal ``f(u_i v_j)`` separates for ``f = |.|`` and ``f = -|.| log |.|``."""
    uu, vv, d = kind.u[0], kind.v[0], kind.d
    au, av = uu.abs(), vv.abs()
    diag = d + uu * vv

    def pull(a, f):
        if f is abs_weight:
            terms, dg = [(au, av)], diag.abs()
        elif f is neg_w_log_w:
            terms, dg = [(neg_w_log_w(uu), av), (au, neg_w_log_w(vv))], neg_w_log_w(diag)
        else:
            return linear_pull(kind.map_weights(f), a)
        out = a * dg
        for left, right in terms:
            out = out + right * ((a * left).sum(-1, keepdim=True) - a * left)
        return out

    if only is not None:
        return pull(z, only), None
    z2 = pull(z, abs_weight)
    u2 = None if u is None else pull(u, abs_weight) + pull(z, neg_w_log_w)
    return z2, u2


def _layernorm_scaled(kind: LayerNormRow, z, u, only):
    """``|J_ij| = |gain_i| A_ij`` and ``-|J| log|J| = |gain_i| B_ij + (-|gain_i| log|gain_i|) A_ij`` with
    ``A = |C|``, ``B = -A log A`` (:mod:`~inseq_semiring.kernels.rowcore` walks each row's pairs once)."""
    g = kind.gain
    p = z * g.abs()  # z |gain|
    if only is abs_weight:
        return core_pull_sum(kind.xh, p)[0], None
    if only is neg_w_log_w:
        za, ub = core_pull_sum(kind.xh, z * neg_w_log_w(g), pb=p)
        return za + ub, None
    if only is not None:
        return linear_pull(LayerNormRow(kind.gain, kind.xh).map_weights(only), z), None
    if u is None:
        return core_pull_sum(kind.xh, p)[0], None
    return core_pull_sum(kind.xh, p, u * g.abs() + z * neg_w_log_w(g), pb=p)


def _rowdense_linear(kind: RowDense, a: Tensor) -> Tensor:
    if kind.entry_map is None:  # diag + low rank, O(n r) per row
        s = (a.unsqueeze(0) * kind.u).sum(-1, keepdim=True)  # [r, *rows, 1]
        return a * kind.d + (s * kind.v).sum(0)
    n = kind.in_shape[-1]
    flat = a.reshape(-1, n)
    out = torch.zeros_like(flat)
    rows = _live_rows(flat)
    for sel, outs, jac in _dense_chunks(kind, flat, rows):
        out[sel] = torch.bmm(flat[sel][:, outs].unsqueeze(1), jac).squeeze(1)
    return out.reshape(a.shape)


# -- (max, x) pulls on non-negative values --------------------------------------------------------------------

def max_pull(kind, a: Tensor, index: bool = True) -> tuple[Tensor, Tensor | None]:
    """``a'_j = max_i a_i J[i, j]`` and the flat output index ``i*`` of the winner (values and weights >= 0 are
    expected: the caller maps weights to ``|w|``). Ties: the smallest output index. ``index=False``: the index may
    be None (skipped where it costs extra work)."""
    if isinstance(kind, Pointwise):
        return amax_to_shape(a * kind.weight, kind.in_shape, index=index)
    if isinstance(kind, Reduction):
        return kind.expand_out(a) * kind.weight, (kind.out_index().to(a.device) if index else None)
    if isinstance(kind, IndexMap):
        return _scatter_max(kind, a * kind.weight if kind.weight != 1 else a, index=index)
    if isinstance(kind, MatMul):
        return _matmul_max(kind, a, index)
    if isinstance(kind, RowDense):
        if kind.u.shape[0] == 1 and kind.entry_map is abs_weight:
            return _rank1_max(kind, a, index)
        return _rowdense_max(kind, a)
    if isinstance(kind, LayerNormRow):
        return _layernorm_max(kind, a, index)
    raise TypeError(f"unknown Jacobian kind {type(kind).__name__}")


def _rank1_max(kind: RowDense, a: Tensor, index: bool = True) -> tuple[Tensor, Tensor | None]:
    """``max_i a_i |J_ij|`` for ``J = diag(d) + u v^T`` in O(n): the best and second-best ``a_i |u_i|``.
    ``index=False``: the values alone (the same: among equal candidates the choice does not change the value)."""
    uu, vv = kind.u[0], kind.v[0]
    n = a.shape[-1]
    t = a * uu.abs()
    best1, arg1 = _first_extreme(t, True)
    masked = t.scatter(-1, arg1.unsqueeze(-1), float("-inf"))
    pos = torch.arange(n, device=a.device)
    is1 = pos == arg1.unsqueeze(-1)
    if not index:
        off_val = torch.where(is1, masked.amax(-1).unsqueeze(-1), best1.unsqueeze(-1)) * vv.abs()
        if n == 1:
            off_val = torch.full_like(a, float("-inf"))
        diag_val = a * (kind.d + uu * vv).abs()
        return torch.where(diag_val > off_val, diag_val, off_val), None
    best2, arg2 = _first_extreme(masked, True)
    off_val = torch.where(is1, best2.unsqueeze(-1), best1.unsqueeze(-1)) * vv.abs()
    off_arg = torch.where(is1, arg2.unsqueeze(-1), arg1.unsqueeze(-1))
    if n == 1:
        off_val = torch.full_like(a, float("-inf"))
    diag_val = a * (kind.d + uu * vv).abs()
    take_diag = (diag_val > off_val) | ((diag_val == off_val) & (pos < off_arg))
    best = torch.where(take_diag, diag_val, off_val)
    arg = torch.where(take_diag, pos.expand_as(off_arg), off_arg)
    rows = torch.arange(a.numel() // n, device=a.device).reshape(a.shape[:-1]).unsqueeze(-1)
    return best, rows * n + arg


def _layernorm_max(kind: LayerNormRow, a: Tensor, index: bool = True) -> tuple[Tensor, Tensor | None]:
    """``max_i a_i |gain_i| |C_ij|`` (:func:`~inseq_semiring.kernels.rowcore.core_pull_max`; no index work unless
    ``index``)."""
    if kind.entry_map is not abs_weight:
        return _rowdense_max(kind, a)
    n = kind.xh.shape[-1]
    vals, pos = core_pull_max(kind.xh, a * kind.gain.abs(), index=index)
    if pos is None:
        return vals, None
    rows = torch.arange(a.numel() // n, device=a.device).reshape(a.shape[:-1]).unsqueeze(-1)
    return vals, rows * n + pos


def _scatter_max(kind: IndexMap, a: Tensor, largest: bool = True, empty: float = 0.0,
                 index: bool = True) -> tuple[Tensor, Tensor | None]:
    n_in = _numel(kind.in_shape)
    if kind.identity:
        return a.reshape(kind.in_shape), (_arange(a.numel(), a.device).reshape(kind.in_shape) if index else None)
    if kind.adjoint is not None and a.dim() == kind.index.dim():  # a bijection: every input gets its one copy
        return kind.adjoint(a), (kind.adjoint(_arange(a.numel(), a.device).reshape(a.shape)) if index else None)
    where = kind.index.reshape(-1)
    src = a.reshape(-1)
    if not skips_rows(a):  # off the CPU: no host read of the index (same maxima and winners)
        return _scatter_max_dense(kind, src, where, torch.arange(a.numel(), device=a.device), n_in, largest, empty,
                                  index)
    out_pos = None  # the flat output positions of ``where`` (arange unless invalid entries were dropped)
    if not kind.all_valid:  # the structural rule says when no entry is -1 (then no check, no sync)
        entries = _valid_entries(kind.index)
        if entries is not None:
            out_pos, where = entries
            src = src[out_pos]
    best = a.new_full((n_in,), empty)
    if kind.injective:  # one candidate per input element at most: a scatter, no max
        best.scatter_(0, where, src)
    else:
        best.scatter_reduce_(0, where, src, reduce="amax" if largest else "amin", include_self=False)
    if not index:
        return best.reshape(kind.in_shape), None
    if out_pos is None:
        out_pos = torch.arange(a.numel(), device=a.device)
    arg = torch.full((n_in,), -1, dtype=torch.long, device=a.device)
    if kind.injective:
        arg[where] = out_pos
        return best.reshape(kind.in_shape), arg.reshape(kind.in_shape)
    win = src == best[where]
    if win.any():
        fill = torch.full((n_in,), src.numel(), dtype=torch.long, device=a.device)
        fill.scatter_reduce_(0, where[win], out_pos[win], reduce="amin", include_self=True)
        arg = torch.where(fill < src.numel(), fill, arg)
    return best.reshape(kind.in_shape), arg.reshape(kind.in_shape)


def _scatter_max_dense(kind: IndexMap, src, where, out_pos, n_in: int, largest: bool, empty: float,
                       index: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`_scatter_max` without host reads: entries with no input (``-1``) go to one extra slot ``n_in``,
    dropped at the end; the same maxima and winners (smallest output index among ties)."""
    where = torch.where(where >= 0, where, n_in)
    best = src.new_full((n_in + 1,), empty)
    if kind.injective:
        best.scatter_(0, where, src)  # distinct valid positions; the extra slot takes whatever comes last
    else:
        best.scatter_reduce_(0, where, src, reduce="amax" if largest else "amin", include_self=False)
    if not index:
        return best[:n_in].reshape(kind.in_shape), None
    if kind.injective:
        arg = torch.full((n_in + 1,), -1, dtype=torch.long, device=src.device).scatter_(0, where, out_pos)
        return best[:n_in].reshape(kind.in_shape), arg[:n_in].reshape(kind.in_shape)
    none = src.numel()
    candidates = torch.where(src == best[where], out_pos, none)
    fill = torch.full((n_in + 1,), none, dtype=torch.long, device=src.device)
    fill.scatter_reduce_(0, where, candidates, reduce="amin", include_self=True)
    arg = torch.where(fill < none, fill, -1)
    return best[:n_in].reshape(kind.in_shape), arg[:n_in].reshape(kind.in_shape)


def _matmul_max(kind: MatMul, a: Tensor, index: bool = True) -> tuple[Tensor, Tensor | None]:
    if not kind.blockwise:
        kind = kind.mapped()
    w, (m, n) = kind.weight, kind.mat_out[-2:]
    if kind.left and w.dim() == 2:  # shared weight: every leading row is independent
        rows = a.reshape(-1, n)
        vals, col = _rows_active_max(rows, w, kind.entry_map, index)
        if not index:
            return vals.reshape(kind.in_shape), None
        idx = torch.arange(rows.shape[0], device=a.device).unsqueeze(-1) * n + col
        return vals.reshape(kind.in_shape), idx.reshape(kind.in_shape)
    a3 = a.reshape(-1, m, n)
    w3 = w.reshape(-1, *w.shape[-2:]).expand(a3.shape[0], -1, -1) if w.dim() > 2 else w.expand(a3.shape[0], -1, -1)
    if not index:
        vals = max_times(a3, w3) if kind.left else max_times(w3, a3)
        return vals.reshape(kind.in_shape), None
    b = torch.arange(a3.shape[0], device=a.device).view(-1, 1, 1)
    if kind.left:  # a' [B, m, k] = max_c a[B, m, c] w[B, c, k]
        vals, col = max_times(a3, w3, argmax=True)
        idx = (b * m + torch.arange(m, device=a.device).view(1, -1, 1)) * n + col
    else:  # a' [B, k, n] = max_r w[B, k, r] a[B, r, n]
        vals, row = max_times(w3, a3, argmax=True)
        idx = (b * m + row) * n + torch.arange(n, device=a.device).view(1, 1, -1)
    return vals.reshape(kind.in_shape), idx.reshape(kind.in_shape)


def _rows_active_max(a: Tensor, w: Tensor, entry_map=None, index: bool = True) -> tuple[Tensor, Tensor | None]:
    """2-D max-times (with ``entry_map(w)`` done block by block if given) that skips rows of ``a`` that are
    entirely zero; the winning column index too when ``index``."""
    def product(x):
        if entry_map is not None:
            return mapped_max_times(x, w, entry_map, argmax=index)
        return max_times(x, w, argmax=True) if index else (max_times(x, w), None)

    if not skips_rows(a):  # off the CPU: no host read of the live-row count (a zero row gives 0 and argmax 0 here too)
        return product(a)
    rows = live_mask(a)
    n_active = int(rows.sum())
    if n_active == a.shape[0]:
        return product(a)
    vals = a.new_zeros(a.shape[0], w.shape[-1])
    arg = torch.zeros(a.shape[0], w.shape[-1], dtype=torch.long, device=a.device) if index else None
    if n_active:
        v, i = product(a[rows])
        vals[rows] = v
        if index:
            arg[rows] = i
    return vals, arg


def _rowdense_max(kind: RowDense, a: Tensor) -> tuple[Tensor, Tensor]:
    n = kind.in_shape[-1]
    flat = a.reshape(-1, n)
    out = torch.zeros_like(flat)
    row_of = torch.arange(flat.shape[0], device=a.device).unsqueeze(-1) * n
    arg = (row_of + torch.arange(n, device=a.device)).clone()  # default: the diagonal edge
    rows = _live_rows(flat)
    for sel, outs, jac in _dense_chunks(kind, flat, rows):
        cand = flat[sel][:, outs].unsqueeze(-1) * jac  # [c, k, n]
        best, pos = _first_extreme(cand.transpose(1, 2), True)  # over outputs
        out[sel] = best
        arg[sel] = sel.unsqueeze(-1) * n + outs[pos]
    return out.reshape(a.shape), arg.reshape(a.shape)


def _dense_chunks(kind: RowDense, flat: Tensor, rows: Tensor):
    """Yield (rows, active output positions, mapped dense Jacobian [c, k, n]) in bounded chunks."""
    n = flat.shape[-1]
    if rows.numel() == 0:
        return
    if skips_rows(flat):
        active_cols = live_mask(flat[rows], 0).nonzero().flatten()
        k = active_cols.numel()
    else:  # every output position (no host read of which are live)
        active_cols, k = None, n
    outs = active_cols if k < n else torch.arange(n, device=flat.device)
    step = max(1, CHUNK_ELEMENTS // max(1, outs.numel() * n))
    for start in range(0, rows.numel(), step):
        sel = rows[start:start + step]
        yield sel, outs, kind.dense(sel, outs if k < n else None)


def _live_rows(flat: Tensor) -> Tensor:
    """Indices of the rows that carry a value (all rows where :func:`skips_rows` is False)."""
    if skips_rows(flat):
        return live_mask(flat).nonzero().flatten()
    return torch.arange(flat.shape[0], device=flat.device)


def _valid_entries(index: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(positions, targets)`` of the entries of a flat index map that have an input (not ``-1``), in order, or
    None when all do; made once per sweep and map (the sweep's memo holds the map, so its ``id`` stays its own).
    CPU only (it reads the count on the host)."""
    from ..rules.weight_cache import sweep_memo

    memo = sweep_memo()
    key = ("valid entries", id(index))
    hit = None if memo is None else memo.get(key)
    if hit is not None and hit[0] is index:
        return hit[1]
    flat = index.reshape(-1)
    valid = flat >= 0
    entries = None
    if not bool(valid.all()):
        pos = valid.nonzero().flatten()
        entries = (pos, flat[pos])
    if memo is not None:
        memo[key] = (index, entries)
    return entries


def _arange(n: int, device) -> Tensor:
    """``torch.arange(n)``, made once per sweep and size (the sweep's memo); callers never write into it."""
    from ..rules.weight_cache import sweep_memo

    memo = sweep_memo()
    if memo is None:
        return torch.arange(n, device=device)
    key = ("arange", n, device)
    out = memo.get(key)
    if out is None:
        out = memo[key] = torch.arange(n, device=device)
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
