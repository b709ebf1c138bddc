"""``|w|`` and ``-|w| log |w|`` of a block of weights in one pass (``0 log 0 = 0``): the entropy semiring's two
edge maps of a constant matrix, recomputed block by block in every pull (:mod:`inseq_semiring.semirings.weight_maps`).

Two backends give the same numbers up to the last bit or two of the log:

* ``"cpp"`` (CPU float32/float64): one pass, the vector log of :mod:`~inseq_semiring.kernels.vecmath` (~1 ulp),
  ``0`` mapped to exactly ``0``; subnormal ``|w|`` (outside that log's range) are redone with ``std::log``. About
  4x faster than the PyTorch chain ``abs, clamp, log, mul`` (measured on a 3072 x 768 float32 weight).
* ``"torch"`` (any device/dtype): ``-|w| log(max(|w|, s))`` with ``s`` the dtype's smallest positive subnormal,
  exact for every ``|w| > 0`` and exactly 0 at ``w = 0``.

:func:`pair_products` gives ``(a1 @ |W|, a2 @ (-|W| log |W|))`` for a few rows in one read of ``W`` without writing
either map (the LM head under a next-token root: one active row against a 50257 x 768 weight). The row counts the
sweep uses keep their partial sums in registers over blocks of 32 rows of ``W`` (``[z; u]`` and ``z`` against
GPT-2's LM head: 32 -> 19 ms); its log takes subnormal ``|w|`` by an exact power-of-two scaling instead of a
per-vector test, and for float32 is the log2 for summed terms (:mod:`~inseq_semiring.kernels.vecmath`: absolute error
~1.5e-7, below the rounding of the products; the same product through the blocked maps then differs in the last bit
or two).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extension import CompiledExtension, visible
from .vecmath import VECMATH_CPP

_CPP = VECMATH_CPP + r"""
#include <torch/extension.h>
#include <vector>

namespace {

// -v log v for v = |x| >= 0 (normal or 0). SUMMED (the map only enters matrix products, e.g. mapped_mm_pair's
// blocks): for float32 by vecmath's log2 for summed terms (an absolute error ~1.5e-7 in log v; measured on 1M
// float32 entries, Zen 3, AVX2: 0.66-0.86 -> 0.45 ms per map); otherwise by vlog (~1 ulp).
template <typename T, int W, bool SUMMED> static inline typename Vec<T, W>::V neg_xlogx(typename Vec<T, W>::V v) {
  if constexpr (SUMMED && std::is_same<T, float>::value && W == RC_VBYTES / 4) {
    return (v * vlog2_sum(v)) * T(-VLOG2_SUM_UNIT);
  } else {
    return -(v * vlog<T, W>(v));
  }
}

// a[j] = |x[j]|, b[j] = -a[j] log a[j] for one row; the tail goes through the vector code too (padded with 1);
// subnormal |x| (outside the vector logs' range) are redone after one test per row.
template <typename T, bool SUMMED = false> static void map_row(const T* x, T* a, T* b, int64_t n) {
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::IV IV;
  const T tiny = std::numeric_limits<T>::min();
  IV sub = IV{};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V v = vabs<T, W>(vload<V>(x + i));
    sub |= (v > T(0)) & (v < tiny);
    vstore(a + i, v);
    vstore(b + i, neg_xlogx<T, W, SUMMED>(v));
  }
  if (i < n) {
    T in[W], ob[W];
    for (int l = 0; l < W; ++l) in[l] = i + l < n ? std::fabs(x[i + l]) : T(1);
    vstore(ob, neg_xlogx<T, W, SUMMED>(vload<V>(in)));
    for (int64_t j = i; j < n; ++j) {
      a[j] = in[j - i];
      b[j] = ob[j - i];
    }
  }
  bool any = false;
  for (int l = 0; l < W; ++l) any |= sub[l] != 0;
  for (int64_t j = any ? 0 : n - n % W; j < n; ++j) {  // subnormal |w| (outside vlog's range): rare
    if (a[j] > T(0) && a[j] < tiny) b[j] = -a[j] * std::log(a[j]);
  }
}

