"""Triton kernel for the (max, x) product on CUDA; see :mod:`inseq_semiring.kernels.maxtimes`.

Imported lazily by :func:`inseq_semiring.kernels.maxtimes.max_times`, only when CUDA tensors arrive
(importing this module imports ``triton``).

    C[b, i, j] = max_k a[b, i, k] * b[b, k, j]      (and the first k attaining it)

Layout of the work:

* one program per ``BLOCK_M x BLOCK_N`` output tile (axis 0), per batch entry (axis 1) and per
  slice of ``k`` (axis 2, "split-k", used when the tiles alone cannot fill the GPU);
* each program walks its ``k`` range in increasing order, ``BLOCK_K`` steps unrolled at a time,
  forming the outer product ``a[:, k] * b[k, :]`` of one column of ``a`` and one row of ``b``;
* the value is a running NaN-propagating maximum (IEEE ``maximum``: a NaN product makes the
  output NaN); the index is replaced only where the product is strictly greater than the
  running value, so ties keep the smallest ``k`` and, once the running value is NaN, the index
  stays some earlier valid ``k``;
* with split-k, the per-slice partial results (in the accumulation dtype, int32 indices) are
  merged by a second kernel that scans the slices in increasing order with the same rule, so
  ties across slices keep the earlier slice, i.e. the smaller ``k``.

Accumulation: float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs. For
float32/float64 each product is the IEEE product in that dtype, exactly as torch computes it, so
values and indices match the other backends bit for bit. For float16/bfloat16 the products are
exact in float32 and the maximum is rounded once to the input dtype at the end; since rounding
is monotonic this equals the max of the rounded products (the torch backend's value), but the
index is that of the first *exact* maximum, which can differ from the torch backend's index where
two different exact products round to the same half-precision value.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["max_times_triton", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_GRID_Y_MAX = 65535  # CUDA limit on grid dims 1 and 2
_MAX_SPLIT = 64
_MIN_K_PER_SPLIT = 64
# parallelism target (programs per SM) before k is split; measured on an H100 (float64 is
# compute-bound sooner: more k slices made it slower)
_PROGRAMS_PER_SM = 10
_PROGRAMS_PER_SM_F64 = 3
_COMBINE_BLOCK = 1024


@triton.jit
def _step(a_ptrs, b_ptrs, mask_m, mask_n, acc, idx, k, sign_a, ARGMAX: tl.constexpr):
    av = tl.load(a_ptrs, mask=mask_m, other=0.0).to(acc.dtype) * sign_a  # +-1: exact
    bv = tl.load(b_ptrs, mask=mask_n, other=0.0).to(acc.dtype)
    p = av[:, None] * bv[None, :]
    if ARGMAX:
        idx = tl.where(p > acc, k, idx)  # strictly greater: ties keep the smaller k
    acc = tl.maximum(acc, p, propagate_nan=tl.PropagateNan.ALL)
    return acc, idx


_NO_SPEC = ["M", "K", "k_split", "tiles_n", "s_ab", "s_am", "s_bb", "s_vs", "s_vb", "s_vm", "sign_a", "sign_out"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _max_times_kernel(
    a_ptr,
    b_ptr,
    v_ptr,
    i_ptr,
    M,
    N,
    K,
    k_split,
    tiles_n,
    s_ab,
    s_am,
    s_ak,
    s_bb,
    s_bk,
    s_bn,
    s_vs,
    s_vb,
    s_vm,
    sign_a,
    sign_out,
    ARGMAX: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    sid = tl.program_id(2)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = sid * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    a_ptrs = a_ptr + bid * s_ab + offs_m.to(tl.int64) * s_am + k_lo.to(tl.int64) * s_ak
    b_ptrs = b_ptr + bid * s_bb + offs_n.to(tl.int64) * s_bn + k_lo.to(tl.int64) * s_bk
    if IS_F64:
        acc = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float64)
    else:
        acc = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    idx = tl.full([BLOCK_M, BLOCK_N], 0, tl.int32) + k_lo  # all products -inf: the first k
    k_end = k_lo + ((k_hi - k_lo) // BLOCK_K) * BLOCK_K
    for k0 in range(k_lo, k_end, BLOCK_K):
        for kk in tl.static_range(BLOCK_K):
            acc, idx = _step(a_ptrs, b_ptrs, mask_m, mask_n, acc, idx, k0 + kk, sign_a, ARGMAX)
            a_ptrs += s_ak
            b_ptrs += s_bk
    for k in range(k_end, k_hi):
        acc, idx = _step(a_ptrs, b_ptrs, mask_m, mask_n, acc, idx, k, sign_a, ARGMAX)
        a_ptrs += s_ak
        b_ptrs += s_bk
    acc = acc * sign_out  # +-1: exact
    out = bid * s_vb + sid.to(tl.int64) * s_vs + offs_m[:, None].to(tl.int64) * s_vm + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(v_ptr + out, acc.to(v_ptr.dtype.element_ty), mask=mask)  # rounds to nearest: monotonic
    if ARGMAX:
        tl.store(i_ptr + out, idx.to(i_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["total", "S", "s_s", "sign_out"])
def _combine_kernel(
    pv_ptr,
    pi_ptr,
    v_ptr,
    i_ptr,
    total,
    S,
    s_s,
    sign_out,
    ARGMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    pv_ptrs = pv_ptr + offs
    pi_ptrs = pi_ptr + offs
    acc = tl.load(pv_ptrs, mask=mask, other=0.0)
    if ARGMAX:
        idx = tl.load(pi_ptrs, mask=mask, other=0)
    for _ in range(1, S):
        pv_ptrs += s_s
        v = tl.load(pv_ptrs, mask=mask, other=0.0)
        if ARGMAX:
            pi_ptrs += s_s
            i = tl.load(pi_ptrs, mask=mask, other=0)
            idx = tl.where(v > acc, i, idx)  # strictly greater: ties keep the earlier slice
        acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)
    acc = acc * sign_out  # +-1: exact
    tl.store(v_ptr + offs, acc.to(v_ptr.dtype.element_ty), mask=mask)  # rounds to nearest: monotonic
    if ARGMAX:
        tl.store(i_ptr + offs, idx.to(i_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter (CPU tensors): any plausible number
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)  # (not triton.cdiv: a JIT function, slow to call from the host)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _warps(bm: int, bn: int) -> int:
    return max(1, min(4, bm * bn // 1024))  # 32 outputs per thread (measured best on an H100)


@functools.lru_cache(maxsize=4096)
def choose_config(nb: int, m: int, k: int, n: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, num_warps, k slices) for a ``[nb, m, k] x [nb, k, n]`` problem."""
    bm = min(64, max(16, _pow2_at_least(m)))
    bn = min(64, max(16, _pow2_at_least(n)))
    target = (_PROGRAMS_PER_SM_F64 if dtype == torch.float64 else _PROGRAMS_PER_SM) * num_sms

    def tiles(bm, bn):
        return nb * _cdiv(m, bm) * _cdiv(n, bn)

    # smaller tiles first (down to 32 x 32), then split k
    while tiles(bm, bn) < target and max(bm, bn) > 32:
        if bm >= bn:
            bm //= 2
        else:
            bn //= 2
    split = 1
    have = tiles(bm, bn)
    if have < target and k >= 2 * _MIN_K_PER_SPLIT:
        split = max(1, min(_cdiv(target, have), k // _MIN_K_PER_SPLIT, _MAX_SPLIT))
    return bm, bn, 4 if dtype == torch.float64 else 8, _warps(bm, bn), split


# ------------------------------------------------------------------------------------------
# launching: Triton's generic launch path (argument binding, specialisation key, option
# parsing) costs tens of microseconds of host time, more than the kernel itself on small
# problems (cProfile on an H100 host: ~40% of the host time of a small max_times call).
# OPT-IN (``INSEQ_SEMIRING_TRITON_FAST_LAUNCH=1``), NOT YET VALIDATED ON A GPU: after a kernel's
# first launch (compiled through the normal path) later launches with the same specialisation
# call the compiled kernel's launcher directly. The cache key holds everything Triton
# specialises on: for ints, == 1 / divisible by 16 (64-bit sizes skip this path); for tensors,
# dtype and 16-byte alignment; plus the constexprs, num_warps and the device. Any exception in
# this path switches it off for the process (the normal path still works).
# ------------------------------------------------------------------------------------------

FAST_LAUNCH_ENV = "INSEQ_SEMIRING_TRITON_FAST_LAUNCH"
_fast_launch = os.environ.get(FAST_LAUNCH_ENV, "").strip().lower() in ("1", "true", "yes", "on")
_fast_cache: dict = {}


def _int_class(x: int) -> int:
    """What Triton specialises an int argument on (sizes above 2**31 are excluded upstream)."""
    if x == 1:
        return 1
    return 16 if x % 16 == 0 else 0


@functools.lru_cache(maxsize=None)
def _fast_launch_supported() -> bool:
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
        from triton import knobs  # (3.4+)
        from triton.runtime import driver

        driver.active.get_current_stream  # noqa: B018
        knobs.runtime.launch_enter_hook  # noqa: B018
    except Exception:
        return False
    return (major, minor) >= (3, 4) and torch.version.hip is None


def _hook_idle(hook) -> bool:
    # None (Triton < 3.5) or an empty HookChain (3.5+): nothing to call around a launch
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _launch(fn, grid, args: tuple, constexprs: dict, num_warps: int, key) -> None:
    """``fn[grid](*args, **constexprs, num_warps=num_warps)``, through the fast path if possible.

    ``key`` must determine everything Triton specialises ``args`` on (None: never cache).
    """
    global _fast_launch
    fast = _fast_launch and key is not None and _fast_launch_supported()
    if fast:
        from triton import knobs
        from triton.runtime import driver

        if _hook_idle(knobs.runtime.launch_enter_hook) and _hook_idle(knobs.runtime.launch_exit_hook):
            kern = _fast_cache.get(key)
            if kern is not None:
                try:
                    stream = driver.active.get_current_stream(key[0])
                    g = (*grid, 1, 1)
                    kern.run(g[0], g[1], g[2], stream, kern.function, kern.packed_metadata, None, None, None, *args, *constexprs.values())
                    return
                except Exception:  # launcher API changed: use the normal path from now on
                    _fast_launch = False
                    _fast_cache.clear()
                    fast = False
        else:  # launch hooks (profilers) set: keep Triton's path, which calls them
            fast = False
    kern = fn[grid](*args, **constexprs, num_warps=num_warps)
    if fast and kern is not None and getattr(kern, "function", None) is not None:
        _fast_cache[key] = kern


def _aligned(*ts: Tensor) -> tuple[bool, ...]:
    return tuple(t.data_ptr() % 16 == 0 for t in ts)


def max_times_triton(
    a: Tensor,
    b: Tensor,
    argmax: bool,
    negate: bool = False,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    split: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``max_k a[b,i,k] * b[b,k,j]`` (and its first argmax) for 3-D ``a [B,m,k]``, ``b [B,k,n]``.

    Same dtype (one of :data:`SUPPORTED_DTYPES`), same device, ``k >= 1``, no empty dim, ``k < 2**31``.
    ``negate=True`` computes ``min_k a*b`` as ``-max_k (-a)*b`` (both negations inside the kernel).
    Keyword overrides of the launch configuration are for tests and benchmarks.
    """
    nb, m, k = a.shape
    n = b.shape[2]
    dev = a.device
    dtype = a.dtype
    bm, bn, bk, nw, sp = choose_config(nb, m, k, n, dtype, _num_sms(dev))
    bm, bn, bk, nw = block_m or bm, block_n or bn, block_k or bk, num_warps or nw
    k_split = _cdiv(k, split or sp)
    n_split = _cdiv(k, k_split)
    sb = b.stride()
    if sb[2] != 1:  # rows of b are loaded as vectors
        b = b.contiguous()
        sb = b.stride()
    sa = a.stride()
    is_f64 = dtype == torch.float64
    out = torch.empty((nb, m, n), dtype=dtype, device=dev)
    idx = torch.empty((nb, m, n), dtype=torch.int64, device=dev) if argmax else None
    if n_split == 1:
        pv, pi = out, (idx if argmax else out)
        s_vs = 0
    else:
        acc_dtype = torch.float64 if is_f64 else torch.float32
        pv = torch.empty((n_split, nb, m, n), dtype=acc_dtype, device=dev)
        pi = torch.empty((n_split, nb, m, n), dtype=torch.int32, device=dev) if argmax else pv
        s_vs = nb * m * n
    tiles_n = _cdiv(n, bn)
    n_tiles = _cdiv(m, bm) * tiles_n
    sign = -1.0 if negate else 1.0
    consts = {"ARGMAX": argmax, "IS_F64": is_f64, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    # 64-bit ints change the kernel's signature: such (huge) problems skip the fast launch path
    big = max(nb * m * k, nb * k * n, n_split * nb * m * n, m, n, *sa, *sb) >= 2**31
    dev_index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
    other_device = dev.type == "cuda" and torch.cuda.device_count() > 1 and dev_index != torch.cuda.current_device()
    with torch.cuda.device(dev) if other_device else contextlib.nullcontext():
        for b0 in range(0, nb, _GRID_Y_MAX):
            b1 = min(nb, b0 + _GRID_Y_MAX)
            if nb <= _GRID_Y_MAX:
                a_c, b_c, pv_c, pi_c = a, b, pv, pi
            elif n_split == 1:
                a_c, b_c, pv_c, pi_c = a[b0:b1], b[b0:b1], pv[b0:b1], pi[b0:b1]
            else:
                a_c, b_c, pv_c = a[b0:b1], b[b0:b1], pv[:, b0:b1]
                pi_c = pi[:, b0:b1] if argmax else pv_c
            args = (a_c, b_c, pv_c, pi_c, m, n, k, k_split, tiles_n, sa[0], sa[1], sa[2], sb[0], sb[1], sb[2])
            args += (s_vs, m * n, n, sign, sign if n_split == 1 else 1.0)
            key = None if big else (
                dev_index, "mt", dtype, argmax, n_split == 1, bm, bn, bk, nw,
                _int_class(n), _int_class(sa[2]), _int_class(sb[1]), _int_class(sb[2]),
                _aligned(a_c, b_c, pv_c, pi_c),
            )  # fmt: skip
            _launch(_max_times_kernel, (n_tiles, b1 - b0, n_split), args, consts, nw, key)
        if n_split > 1:
            total = nb * m * n
            args = (pv, pi, out, idx if argmax else out, total, n_split, s_vs, sign)
            key = None if big else (dev_index, "combine", dtype, argmax, _aligned(*args[:4]))
            consts = {"ARGMAX": argmax, "BLOCK": _COMBINE_BLOCK}
            _launch(_combine_kernel, (_cdiv(total, _COMBINE_BLOCK),), args, consts, 4, key)
    return out, idx
