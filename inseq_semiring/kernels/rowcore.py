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
  ``B``: it walks the unordered pairs ``i < j`` of a row once, computes ``|c_ij|`` (and its log)
  once per pair and lets the pair contribute to both outputs ``j`` and ``i`` (a symmetric
  matrix-vector product), vectorised with GCC/Clang vector extensions. The log is a hand-written
  branch-free vector log (float32 with AVX-512: a 32-entry table in registers and a cubic log1p,
  five multiply-adds; otherwise ``log2`` by a degree-8 polynomial, the exponent added with one add and
  ``ln 2`` folded into the pair coefficients; fdlibm ``log`` for float64; absolute error ~1e-7 / ~1e-16),
  so no ``-ffast-math`` or vector math library is needed. ``1 + xh_i xh_j`` is a
  single fma (one rounding). For float32 the pair terms and short partial sums (at most 32 vectors
  along ``j``, 32 rows along ``i``) run in float32 at full vector width and are flushed into
  float64 accumulators: float32 results land within ~1e-7 (relative to the size of the terms) of
  the float64 reference, for ~5-20% over pure-float32 accumulation, while accumulating every term
  in float64 cost ~2x. The diagonal ``c_ii = (n - 1 - xh_i^2) / n`` is computed in float64
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
//   Otherwise (float): log2 x = k + f R(f) after vlog's range reduction (x = 2^k (1 + f), f in [sqrt(1/2) - 1,
//   sqrt(2) - 1]), R(f) = (1 + f q(f)) / ln 2 with q a degree-6 log1p polynomial: eight multiply-adds; k enters
//   with the last one, where ln x = k ln2_hi + k ln2_lo + f + f^2 q(f) took ten (measured on Zen 3, AVX2: the
//   entropy pair loop 8% faster, the same error). The pair loop folds ln 2 into its coefficients
//   (pair_log_unit: the log's base, as its natural log).
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
  return std::is_same<T, float>::value ? 0.69314718055994530942 : 1.0;
}

template <typename T, int W> static inline typename Vec<T, W>::V vlog_pair(typename Vec<T, W>::V x) {
  typedef typename Vec<T, W>::V V;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && W == 16) {
    return (V)vlog_pair16((__m512)x);
  } else
#endif
  if constexpr (std::is_same<T, float>::value) {  // log2
    typedef typename Vec<T, W>::IV IV;
    typedef typename Vec<T, W>::UV UV;
    const IV u = bitcast<IV>(x);
    const IV k = (u - 0x3f3504f3) >> 23;
    const V f = bitcast<V>(u - bitcast<IV>(bitcast<UV>(k) << 23)) - 1.0f;
    const V kf = __builtin_convertvector(k, V);
    constexpr float L = 1.44269504088896340736f;  // 1 / ln 2
    V r = (-9.797476232e-02f * L) * f + (1.620765030e-01f * L);
    r = r * f - (1.735297441e-01f * L);
    r = r * f + (1.990539879e-01f * L);
    r = r * f - (2.496028841e-01f * L);
    r = r * f + (3.333470225e-01f * L);
    r = r * f - (5.000061989e-01f * L);
    r = r * f + L;
    return f * r + kf;
  } else {
    return vlog<T, W>(x);
  }
}

template <typename T> struct SumWork {
  Buf<T> x, p, q, b, z, u, sp, sq, sb;
  Buf<double> zd, ud;
};