// The log of the products' terms, for x >= 0 including subnormals, branch-free, in the base sum_log_unit gives (as
// its natural log): float log2 by vecmath's vlog2_sum (absolute error ~1.5e-7 in ln units: the terms |w| log |w| are
// weighed and summed at once, and their sum's rounding is larger; on GPT-2's LM head [z; u] and z: 35 -> 25 ms),
// double ln by vlog. A subnormal x is scaled by 2^S into the normal range (exact) and S log 2 taken off again; 0
// gives a finite value (so 0 log 0 = 0 without a case). map_row (whose entries are the result) keeps vlog's ~1 ulp,
// and its cheaper test-once-per-row and redo (16% faster per 1M entries).
template <typename T> constexpr double sum_log_unit() {
  return std::is_same<T, float>::value ? VLOG2_SUM_UNIT : 1.0;
}
template <typename T, int W> static inline typename Vec<T, W>::V vlog_sum(typename Vec<T, W>::V x) {
  typedef typename Vec<T, W>::V V;
  constexpr int S = std::numeric_limits<T>::digits;
  const auto sub = x < std::numeric_limits<T>::min();
  const V up = sub ? x * T(std::ldexp(1.0, S)) : x;
  if constexpr (std::is_same<T, float>::value && W == RC_VBYTES / 4) {
    return vlog2_sum(up) - (sub ? V{} + T(S) : V{} + T(0));
  } else {
    return vlog<T, W>(up) - (sub ? V{} + T(S * 0.693147180559945309417232121458) : V{} + T(0));
  }
}

// Products with both maps of a weight for a few rows, without materialising either map (one read of w):
//   oa[r, j] = sum_i aa[r, i] |w[i, j]|,   ob[r, j] = sum_i ab[r, i] (-|w[i, j]| log |w[i, j]|).
// Columns go in blocks of KB (accumulators stay in L1); along i, float partial sums of at most FLUSH terms are
// flushed into double (as in kernels/rowcore.py). Rows i whose coefficients are all zero are skipped.
template <typename T>
static void pair_rows(const T* w, int64_t n, int64_t k, int64_t ws, const T* aa, int64_t ra, int64_t as,
                      const T* ab, int64_t rb, int64_t bs, T* oa, T* ob) {
  constexpr int W = RC_VBYTES / sizeof(T);
  constexpr int64_t KB = 64 * W;
  constexpr int FLUSH = 32;
  typedef typename Vec<T, W>::V V;
  std::vector<T> pa(ra * KB), pb(rb * KB), ca(ra), cb(rb), tail(W);
  std::vector<double> da(ra * KB), db(rb * KB);
  for (int64_t c0 = 0; c0 < k; c0 += KB) {
    const int64_t width = std::min<int64_t>(KB, k - c0);
    const int64_t vw = (width + W - 1) / W * W;  // padded to whole vectors (pad lanes are dropped)
    std::fill(pa.begin(), pa.end(), T(0));
    std::fill(pb.begin(), pb.end(), T(0));
    std::fill(da.begin(), da.end(), 0.0);
    std::fill(db.begin(), db.end(), 0.0);
    int since = 0;
    for (int64_t i = 0; i < n; ++i) {
      bool live = false;
      for (int64_t r = 0; r < ra; ++r) live |= (ca[r] = aa[r * as + i]) != T(0);
      for (int64_t r = 0; r < rb; ++r) {
        live |= ab[r * bs + i] != T(0);
        cb[r] = T(ab[r * bs + i] * sum_log_unit<T>());
      }
      if (!live) continue;
      const T* row = w + i * ws + c0;
      for (int64_t j = 0; j < vw; j += W) {
        V v;
        if (j + W <= width) {
          v = vabs<T, W>(vload<V>(row + j));
        } else {  // the block's last partial vector: padded with 1 (|1| log 1 = 0)
          for (int l = 0; l < W; ++l) tail[l] = j + l < width ? std::fabs(row[j + l]) : T(1);
          v = vload<V>(tail.data());
        }
        for (int64_t r = 0; r < ra; ++r) vstore(&pa[r * KB + j], vload<V>(&pa[r * KB + j]) + v * ca[r]);
        if (rb) {
          const V l = v * vlog_sum<T, W>(v);  // |w| log_b |w| (cb has ln b); 0 -> 0
          for (int64_t r = 0; r < rb; ++r) vstore(&pb[r * KB + j], vload<V>(&pb[r * KB + j]) + l * cb[r]);
        }
      }
      if (++since == FLUSH) {
        since = 0;
        for (int64_t q = 0; q < ra * KB; ++q) { da[q] += double(pa[q]); pa[q] = T(0); }
        for (int64_t q = 0; q < rb * KB; ++q) { db[q] += double(pb[q]); pb[q] = T(0); }
      }
    }
    for (int64_t r = 0; r < ra; ++r)
      for (int64_t j = 0; j < width; ++j) oa[r * k + c0 + j] = T(da[r * KB + j] + double(pa[r * KB + j]));
    for (int64_t r = 0; r < rb; ++r)
      for (int64_t j = 0; j < width; ++j) ob[r * k + c0 + j] = T(-(db[r * KB + j] + double(pb[r * KB + j])));
  }
}

