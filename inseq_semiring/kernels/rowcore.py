"""Fused per-row pulls through the |core| of a layer-norm Jacobian.

Layer norm over rows of length ``n`` has the per-row Jacobian ``J = diag(gain) C`` with the
symmetric core

    C_ij = delta_ij - (1 + xh_i xh_j) / n          (xh = the normalised row)

The flow / entropy / max semirings pull vectors through ``A = |C|`` and ``B = -A log A``
(``0 log 0 = 0``), one row ``r`` at a time:

* :func:`core_pull_sum` -- ``zA[r, j] = sum_i p[r, i] A_ij`` and, when ``q`` / ``pb`` are
  given, ``uAB[r, j] = sum_i q[r, i] A_ij + sum_i pb[r, i] B_ij``.
* :func:`core_pull_max` -- ``vals[r, j] = max_i p[r, i] A_ij`` (``p >= 0``) and ``argi[r, j]``,
  the SMALLEST ``i`` attaining it.

Two backends compute the same thing:

* ``"cpp"`` -- a C++ kernel (float32 / float64 CPU tensors) that never materialises ``A`` or
  ``B``. Off the diagonal ``n A_ij = |1 + xh_i xh_j|``, so the sums of the terms linear in ``A`` (all of
  ``zA``; ``q A`` and the ``log n`` part of ``B``) take O(n log n) per row: the ``i`` with
  ``1 + xh_i xh_j >= 0`` are a prefix or a suffix of the sorted row (a radix sort), and prefix sums of ``p`` and
  ``p xh`` over it give every ``j``'s sum, in float64 (the split decided by the exact sign of ``1 + xh_i xh_j``, an
  fma; ``j`` itself left out as two ranges, so a sum without terms is exactly 0). Only the log terms
  ``|c| log |c|`` walk the unordered pairs ``i < j``, once each, contributing to both outputs ``j`` and ``i`` (a
  symmetric matrix-vector product), vectorised with GCC/Clang vector extensions (measured on Zen 3, AVX2, 64 rows of
  768: flow 3.1-4.8 -> 1.8-2.2 ms, entropy 10.6 -> 9.9 ms, both closer to the float64 reference). The log is a
  hand-written branch-free vector log (float32 with AVX-512: a 32-entry table in registers and a cubic log1p,
  five multiply-adds; otherwise ``log2`` by a degree-8 polynomial, the exponent added with one add and
  ``ln 2`` folded into the pair coefficients; fdlibm ``log`` for float64; absolute error ~1e-7 / ~1e-16),
  so no ``-ffast-math`` or vector math library is needed. ``1 + xh_i xh_j`` is a
  single fma (one rounding). For float32 the log terms and short partial sums (at most 32 vectors
  along ``j``, 32 rows along ``i``) run in float32 at full vector width and are flushed into
  float64 accumulators: float32 results land within ~1e-7 (relative to the size of the terms) of
  the float64 reference, while accumulating every term in float64 cost ~2x. The diagonal
  ``c_ii = (n - 1 - xh_i^2) / n`` is computed in float64
  (exactly 0 when ``xh_i^2 == n - 1``). Rows whose ``p`` (and ``q``, ``pb``) are all zero are
  skipped (their outputs are zero; for the max variant ``vals = 0`` and ``argi = 0``). Rows are
  spread over ``at::parallel_for``.
  It is compiled on first use (:class:`~inseq_semiring.kernels.extension.CompiledExtension`) and cached under
  ``~/.cache/inseq_semiring/ext/inseq_semiring_rowcore_<hash of source, flags, CPU>``.
* ``"torch"`` -- the pure-PyTorch reference, device-agnostic (CPU, CUDA, ...), any floating
  dtype: it builds ``C`` densely for chunks of rows (one ``[rows, n, n]`` temporary of about
  ``_TORCH_CHUNK_ELEMS`` elements) and contracts with ``bmm``.

CPU float32/float64 inputs use the C++ backend unless ``INSEQ_SEMIRING_NO_EXT=1`` is set or the
build failed (then one warning is issued and the torch backend is used from then on).

Inputs are assumed finite (``xh`` is a normalised row). A NaN in ``p`` / ``q`` / ``pb``
propagates into the sums as with the reference; for :func:`core_pull_max` NaN or negative ``p``
gives unspecified results. The results are new tensors, not tracked by autograd.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..rules import jacobians as _jacobians
from .extension import CompiledExtension
from .maxtimes import NO_EXT_ENV, _env_no_ext
from .vecmath import VECMATH_CPP

__all__ = ["core_pull_sum", "core_pull_max", "active_backend", "extension_build_seconds", "NO_EXT_ENV"]

#: Elements of one dense ``[rows, n, n]`` temporary of the torch backend (rows are chunked).
_TORCH_CHUNK_ELEMS = 1 << 20

_EXT_DTYPES = (torch.float32, torch.float64)

# The kernels proper: plain C++ (no torch headers), so they can also be compiled stand-alone.
# (VECMATH_CPP: vector types, abs and the branch-free vector log shared with kernels/xlogx.py)
_CPP_KERNELS = VECMATH_CPP + r"""
namespace {

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

// The diagonal |c_ii| in double: c_ii = ((n - 1) - x^2) / n, exactly 0 when x^2 == n - 1.
static inline double diag_abs(double x, int64_t n) {
  return std::fabs((double(n - 1) - x * x) / double(n));
}

// The pair loop's log (float): absolute error ~1e-7 (|log| of the arguments it sees is ~n's log, so this is below
// half an ulp of the result's terms). The pair terms |c| log |c| enter u with weight 1/n next to log(n)/n |c|.
//   AVX-512: x = 2^e m, m in [1, 2) (getexp / getmant); m's top 5 bits pick a table entry inv_k ~ 1/m (10
//   significant bits, so r = m inv_k - 1 is one fma with one rounding) and log(1/inv_k) (float);
//   log x = e log 2 + log(1/inv_k) + log1p(r), |r| < 1/63, log1p(r) = r - r^2/2 + r^3/3 (truncation < 2e-8).
//   x is first raised to the smallest normal (for 0 and subnormal x, c log c is below 2e-36 in absolute value).
//   Five multiply-adds against the polynomial's ten: the pair loop is bound by the multiply-add units.
//   Otherwise (float): vecmath's vlog2_sum, log2 in eight multiply-adds (where ln by the same polynomial took ten:
//   measured on Zen 3, AVX2, the entropy pair loop 8% faster, the same error). The pair loop folds ln 2 into its
//   coefficients (pair_log_unit: the log's base, as its natural log).
// double uses vlog.
#if defined(__AVX512F__)
}  // namespace
#include <immintrin.h>
namespace {
struct PairLogTable {
  alignas(64) float inv[32];
  alignas(64) float log_c[32];
  PairLogTable() {
    for (int k = 0; k < 32; ++k) {
      const double iv = std::ldexp(std::nearbyint(std::ldexp(1.0 / (1.0 + (k + 0.5) / 32.0), 10)), -10);
      inv[k] = float(iv);
      log_c[k] = float(-std::log(iv));
    }
  }
};
static const PairLogTable kPairLogTable;

static inline __m512 vlog_pair16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(std::numeric_limits<float>::min()));
  const __m512 e = _mm512_getexp_ps(x);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __m512i k = _mm512_srli_epi32(_mm512_castps_si512(x), 18);  // the permutes read its low 5 bits
  const __m512 inv = _mm512_permutex2var_ps(_mm512_load_ps(kPairLogTable.inv), k,
                                            _mm512_load_ps(kPairLogTable.inv + 16));
  const __m512 lc = _mm512_permutex2var_ps(_mm512_load_ps(kPairLogTable.log_c), k,
                                           _mm512_load_ps(kPairLogTable.log_c + 16));
  const __m512 r = _mm512_fmsub_ps(m, inv, _mm512_set1_ps(1.0f));
  const __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 3.0f), _mm512_set1_ps(-0.5f));
  const __m512 l1p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693147180559945309f), _mm512_add_ps(lc, l1p));
}
#endif

