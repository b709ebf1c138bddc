"""Max-times (and min-times) matrix contraction: the (max, x) semiring matrix product.

    C[..., i, j] = max_k a[..., i, k] * b[..., k, j]

Three backends compute the same thing:

* ``"cpp"`` -- a cache-blocked, register-tiled C++ kernel (float32 / float64, CPU tensors),
  compiled on first use with :func:`torch.utils.cpp_extension.load_inline` and cached under
  ``~/.cache/inseq_semiring/ext/<hash of source and flags>``; a changed source rebuilds.
  Built with ``-O3 -march=native`` but without ``-ffast-math`` (which would let the compiler
  assume away NaN/inf and rewrite the strict compare behind the tie rule). Inputs are made
  contiguous; the batch is flattened and split, with row and column chunks, over torch's
  intra-op threads (``torch.set_num_threads``).
* ``"triton"`` -- a Triton kernel for CUDA tensors (float32 / float64, and float16 / bfloat16
  accumulated in float32), in :mod:`inseq_semiring.kernels.maxtimes_triton`; that module (and
  ``triton``) is imported on the first CUDA call only. Output tiles x batch x (when the tiles
  alone cannot fill the GPU) slices of ``k`` merged by a second small kernel.
* ``"torch"`` -- a pure-PyTorch fallback, device-agnostic (CPU, CUDA, ...), any dtype torch can
  multiply and compare. It never materialises the full ``[*batch, m, k, n]`` product: it walks
  blocks of the batch, ``m``, ``n`` and ``k`` sized so that the temporaries stay under a
  device-dependent budget (CPU: ``_TORCH_TARGET_BYTES``, never more than ``_TORCH_CHUNK_BYTES``,
  to stay in cache; other devices: ``_TORCH_DEVICE_TARGET_BYTES``, large blocks to cut kernel
  launches) and keeps a running max (and argmax) across the ``k`` blocks.

The C++ backend is used for CPU float32/float64 inputs and the Triton backend for CUDA
float32/float64/float16/bfloat16 inputs, unless the environment variable
``INSEQ_SEMIRING_NO_EXT=1`` is set, or the build / the import of ``triton`` / the Triton kernel
compilation failed (then a single warning is issued and the torch backend is used from then on).
:func:`active_backend` says which backend a device's inputs get.

Semantics shared by all backends (and checked by ``tests/test_maxtimes.py``):

* Values are a plain max of ordinary float products (any sign; not a max of absolute values).
  ``inf * 0`` is NaN as usual. (Triton, float16/bfloat16 inputs: products are formed exactly in
  float32 and the max is rounded once; the value equals the max of the rounded products, but at
  products that only tie after rounding the index is that of the larger exact product.)
* NaN propagates: if any product in the reduction over ``k`` is NaN (a NaN input, or an
  ``inf * 0`` product), the output is NaN. The argmax index at such an output is unspecified
  (some valid index in ``[0, k)``; the torch backend gives the first NaN product's).
* Ties break to the SMALLEST ``k``: ``k`` is scanned in increasing order and the winner is only
  replaced by a strictly greater product. ``-0.0`` and ``+0.0`` are equal, so they tie (the
  sign of a zero result is unspecified); if every product is ``-inf`` the result is ``-inf``
  with index 0.
* Empty contraction (``k == 0``): the result is the semiring zero, ``-inf`` for
  :func:`max_times` (``+inf`` for :func:`min_times`), and the argmax index is ``-1``.
* The result is a new tensor and is not tracked by autograd.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import Tensor

from ..rules import jacobians as _jacobians
from .extension import NO_EXT_ENV, CompiledExtension, _env_no_ext, _short_reason, dispatcher_op  # noqa: F401  (NO_EXT_ENV re-exported)

__all__ = ["max_times", "min_times", "max_times_abs", "max_min_pair", "fuses", "active_backend", "extension_build_seconds",
           "NO_EXT_ENV"]

#: Environment variable that, when set to ``1`` (or ``true``/``yes``), forces the torch backend.

#: Upper bound on the size of one temporary of the torch backend (bytes).
_TORCH_CHUNK_BYTES = 64 << 20
#: Preferred size of one temporary of the torch backend (bytes): small enough to stay in cache.
_TORCH_TARGET_BYTES = 4 << 20
#: Preferred number of k rows per block of the torch backend.
_TORCH_KC = 32
#: Size of the temporaries of the torch backend on non-CPU devices (bytes): GPU memory is
#: plentiful and every block costs several kernel launches (and a host sync with ``argmax``).
_TORCH_DEVICE_TARGET_BYTES = 256 << 20
#: Preferred number of k rows per block of the torch backend on non-CPU devices.
_TORCH_DEVICE_KC = 255

_EXT_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <tuple>

// ---------------------------------------------------------------------------------------------
// Vector width: GCC/Clang vector extensions, sized for the widest ISA enabled by -march=native.
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
#define MT_VBYTES 64
#define MT_NREGS 32
#elif defined(__AVX__)
#define MT_VBYTES 32
#define MT_NREGS 16
#elif defined(__aarch64__)
#define MT_VBYTES 16
#define MT_NREGS 32
#else
#define MT_VBYTES 16
#define MT_NREGS 16
#endif

// Cache blocking (elements): k-block, rows per task, columns per task.
#ifndef MT_KC
#define MT_KC 256
#endif
#ifndef MT_MC
#define MT_MC 192
#endif
#ifndef MT_NC
#define MT_NC 1536
#endif

namespace {

template <typename T> struct VT;
template <> struct VT<float> {
  typedef float V __attribute__((vector_size(MT_VBYTES)));
  typedef int32_t IV __attribute__((vector_size(MT_VBYTES)));
  typedef int32_t I;   // index lanes match the value lanes, so a compare mask selects both
  typedef uint32_t U;
  static constexpr U EXP = 0x7f800000u;
};
template <> struct VT<double> {
  typedef double V __attribute__((vector_size(MT_VBYTES)));
  typedef int64_t IV __attribute__((vector_size(MT_VBYTES)));
  typedef int64_t I;
  typedef uint64_t U;
  static constexpr U EXP = 0x7ff0000000000000ull;
};

// Register tile: MR rows x NV vectors. Accumulators (and index accumulators when ARG) must fit
// in the register file next to NV loaded B vectors and one broadcast.
#if MT_NREGS >= 32
#ifndef MT_MR0
#define MT_MR0 6
#define MT_NV0 4
#endif
#ifndef MT_MR1
#define MT_MR1 4
#define MT_NV1 3
#endif
#else
#ifndef MT_MR0
#define MT_MR0 6
#define MT_NV0 2
#endif
#ifndef MT_MR1
#define MT_MR1 2
#define MT_NV1 2
#endif
#endif
template <bool ARG> struct Tile;
template <> struct Tile<false> { static constexpr int MR = MT_MR0, NV = MT_NV0; };
template <> struct Tile<true> { static constexpr int MR = MT_MR1, NV = MT_NV1; };

template <typename T> struct Buf {  // 64-byte aligned scratch, grown on demand
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      size_t bytes = ((want * sizeof(T) + 63) / 64) * 64;
      p = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!p) throw std::bad_alloc();
      n = want;
    }
    return p;
  }
  ~Buf() { std::free(p); }
};

template <typename V, typename T> static inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> static inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One MR x NR tile, one k-block. Ap: packed [kc][MR], Bp: packed [kc][NR],
// Ct / It: the tile's running max / argmax, [MR][NR] row-major.
// A product replaces the running value only if strictly greater (NaN never replaces): since k
// is scanned in increasing order, ties keep the smallest k.
template <typename T, bool ARG, int MR, int NV>
static inline __attribute__((always_inline)) void micro(
    const T* __restrict Ap, const T* __restrict Bp, int64_t kc, typename VT<T>::I kbase,
    T* __restrict Ct, typename VT<T>::I* __restrict It) {
  typedef typename VT<T>::V V;
  typedef typename VT<T>::IV IV;
  constexpr int W = MT_VBYTES / sizeof(T);
  constexpr int NR = NV * W;
  V c[MR][NV];
  IV ix[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      c[r][v] = vload<V>(Ct + r * NR + v * W);
      if (ARG) ix[r][v] = vload<IV>(It + r * NR + v * W);
    }
  IV kv = IV{} + kbase;
  const IV one = IV{} + 1;
  for (int64_t p = 0; p < kc; ++p) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(Bp + p * NR + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T s = Ap[p * MR + r];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const V prod = bv[v] * s;
        if (ARG) {
          const IV gt = prod > c[r][v];
          c[r][v] = gt ? prod : c[r][v];
          ix[r][v] = gt ? kv : ix[r][v];
        } else {
          c[r][v] = prod > c[r][v] ? prod : c[r][v];
        }
      }
    }
    if (ARG) kv += one;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      vstore(Ct + r * NR + v * W, c[r][v]);
      if (ARG) vstore(It + r * NR + v * W, ix[r][v]);
    }
}

template <typename T> static inline bool nonfinite(T x) {
  typename VT<T>::U u;
  std::memcpy(&u, &x, sizeof(T));
  return (u & VT<T>::EXP) == VT<T>::EXP;
}

template <typename T> struct Scratch {
  Buf<T> ap, bp, cw;
  Buf<typename VT<T>::I> iw;
};

// Rows [i0, i1) x columns [j0, j1) of one matrix product; returns true if a NaN/inf input
// element was seen (the caller then fixes the NaN outputs up).
// Pack B[p0:p0+kc, j:j+w] (element (p, q) at B[p * sbk + q * sbn]) as [p][NR], |x| when ABSB, zero columns
// past the edge; returns whether a NaN/inf element was seen. A transposed B (sbn != 1) is read along p.
template <typename T, bool ABSB>
static inline unsigned pack_b(const T* B, int64_t sbk, int64_t sbn, int64_t p0, int64_t kc, int64_t j,
                              int64_t w, int NR, T* Bp) {
  unsigned bad = 0;
  if (sbn == 1) {
    for (int64_t p = 0; p < kc; ++p) {
      const T* src = B + (p0 + p) * sbk + j;
      T* dst = Bp + p * NR;
      for (int64_t q = 0; q < w; ++q) {
        const T x = src[q];
        bad |= nonfinite(x);
        dst[q] = ABSB ? std::fabs(x) : x;
      }
      for (int64_t q = w; q < NR; ++q) dst[q] = T(0);
    }
  } else {
    // groups of G columns: G read streams along p, G consecutive writes per p (a column at a time would write
    // with a stride of NR elements and run ~10x slower)
    constexpr int G = 8;
    for (int64_t q0 = 0; q0 < w; q0 += G) {
      const int g = static_cast<int>(std::min<int64_t>(G, w - q0));
      const T* src = B + p0 * sbk + (j + q0) * sbn;
      if (g == G && sbk == 1) {
        for (int64_t p = 0; p < kc; ++p) {
          T* dst = Bp + p * NR + q0;
#pragma GCC unroll 8
          for (int qq = 0; qq < G; ++qq) {
            const T x = src[qq * sbn + p];
            bad |= nonfinite(x);
            dst[qq] = ABSB ? std::fabs(x) : x;
          }
        }
      } else {
        for (int64_t p = 0; p < kc; ++p) {
          T* dst = Bp + p * NR + q0;
          for (int qq = 0; qq < g; ++qq) {
            const T x = src[qq * sbn + p * sbk];
            bad |= nonfinite(x);
            dst[qq] = ABSB ? std::fabs(x) : x;
          }
        }
      }
    }
    for (int64_t p = 0; p < kc; ++p)
      for (int64_t q = w; q < NR; ++q) Bp[p * NR + q] = T(0);
  }
  return bad;
}

template <typename T>
static inline unsigned pack_a(const T* A, int64_t k, int64_t i0, int64_t mb, int64_t mt, int MR, int64_t p0,
                              int64_t kc, T* Ap) {
  unsigned bad = 0;
  for (int64_t t = 0; t < mt; ++t) {
    T* dst = Ap + t * kc * MR;
    for (int r = 0; r < MR; ++r) {
      const int64_t row = t * MR + r;
      if (row < mb) {
        const T* src = A + (i0 + row) * k + p0;
        for (int64_t p = 0; p < kc; ++p) {
          const T x = src[p];
          bad |= nonfinite(x);
          dst[p * MR + r] = x;
        }
      } else {
        for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = T(0);
      }
    }
  }
  return bad;
}

// The valid part of a block's output tiles (mt x nt tiles of MR x NR, the block mb x nb): f(row, j, width, offset
// of the tile row in the tile buffer), for each row of each tile, as the write-back of run_block and run_block_pair.
template <typename F>
static inline void for_each_tile_row(int64_t mt, int64_t nt, int64_t mb, int64_t nb, int MR, int NR, F&& f) {
  for (int64_t it = 0; it < mt; ++it)
    for (int r = 0; r < MR; ++r) {
      const int64_t row = it * MR + r;
      if (row >= mb) break;
      for (int64_t jt = 0; jt < nt; ++jt) {
        const int64_t j = jt * NR;
        f(row, j, std::min<int64_t>(NR, nb - j), (it * nt + jt) * MR * NR + r * NR);
      }
    }
}

template <typename T, bool ARG, bool ABSB>
static bool run_block(const T* A, const T* B, T* C, int64_t* Cidx, int64_t k, int64_t n, int64_t sbk,
                      int64_t sbn, int64_t i0, int64_t i1, int64_t j0, int64_t j1, Scratch<T>& s) {
  typedef typename VT<T>::I I;
  constexpr int W = MT_VBYTES / sizeof(T);
  constexpr int MR = Tile<ARG>::MR, NV = Tile<ARG>::NV, NR = NV * W;
  const int64_t mb = i1 - i0, nb = j1 - j0;
  const int64_t mt = (mb + MR - 1) / MR, nt = (nb + NR - 1) / NR;
  const int64_t KC = std::min<int64_t>(MT_KC, k);
  T* Ap = s.ap.get(static_cast<size_t>(mt * MR * KC));
  T* Bp = s.bp.get(static_cast<size_t>(KC * NR));
  T* Cw = s.cw.get(static_cast<size_t>(mt * nt * MR * NR));
  I* Iw = ARG ? s.iw.get(static_cast<size_t>(mt * nt * MR * NR)) : nullptr;
  std::fill(Cw, Cw + mt * nt * MR * NR, -std::numeric_limits<T>::infinity());
  if (ARG) std::fill(Iw, Iw + mt * nt * MR * NR, I(0));
  unsigned bad = 0;
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, k - p0);
    bad |= pack_a(A, k, i0, mb, mt, MR, p0, kc, Ap);  // A[i0:i1, p0:p0+kc] as [tile][p][r], zero rows past the edge
    for (int64_t jt = 0; jt < nt; ++jt) {
      // pack B[p0:p0+kc, j:j+NR] as [p][NR], zero columns past the edge
      const int64_t j = j0 + jt * NR;
      const int64_t w = std::min<int64_t>(NR, j1 - j);
      bad |= pack_b<T, ABSB>(B, sbk, sbn, p0, kc, j, w, NR, Bp);
      for (int64_t it = 0; it < mt; ++it) {
        const int64_t off = (it * nt + jt) * MR * NR;
        micro<T, ARG, MR, NV>(Ap + it * kc * MR, Bp, kc, static_cast<I>(p0), Cw + off,
                              ARG ? Iw + off : nullptr);
      }
    }
  }
  // unpack the valid part of the tiles
  for_each_tile_row(mt, nt, mb, nb, MR, NR, [&](int64_t row, int64_t j, int64_t w, int64_t off) {
    std::memcpy(C + (i0 + row) * n + j0 + j, Cw + off, static_cast<size_t>(w) * sizeof(T));
    if (ARG) {
      int64_t* dst = Cidx + (i0 + row) * n + j0 + j;
      for (int64_t q = 0; q < w; ++q) dst[q] = static_cast<int64_t>(Iw[off + q]);
    }
  });
  return bad != 0;
}

// Every (batch, MT_MC x MT_NC block) task, in parallel; each thread owns one scratch S.
// block(bi, i0, i1, j0, j1, s) returns whether it saw a non-finite input.
template <typename S, typename F>
static bool for_each_block(int64_t nbatch, int64_t m, int64_t n, F&& block) {
  const int64_t mch = (m + MT_MC - 1) / MT_MC, nch = (n + MT_NC - 1) / MT_NC;
  const int64_t ntask = nbatch * mch * nch;
  std::atomic<bool> bad(false);
  at::parallel_for(0, ntask, 1, [&](int64_t beg, int64_t end) {
    S s;
    bool local = false;
    for (int64_t t = beg; t < end; ++t) {
      const int64_t bi = t / (mch * nch), rem = t % (mch * nch);
      const int64_t ic = rem / nch, jc = rem % nch;
      const int64_t i0 = ic * MT_MC, i1 = std::min<int64_t>(m, i0 + MT_MC);
      const int64_t j0 = jc * MT_NC, j1 = std::min<int64_t>(n, j0 + MT_NC);
      local |= block(bi, i0, i1, j0, j1, s);
    }
    if (local) bad.store(true);
  });
  return bad.load();
}

template <typename T, bool ARG, bool ABSB>
static bool run_all(const T* A, const T* B, T* C, int64_t* Cidx, int64_t nbatch, int64_t m,
                    int64_t k, int64_t n, int64_t sbb, int64_t sbk, int64_t sbn) {
  return for_each_block<Scratch<T>>(nbatch, m, n, [&](int64_t bi, int64_t i0, int64_t i1, int64_t j0,
                                                      int64_t j1, Scratch<T>& s) {
    return run_block<T, ARG, ABSB>(A + bi * m * k, B + bi * sbb, C + bi * m * n,
                                   ARG ? Cidx + bi * m * n : nullptr, k, n, sbk, sbn, i0, i1, j0, j1, s);
  });
}

// ---------------------------------------------------------------------------------------------
// Signed pair (no argmax): hi = max_p max(h_p b_pj, l_p b_pj), lo = min_p min(h_p b_pj, l_p b_pj)
// in one pass over B: both products once, four compares (the stacked form [h, l, -h, -l] costs
// four products and four compares, and packs B once per 192 of its 4x rows).
// ---------------------------------------------------------------------------------------------
#if MT_NREGS >= 32
#ifndef MT_MRP
#define MT_MRP 4
#define MT_NVP 3
#endif
#else
#ifndef MT_MRP
#define MT_MRP 2
#define MT_NVP 2
#endif
#endif

template <typename T, int MR, int NV>
static inline __attribute__((always_inline)) void micro_pair(
    const T* __restrict Aph, const T* __restrict Apl, const T* __restrict Bp, int64_t kc,
    T* __restrict Ch, T* __restrict Cl) {
  typedef typename VT<T>::V V;
  constexpr int W = MT_VBYTES / sizeof(T);
  constexpr int NR = NV * W;
  V hi[MR][NV], lo[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      hi[r][v] = vload<V>(Ch + r * NR + v * W);
      lo[r][v] = vload<V>(Cl + r * NR + v * W);
    }
  for (int64_t p = 0; p < kc; ++p) {
    V bv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(Bp + p * NR + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T sh = Aph[p * MR + r], sl = Apl[p * MR + r];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const V p1 = bv[v] * sh, p2 = bv[v] * sl;
        hi[r][v] = p1 > hi[r][v] ? p1 : hi[r][v];
        hi[r][v] = p2 > hi[r][v] ? p2 : hi[r][v];
        lo[r][v] = p1 < lo[r][v] ? p1 : lo[r][v];
        lo[r][v] = p2 < lo[r][v] ? p2 : lo[r][v];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      vstore(Ch + r * NR + v * W, hi[r][v]);
      vstore(Cl + r * NR + v * W, lo[r][v]);
    }
}

template <typename T> struct PairScratch {
  Buf<T> aph, apl, bp, ch, cl;
};

template <typename T>
static bool run_block_pair(const T* Ah, const T* Al, const T* B, T* Ch, T* Cl, int64_t k, int64_t n,
                           int64_t sbk, int64_t sbn, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                           PairScratch<T>& s) {
  constexpr int W = MT_VBYTES / sizeof(T);
  constexpr int MR = MT_MRP, NV = MT_NVP, NR = NV * W;
  const int64_t mb = i1 - i0, nb = j1 - j0;
  const int64_t mt = (mb + MR - 1) / MR, nt = (nb + NR - 1) / NR;
  const int64_t KC = std::min<int64_t>(MT_KC, k);
  T* Aph = s.aph.get(static_cast<size_t>(mt * MR * KC));
  T* Apl = s.apl.get(static_cast<size_t>(mt * MR * KC));
  T* Bp = s.bp.get(static_cast<size_t>(KC * NR));
  const size_t tiles = static_cast<size_t>(mt * nt * MR * NR);
  T* Hw = s.ch.get(tiles);
  T* Lw = s.cl.get(tiles);
  std::fill(Hw, Hw + tiles, -std::numeric_limits<T>::infinity());
  std::fill(Lw, Lw + tiles, std::numeric_limits<T>::infinity());
  unsigned bad = 0;
  for (int64_t p0 = 0; p0 < k; p0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, k - p0);
    bad |= pack_a(Ah, k, i0, mb, mt, MR, p0, kc, Aph);
    bad |= pack_a(Al, k, i0, mb, mt, MR, p0, kc, Apl);
    for (int64_t jt = 0; jt < nt; ++jt) {
      const int64_t j = j0 + jt * NR;
      const int64_t w = std::min<int64_t>(NR, j1 - j);
      bad |= pack_b<T, false>(B, sbk, sbn, p0, kc, j, w, NR, Bp);
      for (int64_t it = 0; it < mt; ++it) {
        const int64_t off = (it * nt + jt) * MR * NR;
        micro_pair<T, MR, NV>(Aph + it * kc * MR, Apl + it * kc * MR, Bp, kc, Hw + off, Lw + off);
      }
    }
  }
  for_each_tile_row(mt, nt, mb, nb, MR, NR, [&](int64_t row, int64_t j, int64_t w, int64_t off) {
    std::memcpy(Ch + (i0 + row) * n + j0 + j, Hw + off, static_cast<size_t>(w) * sizeof(T));
    std::memcpy(Cl + (i0 + row) * n + j0 + j, Lw + off, static_cast<size_t>(w) * sizeof(T));
  });
  return bad != 0;
}

template <typename T>
static bool run_all_pair(const T* Ah, const T* Al, const T* B, T* Ch, T* Cl, int64_t nbatch, int64_t m,
                         int64_t k, int64_t n, int64_t sbb, int64_t sbk, int64_t sbn) {
  return for_each_block<PairScratch<T>>(nbatch, m, n, [&](int64_t bi, int64_t i0, int64_t i1, int64_t j0,
                                                          int64_t j1, PairScratch<T>& s) {
    return run_block_pair<T>(Ah + bi * m * k, Al + bi * m * k, B + bi * sbb, Ch + bi * m * n, Cl + bi * m * n, k,
                             n, sbk, sbn, i0, i1, j0, j1, s);
  });
}

}  // namespace

// a: [B, m, k], b: [B, k, n], both contiguous, same dtype (float32/float64), k >= 1.
// Returns (values [B, m, n], argmax [B, m, n] int64 or an empty tensor, saw_nonfinite_input).
// b may have any strides (a transposed or expanded weight is read in place); absb: use |b|.
std::tuple<torch::Tensor, torch::Tensor, bool> max_times_cpu(torch::Tensor a, torch::Tensor b,
                                                             bool argmax, bool absb) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, "max_times_cpu: expected 3-D inputs");
  TORCH_CHECK(a.is_contiguous(), "max_times_cpu: expected a contiguous a");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "max_times_cpu: dtype mismatch");
  const int64_t nb = a.size(0), m = a.size(1), k = a.size(2), n = b.size(2);
  TORCH_CHECK(b.size(0) == nb && b.size(1) == k, "max_times_cpu: shape mismatch");
  TORCH_CHECK(k >= 1, "max_times_cpu: k must be >= 1");
  TORCH_CHECK(k < (int64_t(1) << 31), "max_times_cpu: k too large");
  auto c = torch::empty({nb, m, n}, a.options());
  auto idx = argmax ? torch::empty({nb, m, n}, a.options().dtype(torch::kInt64))
                    : torch::empty({0}, a.options().dtype(torch::kInt64));
  if (nb == 0 || m == 0 || n == 0) return std::make_tuple(c, idx, false);
  bool bad = false;
  int64_t* ip = argmax ? idx.data_ptr<int64_t>() : nullptr;
  if (a.scalar_type() == torch::kFloat32) {
    const float* A = a.data_ptr<float>();
    const float* B = b.data_ptr<float>();
    float* C = c.data_ptr<float>();
    const int64_t sb = b.stride(0), sk = b.stride(1), sn = b.stride(2);
    if (absb)
      bad = argmax ? run_all<float, true, true>(A, B, C, ip, nb, m, k, n, sb, sk, sn)
                   : run_all<float, false, true>(A, B, C, ip, nb, m, k, n, sb, sk, sn);
    else
      bad = argmax ? run_all<float, true, false>(A, B, C, ip, nb, m, k, n, sb, sk, sn)
                   : run_all<float, false, false>(A, B, C, ip, nb, m, k, n, sb, sk, sn);
  } else if (a.scalar_type() == torch::kFloat64) {
    const double* A = a.data_ptr<double>();
    const double* B = b.data_ptr<double>();
    double* C = c.data_ptr<double>();
    const int64_t sb = b.stride(0), sk = b.stride(1), sn = b.stride(2);
    if (absb)
      bad = argmax ? run_all<double, true, true>(A, B, C, ip, nb, m, k, n, sb, sk, sn)
                   : run_all<double, false, true>(A, B, C, ip, nb, m, k, n, sb, sk, sn);
    else
      bad = argmax ? run_all<double, true, false>(A, B, C, ip, nb, m, k, n, sb, sk, sn)
                   : run_all<double, false, false>(A, B, C, ip, nb, m, k, n, sb, sk, sn);
  } else {
    TORCH_CHECK(false, "max_times_cpu: only float32 and float64 are supported");
  }
  return std::make_tuple(c, idx, bad);
}

// h, l: [B, m, k] contiguous, b: [B, k, n] any strides, same dtype, k >= 1.
// Returns (max_p max(h b, l b) [B, m, n], min_p min(h b, l b) [B, m, n], saw_nonfinite_input).
std::tuple<torch::Tensor, torch::Tensor, bool> max_min_pair_cpu(torch::Tensor h, torch::Tensor l,
                                                                torch::Tensor b) {
  TORCH_CHECK(h.dim() == 3 && l.dim() == 3 && b.dim() == 3, "max_min_pair_cpu: expected 3-D inputs");
  TORCH_CHECK(h.is_contiguous() && l.is_contiguous(), "max_min_pair_cpu: expected contiguous h, l");
  TORCH_CHECK(h.scalar_type() == b.scalar_type() && l.scalar_type() == b.scalar_type(),
              "max_min_pair_cpu: dtype mismatch");
  TORCH_CHECK(h.sizes() == l.sizes(), "max_min_pair_cpu: h and l differ in shape");
  const int64_t nb = h.size(0), m = h.size(1), k = h.size(2), n = b.size(2);
  TORCH_CHECK(b.size(0) == nb && b.size(1) == k, "max_min_pair_cpu: shape mismatch");
  TORCH_CHECK(k >= 1, "max_min_pair_cpu: k must be >= 1");
  auto hi = torch::empty({nb, m, n}, h.options());
  auto lo = torch::empty({nb, m, n}, h.options());
  if (nb == 0 || m == 0 || n == 0) return std::make_tuple(hi, lo, false);
  const int64_t sb = b.stride(0), sk = b.stride(1), sn = b.stride(2);
  bool bad = false;
  if (h.scalar_type() == torch::kFloat32) {
    bad = run_all_pair<float>(h.data_ptr<float>(), l.data_ptr<float>(), b.data_ptr<float>(),
                              hi.data_ptr<float>(), lo.data_ptr<float>(), nb, m, k, n, sb, sk, sn);
  } else if (h.scalar_type() == torch::kFloat64) {
    bad = run_all_pair<double>(h.data_ptr<double>(), l.data_ptr<double>(), b.data_ptr<double>(),
                               hi.data_ptr<double>(), lo.data_ptr<double>(), nb, m, k, n, sb, sk, sn);
  } else {
    TORCH_CHECK(false, "max_min_pair_cpu: only float32 and float64 are supported");
  }
  return std::make_tuple(hi, lo, bad);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("max_times_cpu", &max_times_cpu, "max-times product of [B,m,k] x [B,k,n] (b any strides, |b| if absb)",
          pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("argmax"), pybind11::arg("absb") = false,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("max_min_pair_cpu", &max_min_pair_cpu, "signed max/min-times of the pair (h, l) with b",
          pybind11::arg("h"), pybind11::arg("l"), pybind11::arg("b"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

_EXT_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
# No -ffast-math: it would let the compiler assume there are no NaN/inf (breaking the NaN
# bookkeeping) and rewrite the strict ``>`` compare that implements the tie rule.

EXTENSION = CompiledExtension("maxtimes", _CPP_SOURCE, _EXT_CFLAGS, "max-times")
_ext_lock = threading.Lock()  # guards the Triton import
_triton_module = None  # inseq_semiring.kernels.maxtimes_triton once imported
_triton_failed = False  # its import or a kernel compilation failed (warned once)


def _load_ext(stacklevel: int = 2):
    """The compiled module (built on first use), or None if unavailable; ``stacklevel`` (for the one-time warning)
    counts frames from this function to the user code."""
    return EXTENSION.load(stacklevel + 1)


def _load_triton(stacklevel: int = 2):
    """Import (first call) the Triton kernel module; None if unavailable (warned once)."""
    global _triton_module, _triton_failed
    if _triton_module is not None or _triton_failed:
        return _triton_module
    with _ext_lock:
        if _triton_module is not None or _triton_failed:
            return _triton_module
        try:
            from . import maxtimes_triton
        except Exception as exc:  # triton not installed, incompatible version, ...
            _triton_failed = True
            warnings.warn(
                "inseq_semiring: could not import the Triton max-times kernel "
                f"({_short_reason(exc)}); max_times/min_times on CUDA fall back to the slower "
                f"pure-PyTorch implementation for the rest of this process. Set {NO_EXT_ENV}=1 "
                "to skip the attempt.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
            return None
        _triton_module = maxtimes_triton
        return _triton_module


def _triton_broke(exc: BaseException, stacklevel: int) -> None:
    """The Triton kernel failed to compile or launch: warn once, use the torch backend from now on."""
    global _triton_failed
    with _ext_lock:
        if _triton_failed:
            return
        _triton_failed = True
    warnings.warn(
        f"inseq_semiring: the Triton max-times kernel failed ({_short_reason(exc)}); "
        "max_times/min_times on CUDA fall back to the slower pure-PyTorch implementation for the "
        f"rest of this process. Set {NO_EXT_ENV}=1 to skip the attempt.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def active_backend(device: str | torch.device = "cpu", *, build: bool = True) -> str:
    """Which backend :func:`max_times` uses for float32/float64 tensors on ``device``.

    Returns ``"cpp"`` (compiled kernel, CPU), ``"triton"`` (Triton kernel, CUDA) or ``"torch"``
    (pure-PyTorch fallback). With ``build=True`` (default) this builds/loads the C++ extension
    (CPU) or imports the Triton module (CUDA) if that has not happened yet, so the answer is
    definitive unless the Triton kernel later fails to compile; with ``build=False`` it reports
    ``"cpp"``/``"triton"`` only if already loaded. Other dtypes: integers always use the torch
    backend, float16/bfloat16 the Triton backend on CUDA and the torch backend on CPU.
    """
    dev = torch.device(device)
    if _env_no_ext():
        return "torch"
    if dev.type == "cuda":
        if _triton_module is None and build:
            _load_triton(stacklevel=3)
        return "triton" if _triton_module is not None and not _triton_failed else "torch"
    if dev.type != "cpu":
        return "torch"
    ext = _load_ext(stacklevel=3) if build else EXTENSION.module
    return "cpp" if ext is not None else "torch"


def extension_build_seconds() -> float | None:
    """Seconds the first :func:`_load_ext` call of this process took (compile or cache load)."""
    return EXTENSION.build_seconds


# ------------------------------------------------------------------------------------------
# argument checking
# ------------------------------------------------------------------------------------------


def _check(a: Tensor, b: Tensor, fname: str) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{fname}: a and b must be torch.Tensor, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(
            f"{fname}: a and b must have at least 2 dims ([*batch, m, k] and [*batch, k, n]); "
            f"got a.shape={tuple(a.shape)} and b.shape={tuple(b.shape)}"
        )
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"{fname}: shape mismatch, a.shape={tuple(a.shape)} and b.shape={tuple(b.shape)}; "
            "expected a=[*batch, m, k] and b=[*batch, k, n] with identical batch dims and the "
            "same k (a.shape[-1] == b.shape[-2])"
        )
    if a.device != b.device:
        raise ValueError(f"{fname}: a and b are on different devices ({a.device} and {b.device})")
    if a.is_complex() or b.is_complex():
        raise TypeError(f"{fname}: complex tensors have no order; got {a.dtype} and {b.dtype}")
    if a.dtype != b.dtype:
        dt = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dt), b.to(dt)
    return a, b


# ------------------------------------------------------------------------------------------
# backends (inputs already checked; 3-D [B, m, k] x [B, k, n])
# ------------------------------------------------------------------------------------------


def _torch_backend(a: Tensor, b: Tensor, argmax: bool) -> tuple[Tensor, Tensor | None]:
    """Blocked running max over k with reused, size-bounded [bc, mc, kc, nc] buffers.

    Only fast reductions are used (``amax``): ``torch.max(dim)`` with indices runs ~50x slower
    than ``amax`` on CPU. The argmax of a block is the first ``k`` whose product equals the
    block max ``v``, found as the max over k of a weight ``kk - k`` kept only where ``p == v``
    (so ``kc <= 255``). On CPU float32/float64 blocks with a finite ``v``, ``p == v`` is read
    off ``sign(p - v)`` (0 or -1; exact under IEEE gradual underflow, i.e. unless denormals are
    flushed), because torch's CPU comparisons are several times slower than arithmetic;
    otherwise (NaN/inf max, other dtypes, other devices, flushed denormals) ``torch.eq`` is used.
    """
    nb, m, k = a.shape
    n = b.shape[-1]
    esize = torch.empty((), dtype=a.dtype).element_size()
    per_elem = esize + (2 if argmax else 0)  # product (+ bool hit mask and uint8 weights)
    budget, kc_pref = _torch_block_budget(a.device)
    target = max(1, budget // per_elem)  # elements/block
    # widest blocks along n (contiguous) first, then up to kc_pref rows of k (enough to
    # amortise the per-block [mc, nc] bookkeeping), then m and batch, then the rest of k
    nc = min(n, target)
    kc = max(1, min(k, kc_pref, target // nc))
    mc = max(1, min(m, target // (nc * kc)))
    bc = max(1, min(nb, target // (nc * kc * mc)))
    kc = max(1, min(k, target // (nc * mc * bc), 255 if argmax else k))
    floating = a.is_floating_point()
    dev = a.device
    fast_eq = argmax and dev.type == "cpu" and a.dtype in _EXT_DTYPES and not _flushes_denormals(a.dtype)
    out = torch.empty((nb, m, n), dtype=a.dtype, device=dev)
    idx = torch.empty((nb, m, n), dtype=torch.int64, device=dev) if argmax else None
    # reused buffers: fresh multi-MB allocations cost page faults on every block
    buf = torch.empty(bc * mc * kc * nc, dtype=a.dtype, device=dev)
    if argmax:
        hit_buf = torch.empty(bc * mc * kc * nc, dtype=torch.bool, device=dev)
        w_buf = torch.empty(bc * mc * kc * nc, dtype=torch.uint8, device=dev)
        weights = torch.arange(kc, 0, -1, dtype=torch.uint8, device=dev).view(kc, 1)  # kc - k
        weights_f = weights.to(a.dtype)
    for b0 in range(0, nb, bc):
        b1 = min(nb, b0 + bc)
        for m0 in range(0, m, mc):
            m1 = min(m, m0 + mc)
            for n0 in range(0, n, nc):
                n1 = min(n, n0 + nc)
                run_v = run_i = None
                for k0 in range(0, k, kc):
                    k1 = min(k, k0 + kc)
                    kk = k1 - k0
                    shape = (b1 - b0, m1 - m0, kk, n1 - n0)
                    numel = shape[0] * shape[1] * kk * shape[3]
                    prod = buf[:numel].view(shape)
                    torch.mul(a[b0:b1, m0:m1, k0:k1, None], b[b0:b1, None, k0:k1, n0:n1], out=prod)
                    v = prod.amax(dim=-2)  # NaN-propagating
                    if not argmax:
                        run_v = v if run_v is None else torch.maximum(run_v, v)
                        continue
                    # all finite iff the sum is (an overflowing sum only costs the slow path)
                    # (off the CPU: not read, the NaN-safe path below gives the same values and winners, no sync)
                    v_finite = floating and _jacobians.reads_on_host(v) and bool(torch.isfinite(v.sum()))
                    if fast_eq and v_finite:
                        # p <= v, and p - v == 0 iff p == v: sign is 0 at hits, -1 elsewhere
                        prod.sub_(v.unsqueeze(-2)).sign_()
                        # weight kk - k at hits, negative elsewhere (kk < 256)
                        torch.add(weights_f[kc - kk :], prod, alpha=256, out=prod)
                        i = (kk - prod.amax(dim=-2).to(torch.int64)).add_(k0)  # first hit
                    else:
                        hit = hit_buf[:numel].view(shape)
                        w = w_buf[:numel].view(shape)
                        wk = weights[kc - kk :]  # kk, kk-1, ..., 1
                        torch.eq(prod, v.unsqueeze(-2), out=hit)
                        torch.mul(hit, wk, out=w)
                        i = (kk - w.amax(dim=-2).to(torch.int64)).add_(k0)  # first hit
                        if floating:
                            nan_v = torch.isnan(v)
                            if not _jacobians.reads_on_host(v) or bool(nan_v.any()):  # a NaN max: the first NaN
                                torch.mul(torch.isnan(prod), wk, out=w)
                                i_nan = (kk - w.amax(dim=-2).to(torch.int64)).add_(k0)
                                i = torch.where(nan_v, i_nan, i)
                    if run_v is None:
                        run_v, run_i = v, i
                    else:
                        upd = v > run_v  # strict: ties keep the earlier (smaller) k
                        if floating and not v_finite:  # a NaN sticks once seen
                            upd |= torch.isnan(v) & ~torch.isnan(run_v)
                        run_v = torch.where(upd, v, run_v)
                        run_i = torch.where(upd, i, run_i)
                out[b0:b1, m0:m1, n0:n1] = run_v
                if argmax:
                    idx[b0:b1, m0:m1, n0:n1] = run_i
    return out, idx


def _torch_block_budget(device: torch.device) -> tuple[int, int]:
    """(bytes of temporaries, preferred k rows) per block of the torch backend on ``device``."""
    if torch.device(device).type == "cpu":
        return min(_TORCH_TARGET_BYTES, _TORCH_CHUNK_BYTES), _TORCH_KC
    return _TORCH_DEVICE_TARGET_BYTES, _TORCH_DEVICE_KC


def _flushes_denormals(dtype: torch.dtype) -> bool:
    """Whether CPU arithmetic currently flushes subnormal results to zero (set_flush_denormal)."""
    smallest_normal = torch.finfo(dtype).tiny
    return bool(torch.tensor(smallest_normal, dtype=dtype) * 0.5 == 0)  # a subnormal, unless flushed


def _nan_fixup(a: Tensor, b: Tensor, out: Tensor) -> None:
    """Set to NaN every output whose reduction contains a NaN product (the C++ kernel skips them).

    A product a[i,k] * b[k,j] is NaN iff a factor is NaN, or one is +-inf and the other is 0.
    """
    nan_a = torch.isnan(a)
    nan_b = torch.isnan(b)
    mask = nan_a.any(-1).unsqueeze(-1) | nan_b.any(-2).unsqueeze(-2)
    inf_a = torch.isinf(a)
    inf_b = torch.isinf(b)
    if bool(inf_a.any()) or bool(inf_b.any()):
        f = torch.float32
        # counts of (inf, 0) pairs per output; a sum of non-negative terms is > 0 iff one is 1
        pairs = torch.bmm(inf_a.to(f), (b == 0).to(f)) + torch.bmm((a == 0).to(f), inf_b.to(f))
        mask |= pairs > 0
    out.masked_fill_(mask, float("nan"))


def _kernel_max_times(a: Tensor, b: Tensor, argmax: bool, absb: bool) -> tuple[Tensor, Tensor]:
    """The C++ max-times of 3-D ``a`` (contiguous) and ``b`` (any strides; ``absb``: ``|b|``), NaN rule applied:
    ``(values, winning k)`` (an empty index without ``argmax``)."""
    out, idx, nonfinite = EXTENSION.load().max_times_cpu(a, b, argmax, absb)
    if nonfinite:
        _nan_fixup(a, b, out)  # |b| has the NaN / inf / zero pattern of b
    return out, idx


#: The kernel as the operator ``torch.ops.inseq_semiring.max_times`` (one opaque call in a traced sweep).
_max_times_kernel = dispatcher_op("max_times", "(Tensor a, Tensor b, bool argmax, bool absb) -> (Tensor, Tensor)",
                                  _kernel_max_times)


def _cpp_backend(a: Tensor, b: Tensor, argmax: bool, absb: bool = False) -> tuple[Tensor, Tensor | None]:
    """``a`` contiguous, ``b`` any strides (read in place); ``absb``: the product with ``|b|``. The extension is
    loaded (callers checked)."""
    out, idx = _max_times_kernel(a, b, argmax, absb)
    return out, (idx if argmax else None)


def _use_triton(a: Tensor) -> object | None:
    if a.device.type != "cuda" or a.dtype not in _TRITON_DTYPES or _env_no_ext() or _triton_failed:
        return None
    if a.shape[-1] >= 2**31:
        return None
    return _load_triton(stacklevel=5)  # user -> max_times -> _max_times_impl -> _use_triton


def _use_cpp(a: Tensor) -> object | None:
    if a.device.type != "cpu" or a.dtype not in _EXT_DTYPES or _env_no_ext():
        return None
    if a.shape[-1] >= 2**31:
        return None
    return _load_ext(stacklevel=5)  # user -> max_times -> _max_times_impl -> _use_cpp


def _max_times_impl(a: Tensor, b: Tensor, argmax: bool, fname: str, backend: str | None, negate: bool):
    a, b = _check(a, b, fname)
    batch = a.shape[:-2]
    m, k = a.shape[-2:]
    n = b.shape[-1]
    with torch.no_grad():
        if k == 0:  # empty max (min): the semiring zero, no winner
            if a.is_floating_point():
                fill = float("inf") if negate else float("-inf")
            else:
                info = torch.iinfo(a.dtype)
                fill = info.max if negate else info.min
            out = torch.full((*batch, m, n), fill, dtype=a.dtype, device=a.device)
            idx = torch.full((*batch, m, n), -1, dtype=torch.int64, device=a.device)
            return (out, idx) if argmax else out
        if a.numel() == 0 or b.numel() == 0:  # empty batch, m or n: nothing to compute
            out = torch.empty((*batch, m, n), dtype=a.dtype, device=a.device)
            idx = torch.empty((*batch, m, n), dtype=torch.int64, device=a.device)
            return (out, idx) if argmax else out
        if backend not in (None, "cpp", "triton", "torch"):
            raise ValueError(f"{fname}: backend must be None, 'cpp', 'triton' or 'torch', got {backend!r}")
        if backend == "triton":
            tri = _load_triton(4) if a.device.type == "cuda" and a.dtype in _TRITON_DTYPES else None
            if tri is None:
                raise RuntimeError(f"{fname}: the Triton backend is not available for {a.device}/{a.dtype}")
        else:
            tri = _use_triton(a) if backend is None else None
        if tri is not None:
            # strided 3-D views where possible: the kernel takes strides (and negates a itself)
            out, idx = None, None
            nd = a.dim()
            if nd == 3:
                a3, b3 = a, b
            elif nd == 2:
                a3, b3 = a.unsqueeze(0), b.unsqueeze(0)
            else:
                a3, b3 = a.reshape(-1, m, k), b.reshape(-1, k, n)
            try:
                out, idx = tri.max_times_triton(a3, b3, argmax, negate)
            except torch.cuda.OutOfMemoryError:  # not a kernel problem
                raise
            except Exception as exc:  # compilation (or launch) failure
                if backend == "triton":
                    raise
                _triton_broke(exc, stacklevel=3)  # user -> max_times -> _max_times_impl
            if out is not None:
                if nd == 2:
                    out, idx = out[0], (idx[0] if argmax else None)
                elif nd > 3:
                    out, idx = out.view(*batch, m, n), (idx.view(*batch, m, n) if argmax else None)
                return (out, idx) if argmax else out
        if negate:  # min_k a*b == -max_k (-a)*b, exactly (negation is exact)
            a = -a
        a3 = a.reshape(-1, m, k).contiguous()
        b3 = b.reshape(-1, k, n)  # the C++ kernel reads b with its strides (transposed / expanded: no copy)
        if backend is None:
            ext = _use_cpp(a3)
        elif backend == "cpp":
            ext = _load_ext(4) if a3.device.type == "cpu" and a3.dtype in _EXT_DTYPES else None
            if ext is None:
                raise RuntimeError(f"{fname}: the C++ backend is not available for {a3.device}/{a3.dtype}")
        else:
            ext = None
        if ext is not None:
            out, idx = _cpp_backend(a3, b3, argmax)
        else:
            out, idx = _torch_backend(a3, b3.contiguous(), argmax)
        out = out.reshape(*batch, m, n)
        if negate:
            out = out.neg_()
        if argmax:
            return out, idx.reshape(*batch, m, n)
        return out


def max_times(a: Tensor, b: Tensor, *, argmax: bool = False, _backend: str | None = None):
    """(max, x) semiring matrix product: ``C[..., i, j] = max_k a[..., i, k] * b[..., k, j]``.

    Args:
        a: ``[*batch, m, k]``.
        b: ``[*batch, k, n]`` with the same batch dims as ``a`` (or both 2-D). Different dtypes
            are promoted (``torch.promote_types``); both must be on the same device.
        argmax: also return the int64 index ``k*`` of the winning term, shape ``[*batch, m, n]``.

    Returns:
        ``C`` (``[*batch, m, n]``, dtype of the inputs) or ``(C, index)`` when ``argmax=True``.

    Ties break to the SMALLEST ``k`` (only a strictly greater product replaces the running
    winner). Values may have any sign: this is a plain max of products, not of ``abs`` values.
    Products are ordinary float products (``inf * 0`` is NaN); a NaN product makes the output
    NaN (the index there is unspecified). ``k == 0`` gives ``-inf`` and index ``-1``.
    Never builds the ``[*batch, m, k, n]`` temporary. Not differentiable (runs under no_grad).
    Raises ValueError naming both shapes if they do not fit together.

    ``_backend`` (``None``/``"cpp"``/``"triton"``/``"torch"``) overrides the automatic backend
    choice; it is for tests and benchmarks.
    """
    return _max_times_impl(a, b, argmax, "max_times", _backend, negate=False)


def min_times(a: Tensor, b: Tensor, *, argmax: bool = False, _backend: str | None = None):
    """(min, x) product: ``C[..., i, j] = min_k a[..., i, k] * b[..., k, j]``.

    Computed as ``-max_times(-a, b)`` (negation is exact, so ``(-a)*b == -(a*b)``); same shape
    rules, same tie rule (ties break to the SMALLEST ``k``), same NaN rule; ``k == 0`` gives
    ``+inf`` and index ``-1``.
    """
    return _max_times_impl(a, b, argmax, "min_times", _backend, negate=True)


def _fused_ext(a: Tensor, *others: Tensor):
    """The C++ module when every input is a CPU float32/float64 tensor of one dtype with k >= 1, else None."""
    if a.device.type != "cpu" or a.dtype not in _EXT_DTYPES or _env_no_ext() or not 0 < a.shape[-1] < 2**31:
        return None
    if any(o.device != a.device or o.dtype != a.dtype for o in others):
        return None
    return _load_ext(stacklevel=4)


def max_times_abs(a: Tensor, b: Tensor, *, argmax: bool = False):
    """``max_k a[..., i, k] |b[..., k, j]|``: :func:`max_times` of ``a`` and ``b.abs()`` (same values, same indices,
    same tie and NaN rules), with ``|b|`` taken while the C++ kernel packs ``b`` (read with its strides), so ``|b|``
    is never materialised; other devices / dtypes: ``max_times(a, b.abs())``."""
    ext = _fused_ext(a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 2 else None
    if ext is None or a.shape[:-2] != b.shape[:-2] or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        return max_times(a, b.abs(), argmax=argmax)
    batch, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[-1]
    if a.numel() == 0 or b.numel() == 0:
        return max_times(a, b.abs(), argmax=argmax)
    with torch.no_grad():
        out, idx = _cpp_backend(a.reshape(-1, m, k).contiguous(), b.reshape(-1, k, n), argmax, absb=True)
    out = out.reshape(*batch, m, n)
    return (out, idx.reshape(*batch, m, n)) if argmax else out


def max_min_pair(h: Tensor, l: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The signed pull of a pair through one product, values only:

        hi[..., i, j] = max_k max(h[..., i, k] b[..., k, j], l[..., i, k] b[..., k, j])
        lo[..., i, j] = min_k min(h[..., i, k] b[..., k, j], l[..., i, k] b[..., k, j])

    i.e. ``max(max_times(h, b), max_times(l, b))`` and ``min(min_times(h, b), min_times(l, b))`` (exactly: a max of
    the same rounded products). The C++ kernel forms both products once per pair and keeps the max and the min in
    one pass over ``b``; an input with NaN / inf, other devices and dtypes take the four-product form."""
    ext = _fused_ext(h, l, b) if h.dim() >= 2 and h.shape == l.shape else None
    if ext is not None and h.shape[:-2] == b.shape[:-2] and b.dim() >= 2 and h.shape[-1] == b.shape[-2] \
            and h.numel() and b.numel():
        batch, (m, k), n = h.shape[:-2], h.shape[-2:], b.shape[-1]
        with torch.no_grad():
            hi, lo = _max_min_pair_kernel(h.reshape(-1, m, k).contiguous(), l.reshape(-1, m, k).contiguous(),
                                          b.reshape(-1, k, n))
        return hi.reshape(*batch, m, n), lo.reshape(*batch, m, n)
    return _four_products(h, l, b)