// pair_rows with the row counts RA, RB known at compile time and the partial sums in registers: the live rows i
// (some coefficient nonzero) are taken FLUSH at a time, and for each chunk of NV vectors of columns the float
// partial sums over those rows stay in registers, then go into the double accumulators (the same sums as pair_rows:
// float partial sums of at most FLUSH terms flushed into double). w is then read once, a block of rows at a time
// (the block's rows stay in L1/L2 across its column chunks), with one load and no store per vector of w.
template <typename T, int RA, int RB, int NV, bool PAD>
static inline void pair_chunk(const T* w, int64_t ws, int64_t c0, int64_t width, const int64_t* rows, int m,
                              const T* ca, const T* cb, double* da, double* db, int64_t kp) {
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  V acc_a[RA > 0 ? RA : 1][NV], acc_b[RB > 0 ? RB : 1][NV];
  for (int q = 0; q < NV; ++q) {
    for (int r = 0; r < RA; ++r) acc_a[r][q] = V{} + T(0);
    for (int r = 0; r < RB; ++r) acc_b[r][q] = V{} + T(0);
  }
  for (int t = 0; t < m; ++t) {
    const T* row = w + rows[t] * ws + c0;
#pragma GCC unroll 8
    for (int q = 0; q < NV; ++q) {
      V v;
      if constexpr (PAD) {  // the row's last partial vector: padded with 1 (|1| log 1 = 0)
        alignas(64) T in[W];
        for (int l = 0; l < W; ++l) in[l] = l < width ? std::fabs(row[l]) : T(1);
        v = vload<V>(in);
      } else {
        v = vabs<T, W>(vload<V>(row + q * W));
      }
      for (int r = 0; r < RA; ++r) acc_a[r][q] += v * ca[t * RA + r];
      if constexpr (RB > 0) {
        const V l = v * vlog_sum<T, W>(v);  // |w| log_b |w| (cb has ln b); 0 -> 0
        for (int r = 0; r < RB; ++r) acc_b[r][q] += l * cb[t * RB + r];
      }
    }
  }
  for (int q = 0; q < NV; ++q) {
    for (int r = 0; r < RA; ++r)
      for (int e = 0; e < W; ++e) da[r * kp + c0 + q * W + e] += double(acc_a[r][q][e]);
    for (int r = 0; r < RB; ++r)
      for (int e = 0; e < W; ++e) db[r * kp + c0 + q * W + e] += double(acc_b[r][q][e]);
  }
}

template <typename T, int RA, int RB, int NV>
static void pair_rows_tiled(const T* w, int64_t n, int64_t k, int64_t ws, const T* aa, int64_t as, const T* ab,
                            int64_t bs, T* oa, T* ob) {
  constexpr int W = RC_VBYTES / sizeof(T);
  constexpr int FLUSH = 32;
  const int64_t whole = k / W, kp = (whole + 1) * W;
  std::vector<double> da((RA > 0 ? RA : 1) * kp, 0.0), db((RB > 0 ? RB : 1) * kp, 0.0);
  std::vector<int64_t> live;
  for (int64_t i = 0; i < n; ++i) {
    bool any = false;
    for (int r = 0; r < RA; ++r) any |= aa[r * as + i] != T(0);
    for (int r = 0; r < RB; ++r) any |= ab[r * bs + i] != T(0);
    if (any) live.push_back(i);
  }
  T ca[FLUSH * (RA > 0 ? RA : 1)], cb[FLUSH * (RB > 0 ? RB : 1)];
  for (size_t b0 = 0; b0 < live.size(); b0 += FLUSH) {
    const int m = int(std::min<size_t>(FLUSH, live.size() - b0));
    const int64_t* rows = live.data() + b0;
    for (int t = 0; t < m; ++t) {
      for (int r = 0; r < RA; ++r) ca[t * RA + r] = aa[r * as + rows[t]];
      for (int r = 0; r < RB; ++r) cb[t * RB + r] = T(ab[r * bs + rows[t]] * sum_log_unit<T>());
    }
    int64_t j = 0;
    for (; j + NV <= whole; j += NV)
      pair_chunk<T, RA, RB, NV, false>(w, ws, j * W, W * NV, rows, m, ca, cb, da.data(), db.data(), kp);
    for (; j < whole; ++j)
      pair_chunk<T, RA, RB, 1, false>(w, ws, j * W, W, rows, m, ca, cb, da.data(), db.data(), kp);
    if (k % W)
      pair_chunk<T, RA, RB, 1, true>(w, ws, whole * W, k % W, rows, m, ca, cb, da.data(), db.data(), kp);
  }
  for (int r = 0; r < RA; ++r)
    for (int64_t j = 0; j < k; ++j) oa[r * k + j] = T(da[r * kp + j]);
  for (int r = 0; r < RB; ++r)
    for (int64_t j = 0; j < k; ++j) ob[r * k + j] = T(-db[r * kp + j]);
}

