"""Edge maps of the additive and max semirings, and products with a mapped *constant* matrix done block by block.

Maps: ``|w|`` (flow, the ``Z`` part of entropy, maxpath) and ``-|w| log |w|`` (the ``U`` part of entropy, with
``0 log 0 = 0``). For a weight ``W`` [n, k] (rows: the output features the pull sums over) the products

    a @ f(W)                          (:func:`mapped_mm`)
    a1 @ |W|,  a2 @ (-|W| log |W|)    (:func:`mapped_mm_pair`: both maps from one pass over each block; for a few
                                      rows, one read of W that writes no map at all)
    max_c a[:, c] f(W)[c, :]          (:func:`mapped_max_times`, with the smallest winning ``c``)

map one block of about ``BLOCK_ELEMENTS`` entries of ``W`` at a time, use it and drop it. Memory: one block,
whatever the weight's size (a 50257 x 768 LM head needs 4 MiB, not 147 MiB per map); time: the map is one cheap
pass over ``W`` per call, and the block is still in cache when the product reads it. Nothing is kept between
calls (an opt-in cache of whole mapped weights lives in :mod:`inseq_semiring.rules.weight_cache`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import xlogx
from ..kernels.maxtimes import fuses, max_times, max_times_abs
from ..kernels.xlogx import abs_and_neg_xlogx

#: Entries of ``W`` mapped at once by the (+, x) products (4 MiB of float32).
BLOCK_ELEMENTS = 1 << 20
#: Entries per block for max-times (its kernel is compute-bound; fewer, larger blocks).
MAX_BLOCK_ELEMENTS = 1 << 21
#: At most this many rows in all (both factors) take the one-read kernel
#: :func:`~inseq_semiring.kernels.xlogx.pair_products` (a weight with unit stride along its columns; measured on the
#: 50257 x 768 LM head with one / two active rows, ``[z; u]`` and ``z``: 19 / 25 ms against 39 / 45 ms for the
#: blocked maps).
PAIR_KERNEL_ROWS = 8
#: ...and at least this many columns (it vectorises along them; narrower weights take the blocked maps).
PAIR_KERNEL_COLUMNS = 64
#: Row blocks are used when they are at least this deep (a shallower split of the sum costs more than it saves)...
MIN_BLOCK_ROWS = 1024
#: ...else column blocks, when at least this wide (narrower ones would read the weight in tiny pieces).
MIN_BLOCK_COLUMNS = 64


def abs_weight(w: Tensor) -> Tensor:
    """Edge map ``w -> |w|``."""
    return w.abs()


def neg_w_log_w(w: Tensor) -> Tensor:
    """Edge map ``w -> -|w| log |w|`` with ``0 log 0 = 0`` (the U part of the expectation-semiring edge).
    CPU float32/float64 tensors take the one-pass compiled kernel
    (:func:`~inseq_semiring.kernels.xlogx.abs_and_neg_xlogx`, ~4x the speed of ``xlogy``); other devices and dtypes,
    and tensors that autograd tracks, take ``-xlogy(|w|, |w|)``. Both logs are within an ulp of each other."""
    if w.device.type == "cpu" and w.dtype in _KERNEL_DTYPES and not (w.requires_grad and torch.is_grad_enabled()):
        return abs_and_neg_xlogx(w)[1]
    aw = w.abs()
    return -torch.xlogy(aw, aw)


_KERNEL_DTYPES = (torch.float32, torch.float64)


def abs_and_neg_w_log_w(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(|w|, -|w| log |w|)`` in one pass where the compiled kernel applies (as :func:`neg_w_log_w`)."""
    if w.device.type == "cpu" and w.dtype in _KERNEL_DTYPES and not (w.requires_grad and torch.is_grad_enabled()):
        return abs_and_neg_xlogx(w)
    return w.abs(), neg_w_log_w(w)