def _four_products(h: Tensor, l: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`max_min_pair` as four max-/min-times products (any input, NaN / inf included)."""
    both = torch.cat([h, l], -2)
    mx, mn = max_times(both, b), min_times(both, b)
    r = h.shape[-2]
    return torch.maximum(mx[..., :r, :], mx[..., r:, :]), torch.minimum(mn[..., :r, :], mn[..., r:, :])


def _kernel_max_min_pair(h: Tensor, l: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The C++ signed pair pull of 3-D ``h``, ``l`` (contiguous) and ``b``; the four-product form where an input
    holds NaN / inf (the kernel says so)."""
    hi, lo, bad = EXTENSION.load().max_min_pair_cpu(h, l, b)
    return _four_products(h, l, b) if bad else (hi, lo)


#: The kernel as the operator ``torch.ops.inseq_semiring.max_min_pair``.
_max_min_pair_kernel = dispatcher_op("max_min_pair", "(Tensor h, Tensor l, Tensor b) -> (Tensor, Tensor)",
                                     _kernel_max_min_pair)


def fuses(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`max_times_abs` / :func:`max_min_pair` run fused (C++ kernel) for these inputs; otherwise they
    materialise ``|b|`` or take the four-product form, and a caller bounding memory may prefer its own blocks."""
    return _fused_ext(a, b) is not None