// The row counts the sweep uses (entropy: [z; u] and z for one or two live rows; flow / the U part alone: one
// factor) take the register-tiled form; others the general loop. True if handled.
template <typename T>
static bool pair_rows_fixed(const T* w, int64_t n, int64_t k, int64_t ws, const T* aa, int64_t ra, int64_t as,
                            const T* ab, int64_t rb, int64_t bs, T* oa, T* ob) {
#define PAIR_CASE(A, B, NV) \
  if (ra == A && rb == B) { pair_rows_tiled<T, A, B, NV>(w, n, k, ws, aa, as, ab, bs, oa, ob); return true; }
  PAIR_CASE(2, 1, 4)
  PAIR_CASE(4, 2, 2)
  PAIR_CASE(1, 0, 8)
  PAIR_CASE(0, 1, 4)
  PAIR_CASE(1, 1, 4)
  PAIR_CASE(2, 0, 6)
#undef PAIR_CASE
  return false;
}

// sum_j a[j] b[j] in double, in DW lanes of running sums (a serial double sum waits on each add's latency).
template <typename T> static double dot_double(const T* a, const T* b, int64_t n) {
  constexpr int DW = RC_VBYTES / sizeof(double);
  typedef typename Vec<double, DW>::V DV;
  typedef typename Vec<T, DW>::V TV;
  DV acc0 = DV{} + 0.0, acc1 = acc0;
  int64_t j = 0;
  for (; j + 2 * DW <= n; j += 2 * DW) {
    acc0 += __builtin_convertvector(vload<TV>(a + j), DV) * __builtin_convertvector(vload<TV>(b + j), DV);
    acc1 += __builtin_convertvector(vload<TV>(a + j + DW), DV) * __builtin_convertvector(vload<TV>(b + j + DW), DV);
  }
  acc0 += acc1;
  double s = 0.0;
  for (int l = 0; l < DW; ++l) s += acc0[l];
  for (; j < n; ++j) s += double(a[j]) * double(b[j]);
  return s;
}

// The additive pulls through a rank-1 row Jacobian J = diag(d) + u v^T (softmax, log-softmax), one row of
// length n at a time, with the maps of J's entries never formed: off the diagonal |u_i v_j| = |u_i||v_j| and
// -|u_i v_j| log|u_i v_j| = nl(u_i)|v_j| + |u_i| nl(v_j) (nl(x) = -|x| log|x|), so with sums over the row
//   z'_j = |v_j| (Sz - z_j |u_j|) + z_j |J_jj|,                     Sz = sum_i z_i |u_i|
//   q'_j = |v_j| (Sq - q_j |u_j| + Sn - z_j nl(u_j)) + nl(v_j) (Sz - z_j |u_j|) + q_j |J_jj| + z_j nl(J_jj)
// (Sq = sum_i q_i |u_i|, Sn = sum_i z_i nl(u_i)); sums and outputs in double. Rows with z = q = 0 give 0.
template <typename T>
static void rank1_rows(const T* d, const T* u, const T* v, const T* z, const T* q, int64_t R, int64_t n, T* oz,
                       T* oq) {
  std::vector<T> au(n), nu(n), av(n), nv(n), jd(n), ajd(n), njd(n);
  for (int64_t r = 0; r < R; ++r) {
    const T *dr = d + r * n, *ur = u + r * n, *vr = v + r * n, *zr = z + r * n, *qr = q ? q + r * n : nullptr;
    T *ozr = oz + r * n, *oqr = q ? oq + r * n : nullptr;
    bool live = false;
    for (int64_t j = 0; j < n && !live; ++j) live = zr[j] != T(0) || (q && qr[j] != T(0));
    if (!live) {
      std::fill(ozr, ozr + n, T(0));
      if (q) std::fill(oqr, oqr + n, T(0));
      continue;
    }
    for (int64_t j = 0; j < n; ++j) jd[j] = dr[j] + ur[j] * vr[j];
    if (q) {
      map_row<T>(ur, au.data(), nu.data(), n);
      map_row<T>(vr, av.data(), nv.data(), n);
      map_row<T>(jd.data(), ajd.data(), njd.data(), n);
    } else {
      for (int64_t j = 0; j < n; ++j) {
        au[j] = std::fabs(ur[j]);
        av[j] = std::fabs(vr[j]);
        ajd[j] = std::fabs(jd[j]);
      }
    }
    const double sz = dot_double(zr, au.data(), n);
    const double sq = q ? dot_double(qr, au.data(), n) : 0.0;
    const double sn = q ? dot_double(zr, nu.data(), n) : 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double zj = zr[j], ez = sz - zj * double(au[j]);
      ozr[j] = T(double(av[j]) * ez + zj * double(ajd[j]));
      if (q) {
        const double qj = qr[j];
        oqr[j] = T(double(av[j]) * ((sq - qj * double(au[j])) + (sn - zj * double(nu[j]))) + double(nv[j]) * ez +
                   qj * double(ajd[j]) + zj * double(njd[j]));
      }
    }
  }
}

