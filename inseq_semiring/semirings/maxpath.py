"""Highest-weighted gradient path: the (max, x) semiring, absolute or signed, at scalar or tensor granularity.

* ``sign="abs"`` (default): ``M(u) = max over out-edges u->v of |w| M(v)``, ``M(root) = 1``: the largest ``|prod w|``
  over the paths from ``u`` to the root. Values are >= 0 and 0 is the semiring zero.
* ``sign="positive"`` / ``"negative"``: track the largest (``M+``) and smallest (``M-``) *signed* path product;
  an edge ``w`` offers ``w M+(v)`` and ``w M-(v)`` to both (so negative edges swap them), every structural edge
  offers its candidate even when ``w = 0``; elements with no path to the root are absent (-inf / +inf).
  ``finalize`` returns ``M+`` for "positive" and ``M-`` for "negative".
* ``granularity="tensor"``: the paper's semantics (on the paper's operator graph, ``decomposition="paper"``, it equals
  the paper's library). Inside an operator the candidates are *summed* (an ordinary
  vector-Jacobian product of ``M+`` and ``M-``, then ``M+ = max``, ``M- = min`` of the two); only where a tensor
  fans out to several consumer operators is the max taken. Absent values are 0 there, as in a plain VJP.

Values are kept as ``m * exp(log_scale)`` with a per-tensor scale (max-times is scale-equivariant).

Back-pointers (``backpointers=True``): for every element, the edge its best value came through, as two integer
tensors: ``code = record << 20 | output slot << 10 | argument leaf`` and the flat index of the output element
(scalar granularity; -1 at tensor granularity, where only the winning consumer is kept; -1 code: no path). At
scalar granularity the sweep leaves the pointers of absent elements unset (a pull's kernel index, a merge's loser)
and :meth:`MaxValue.pointers` masks them when read: an element is absent exactly where its value is (``M <= 0``;
signed: ``M+ = -inf``, ``M- = +inf``), since a merge keeps a present candidate over an absent one.
Tie rule, stated once: inside an operator the smallest output flat index wins; across consumer operators the
value accumulated first wins, i.e. the consumer that ran *last* in the forward pass; ``M+`` over ``M-`` candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..kernels.maxtimes import max_min_pair, max_times
from ..rules import jacobians as _jacobians
from ..rules.jacobians import IndexMap, LayerNormRow, MatMul, Pointwise, Reduction, RowDense
from .base import Semiring, _dense_chunks, _first_extreme, _scatter_max, amax_to_shape, linear_pull, max_pull
from .base import abs_weight
from .signed_rows import fast_signed_rowdense

SIGNS = ("abs", "positive", "negative")
GRANULARITIES = ("scalar", "tensor")
NO_PATH = -1


def encode_origin(origin: tuple[int, int, int]) -> int:
    rec, out, leaf = origin
    return (rec << 20) | (out << 10) | leaf


def decode_origin(code: int) -> tuple[int, int, int]:
    return code >> 20, (code >> 10) & 1023, code & 1023


@dataclass(frozen=True)
class MaxValue:
    hi: Tensor
    lo: Tensor | None
    log_scale: Tensor
    hi_src: tuple[Tensor, Tensor] | None = None
    lo_src: tuple[Tensor, Tensor] | None = None
    raw: bool = False  # tensor granularity: an un-swapped VJP sum
    masked: bool = True  # back-pointers hold NO_PATH where the value is absent (False: set there only when read)

    def pointers(self, side: str = "hi") -> tuple[Tensor, Tensor] | None:
        """The back-pointers ``(code, index)`` of ``M+`` (``side="hi"``) or ``M-`` (``"lo"``), ``NO_PATH`` where
        the element is absent (abs: ``M <= 0``; signed: ``M+ = -inf``, ``M- = +inf``)."""
        src = self.hi_src if side == "hi" else self.lo_src
        if src is None or self.masked:
            return src
        m = self.hi if side == "hi" else self.lo
        absent = (m <= 0) if self.lo is None else (torch.isneginf(m) if side == "hi" else torch.isposinf(m))
        return torch.where(absent, NO_PATH, src[0]), torch.where(absent, NO_PATH, src[1])


class MaxPath(Semiring):
    name = "maxpath"

    def __init__(self, sign: str = "abs", granularity: str = "scalar", backpointers: bool = False):
        if sign not in SIGNS:
            raise InvalidInputError(f"sign={sign!r} is not one of {SIGNS}", where="maxpath semiring",
                                    fix="pass sign='abs', 'positive' or 'negative'")
        if granularity not in GRANULARITIES:
            raise InvalidInputError(f"granularity={granularity!r} is not one of {GRANULARITIES}",
                                    where="maxpath semiring", fix="pass granularity='scalar' or 'tensor'")
        self.sign, self.granularity, self.backpointers = sign, granularity, backpointers
        self.signed = sign != "abs"
        self.scalar = granularity == "scalar"

    # -- seeds, finalisation ----------------------------------------------------------------------------------
    def seed(self, root: Tensor) -> MaxValue:
        one = torch.ones_like(root)
        zero = torch.zeros((), dtype=torch.float64, device=root.device)
        src = (torch.full(root.shape, NO_PATH, dtype=torch.long, device=root.device),) * 2 if self.backpointers else None
        return MaxValue(one, one.clone() if self.signed else None, zero, src, src if self.signed else None)

    def finalize(self, value: MaxValue | None, like: Tensor) -> Tensor:
        if value is None:
            return torch.zeros_like(like)
        value = self._settle(value)
        m = value.lo if self.sign == "negative" else value.hi
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no path: 0
        return (m.double() * torch.exp(value.log_scale)).to(like.dtype)

    # -- the traversal's interface ----------------------------------------------------------------------------
    def pull(self, kind, value: MaxValue, origin) -> MaxValue:
        value = self._settle(value)
        if not self.scalar:
            return self._pull_vjp(kind, value, origin)
        if not self.signed:
            m, idx = max_pull(kind.map_weights(abs_weight), value.hi, index=self.backpointers)
            return self._make(m, None, value.log_scale, idx, None, origin, _keeps_scale(kind))
        hi, hi_idx, lo, lo_idx = _signed_pull(kind, value.hi, value.lo, index=self.backpointers)
        return self._make(hi, lo, value.log_scale, hi_idx, lo_idx, origin, _keeps_scale(kind))

    def complete(self, value: MaxValue) -> MaxValue:
        return self._settle(value)

    def cast(self, value: MaxValue, dtype: torch.dtype) -> MaxValue:
        return replace(value, hi=value.hi.to(dtype), lo=None if value.lo is None else value.lo.to(dtype))

    def plus_within(self, a: MaxValue, b: MaxValue) -> MaxValue:
        if self.scalar:
            return self.plus(a, b)
        fa, fb, top = _align(a, b)  # tensor granularity: the VJP sums inside an operator
        lo = _times(a.lo, fa) + _times(b.lo, fb) if self.signed else None
        return replace(a, hi=_times(a.hi, fa) + _times(b.hi, fb), lo=lo, log_scale=top)

    def plus(self, a: MaxValue, b: MaxValue) -> MaxValue:
        """The elementwise max (and min) of two values on a common scale. Not renormalised: when both values are
        (largest magnitude 1), the one holding the larger scale keeps its entries exactly (factor ``exp(0)``) and the
        other's shrink, so the result is too (and otherwise a value need not be: the next pull renormalises)."""
        a, b = self._settle(a), self._settle(b)
        fa, fb, top = _align(a, b)
        ah, bh = _times(a.hi, fa), _times(b.hi, fb)
        if not self.backpointers:  # the same values, no masks
            return MaxValue(torch.maximum(ah, bh),
                            torch.minimum(_times(a.lo, fa), _times(b.lo, fb)) if self.signed else None, top)
        take_b = bh > ah
        hi = torch.where(take_b, bh, ah)
        hi_src = _select_src(take_b, b.hi_src, a.hi_src)
        lo = lo_src = None
        if self.signed:
            al, bl = _times(a.lo, fa), _times(b.lo, fb)
            take_b_lo = bl < al
            lo = torch.where(take_b_lo, bl, al)
            lo_src = _select_src(take_b_lo, b.lo_src, a.lo_src)
        return MaxValue(hi, lo, top, hi_src, lo_src, masked=a.masked and b.masked)

    # -- internals --------------------------------------------------------------------------------------------
    def _make(self, hi, lo, log_scale, hi_idx, lo_idx, origin, keeps_scale: bool = False) -> MaxValue:
        """The pulled value (``keeps_scale``: the pull only moved entries, so it is still normalised)."""
        hi_src = lo_src = None
        if self.backpointers:
            code = encode_origin(origin)
            hi_src = _src(code, hi_idx)
            if self.signed:
                lo_src = _src(code, lo_idx)
        value = MaxValue(hi, lo, log_scale, hi_src, lo_src, masked=not self.backpointers)
        return value if keeps_scale else _renormalise(value)

    def _pull_vjp(self, kind, value: MaxValue, origin) -> MaxValue:
        k = kind if self.signed else kind.map_weights(abs_weight)
        hi = linear_pull(k, value.hi)
        lo = linear_pull(k, value.lo) if self.signed else None
        src = None
        if self.backpointers:
            code = torch.full(hi.shape, encode_origin(origin), dtype=torch.long, device=hi.device)
            src = (code, torch.full_like(code, NO_PATH))
        return MaxValue(hi, lo, value.log_scale, src, src if self.signed else None, raw=True)

    def _settle(self, v: MaxValue) -> MaxValue:
        """Tensor granularity: turn a summed (raw) VJP pair into ``M+ = max``, ``M- = min``."""
        if not v.raw:
            return v
        if not self.signed:
            return _renormalise(replace(v, raw=False))
        hi, lo = torch.maximum(v.hi, v.lo), torch.minimum(v.hi, v.lo)
        return _renormalise(MaxValue(hi, lo, v.log_scale, v.hi_src, v.lo_src, raw=False, masked=v.masked))