// One row of core_pull_sum: z[j] = sum_i p_i A_ij, u[j] = sum_i q_i A_ij + pb_i B_ij.
// HQ: q given, HB: pb given (only then is the log needed). Pairs i < j, W at a time: the
// j-outputs get a vector update (z[j..j+W) += p_i a_ij), the i-output a lane-wise running sum
// (sum_j p_j a_ij) reduced after each segment of the inner loop. Everything runs in T; for
// float the partial sums are short (<= RC_SEG vectors per lane along j, <= RC_FLUSH rows along
// i) and are flushed into double accumulators, which keeps float32 results within ~1e-7 of the
// float64 reference at almost no cost (full double accumulation would halve the vector width).
#ifndef RC_SEG
#define RC_SEG 32
#endif
#ifndef RC_FLUSH
#define RC_FLUSH 32
#endif
template <typename T, bool HQ, bool HB>
static void row_sum(const T* x, const T* p, const T* q, const T* pb, int64_t n, T* oz, T* ou,
                    SumWork<T>& wk) {
  constexpr bool HU = HQ || HB;
  constexpr bool FL = std::is_same<T, float>::value;  // flush float partial sums into double
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
  // zero padding: the inner loop may run W - 1 lanes past n (x = 0, p = q = pb = 0 there)
  const size_t np = static_cast<size_t>(n + W);
  T* xs = wk.x.get(np);
  T* ps = wk.p.get(np);
  T* qs = HQ ? wk.q.get(np) : nullptr;
  T* bs = HB ? wk.b.get(np) : nullptr;
  T* za = wk.z.get(np);
  T* ua = HU ? wk.u.get(np) : nullptr;
  double* zd = FL ? wk.zd.get(np) : nullptr;
  double* ud = FL && HU ? wk.ud.get(np) : nullptr;
  // With the log (HB): the pair loop works on c = |1 + xi xj| = n |C_ij| and coefficients folded with 1/n and
  // log n, since -A log A = (log n / n) c - (1/n) c log c:  z_j += (p_i / n) c,  u_j += ((q_i + log n pb_i) / n) c
  // - (pb_i / n) c log c. (Without it the loop keeps A = c / n.) The diagonal uses the unscaled p, q, pb.
  T* sp = HB ? wk.sp.get(np) : nullptr;
  T* sq = HB ? wk.sq.get(np) : nullptr;
  T* sb = HB ? wk.sb.get(np) : nullptr;
  const double logn = std::log(double(n)), inv = 1.0 / double(n);
  for (size_t i = 0; i < np; ++i) {
    const bool in = i < static_cast<size_t>(n);
    xs[i] = in ? x[i] : T(0);
    ps[i] = in ? p[i] : T(0);
    if (HQ) qs[i] = in ? q[i] : T(0);
    if (HB) bs[i] = in ? pb[i] : T(0);
    if (HB) {
      sp[i] = T(double(ps[i]) * inv);
      sq[i] = T(((HQ ? double(qs[i]) : 0.0) + logn * double(bs[i])) * inv);
      sb[i] = T(double(bs[i]) * inv * pair_log_unit<T, W>());  // with the log's base: sb ln(b) log_b c
    }
    za[i] = T(0);
    if (HU) ua[i] = T(0);
    if (FL) zd[i] = 0.0;
    if (FL && HU) ud[i] = 0.0;
  }
  const T invn = static_cast<T>(1.0 / static_cast<double>(n));
  for (int64_t i = 0; i < n; ++i) {
    const T xi = xs[i];
    const T pi = ps[i];
    const T qi = HQ ? qs[i] : T(0);
    const T bi = HB ? bs[i] : T(0);
    const double ad = diag_abs(double(xi), n);
    const double bd = ad > 0.0 ? -ad * std::log(ad) : 0.0;
    double tz = double(pi) * ad, tu = 0.0;
    if (HQ) tu += double(qi) * ad;
    if (HB) tu += double(bi) * bd;
    for (int64_t j0 = i + 1; j0 < n && HB; j0 += RC_SEG * W) {  // with the log: folded coefficients
      const int64_t j1 = std::min<int64_t>(n, j0 + RC_SEG * W);
      const T spi = sp[i], sqi = sq[i], sbi = sb[i];
      V sz = V{} + T(0), su = V{} + T(0), sz2 = sz, su2 = su;  // two chains of running sums
      const auto pair = [&](int64_t j, V& rz, V& ru) {
        const V c = vabs<T, W>(vload<V>(xs + j) * xi + T(1));  // n |c_ij|; 1 + xi xj is one fma
        vstore(za + j, vload<V>(za + j) + c * spi);
        rz += c * vload<V>(sp + j);
        const V lc = vlog_pair<T, W>(c);  // log_b c; u terms c (sq - sb log c): two multiply-adds each
        vstore(ua + j, vload<V>(ua + j) + c * (sqi - lc * sbi));
        ru += c * (vload<V>(sq + j) - lc * vload<V>(sb + j));
      };
      int64_t j = j0;
      for (; j + W < j1; j += 2 * W) {
        pair(j, sz, su);
        pair(j + W, sz2, su2);
      }
      if (j < j1) pair(j, sz, su);
      sz += sz2;
      su += su2;
      for (int l = 0; l < W; ++l) {
        tz += double(sz[l]);
        tu += double(su[l]);
      }
    }
    for (int64_t j0 = i + 1; j0 < n && !HB; j0 += RC_SEG * W) {
      const int64_t j1 = std::min<int64_t>(n, j0 + RC_SEG * W);
      V sz = V{} + T(0), su = V{} + T(0);
      for (int64_t j = j0; j < j1; j += W) {
        const V a = vabs<T, W>(vload<V>(xs + j) * xi + T(1)) * invn;  // |c_ij|; 1 + xi xj is one fma
        vstore(za + j, vload<V>(za + j) + a * pi);
        sz += a * vload<V>(ps + j);
        if (HU) {
          V uj = vload<V>(ua + j);
          if (HQ) {
            uj += a * qi;
            su += a * vload<V>(qs + j);
          }
          if (HB) {
            const V al = a * vlog<T, W>(a);  // -B_ij
            uj -= al * bi;
            su -= al * vload<V>(bs + j);
          }
          vstore(ua + j, uj);
        }
      }
      for (int l = 0; l < W; ++l) {
        tz += double(sz[l]);
        if (HU) tu += double(su[l]);
      }
    }
    if (FL) {
      zd[i] += tz;
      if (HU) ud[i] += tu;
      if ((i + 1) % RC_FLUSH == 0 || i + 1 == n) {  // columns j > i - RC_FLUSH + 1 got updates
        for (int64_t j = std::max<int64_t>(0, i + 2 - RC_FLUSH); j < n; ++j) {
          zd[j] += double(za[j]);
          za[j] = T(0);
          if (HU) {
            ud[j] += double(ua[j]);
            ua[j] = T(0);
          }
        }
      }
    } else {
      za[i] += T(tz);
      if (HU) ua[i] += T(tu);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    oz[j] = FL ? static_cast<T>(zd[j]) : za[j];
    if (HU) ou[j] = FL ? static_cast<T>(ud[j]) : ua[j];
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