// The pointwise pulls of flow and entropy, elementwise over n entries, both maps formed per chunk in L1:
//   oz = z |w|,   oq = q |w| + z (-|w| log|w|)   (q given),   zmax = max oz (NaN if any oz is NaN).
// The products round as the tensor formulas do (z * |w|; addcmul(u * |w|, z, nl): one fused multiply-add).
template <typename T>
static void pointwise_rows(const T* w, const T* z, const T* q, int64_t n, T* oz, T* oq, T* zmax) {
  constexpr int W = RC_VBYTES / sizeof(T);
  constexpr int64_t CH = 64 * W;
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::IV IV;
  alignas(64) T a[CH], b[CH];
  V best = V{} + T(0);
  IV nan = IV{};
  for (int64_t c0 = 0; c0 < n; c0 += CH) {
    const int64_t m = std::min<int64_t>(CH, n - c0), mv = m - m % W;
    if (q) map_row<T>(w + c0, a, b, m);
    for (int64_t j = 0; j < mv; j += W) {
      const V zj = vload<V>(z + c0 + j);
      const V aj = q ? vload<V>(a + j) : vabs<T, W>(vload<V>(w + c0 + j));
      const V r = zj * aj;
      vstore(oz + c0 + j, r);
      nan |= r != r;
      best = r > best ? r : best;
      if (q) {
        const V qa = vload<V>(q + c0 + j) * aj;
        V out;
        for (int l = 0; l < W; ++l) out[l] = std::fma(zj[l], b[j + l], qa[l]);  // as torch.addcmul(u * |w|, z, nl)
        vstore(oq + c0 + j, out);
      }
    }
    for (int64_t j = mv; j < m; ++j) {  // the tail
      const T aj = q ? a[j] : std::fabs(w[c0 + j]);
      const T r = z[c0 + j] * aj;
      oz[c0 + j] = r;
      nan[0] |= r != r;
      best[0] = r > best[0] ? r : best[0];
      if (q) oq[c0 + j] = std::fma(z[c0 + j], b[j], q[c0 + j] * aj);
    }
  }
  bool any_nan = false;
  T top = T(0);
  for (int l = 0; l < W; ++l) {
    any_nan |= nan[l] != 0;
    top = best[l] > top ? best[l] : top;
  }
  *zmax = any_nan ? std::numeric_limits<T>::quiet_NaN() : top;
}

}  // namespace

// w: 2-D with unit stride along dim 1 (any row stride). Writes (|w|, -|w| log|w|) into a, b (contiguous, w's shape);
// summed: b only enters products (map_row's SUMMED).
void abs_neg_xlogx_out_cpu(torch::Tensor w, torch::Tensor a, torch::Tensor b, bool summed) {
  TORCH_CHECK(w.dim() == 2 && (w.size(1) <= 1 || w.stride(1) == 1), "abs_neg_xlogx_cpu: need a 2-D row-strided tensor");
  TORCH_CHECK(a.sizes() == w.sizes() && b.sizes() == w.sizes() && a.is_contiguous() && b.is_contiguous() &&
              a.scalar_type() == w.scalar_type() && b.scalar_type() == w.scalar_type(),
              "abs_neg_xlogx_out_cpu: outputs must be contiguous tensors shaped and typed like w");
  const int64_t rows = w.size(0), cols = w.size(1), stride = w.stride(0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "abs_neg_xlogx_cpu", [&] {
    const scalar_t* x = w.data_ptr<scalar_t>();
    scalar_t* pa = a.data_ptr<scalar_t>();
    scalar_t* pb = b.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r)
      (summed ? map_row<scalar_t, true> : map_row<scalar_t, false>)(x + r * stride, pa + r * cols, pb + r * cols,
                                                                   cols);
  });
}