def _src(code: int, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Back-pointers of a pull, ``(code, idx)`` as int64, unmasked (see :meth:`MaxValue.pointers`)."""
    idx = idx.to(torch.long)
    return torch.full_like(idx, code), idx


def _keeps_scale(kind) -> bool:
    """Whether a pull through ``kind`` only moves entries, each output entry to one input entry, with weight 1
    (an identity reshape, or an injective index map without missing entries): then the pulled value holds exactly
    the output value's entries (plus empty ones: 0, or absent in the signed modes), so its largest magnitude is
    the output's and renormalising it again would divide by 1 (every value is normalised once pulled or summed)."""
    return isinstance(kind, IndexMap) and kind.weight == 1 and (kind.identity or (kind.injective and kind.all_valid))


def _select_src(take_b, b, a):
    if a is None or b is None:
        return None
    return torch.where(take_b, b[0], a[0]), torch.where(take_b, b[1], a[1])


def _align(a: MaxValue, b: MaxValue):
    """``(exp(la - top), exp(lb - top), top)``, ``top = max(la, lb)``; on the CPU (scales read as numbers) the side
    that holds ``top`` gets the number 1 (``exp(0)``), which callers skip multiplying by."""
    if _jacobians.reads_on_host(a.log_scale):
        la, lb = float(a.log_scale), float(b.log_scale)
        if la == la and lb == lb:  # no NaN scale
            if la >= lb:
                return 1.0, (1.0 if la == lb else torch.exp(b.log_scale - a.log_scale).to(b.hi.dtype)), a.log_scale
            return torch.exp(a.log_scale - b.log_scale).to(a.hi.dtype), 1.0, b.log_scale
    top = torch.maximum(a.log_scale, b.log_scale)
    return torch.exp(a.log_scale - top).to(a.hi.dtype), torch.exp(b.log_scale - top).to(b.hi.dtype), top


def _times(x: Tensor, f) -> Tensor:
    """``x * f`` (``f`` the number 1: ``x`` itself, the same values)."""
    return x if isinstance(f, float) and f == 1.0 else x * f


def _renormalise(v: MaxValue) -> MaxValue:
    """Divide by the largest finite magnitude (folded into ``log_scale``). On the CPU the magnitude is read as a
    number first, and a largest magnitude of exactly 1 (or none) costs nothing more."""
    if _jacobians.reads_on_host(v.hi):
        if v.lo is None:
            if not v.hi.numel():
                return v
            m = v.hi.amax()
            mf = float(m)
            if not (0 < mf < math.inf) or mf == 1.0:  # (NaN fails the first test)
                return v
        else:
            m = _largest_magnitude(v.hi, v.lo)
            mf = float(m)
            if not mf > 0 or mf == 1.0:
                return v
        return replace(v, hi=v.hi / m, lo=None if v.lo is None else v.lo / m,
                       log_scale=v.log_scale + torch.log(m.double()))
    if v.lo is None:  # abs mode: values >= 0, absent = 0; an inf (an infinite local weight) is left unscaled
        m = v.hi.amax() if v.hi.numel() else v.hi.new_zeros(())
        m = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
        return replace(v, hi=v.hi / m, log_scale=v.log_scale + torch.log(m.double()))
    m = _largest_magnitude(v.hi, v.lo)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return replace(v, hi=v.hi / m, lo=None if v.lo is None else v.lo / m, log_scale=v.log_scale + torch.log(m.double()))


def _largest_magnitude(hi: Tensor, lo: Tensor) -> Tensor:
    """The largest finite ``|M+|``, ``|M-|`` (0 if none). Where both are finite ``M+ >= M-``, so their larger
    magnitude is ``max(M+, -M-)``, and an absent pair (-inf, +inf) offers -inf: two reductions, no masks. Only a
    genuinely infinite value (an infinite local weight) needs the masked form."""
    if not hi.numel():
        return hi.new_zeros(())
    if not _jacobians.reads_on_host(hi):  # off the CPU: the masked form, which equals the fast one wherever that applies
        return torch.stack([x.masked_fill(~torch.isfinite(x), 0).abs().amax() for x in (hi, lo)]).amax()
    top, bottom = hi.amax(), lo.amin()  # the two extremes as numbers: the larger one is the tensor to divide by
    th, tl = float(top), -float(bottom)
    if math.isfinite(th) and math.isfinite(tl):
        return top if th >= tl else -bottom
    m = torch.maximum(hi.amax(), -lo.amin())
    if bool(torch.isfinite(m)):
        return m
    if bool(m < 0):  # all absent
        return hi.new_zeros(())
    return torch.stack([x.masked_fill(~torch.isfinite(x), 0).abs().amax() for x in (hi, lo)]).amax()


# -- signed scalar pulls ----------------------------------------------------------------------------------------

def _candidates(hi: Tensor, lo: Tensor, w) -> tuple[Tensor, Tensor]:
    """Per-edge candidates ``max/min(w M+, w M-)``; absent sources (M+ = -inf) offer nothing."""
    if isinstance(w, (int, float)) and w != 0:  # one weight for all edges: it keeps or swaps the order (M+ >= M-)
        if w == 1:
            return hi, lo
        return (hi * w, lo * w) if w > 0 else (lo * w, hi * w)  # -inf * w stays absent (-inf), +inf likewise
    if _jacobians.reads_on_host(hi) and _all_finite(hi):  # off the CPU: the masked form (the same values)
        c1, c2 = hi * w, lo * w
        return torch.maximum(c1, c2), torch.minimum(c1, c2)
    reach = torch.isfinite(hi)
    h = torch.where(reach, hi, torch.zeros_like(hi))
    l = torch.where(reach, lo, torch.zeros_like(lo))
    c1, c2 = h * w, l * w
    inf = torch.full_like(c1, float("inf"))
    return torch.where(reach, torch.maximum(c1, c2), -inf), torch.where(reach, torch.minimum(c1, c2), inf)


def _signed_pull(kind, hi: Tensor, lo: Tensor, index: bool = True):
    """``(M+', argmax, M-', argmin)`` of one pull; the flat output indices may be None when ``index`` is False."""
    if isinstance(kind, Pointwise):
        ch, cl = _candidates(hi, lo, kind.weight)
        h, hi_idx = amax_to_shape(ch, kind.in_shape, largest=True, index=index)
        l, lo_idx = amax_to_shape(cl, kind.in_shape, largest=False, index=index)
        return h, hi_idx, l, lo_idx
    if isinstance(kind, Reduction):
        ch, cl = _candidates(kind.expand_out(hi), kind.expand_out(lo), kind.weight)
        if kind.support is not None:  # no edge: no candidate (not a candidate 0)
            ch = ch.masked_fill(~kind.support, float("-inf"))
            cl = cl.masked_fill(~kind.support, float("inf"))
        idx = kind.out_index().to(hi.device) if index else None
        return ch, idx, cl, idx
    if isinstance(kind, IndexMap):
        ch, cl = _candidates(hi, lo, kind.weight)
        h, hi_idx = _scatter_max(kind, ch, largest=True, empty=float("-inf"), index=index)
        l, lo_idx = _scatter_max(kind, cl, largest=False, empty=float("inf"), index=index)
        return h, hi_idx, l, lo_idx
    if isinstance(kind, MatMul):
        if kind.left and kind.weight.dim() == 2 and kind.mat_shapes is None:
            return _signed_matmul_rows(kind, hi, lo, index)
        return _signed_matmul(kind, hi, lo, index)
    if isinstance(kind, (RowDense, LayerNormRow)):
        return _signed_rowdense(kind, hi, lo, index)
    raise TypeError(f"unknown Jacobian kind {type(kind).__name__}")


def _extremes(product, h: Tensor, l: Tensor, dim: int, index: bool):
    """Max- and min-times of ``h`` and of ``l`` in ONE kernel call (the weight is streamed once):
    ``[h, l, -h, -l]`` stacked along ``dim``, with ``min_c x_c w_c = -max_c (-x_c) w_c`` (negation is exact, so the
    values and the first arguments are those of min-times). Returns ``mx, mn``: ``[(values, args)] * 2`` each (args
    None unless ``index``)."""
    out = product(torch.cat([h, l, -h, -l], dim), index)
    vals, args = out if index else (out, None)
    v = vals.split(h.shape[dim], dim)
    a = args.split(h.shape[dim], dim) if index else (None,) * 4
    return [(v[0], a[0]), (v[1], a[1])], [(-v[2], a[2]), (-v[3], a[3])]


def _all_finite(x: Tensor) -> bool:
    """Every element finite (no absent element): two reductions (a NaN fails both compares)."""
    return not x.numel() or bool((x.amin() > float("-inf")) & (x.amax() < float("inf")))


def _partial_ties(slices: Tensor, mx, mn, hi_a, lo_a):
    """In partly reachable slices the winner is the smallest index over all candidates (M+ and M- offers alike), so
    where the two kernels tie, the smaller of their first indices (elsewhere, and in fully reachable slices, the
    M+ kernel's on a tie, as before)."""
    if hi_a is None:
        return hi_a, lo_a
    hi_a = torch.where(slices & (mx[0][0] == mx[1][0]), torch.minimum(mx[0][1], mx[1][1]), hi_a)
    lo_a = torch.where(slices & (mn[0][0] == mn[1][0]), torch.minimum(mn[0][1], mn[1][1]), lo_a)
    return hi_a, lo_a


def _merge(mx, mn, index: bool):
    hi_v = torch.maximum(mx[0][0], mx[1][0])
    lo_v = torch.minimum(mn[0][0], mn[1][0])
    hi_a = torch.where(mx[1][0] > mx[0][0], mx[1][1], mx[0][1]) if index else None
    lo_a = torch.where(mn[1][0] < mn[0][0], mn[1][1], mn[0][1]) if index else None
    return hi_v, hi_a, lo_v, lo_a


def _rows_core(rh: Tensor, rl: Tensor, rr: Tensor | None, w: Tensor, index: bool, partial: Tensor | None):
    """``max/min_c`` of the offers of rows ``rh``/``rl`` ([R, n], absent = -inf/+inf; ``rr`` their reachability or
    None when all are reachable) through ``w`` [n, k]: ``(hi, arg, lo, arg)`` [R, k] (args None unless ``index``).
    ``partial``: the rows that count as partly reachable (the smallest index wins an M+/M- tie there)."""
    zh, zl = (rh, rl) if rr is None else (rh.masked_fill(~rr, 0), rl.masked_fill(~rr, 0))
    if index:
        mx, mn = _extremes(lambda x, i: max_times(x, w, argmax=i), zh, zl, 0, index)
        hi_v, hi_a, lo_v, lo_a = _merge(mx, mn, index)
    else:  # values only: one fused pass (the same max / min of the same products)
        (hi_v, lo_v), hi_a, lo_a = max_min_pair(zh, zl, w), None, None
    if partial is not None and bool(partial.any()):  # see _signed_matmul
        slices = partial.unsqueeze(-1)
        if index:
            hi_a, lo_a = _partial_ties(slices, mx, mn, hi_a, lo_a)
        h3, l3, w3 = rh.unsqueeze(0), rl.unsqueeze(0), w.unsqueeze(0)
        for redo, largest, vals, args in ((slices & (hi_v == 0), True, hi_v, hi_a),
                                          (slices & (lo_v == 0), False, lo_v, lo_a)):
            _exact_outputs(redo.unsqueeze(0), largest, True, h3, l3, w3, vals.unsqueeze(0),
                           None if args is None else args.unsqueeze(0))
    return hi_v, hi_a, lo_v, lo_a


def _signed_matmul_rows(kind: MatMul, hi: Tensor, lo: Tensor, index: bool):
    """``y = x @ B`` with one 2-D weight: rows of the output with no reachable element are skipped (absent)."""
    w = kind.weight  # [n, k]
    n, k = w.shape
    fh, fl = hi.reshape(-1, n), lo.reshape(-1, n)
    if not _jacobians.reads_on_host(fh):
        return _signed_matmul_rows_device(kind, fh, fl, w, index)
    everywhere = _all_finite(fh)
    reach = None if everywhere else torch.isfinite(fh)
    live = None if everywhere else reach.any(-1)
    n_live = fh.shape[0] if everywhere else int(live.sum())
    all_live = n_live == fh.shape[0]
    if everywhere:
        out_h = out_l = arg_h = arg_l = None
    else:
        out_h = fh.new_full((fh.shape[0], k), float("-inf"))
        out_l = fh.new_full((fh.shape[0], k), float("inf"))
        arg_h = torch.zeros((fh.shape[0], k), dtype=torch.long, device=hi.device) if index else None
        arg_l = torch.zeros_like(arg_h) if index else None
    if n_live:
        sel = slice(None) if all_live else live
        rr = None if everywhere else reach[sel]
        if rr is not None and bool(rr.all()):
            rr = None
        partial = None if rr is None else ~rr.all(-1)
        hi_v, hi_a, lo_v, lo_a = _rows_core(fh[sel], fl[sel], rr, w, index, partial)
        if everywhere:
            out_h, out_l, arg_h, arg_l = hi_v, lo_v, hi_a, lo_a
        else:
            out_h[sel], out_l[sel] = hi_v, lo_v
            if index:
                arg_h[sel], arg_l[sel] = hi_a, lo_a
    shape = kind.in_shape
    if not index:
        return out_h.reshape(shape), None, out_l.reshape(shape), None
    rows = torch.arange(fh.shape[0], device=hi.device).unsqueeze(-1) * n
    return out_h.reshape(shape), (rows + arg_h).reshape(shape), out_l.reshape(shape), (rows + arg_l).reshape(shape)


#: A batched product whose output slices are mostly unreachable goes slice by slice over the live part only.
_SPARSE_FRACTION = 0.5
_SPARSE_MAX_BATCH = 64


def _signed_matmul_sparse(kind: MatMul, hi: Tensor, lo: Tensor, reach: Tensor, index: bool):
    """A batched product, one batch entry at a time, restricted to its rows with a reachable element and to the
    contraction positions reachable in some row (entirely absent ones offer nothing, so dropping them is exact). A
    right-factor product is the left one transposed. Partly reachable means: in the whole slice, as elsewhere."""
    m, n = kind.mat_out[-2:]
    h3, l3, r3 = hi.reshape(-1, m, n), lo.reshape(-1, m, n), reach.reshape(-1, m, n)
    w = kind.weight
    bsz = h3.shape[0]
    w3 = w.reshape(-1, *w.shape[-2:]).expand(bsz, -1, -1) if w.dim() > 2 else w.expand(bsz, -1, -1)
    rows, k = (m, w3.shape[-1]) if kind.left else (n, w3.shape[-2])
    out_h = hi.new_full((bsz, rows, k), float("-inf"))
    out_l = hi.new_full((bsz, rows, k), float("inf"))
    arg_h = torch.zeros((bsz, rows, k), dtype=torch.long, device=hi.device) if index else None
    arg_l = torch.zeros_like(arg_h) if index else None
    for b in range(bsz):
        ah, al, ar, wb = (h3[b], l3[b], r3[b], w3[b]) if kind.left else (h3[b].T, l3[b].T, r3[b].T, w3[b].T)
        live = ar.any(1).nonzero().flatten()
        if live.numel() == 0:
            continue
        cols = ar.any(0).nonzero().flatten()
        sub = ar[live][:, cols]
        partial = ~ar[live].all(1)
        rr = None if bool(sub.all()) else sub
        vh, ih, vl, il = _rows_core(ah[live][:, cols], al[live][:, cols], rr, wb[cols], index, partial)
        out_h[b, live], out_l[b, live] = vh, vl
        if index:
            arg_h[b, live], arg_l[b, live] = cols[ih], cols[il]
    bidx = torch.arange(bsz, device=hi.device).view(-1, 1, 1)
    pos = torch.arange(rows, device=hi.device).view(1, -1, 1)
    if kind.left:  # [B, m, k]; the winner a[b, r, c]
        flat = (lambda a: (bidx * m + pos) * n + a) if index else None  # noqa: E731
    else:  # computed as [B, n, k]; the winner a[b, r, s]
        flat = (lambda a: (bidx * m + a) * n + pos) if index else None  # noqa: E731
    outs = [out_h, None if not index else flat(arg_h), out_l, None if not index else flat(arg_l)]
    if not kind.left:
        outs = [None if t is None else t.transpose(1, 2) for t in outs]
    shape = kind.in_shape
    return tuple(None if t is None else t.reshape(shape) for t in outs)


def _signed_matmul(kind: MatMul, hi: Tensor, lo: Tensor, index: bool = True):
    """Signed max/min-times. Absent elements enter the kernels as 0; partly reachable slices are then fixed exactly
    where that can matter."""
    if not _jacobians.reads_on_host(hi):
        return _signed_matmul_device(kind, hi, lo, index)
    all_reach = _all_finite(hi)
    reach = torch.isfinite(hi) if not all_reach else None
    if reach is not None:
        m, n = kind.mat_out[-2:]
        r3 = reach.reshape(-1, m, n)
        if r3.shape[0] <= _SPARSE_MAX_BATCH and float(r3.any(-1 if kind.left else -2).float().mean()) <= _SPARSE_FRACTION:
            return _signed_matmul_sparse(kind, hi, lo, reach, index)
    h = hi if all_reach else torch.where(reach, hi, torch.zeros_like(hi))
    l = lo if all_reach else torch.where(reach, lo, torch.zeros_like(lo))
    w = kind.weight
    m, n = kind.mat_out[-2:]
    a_h = h.reshape(-1, m, n)
    a_l = l.reshape(-1, m, n)
    bsz = a_h.shape[0]
    w3 = w.reshape(-1, *w.shape[-2:]).expand(bsz, -1, -1) if w.dim() > 2 else w.expand(bsz, -1, -1)
    if not index:  # values only: one fused pass (a right factor as the transposed left product)
        mx = mn = None
        if kind.left:
            hi_v, lo_v = max_min_pair(a_h, a_l, w3)
        else:
            hi_t, lo_t = max_min_pair(a_h.transpose(1, 2), a_l.transpose(1, 2), w3.transpose(1, 2))
            hi_v, lo_v = hi_t.transpose(1, 2), lo_t.transpose(1, 2)
        hi_a = lo_a = None
    elif kind.left:  # out [B, m, k] over c (dim -1 of a); stacked along m
        mx, mn = _extremes(lambda x, i: max_times(x, w3, argmax=i), a_h, a_l, 1, index)
    else:  # out [B, k, n] over r (dim -2 of a); stacked along n
        mx, mn = _extremes(lambda x, i: max_times(w3, x, argmax=i), a_h, a_l, 2, index)
    if index:
        hi_v, hi_a, lo_v, lo_a = _merge(mx, mn, index)
    if not all_reach:
        r3 = reach.reshape(-1, m, n)
        # slices (rows of a for left, columns for right): all absent -> absent; partly absent -> fixed exactly
        full = r3.all(-1) if kind.left else r3.all(-2)  # [B, m] or [B, n]
        none = ~(r3.any(-1) if kind.left else r3.any(-2))
        if bool(none.any()):
            gone = none.unsqueeze(-1) if kind.left else none.unsqueeze(-2)
            hi_v = hi_v.masked_fill(gone, float("-inf"))
            lo_v = lo_v.masked_fill(gone, float("inf"))
        partial = ~full & ~none
        if bool(partial.any()):
            slices = partial.unsqueeze(-1) if kind.left else partial.unsqueeze(-2)
            if index:
                hi_a, lo_a = _partial_ties(slices, mx, mn, hi_a, lo_a)
            # An absent element entered the kernels as the candidate 0, so there M+' >= 0 >= M-', and the masked
            # result can only differ where M+' = 0 (M-' = 0): those outputs are redone exactly.
            redo_h = slices & (hi_v == 0)
            redo_l = slices & (lo_v == 0)
            h3, l3 = hi.reshape(-1, m, n), lo.reshape(-1, m, n)
            for redo, largest, vals, args in ((redo_h, True, hi_v, hi_a), (redo_l, False, lo_v, lo_a)):
                _exact_outputs(redo, largest, kind.left, h3, l3, w3, vals, args)
    return _batched_result(kind, hi_v, hi_a, lo_v, lo_a, bsz, index)


# -- signed matrix-product pulls without host reads (off the CPU) -------------------------------------------------
# The CPU path reads reachability to skip dead rows and to redo only the outputs of partly reachable slices that
# the zero-substituted kernels may have got wrong. Off the CPU nothing is read: the kernels run on every row, every
# output of the product is also computed exactly from the masked candidates (dense, in chunks whose number depends
# on shapes only), and masks choose: partly reachable slices take the exact result (which equals the CPU path's
# kernel-and-redo result there), fully reachable ones the kernels' (the same tie rule as on the CPU), dead ones are
# absent.

def _exact_dense(left: bool, h3: Tensor, l3: Tensor, w3: Tensor, index: bool):
    """``(M+', first argmax, M-', first argmin)`` of ``[B, m, n] x [B, n, k]`` (``left``: over ``c`` of
    ``a[b, x, c] w[b, c, y]``; else over ``r`` of ``w[b, x, r] a[b, r, y]``) from the masked candidates of every
    element (absent ones offer nothing), in chunks of rows."""
    if not left:  # the transposed left product
        out = _exact_dense(True, h3.transpose(1, 2), l3.transpose(1, 2), w3.transpose(1, 2), index)
        return tuple(None if t is None else t.transpose(1, 2) for t in out)
    bsz, m, n = h3.shape
    k = w3.shape[-1]
    fh, fl = h3.reshape(bsz * m, n), l3.reshape(bsz * m, n)
    batch = torch.arange(bsz, device=h3.device).repeat_interleave(m)
    vh, vl = fh.new_empty(bsz * m, k), fl.new_empty(bsz * m, k)
    ah = torch.empty(bsz * m, k, dtype=torch.long, device=h3.device) if index else None
    al = torch.empty_like(ah) if index else None
    step = max(1, _CHUNK // max(1, n * k))
    for r0 in range(0, bsz * m, step):
        r1 = min(bsz * m, r0 + step)
        wt = w3[batch[r0:r1]].transpose(1, 2)  # [rows, k, n]
        ch, cl = _candidates(fh[r0:r1].unsqueeze(1), fl[r0:r1].unsqueeze(1), wt)  # [rows, k, n]
        (vh[r0:r1], ih), (vl[r0:r1], il) = _first_extreme(ch, True), _first_extreme(cl, False)
        if index:
            ah[r0:r1], al[r0:r1] = ih, il
    shape = (bsz, m, k)
    return (vh.reshape(shape), None if ah is None else ah.reshape(shape), vl.reshape(shape),
            None if al is None else al.reshape(shape))


def _choose(slices: Tensor, dead: Tensor, fast, exact, index: bool):
    """Per output: the exact result in partly reachable slices, the kernels' elsewhere, absent in dead slices."""
    hi_v, hi_a, lo_v, lo_a = fast
    eh, eha, el, ela = exact
    hi_v = torch.where(slices, eh, hi_v).masked_fill(dead, float("-inf"))
    lo_v = torch.where(slices, el, lo_v).masked_fill(dead, float("inf"))
    if index:
        hi_a, lo_a = torch.where(slices, eha, hi_a), torch.where(slices, ela, lo_a)
    return hi_v, hi_a, lo_v, lo_a


def _signed_matmul_rows_device(kind: MatMul, fh: Tensor, fl: Tensor, w: Tensor, index: bool):
    """:func:`_signed_matmul_rows` without host reads (the same values and winners)."""
    n = w.shape[0]
    reach = torch.isfinite(fh)
    fast = _rows_core(fh, fl, reach, w, index, None)  # absent elements enter as 0; no fix-ups here
    exact = tuple(None if t is None else t[0] for t in _exact_dense(True, fh[None], fl[None], w[None], index))
    live = reach.any(-1, keepdim=True)
    partial = live & ~reach.all(-1, keepdim=True)
    hi_v, hi_a, lo_v, lo_a = _choose(partial, ~live, fast, exact, index)
    shape = kind.in_shape
    if not index:
        return hi_v.reshape(shape), None, lo_v.reshape(shape), None
    hi_a, lo_a = hi_a.masked_fill(~live, 0), lo_a.masked_fill(~live, 0)  # dead rows: winner 0, as on the CPU
    rows = torch.arange(fh.shape[0], device=fh.device).unsqueeze(-1) * n
    return hi_v.reshape(shape), (rows + hi_a).reshape(shape), lo_v.reshape(shape), (rows + lo_a).reshape(shape)


def _signed_matmul_device(kind: MatMul, hi: Tensor, lo: Tensor, index: bool):
    """:func:`_signed_matmul` without host reads (the same values and winners; no sparse path)."""
    m, n = kind.mat_out[-2:]
    reach = torch.isfinite(hi)
    h3 = torch.where(reach, hi, torch.zeros_like(hi)).reshape(-1, m, n)
    l3 = torch.where(reach, lo, torch.zeros_like(lo)).reshape(-1, m, n)
    w = kind.weight
    bsz = h3.shape[0]
    w3 = w.reshape(-1, *w.shape[-2:]).expand(bsz, -1, -1) if w.dim() > 2 else w.expand(bsz, -1, -1)
    if not index:
        if kind.left:
            hi_v, lo_v = max_min_pair(h3, l3, w3)
        else:
            hi_t, lo_t = max_min_pair(h3.transpose(1, 2), l3.transpose(1, 2), w3.transpose(1, 2))
            hi_v, lo_v = hi_t.transpose(1, 2), lo_t.transpose(1, 2)
        fast = (hi_v, None, lo_v, None)
    elif kind.left:
        fast = _merge(*_extremes(lambda x, i: max_times(x, w3, argmax=i), h3, l3, 1, index), index)
    else:
        fast = _merge(*_extremes(lambda x, i: max_times(w3, x, argmax=i), h3, l3, 2, index), index)
    r3 = reach.reshape(-1, m, n)
    full = r3.all(-1) if kind.left else r3.all(-2)
    none = ~(r3.any(-1) if kind.left else r3.any(-2))
    expand = (lambda t: t.unsqueeze(-1)) if kind.left else (lambda t: t.unsqueeze(-2))  # noqa: E731
    exact = _exact_dense(kind.left, hi.reshape(-1, m, n), lo.reshape(-1, m, n), w3, index)
    hi_v, hi_a, lo_v, lo_a = _choose(expand(~full & ~none), expand(none), fast, exact, index)
    return _batched_result(kind, hi_v, hi_a, lo_v, lo_a, bsz, index)


def _batched_result(kind: MatMul, hi_v, hi_a, lo_v, lo_a, bsz: int, index: bool):
    """A batched signed product's ``(M+', flat argmax, M-', flat argmin)`` in the input's shape: the winners along
    the contraction (``hi_a``, ``lo_a``, [B, m, k] or [B, k, n]) turned into flat input indices."""
    m, n = kind.mat_out[-2:]
    shape = kind.in_shape
    if not index:
        return hi_v.reshape(shape), None, lo_v.reshape(shape), None
    bidx = torch.arange(bsz, device=hi_v.device).view(-1, 1, 1)
    if kind.left:
        rows = torch.arange(m, device=hi_v.device).view(1, -1, 1)
        to_flat = lambda arg: (bidx * m + rows) * n + arg  # noqa: E731
    else:
        cols = torch.arange(n, device=hi_v.device).view(1, 1, -1)
        to_flat = lambda arg: (bidx * m + arg) * n + cols  # noqa: E731
    return hi_v.reshape(shape), to_flat(hi_a).reshape(shape), lo_v.reshape(shape), to_flat(lo_a).reshape(shape)


def _exact_outputs(redo: Tensor, largest: bool, left: bool, h3: Tensor, l3: Tensor, w3: Tensor, vals: Tensor,
                   args: Tensor | None) -> None:
    """Recompute the signed max (min) and its first argument at the outputs ``redo`` of a matrix product from the
    masked candidates (absent elements offer nothing), in place; gathered in bounded chunks."""
    where = redo.nonzero()
    if where.numel() == 0:
        return
    length = h3.shape[-1] if left else h3.shape[-2]
    step = max(1, _CHUNK // max(1, length))
    for start in range(0, where.shape[0], step):
        b, x, y = where[start:start + step].unbind(-1)
        if left:  # out [b, x = row, y = k] over c: a[b, x, :] and w[b, :, y]
            rh, rl, w = h3[b, x], l3[b, x], w3[b, :, y]
        else:  # out [b, x = k, y = column] over r: a[b, :, y] and w[b, x, :]
            rh, rl, w = h3[b, :, y], l3[b, :, y], w3[b, x, :]
        cand_h, cand_l = _candidates(rh, rl, w)
        v, a = _first_extreme(cand_h if largest else cand_l, largest)
        vals[b, x, y] = v
        if args is not None:
            args[b, x, y] = a


_CHUNK = 1 << 22


def _signed_rowdense(kind: RowDense | LayerNormRow, hi: Tensor, lo: Tensor, index: bool = True):
    """Rank-one rows and layer norm without the dense Jacobian (:mod:`.signed_rows`); others densely. The args
    may be None when ``index`` is False."""
    fast = fast_signed_rowdense(kind, hi, lo, index)
    return fast if fast is not None else _signed_rowdense_dense(kind, hi, lo)


def _signed_rowdense_dense(kind: RowDense | LayerNormRow, hi: Tensor, lo: Tensor):
    """The reference: every candidate ``J_ij M_i`` of the dense ``J`` (chunks of rows)."""
    n = kind.in_shape[-1]
    fh, fl = hi.reshape(-1, n), lo.reshape(-1, n)
    out_h = torch.full_like(fh, float("-inf"))
    out_l = torch.full_like(fl, float("inf"))
    base = torch.arange(fh.shape[0], device=hi.device).unsqueeze(-1) * n
    arg_h = (base + torch.arange(n, device=hi.device)).clone()
    arg_l = arg_h.clone()
    rows = torch.isfinite(fh).any(-1).nonzero().flatten()
    probe = torch.where(torch.isfinite(fh), torch.ones_like(fh), torch.zeros_like(fh))
    for sel, outs, jac in _dense_chunks(kind, probe, rows):
        ch, cl = _candidates(fh[sel][:, outs].unsqueeze(-1).expand_as(jac),
                             fl[sel][:, outs].unsqueeze(-1).expand_as(jac), jac)  # [c, k, n]
        vh, ph = _first_extreme(ch.transpose(1, 2), True)
        vl, pl = _first_extreme(cl.transpose(1, 2), False)
        out_h[sel], out_l[sel] = vh, vl
        arg_h[sel] = sel.unsqueeze(-1) * n + outs[ph]
        arg_l[sel] = sel.unsqueeze(-1) * n + outs[pl]
    return out_h.reshape(hi.shape), arg_h.reshape(hi.shape), out_l.reshape(lo.shape), arg_l.reshape(lo.shape)