// The base of vlog_pair's log, as its natural log (the pair loop scales its log coefficients by it).
template <typename T, int W> constexpr double pair_log_unit() {
#if defined(__AVX512F__)
  if (std::is_same<T, float>::value && W == 16) return 1.0;
#endif
  return std::is_same<T, float>::value ? VLOG2_SUM_UNIT : 1.0;
}

template <typename T, int W> static inline typename Vec<T, W>::V vlog_pair(typename Vec<T, W>::V x) {
  typedef typename Vec<T, W>::V V;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && W == 16) {
    return (V)vlog_pair16((__m512)x);
  } else
#endif
  if constexpr (std::is_same<T, float>::value) {  // log2 (vecmath's vlog2_sum)
    return vlog2_sum(x);
  } else {
    return vlog<T, W>(x);
  }
}

template <typename T> struct SumWork {
  Buf<T> x, sb, lu;                               // padded row, pb / n in the log's base, float log partial sums
  Buf<double> y, c0, c1, p00, p01, p10, p11, z, u;  // sorted row, coefficients, their prefix sums, accumulators
  Buf<uint64_t> k0, k1;                           // sort keys (order-preserving bits, index)
  Buf<int32_t> order;
};

#ifndef RC_SEG
#define RC_SEG 32
#endif
#ifndef RC_FLUSH
#define RC_FLUSH 32
#endif

// The bits of x as an unsigned integer in x's order (negatives flipped, positives with the sign bit set).
template <typename T> static inline typename Bits<T>::U order_bits(T x) {
  typedef typename Bits<T>::U U;
  constexpr U SIGN = U(1) << (8 * sizeof(T) - 1);
  U u;
  std::memcpy(&u, &x, sizeof(T));
  return (u & SIGN) ? ~u : (u | SIGN);
}