// Returns contiguous (|w|, -|w| log|w|) (summed: as abs_neg_xlogx_out_cpu).
std::vector<torch::Tensor> abs_neg_xlogx_cpu(torch::Tensor w, bool summed) {
  auto a = torch::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  auto b = torch::empty_like(a);
  abs_neg_xlogx_out_cpu(w, a, b, summed);
  return {a, b};
}

// aa [ra, n], ab [rb, n] (unit stride along n), w [n, k] (unit stride along k). Returns (aa |w|, ab (-|w| log|w|)).
std::vector<torch::Tensor> pair_products_cpu(torch::Tensor aa, torch::Tensor ab, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.size(1) <= 1 || w.stride(1) == 1), "pair_products_cpu: need a row-strided w");
  TORCH_CHECK(aa.dim() == 2 && ab.dim() == 2 && aa.size(1) == w.size(0) && ab.size(1) == w.size(0),
              "pair_products_cpu: factor shapes");
  TORCH_CHECK((aa.size(1) <= 1 || aa.stride(1) == 1) && (ab.size(1) <= 1 || ab.stride(1) == 1),
              "pair_products_cpu: factors need unit stride along n");
  TORCH_CHECK(aa.scalar_type() == w.scalar_type() && ab.scalar_type() == w.scalar_type(), "pair_products_cpu: dtype");
  auto oa = torch::empty({aa.size(0), w.size(1)}, w.options().memory_format(at::MemoryFormat::Contiguous));
  auto ob = torch::empty({ab.size(0), w.size(1)}, oa.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pair_products_cpu", [&] {
    if (pair_rows_fixed<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1), w.stride(0), aa.data_ptr<scalar_t>(),
                                  aa.size(0), aa.stride(0), ab.data_ptr<scalar_t>(), ab.size(0), ab.stride(0),
                                  oa.data_ptr<scalar_t>(), ob.data_ptr<scalar_t>()))
      return;
    pair_rows<scalar_t>(w.data_ptr<scalar_t>(), w.size(0), w.size(1), w.stride(0), aa.data_ptr<scalar_t>(),
                        aa.size(0), aa.stride(0), ab.data_ptr<scalar_t>(), ab.size(0), ab.stride(0),
                        oa.data_ptr<scalar_t>(), ob.data_ptr<scalar_t>());
  });
  return {oa, ob};
}

// d, u, v, z (and q when has_q): [R, n] contiguous, one dtype. Returns (z', q') (q' empty without q).
std::vector<torch::Tensor> rank1_pull_cpu(torch::Tensor d, torch::Tensor u, torch::Tensor v, torch::Tensor z,
                                          torch::Tensor q, bool has_q) {
  for (const auto* t : {&d, &u, &v, &z}) {
    TORCH_CHECK(t->dim() == 2 && t->sizes() == d.sizes() && t->is_contiguous() && t->scalar_type() == d.scalar_type(),
                "rank1_pull_cpu: d, u, v, z must be contiguous [R, n] tensors of one dtype");
  }
  if (has_q) TORCH_CHECK(q.sizes() == d.sizes() && q.is_contiguous() && q.scalar_type() == d.scalar_type(),
                         "rank1_pull_cpu: q like z");
  auto oz = torch::empty_like(z);
  auto oq = has_q ? torch::empty_like(z) : torch::empty({0}, z.options());
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "rank1_pull_cpu", [&] {
    rank1_rows<scalar_t>(d.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         z.data_ptr<scalar_t>(), has_q ? q.data_ptr<scalar_t>() : nullptr, d.size(0), d.size(1),
                         oz.data_ptr<scalar_t>(), has_q ? oq.data_ptr<scalar_t>() : nullptr);
  });
  return {oz, oq};
}