def _plan(n: int, k: int, elements: int) -> tuple[str, list[slice]]:
    """Blocks of about ``elements`` entries of ``w`` [n, k]: whole rows when at least ``MIN_BLOCK_ROWS`` fit (deep
    partial products, summed or max-ed), else whole columns when at least ``MIN_BLOCK_COLUMNS`` fit (each block's
    product is final), else rows (measured on GPT-2's weights: each choice is the faster one where it is made)."""
    rows, cols = max(1, elements // max(1, k)), elements // max(1, n)
    if rows < min(n, MIN_BLOCK_ROWS) and cols >= min(k, MIN_BLOCK_COLUMNS):
        step = max(1, cols)
        return "cols", [slice(s, min(k, s + step)) for s in range(0, k, step)]
    return "rows", [slice(s, min(n, s + rows)) for s in range(0, n, rows)]


def _contiguous_map(block: Tensor, f) -> Tensor:
    """``f(block)`` in row-major order, what the max-times kernel reads (mapping first keeps the strides of a
    transposed weight dense, so the transposing copy that follows is the fast kind)."""
    return f(block).contiguous()


def mapped_mm(a: Tensor, w: Tensor, f) -> Tensor:
    """``a @ f(w)`` for ``a`` [r, n] and a 2-D ``w`` [n, k], without holding ``f(w)`` whole."""
    if f is neg_w_log_w:
        return mapped_mm_pair(None, a, w)[1]
    out = a.new_zeros(a.shape[0], w.shape[1])
    by, blocks = _plan(w.shape[0], w.shape[1], BLOCK_ELEMENTS)
    for b in blocks:
        if by == "cols":
            out[:, b] = a @ f(w[:, b])
        else:
            out.addmm_(a[:, b], f(w[b]))
    return out


def mapped_mm_pair(a_abs: Tensor | None, a_nlogn: Tensor | None, w: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(a_abs @ |w|, a_nlogn @ (-|w| log |w|))``; either factor may be None (its product is then None)."""
    like = a_abs if a_abs is not None else a_nlogn
    rows = sum(0 if a is None else a.shape[0] for a in (a_abs, a_nlogn))
    if (rows <= PAIR_KERNEL_ROWS and w.dim() == 2 and w.shape[1] >= PAIR_KERNEL_COLUMNS and w.stride(1) == 1
            and like.dtype == w.dtype and xlogx.active_backend(w) == "cpp"):
        return xlogx.pair_products(a_abs, a_nlogn, w, backend="cpp")
    out_abs = None if a_abs is None else like.new_empty(a_abs.shape[0], w.shape[1])
    out_nlogn = None if a_nlogn is None else like.new_empty(a_nlogn.shape[0], w.shape[1])
    by, blocks = _plan(w.shape[0], w.shape[1], BLOCK_ELEMENTS)
    if not blocks:  # an empty contraction
        return tuple(None if out is None else out.zero_() for out in (out_abs, out_nlogn))
    scratch = None if a_nlogn is None else _scratch(w, BLOCK_ELEMENTS + max(w.shape))
    for i, b in enumerate(blocks):
        block, rows = (w[:, b], slice(None)) if by == "cols" else (w[b], b)
        maps = (block.abs(), None) if a_nlogn is None else abs_and_neg_xlogx(block, out=scratch, summed=True)
        for out, a, mapped in ((out_abs, a_abs, maps[0]), (out_nlogn, a_nlogn, maps[1])):
            if out is None:
                continue
            if by == "cols":
                out[:, b] = a @ mapped
            elif i == 0:  # the first partial product is written, not added to zeros
                torch.mm(a[:, rows], mapped, out=out)
            else:
                out.addmm_(a[:, rows], mapped)
    return out_abs, out_nlogn


def _scratch(w: Tensor, numel: int) -> tuple[Tensor, Tensor] | None:
    """Two flat buffers for one block's maps, kept for the rest of this thread's sweep (its memo) so that blocks and
    pulls reuse the same pages instead of faulting in fresh ones for every block; None outside a sweep."""
    from ..rules.weight_cache import sweep_memo

    memo = sweep_memo()
    if memo is None or w.device.type != "cpu":
        return None
    key = ("weight-map scratch", w.dtype)
    bufs = memo.get(key)
    if bufs is None or bufs[0].numel() < numel:
        bufs = memo[key] = (torch.empty(numel, dtype=w.dtype), torch.empty(numel, dtype=w.dtype))
    return bufs


def mapped_max_times(a: Tensor, w: Tensor, f, argmax: bool = True) -> tuple[Tensor, Tensor | None]:
    """``max_c a[r, c] f(w)[c, j]`` and (``argmax``) the winning ``c``; ties: the smallest ``c`` (over row blocks a
    later block replaces the running winner only when strictly greater, as inside the max-times kernel). ``|w|`` on
    CPU: the C++ kernel takes ``|w|`` while packing ``w`` (in place, any strides), no block is mapped."""
    if f is abs_weight and fuses(a, w):
        out = max_times_abs(a, w, argmax=argmax)
        return out if argmax else (out, None)
    by, blocks = _plan(w.shape[0], w.shape[1], MAX_BLOCK_ELEMENTS)
    if w.shape[0] == 0 or len(blocks) <= 1:
        out = max_times(a, _contiguous_map(w, f), argmax=argmax)
        return out if argmax else (out, None)
    best = a.new_empty(a.shape[0], w.shape[1])
    index = torch.empty(best.shape, dtype=torch.long, device=a.device) if argmax else None
    for i, b in enumerate(blocks):
        if by == "cols":  # each block gives its columns' final values
            out = max_times(a, _contiguous_map(w[:, b], f), argmax=argmax)
            vals, idx = out if argmax else (out, None)
            best[:, b] = vals
            if argmax:
                index[:, b] = idx
            continue
        out = max_times(a[:, b], _contiguous_map(w[b], f), argmax=argmax)
        vals, idx = out if argmax else (out, None)
        better = vals > best if i else torch.ones_like(vals, dtype=torch.bool)
        best = torch.where(better, vals, best)
        if argmax:
            index = torch.where(better, idx + b.start, index)
    return best, index