// order[k] = the index of the k-th smallest x (ties: the smaller index first): an LSD radix sort, three passes of
// 11 bits over 32 key bits packed above the index; a double's key takes its low, then its high 32 bits (stable).
template <typename T> static void sort_order(const T* x, int64_t n, SumWork<T>& wk, int32_t* order) {
  uint64_t* k0 = wk.k0.get(n);
  uint64_t* k1 = wk.k1.get(n);
  for (int half = 0; half < int(sizeof(T) / 4); ++half) {
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t idx = half ? uint32_t(k0[k]) : uint32_t(k);  // the order so far
      k1[k] = (uint64_t(uint32_t(order_bits(x[idx]) >> (32 * half))) << 32) | idx;
    }
    std::swap(k0, k1);
    for (int shift = 32; shift < 64; shift += 11) {
      uint32_t cnt[2049] = {0};
      for (int64_t k = 0; k < n; ++k) ++cnt[((k0[k] >> shift) & 2047u) + 1];
      for (int d = 0; d < 2048; ++d) cnt[d + 1] += cnt[d];
      for (int64_t k = 0; k < n; ++k) k1[cnt[(k0[k] >> shift) & 2047u]++] = k0[k];
      std::swap(k0, k1);
    }
  }
  for (int64_t k = 0; k < n; ++k) order[k] = int32_t(uint32_t(k0[k]));
}

// out_c[j] = sum_{i != j} c_i |1 + x_i x_j| for the NC coefficient vectors c (double), in O(n log n): the i with
// 1 + x_i x_j >= 0 are a prefix (x_j < 0) or a suffix (x_j > 0) of the sorted row, so with the prefix sums
// P0 = sum c_i, P1 = sum c_i x_i the sum is (P0 over that side less the one over the other) + x_j (the same for P1),
// j itself left out of its side as two ranges (no subtraction of its own term: a sum without terms stays 0). The
// split moves one way as x_j grows on either side of 0 (one merge-like pass each, no search) and is decided by the
// sign of fma(x_i, x_j, 1), the sign of the exact 1 + x_i x_j (a single rounding keeps it).
template <typename T, int NC>
static void linear_sums(const T* x, int64_t n, const double* const* coef, double* const* out, SumWork<T>& wk) {
  int32_t* s = wk.order.get(n);
  sort_order<T>(x, n, wk, s);
  double* y = wk.y.get(n);
  double* P0[2] = {wk.p00.get(n + 1), NC > 1 ? wk.p10.get(n + 1) : nullptr};
  double* P1[2] = {wk.p01.get(n + 1), NC > 1 ? wk.p11.get(n + 1) : nullptr};
  for (int c = 0; c < NC; ++c) P0[c][0] = P1[c][0] = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    y[k] = double(x[s[k]]);
    for (int c = 0; c < NC; ++c) {
      const double ck = coef[c][s[k]];
      P0[c][k + 1] = P0[c][k] + ck;
      P1[c][k + 1] = P1[c][k] + ck * y[k];
    }
  }
  // sum over [a, b) u [d, e) less the sum over [f, g), for P0 and P1, with j at position k outside all of them
  const auto side = [&](const double* P, int64_t a, int64_t b, int64_t d, int64_t e, int64_t f, int64_t g) {
    return ((P[b] - P[a]) + (P[e] - P[d])) - (P[g] - P[f]);
  };
  int64_t k = 0, m = 0;
  for (; k < n && y[k] < 0.0; ++k) {  // x_j < 0: the prefix [0, m) has 1 + x_i x_j >= 0 (j among them)
    while (m < n && std::fma(y[m], y[k], 1.0) >= 0.0) ++m;
    for (int c = 0; c < NC; ++c)
      out[c][s[k]] = side(P0[c], 0, k, k + 1, m, m, n) + y[k] * side(P1[c], 0, k, k + 1, m, m, n);
  }
  for (; k < n && y[k] == 0.0; ++k)  // x_j = 0: every term is c_i
    for (int c = 0; c < NC; ++c) out[c][s[k]] = side(P0[c], 0, k, k + 1, n, 0, 0);
  for (m = 0; k < n; ++k) {  // x_j > 0: the suffix [m, n) has 1 + x_i x_j >= 0 (j among them)
    while (m < n && std::fma(y[m], y[k], 1.0) < 0.0) ++m;
    for (int c = 0; c < NC; ++c)
      out[c][s[k]] = side(P0[c], m, k, k + 1, n, 0, m) + y[k] * side(P1[c], m, k, k + 1, n, 0, m);
  }
}