// w, z (and q when has_q): contiguous, one shape and dtype, z >= 0. Returns (z |w|, q |w| + z (-|w| log|w|),
// max of the first as a 0-dim tensor); the second is empty without q.
std::vector<torch::Tensor> pointwise_pull_cpu(torch::Tensor w, torch::Tensor z, torch::Tensor q, bool has_q) {
  TORCH_CHECK(w.sizes() == z.sizes() && w.is_contiguous() && z.is_contiguous() && w.scalar_type() == z.scalar_type(),
              "pointwise_pull_cpu: w and z must be contiguous tensors of one shape and dtype");
  if (has_q) TORCH_CHECK(q.sizes() == z.sizes() && q.is_contiguous() && q.scalar_type() == z.scalar_type(),
                         "pointwise_pull_cpu: q like z");
  auto oz = torch::empty_like(z, at::MemoryFormat::Contiguous);
  auto oq = has_q ? torch::empty_like(oz) : torch::empty({0}, z.options());
  auto zmax = torch::empty({}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "pointwise_pull_cpu", [&] {
    pointwise_rows<scalar_t>(w.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), has_q ? q.data_ptr<scalar_t>() : nullptr,
                             z.numel(), oz.data_ptr<scalar_t>(), has_q ? oq.data_ptr<scalar_t>() : nullptr,
                             zmax.data_ptr<scalar_t>());
  });
  return {oz, oq, zmax};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("abs_neg_xlogx_cpu", &abs_neg_xlogx_cpu, "(|w|, -|w| log|w|) of a 2-D row-strided tensor",
          pybind11::arg("w"), pybind11::arg("summed") = false, pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("abs_neg_xlogx_out_cpu", &abs_neg_xlogx_out_cpu, "(|w|, -|w| log|w|) into given buffers",
          pybind11::arg("w"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("summed") = false,
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("rank1_pull_cpu", &rank1_pull_cpu, "additive pulls through diag(d) + u v^T rows, maps in registers",
          pybind11::arg("d"), pybind11::arg("u"), pybind11::arg("v"), pybind11::arg("z"), pybind11::arg("q"),
          pybind11::arg("has_q"), pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("pointwise_pull_cpu", &pointwise_pull_cpu, "(z |w|, q |w| + z (-|w| log|w|), max z |w|) elementwise",
          pybind11::arg("w"), pybind11::arg("z"), pybind11::arg("q"), pybind11::arg("has_q"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("pair_products_cpu", &pair_products_cpu, "(aa |w|, ab (-|w| log|w|)) for a few rows, one read of w",
          pybind11::arg("aa"), pybind11::arg("ab"), pybind11::arg("w"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

EXTENSION = CompiledExtension("xlogx", _CPP, ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],
                              "weight-map (|w|, -|w| log|w|)")


#: The kernels as dispatcher operators (one opaque call each in a traced sweep).
_maps_kernel = EXTENSION.op("abs_neg_xlogx_cpu", "(Tensor w, bool summed) -> (Tensor, Tensor)")
_pair_products_kernel = EXTENSION.op("pair_products_cpu", "(Tensor aa, Tensor ab, Tensor w) -> (Tensor, Tensor)")
_pointwise_pull_kernel = EXTENSION.op(
    "pointwise_pull_cpu", "(Tensor w, Tensor z, Tensor q, bool has_q) -> (Tensor, Tensor, Tensor)")
_rank1_pull_kernel = EXTENSION.op(
    "rank1_pull_cpu", "(Tensor d, Tensor u, Tensor v, Tensor z, Tensor q, bool has_q) -> (Tensor, Tensor)")


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def _torch_backend(w: Tensor) -> tuple[Tensor, Tensor]:
    mag = w.abs()
    return mag, mag.clamp_min(_smallest_subnormal(mag.dtype)).log_().mul_(mag).neg_()


def active_backend(w: Tensor) -> str:
    """``"cpp"`` or ``"torch"``: the backend :func:`abs_and_neg_xlogx` uses for ``w`` (builds the extension)."""
    ok = w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)
    return "cpp" if ok and EXTENSION.load() is not None else "torch"


def abs_and_neg_xlogx(w: Tensor, *, backend: str | None = None, out: tuple[Tensor, Tensor] | None = None,
                      summed: bool = False) -> tuple[Tensor, Tensor]:
    """``(|w|, -|w| log |w|)`` elementwise, shaped like ``w`` (``backend``: force one, for tests). ``out``: two flat
    contiguous scratch buffers of ``w``'s dtype with at least ``w.numel()`` entries that the C++ backend writes into
    (views of them are returned; reusing them across blocks spares fresh pages for every block). ``summed``: the
    second map only enters matrix products, so float32 takes the log for summed terms (absolute error ~1.5e-7 in
    ``log |w|``, not ~1 ulp of each entry), whichever way the kernel is called (a traced sweep calls the dispatcher
    operator, not the ``out`` form)."""
    if (backend or active_backend(w)) == "torch" or w.numel() == 0:
        return _torch_backend(w)
    ext = EXTENSION.load()
    if out is not None and not visible() and w.dim() == 2 and all(b.dtype == w.dtype and b.numel() >= w.numel() for b in out):
        t = w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1
        src = w.t() if t else w
        if src.shape[1] <= 1 or src.stride(1) == 1:
            a, b = (buf[:src.numel()].view(src.shape) for buf in out)
            ext.abs_neg_xlogx_out_cpu(src, a, b, summed)
            return (a.t(), b.t()) if t else (a, b)
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) != 1:  # a transposed matrix: map its rows, give it back
        a, b = _maps_kernel(w.t(), summed)
        return a.t(), b.t()
    if w.dim() == 2 and (w.shape[1] <= 1 or w.stride(1) == 1):
        return _maps_kernel(w, summed)
    if w.dim() > 2 and not w.is_contiguous() and w.transpose(-1, -2).is_contiguous():  # batched transposes (p^T)
        wt = w.transpose(-1, -2)
        a, b = _maps_kernel(wt.reshape(1, -1), summed)
        return a.view(wt.shape).transpose(-1, -2), b.view(wt.shape).transpose(-1, -2)
    flat = w.contiguous().reshape(1, -1)
    a, b = _maps_kernel(flat, summed)
    return a.reshape(w.shape), b.reshape(w.shape)


def pair_products(a_abs: Tensor | None, a_nlogn: Tensor | None, w: Tensor, *,
                  backend: str | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(a_abs @ |w|, a_nlogn @ (-|w| log |w|))`` for ``a_*`` [r, n] and ``w`` [n, k]; either factor may be None.
    ``"cpp"``: one pass over ``w`` that maps each entry in registers and never writes a map (meant for a few rows:
    the accumulators of every row stay in L1); ``"torch"``: the maps, then two products."""
    like = a_abs if a_abs is not None else a_nlogn
    if backend is None:
        backend = active_backend(w) if like is not None and like.dtype == w.dtype else "torch"
    if backend == "torch" or w.numel() == 0:
        mag, nlogn = _torch_backend(w)
        return (None if a_abs is None else a_abs @ mag, None if a_nlogn is None else a_nlogn @ nlogn)
    if w.dim() != 2 or not (w.shape[1] <= 1 or w.stride(1) == 1):
        w = w.contiguous()
    empty = like.new_zeros(0, w.shape[0])
    aa = empty if a_abs is None else (a_abs if a_abs.shape[1] <= 1 or a_abs.stride(1) == 1 else a_abs.contiguous())
    ab = empty if a_nlogn is None else (a_nlogn if a_nlogn.shape[1] <= 1 or a_nlogn.stride(1) == 1
                                        else a_nlogn.contiguous())
    oa, ob = _pair_products_kernel(aa, ab, w)
    return (None if a_abs is None else oa, None if a_nlogn is None else ob)


def rank1_pull(d: Tensor, u: Tensor, v: Tensor, z: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
    """``(z |J|, q |J| + z (-|J| log |J|))`` for rows ``J = diag(d) + u v^T`` (all shaped like ``z``; ``q=None``:
    the first only), or None where the compiled kernel does not apply (then use the tensor formulas)."""
    ts = (d, u, v, z) if q is None else (d, u, v, z, q)
    if z.dim() == 0 or any(t.device.type != "cpu" or t.dtype != z.dtype for t in ts):
        return None
    if z.dtype not in (torch.float32, torch.float64) or EXTENSION.load() is None:
        return None
    n = z.shape[-1]
    flat = [t.expand(z.shape).contiguous().reshape(-1, n) for t in ts]
    if q is None:
        flat.append(flat[3].new_empty(0))
    oz, oq = _rank1_pull_kernel(*flat[:5], q is not None)
    return oz.reshape(z.shape), None if q is None else oq.reshape(z.shape)


def pointwise_pull(w: Tensor, z: Tensor, q: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor] | None:
    """``(z |w|, q |w| + z (-|w| log |w|), max of z |w|)`` elementwise in one pass (``q=None``: no second part), for
    tensors of one shape, dtype and device; None where the compiled kernel does not apply (then use the tensor
    formulas). The products round as those formulas do."""
    ts = (w, z) if q is None else (w, z, q)
    if (z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64) or z.numel() == 0
            or any(t.dtype != z.dtype or t.shape != z.shape or t.device != z.device or not t.is_contiguous()
                   for t in ts)
            or EXTENSION.load() is None):
        return None
    oz, oq, zmax = _pointwise_pull_kernel(w, z, z.new_empty(0) if q is None else q, q is not None)
    return oz, None if q is None else oq, zmax