// One row of core_pull_sum: z[j] = sum_i p_i A_ij, u[j] = sum_i q_i A_ij + pb_i B_ij (HQ: q given, HB: pb given).
// With n A_ij = |1 + x_i x_j| = c_ij off the diagonal and -n B_ij = c_ij log c_ij - log(n) c_ij:
//   * the terms linear in c (p_i c_ij for z, (q_i + log(n) pb_i) c_ij for u) are sums of |1 + x_i x_j|, taken in
//     O(n log n) by linear_sums, in double;
//   * only the log terms -(pb_i / n) c_ij log c_ij walk the pairs i < j, W at a time: the j-outputs get a vector
//     update, the i-output a lane-wise running sum reduced after each segment (<= RC_SEG vectors); for float these
//     partial sums (<= RC_FLUSH rows along i) are flushed into the double accumulators (float32 results within
//     ~1e-7 of the float64 reference, at full vector width);
//   * the diagonal A_ii = |n - 1 - x_i^2| / n in double.
template <typename T, bool HQ, bool HB>
static void row_sum(const T* x, const T* p, const T* q, const T* pb, int64_t n, T* oz, T* ou,
                    SumWork<T>& wk) {
  constexpr bool HU = HQ || HB;
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  bool live = false;
  for (int64_t i = 0; i < n && !live; ++i)
    live = p[i] != T(0) || (HQ && q[i] != T(0)) || (HB && pb[i] != T(0));
  if (!live) {
    std::fill(oz, oz + n, T(0));
    if (HU) std::fill(ou, ou + n, T(0));
    return;
  }
  const double logn = std::log(double(n)), inv = 1.0 / double(n);
  double* zd = wk.z.get(n);
  double* ud = HU ? wk.u.get(n) : nullptr;
  double* c0 = wk.c0.get(n);
  double* c1 = HU ? wk.c1.get(n) : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    c0[i] = double(p[i]);
    if (HU) c1[i] = (HQ ? double(q[i]) : 0.0) + (HB ? logn * double(pb[i]) : 0.0);
  }
  const double* coef[2] = {c0, c1};
  double* sums[2] = {zd, ud};
  if (HU) linear_sums<T, 2>(x, n, coef, sums, wk);
  else linear_sums<T, 1>(x, n, coef, sums, wk);
  for (int64_t i = 0; i < n; ++i) {
    const double ad = diag_abs(double(x[i]), n);
    zd[i] = zd[i] * inv + double(p[i]) * ad;
    if (HU) {
      const double bd = ad > 0.0 ? -ad * std::log(ad) : 0.0;
      ud[i] = ud[i] * inv + (HQ ? double(q[i]) * ad : 0.0) + (HB ? double(pb[i]) * bd : 0.0);
    }
  }
  if (HB) {
    // zero padding: the inner loop may run W - 1 lanes past n (x = 0 there, so c = 1 and log c = 0; sb = 0)
    const size_t np = static_cast<size_t>(n + W);
    T* xs = wk.x.get(np);
    T* sb = wk.sb.get(np);
    T* lu = wk.lu.get(np);
    for (size_t i = 0; i < np; ++i) {
      const bool in = i < static_cast<size_t>(n);
      xs[i] = in ? x[i] : T(0);
      sb[i] = in ? T(double(pb[i]) * inv * pair_log_unit<T, W>()) : T(0);  // sb ln(b) log_b c = (pb / n) ln c
      lu[i] = T(0);
    }
    for (int64_t i = 0; i < n; ++i) {
      const T xi = xs[i], sbi = sb[i];
      double tu = 0.0;
      for (int64_t j0 = i + 1; j0 < n; j0 += RC_SEG * W) {
        const int64_t j1 = std::min<int64_t>(n, j0 + RC_SEG * W);
        V su = V{} + T(0), su2 = su;  // two chains of running sums
        const auto pair = [&](int64_t j, V& ru) {
          const V c = vabs<T, W>(vload<V>(xs + j) * xi + T(1));  // c_ij; 1 + xi xj is one fma
          const V d = c * vlog_pair<T, W>(c);                     // c log_b c
          vstore(lu + j, vload<V>(lu + j) - d * sbi);
          ru -= d * vload<V>(sb + j);
        };
        int64_t j = j0;
        for (; j + W < j1; j += 2 * W) {
          pair(j, su);
          pair(j + W, su2);
        }
        if (j < j1) pair(j, su);
        su += su2;
        for (int l = 0; l < W; ++l) tu += double(su[l]);
      }
      ud[i] += tu;
      if ((i + 1) % RC_FLUSH == 0 || i + 1 == n) {  // columns j > i - RC_FLUSH + 1 got updates
        for (int64_t j = std::max<int64_t>(0, i + 2 - RC_FLUSH); j < n; ++j) {
          ud[j] += double(lu[j]);
          lu[j] = T(0);
        }
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    oz[j] = static_cast<T>(zd[j]);
    if (HU) ou[j] = static_cast<T>(ud[j]);
  }
}

template <typename T> struct MaxWork {
  Buf<T> x, p, v;
  Buf<typename Bits<T>::I> ix;
};

// One row of core_pull_max: vals[j] = max_i p_i |c_ij|, idx[j] = the smallest i attaining it.
// Output j receives its candidates in increasing i: i < j from the outer loop (vector updates of
// vals[j], a strict > keeps the earlier i), then i = j (diagonal), then i > j (lane-wise running
// maxima over the inner loop, reduced with ties going to the smaller index). ARG = false: values only (the same
// compares and values, no index work; oi untouched).
template <typename T, bool ARG>
static void row_max(const T* x, const T* p, int64_t n, T* ov, int64_t* oi, MaxWork<T>& wk) {
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::IV IV;
  typedef typename Bits<T>::I I;
  bool live = false;
  for (int64_t i = 0; i < n && !live; ++i) live = p[i] != T(0);
  if (!live) {
    std::fill(ov, ov + n, T(0));
    if (ARG) std::fill(oi, oi + n, int64_t(0));
    return;
  }
  const size_t np = static_cast<size_t>(n + W);
  T* xs = wk.x.get(np);
  T* ps = wk.p.get(np);
  T* vs = wk.v.get(np);
  I* is = wk.ix.get(np);
  for (size_t i = 0; i < np; ++i) {
    const bool in = i < static_cast<size_t>(n);
    xs[i] = in ? x[i] : T(0);
    ps[i] = in ? p[i] : T(0);
    vs[i] = -std::numeric_limits<T>::infinity();
    is[i] = I(0);
  }
  const T invn = static_cast<T>(1.0 / static_cast<double>(n));
  IV lane;
  for (int l = 0; l < W; ++l) lane[l] = I(l);
  for (int64_t i = 0; i < n; ++i) {
    const T xi = xs[i];
    const T pi = ps[i];
    const IV iv = IV{} + I(i);
    V bv = V{} - std::numeric_limits<T>::infinity();
    IV bi = IV{} + I(0);
    for (int64_t j = i + 1; j < n; j += W) {
      const V a = vabs<T, W>(vload<V>(xs + j) * xi + T(1)) * invn;
      const V c1 = a * pi;  // candidate i for the outputs j..j+W
      const V vj = vload<V>(vs + j);
      const IV m1 = c1 > vj;
      vstore(vs + j, m1 ? c1 : vj);
      if (ARG) vstore(is + j, m1 ? iv : vload<IV>(is + j));
      const V c2 = a * vload<V>(ps + j);  // candidates j..j+W for the output i
      const IV m2 = c2 > bv;
      bv = m2 ? c2 : bv;
      if (ARG) bi = m2 ? lane + I(j) : bi;
    }
    T best = vs[i];
    I bidx = is[i];
    const T d = pi * static_cast<T>(diag_abs(double(xi), n));
    if (d > best) {
      best = d;
      bidx = I(i);
    }
    T lv = -std::numeric_limits<T>::infinity();
    I li = I(0);
    for (int l = 0; l < W; ++l)
      if (bv[l] > lv || (bv[l] == lv && bi[l] < li)) {
        lv = bv[l];
        li = bi[l];
      }
    if (lv > best) {
      best = lv;
      bidx = li;
    }
    vs[i] = best;
    is[i] = bidx;
  }
  for (int64_t j = 0; j < n; ++j) {
    ov[j] = vs[j];
    if (ARG) oi[j] = static_cast<int64_t>(is[j]);
  }
}

// The kernel's vector log over an array (test hook).
template <typename T> static void log_array(const T* x, T* y, int64_t n) {
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  for (int64_t i = 0; i < n; i += W) {
    T buf[W];
    for (int l = 0; l < W; ++l) buf[l] = i + l < n ? x[i + l] : T(1);
    const V r = vlog<T, W>(vload<V>(buf));
    for (int l = 0; l < W && i + l < n; ++l) y[i + l] = r[l];
  }
}

}  // namespace
"""

_CPP_BINDINGS = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

template <typename T, bool HQ, bool HB>
static void sum_all(const torch::Tensor& xh, const torch::Tensor& p, const torch::Tensor& q,
                    const torch::Tensor& pb, torch::Tensor& z, torch::Tensor& u) {
  const int64_t R = xh.size(0), n = xh.size(1);
  const T* X = xh.data_ptr<T>();
  const T* P = p.data_ptr<T>();
  const T* Q = HQ ? q.data_ptr<T>() : nullptr;
  const T* PB = HB ? pb.data_ptr<T>() : nullptr;
  T* Z = z.data_ptr<T>();
  T* U = (HQ || HB) ? u.data_ptr<T>() : nullptr;
  at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
    SumWork<T> wk;
    for (int64_t r = beg; r < end; ++r)
      row_sum<T, HQ, HB>(X + r * n, P + r * n, HQ ? Q + r * n : nullptr, HB ? PB + r * n : nullptr, n,
                         Z + r * n, (HQ || HB) ? U + r * n : nullptr, wk);
  });
}

template <typename T>
static void sum_dispatch(const torch::Tensor& xh, const torch::Tensor& p, const torch::Tensor& q,
                         const torch::Tensor& pb, bool hq, bool hb, torch::Tensor& z, torch::Tensor& u) {
  if (hq && hb) sum_all<T, true, true>(xh, p, q, pb, z, u);
  else if (hq) sum_all<T, true, false>(xh, p, q, pb, z, u);
  else if (hb) sum_all<T, false, true>(xh, p, q, pb, z, u);
  else sum_all<T, false, false>(xh, p, q, pb, z, u);
}

static void check_2d(const torch::Tensor& t, const torch::Tensor& xh, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == xh.sizes(), "rowcore: ", what, " must have the shape of xh");
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == xh.scalar_type() && t.device().is_cpu(),
              "rowcore: ", what, " must be a contiguous CPU tensor of xh's dtype");
}

}  // namespace

// xh, p (and q / pb when has_q / has_pb): [R, n] contiguous CPU float32/float64.
// Returns (zA, uAB) with uAB an empty tensor when neither q nor pb is given.
std::tuple<torch::Tensor, torch::Tensor> core_pull_sum_cpu(torch::Tensor xh, torch::Tensor p, torch::Tensor q,
                                                           torch::Tensor pb, bool has_q, bool has_pb) {
  TORCH_CHECK(xh.dim() == 2, "core_pull_sum_cpu: expected 2-D inputs");
  TORCH_CHECK(xh.size(1) < (int64_t(1) << 31), "core_pull_sum_cpu: rows too long");
  check_2d(xh, xh, "xh");
  check_2d(p, xh, "p");
  if (has_q) check_2d(q, xh, "q");
  if (has_pb) check_2d(pb, xh, "pb");
  auto z = torch::empty_like(xh);
  auto u = (has_q || has_pb) ? torch::empty_like(xh) : torch::empty({0}, xh.options());
  if (xh.numel() == 0) return std::make_tuple(z, u);
  if (xh.scalar_type() == torch::kFloat32) sum_dispatch<float>(xh, p, q, pb, has_q, has_pb, z, u);
  else if (xh.scalar_type() == torch::kFloat64) sum_dispatch<double>(xh, p, q, pb, has_q, has_pb, z, u);
  else TORCH_CHECK(false, "core_pull_sum_cpu: only float32 and float64 are supported");
  return std::make_tuple(z, u);
}

// argmax = false: values only (the index tensor comes back empty).
std::tuple<torch::Tensor, torch::Tensor> core_pull_max_cpu(torch::Tensor xh, torch::Tensor p, bool argmax) {
  TORCH_CHECK(xh.dim() == 2, "core_pull_max_cpu: expected 2-D inputs");
  TORCH_CHECK(xh.size(1) < (int64_t(1) << 31), "core_pull_max_cpu: rows too long");
  check_2d(xh, xh, "xh");
  check_2d(p, xh, "p");
  auto v = torch::empty_like(xh);
  auto idx = argmax ? torch::empty(xh.sizes(), xh.options().dtype(torch::kInt64))
                    : torch::empty({0}, xh.options().dtype(torch::kInt64));
  const int64_t R = xh.size(0), n = xh.size(1);
  if (xh.numel() == 0) return std::make_tuple(v, idx);
  int64_t* I = argmax ? idx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "core_pull_max_cpu", [&] {
    const scalar_t* X = xh.data_ptr<scalar_t>();
    const scalar_t* P = p.data_ptr<scalar_t>();
    scalar_t* Vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
      MaxWork<scalar_t> wk;
      for (int64_t r = beg; r < end; ++r) {
        if (argmax)
          row_max<scalar_t, true>(X + r * n, P + r * n, n, Vp + r * n, I + r * n, wk);
        else
          row_max<scalar_t, false>(X + r * n, P + r * n, n, Vp + r * n, nullptr, wk);
      }
    });
  });
  return std::make_tuple(v, idx);
}

// Test hook: the vector log applied elementwise (x > 0 normal, or 0).
torch::Tensor fast_log_cpu(torch::Tensor x) {
  x = x.contiguous();
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fast_log_cpu",
                             [&] { log_array<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel()); });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("core_pull_sum_cpu", &core_pull_sum_cpu, "sum_i p_i |C_ij| (+ q_i |C_ij| + pb_i B_ij) per row",
          pybind11::arg("xh"), pybind11::arg("p"), pybind11::arg("q"), pybind11::arg("pb"),
          pybind11::arg("has_q"), pybind11::arg("has_pb"), pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("core_pull_max_cpu", &core_pull_max_cpu, "max_i p_i |C_ij| and the smallest argmax per row",
          pybind11::arg("xh"), pybind11::arg("p"), pybind11::arg("argmax") = true,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("fast_log_cpu", &fast_log_cpu, "the kernel's vector log (test hook)", pybind11::arg("x"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

_CPP_SOURCE = _CPP_KERNELS + _CPP_BINDINGS

# -ffp-contract=fast: 1 + xh_i xh_j becomes one fma (one rounding; torch's extension build uses
# an ISO -std=c++NN, where GCC's default is off). No -ffast-math: NaNs must propagate through the sums,
# and the max kernel's strict compares implement the tie rule.
_EXT_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]

EXTENSION = CompiledExtension("rowcore", _CPP_SOURCE, _EXT_CFLAGS, "layer-norm core")


#: The kernels as dispatcher operators (one opaque call each in a traced sweep).
_core_pull_sum_kernel = EXTENSION.op(
    "core_pull_sum_cpu", "(Tensor xh, Tensor p, Tensor q, Tensor pb, bool has_q, bool has_pb) -> (Tensor, Tensor)")
_core_pull_max_kernel = EXTENSION.op("core_pull_max_cpu", "(Tensor xh, Tensor p, bool argmax) -> (Tensor, Tensor)")


def _load_ext():
    """The compiled module (built on first use), or None if unavailable."""
    return EXTENSION.load()


def active_backend(device: str | torch.device = "cpu", *, build: bool = True) -> str:
    """Which backend float32/float64 tensors on ``device`` get: ``"cpp"`` or ``"torch"``.

    For CPU with ``build=True`` (default) this builds/loads the extension if needed, so the answer
    is definitive; with ``build=False`` it reports ``"cpp"`` only if already loaded.
    """
    if torch.device(device).type != "cpu" or _env_no_ext():
        return "torch"
    ext = _load_ext() if build else EXTENSION.module
    return "cpp" if ext is not None else "torch"


def extension_build_seconds() -> float | None:
    """Seconds the first extension load of this process took (a compile, or a cache load)."""
    return EXTENSION.build_seconds


# ------------------------------------------------------------------------------------------
# argument checking
# ------------------------------------------------------------------------------------------


def _check(fname: str, xh: Tensor, **others: Tensor | None) -> list[Tensor | None]:
    given = {"xh": xh, **{k: v for k, v in others.items() if v is not None}}
    for k, v in given.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{fname}: {k} must be a torch.Tensor, got {type(v).__name__}")
    if xh.dim() < 1:
        raise ValueError(f"{fname}: xh must have at least 1 dim ([*rows, n]); got xh.shape={tuple(xh.shape)}")
    if any(v.shape != xh.shape for v in given.values()):
        shapes = ", ".join(f"{k}.shape={tuple(v.shape)}" for k, v in given.items())
        raise ValueError(f"{fname}: shape mismatch, {shapes}; all must be [*rows, n] with the shape of xh")
    devices = {v.device for v in given.values()}
    if len(devices) > 1:
        raise ValueError(f"{fname}: inputs are on different devices ({', '.join(map(str, devices))})")
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in given.values()])
    if not dtype.is_floating_point:
        raise TypeError(f"{fname}: expected floating-point inputs, got {', '.join(str(v.dtype) for v in given.values())}")
    rows, n = math.prod(xh.shape[:-1]), xh.shape[-1]
    return [None if v is None else v.detach().to(dtype).reshape(rows, n).contiguous() for v in (xh, *others.values())]


def _select(fname: str, xh2: Tensor, backend: str | None):
    """The compiled module for the C++ backend, or None for the torch backend."""
    cpp_ok = xh2.device.type == "cpu" and xh2.dtype in _EXT_DTYPES and xh2.shape[-1] < 2**31
    if backend is None:
        return _load_ext() if cpp_ok and not _env_no_ext() else None
    if backend == "cpp":
        ext = _load_ext() if cpp_ok else None
        if ext is None:
            raise RuntimeError(f"{fname}: the C++ backend is not available for {xh2.device}/{xh2.dtype}")
        return ext
    if backend == "torch":
        return None
    raise ValueError(f"{fname}: backend must be None, 'cpp' or 'torch', got {backend!r}")


# ------------------------------------------------------------------------------------------
# torch backend: dense |C| for chunks of rows
# ------------------------------------------------------------------------------------------


def _dense_core(xh: Tensor) -> Tensor:
    """``C`` for the rows of ``xh`` ([k, n] -> [k, n, n])."""
    n = xh.shape[-1]
    c = torch.baddbmm(
        torch.full((1, 1, 1), -1.0 / n, dtype=xh.dtype, device=xh.device),
        xh.unsqueeze(-1),
        xh.unsqueeze(-2),
        alpha=-1.0 / n,
    )
    c.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return c


def _row_chunks(live: Tensor, n: int):
    """Row index groups (slices when every row is live, index tensors otherwise) of bounded size."""
    step = max(1, _TORCH_CHUNK_ELEMS // max(1, n * n))
    if not _jacobians.reads_on_host(live):  # every row, no host read (a dead row gives 0 and argmax 0, as skipped)
        for r0 in range(0, live.numel(), step):
            yield slice(r0, min(live.numel(), r0 + step))
        return
    rows = live.nonzero().flatten()
    if rows.numel() == live.numel():
        for r0 in range(0, live.numel(), step):
            yield slice(r0, min(live.numel(), r0 + step))
    else:
        for r0 in range(0, rows.numel(), step):
            yield rows[r0 : r0 + step]


def _torch_sum(xh: Tensor, p: Tensor, q: Tensor | None, pb: Tensor | None) -> tuple[Tensor, Tensor | None]:
    n = xh.shape[-1]
    z = torch.zeros_like(p)
    u = None if q is None and pb is None else torch.zeros_like(p)
    live = p != 0
    for t in (q, pb):
        if t is not None:
            live |= t != 0
    for idx in _row_chunks(live.any(-1), n):
        a = _dense_core(xh[idx]).abs_()
        z[idx] = torch.bmm(p[idx].unsqueeze(-2), a).squeeze(-2)
        if u is not None:
            acc = torch.bmm(q[idx].unsqueeze(-2), a).squeeze(-2) if q is not None else None
            if pb is not None:
                b = torch.xlogy(a, a).neg_()
                t = torch.bmm(pb[idx].unsqueeze(-2), b).squeeze(-2)
                acc = t if acc is None else acc.add_(t)
            u[idx] = acc
    return z, u


def _torch_max(xh: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    n = xh.shape[-1]
    vals = torch.zeros_like(p)
    argi = torch.zeros(p.shape, dtype=torch.int64, device=p.device)
    for idx in _row_chunks((p != 0).any(-1), n):
        prod = _dense_core(xh[idx]).abs_().mul_(p[idx].unsqueeze(-1))  # [k, i, j] = p_i |C_ij|
        v = prod.amax(-2)
        vals[idx] = v
        argi[idx] = prod.eq_(v.unsqueeze(-2)).to(torch.uint8).argmax(-2)  # first i attaining the max
    return vals, argi


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------


def core_pull_sum(
    xh: Tensor, p: Tensor, q: Tensor | None = None, pb: Tensor | None = None, *, _backend: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Per-row pulls through ``A = |C|`` and ``B = -A log A`` of the layer-norm core ``C``.

    Args:
        xh: ``[*rows, n]`` normalised rows (``C_ij = delta_ij - (1 + xh_i xh_j) / n``).
        p: ``[*rows, n]``, pulled through ``A``.
        q, pb: optional ``[*rows, n]``; when either is given ``uAB = q A + pb B`` is returned too
            (a missing one counts as zero).

    Returns:
        ``(zA, uAB)``: ``zA[r, j] = sum_i p[r, i] A_ij`` and ``uAB[r, j] = sum_i q[r, i] A_ij +
        sum_i pb[r, i] B_ij`` (``None`` when neither ``q`` nor ``pb`` is given), shape
        ``[*rows, n]``, the promoted dtype of the inputs.

    Raises ValueError naming the shapes when the inputs' shapes differ. ``_backend``
    (``None``/``"cpp"``/``"torch"``) overrides the automatic choice (tests and benchmarks).
    """
    x2, p2, q2, b2 = _check("core_pull_sum", xh, p=p, q=q, pb=pb)
    with torch.no_grad():
        ext = _select("core_pull_sum", x2, _backend)
        if ext is not None:
            z, u = _core_pull_sum_kernel(x2, p2, q2 if q2 is not None else p2, b2 if b2 is not None else p2,
                                         q2 is not None, b2 is not None)
            if q2 is None and b2 is None:
                u = None
        else:
            z, u = _torch_sum(x2, p2, q2, b2)
    shape = xh.shape
    return z.reshape(shape), (None if u is None else u.reshape(shape))


def core_pull_max(xh: Tensor, p: Tensor, *, index: bool = True, _backend: str | None = None):
    """Per-row max pull through ``A = |C|``: ``vals[r, j] = max_i p[r, i] A_ij`` (``p >= 0``).

    Returns ``(vals, argi)``, both ``[*rows, n]``; ``argi`` (int64) is the SMALLEST ``i``
    attaining the max (a row of zeros gives ``vals = 0``, ``argi = 0``). Same argument rules as
    :func:`core_pull_sum`. ``index=False``: ``argi`` may be None (the C++ walk then skips the index work; the values
    are the same).
    """
    x2, p2 = _check("core_pull_max", xh, p=p)
    with torch.no_grad():
        ext = _select("core_pull_max", x2, _backend)
        if ext is not None:
            v, i = _core_pull_max_kernel(x2, p2, index)
            if not index:
                return v.reshape(xh.shape), None
        else:
            v, i = _torch_max(x2, p2)
    return v.reshape(xh.shape), i.reshape(xh.shape)
