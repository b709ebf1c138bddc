"""C++ source shared by the compiled CPU kernels: vector types (GCC/Clang vector extensions at the widest width
``-march=native`` enables), bit-level ``abs`` and a branch-free vector natural log (Cephes ``logf`` polynomial for
float32, fdlibm ``log`` for float64; ~1 ulp / < 1 ulp, no ``-ffast-math`` or vector math library needed).
Used by :mod:`~inseq_semiring.kernels.rowcore` and :mod:`~inseq_semiring.kernels.xlogx`.
"""

VECMATH_CPP = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

// Register width for the widest ISA enabled by -march=native.
#if defined(__AVX512F__)
#define RC_VBYTES 64
#elif defined(__AVX__)
#define RC_VBYTES 32
#else
#define RC_VBYTES 16
#endif

namespace {

template <typename T> struct Bits;
template <> struct Bits<float> {
  typedef int32_t I;
  typedef uint32_t U;
  static constexpr U ABS = 0x7fffffffu;
};
template <> struct Bits<double> {
  typedef int64_t I;
  typedef uint64_t U;
  static constexpr U ABS = 0x7fffffffffffffffull;
};

// W lanes of T (GCC/Clang vector extensions), with integer vectors of the same lane width (a
// compare of two V gives an IV mask).
template <typename T, int W> struct Vec {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  typedef typename Bits<T>::I IV __attribute__((vector_size(W * sizeof(T))));
  typedef typename Bits<T>::U UV __attribute__((vector_size(W * sizeof(T))));
};

template <typename V, typename T> static inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> static inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
template <typename V, typename U> static inline V bitcast(const U& u) {
  static_assert(sizeof(V) == sizeof(U), "bitcast size");
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

template <typename T, int W> static inline typename Vec<T, W>::V vabs(typename Vec<T, W>::V v) {
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::UV UV;
  return bitcast<V>(bitcast<UV>(v) & Bits<T>::ABS);
}

// ---------------------------------------------------------------------------------------------
// Branch-free vector natural log for positive normal x: x = 2^k m with m in [sqrt(1/2), sqrt(2)),
// log x = k log 2 + log1p(m - 1). x = 0 gives a finite value (about -88 / -709), so 0 * log 0
// comes out as 0 without a special case. Denormals, inf and NaN are not handled (not needed:
// the arguments are |c_ij| of finite rows).
//   float:  Cephes logf, log1p(f) = f - f^2/2 + f^3 P(f)            (~1 ulp)
//   double: fdlibm log, s = f/(2+f), log1p(f) = f - hfsq + s (hfsq + R(s^2))   (< 1 ulp)
// ---------------------------------------------------------------------------------------------
template <typename T, int W> static inline typename Vec<T, W>::V vlog(typename Vec<T, W>::V x) {
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::IV IV;
  typedef typename Vec<T, W>::UV UV;
  const IV u = bitcast<IV>(x);
  if constexpr (std::is_same<T, float>::value) {
    const IV k = (u - 0x3f3504f3) >> 23;  // bits of sqrt(1/2); arithmetic shift
    const V f = bitcast<V>(u - bitcast<IV>(bitcast<UV>(k) << 23)) - 1.0f;
    const V kf = __builtin_convertvector(k, V);
    const V z = f * f;
    V y = 7.0376836292E-2f * f - 1.1514610310E-1f;
    y = y * f + 1.1676998740E-1f;
    y = y * f - 1.2420140846E-1f;
    y = y * f + 1.4249322787E-1f;
    y = y * f - 1.6668057665E-1f;
    y = y * f + 2.0000714765E-1f;
    y = y * f - 2.4999993993E-1f;
    y = y * f + 3.3333331174E-1f;
    y = y * f * z;
    y = kf * -2.12194440e-4f + y;
    y = z * -0.5f + y;
    return kf * 0.693359375f + (f + y);
  } else {
    const IV k = (u - 0x3fe6a09e667f3bcdLL) >> 52;
    const V f = bitcast<V>(u - bitcast<IV>(bitcast<UV>(k) << 52)) - 1.0;
    const V kf = __builtin_convertvector(k, V);
    const V s = f / (2.0 + f);
    const V z = s * s;
    const V w = z * z;
    const V t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
    const V t2 = z * (6.666666666666735130e-01 +
                      w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
    const V hfsq = 0.5 * f * f;
    return kf * 6.93147180369123816490e-01 -
           ((hfsq - (s * (hfsq + (t2 + t1)) + kf * 1.90821492927058770002e-10)) - f);
  }
}


// log2 x for positive normal float x, branch-free: x = 2^k (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1] (vlog's range
// reduction), log2 x = k + f R(f) with R(f) = (1 + f q(f)) / ln 2 and q a degree-6 log1p polynomial: eight
// multiply-adds, k entering with the last, against ten for vlog's ln x = k ln2_hi + k ln2_lo + f + f^2 q(f) with this
// q. Absolute error ~1.5e-7 in ln units (~1 ulp of |ln x| ~ 2), not vlog's relative ~1 ulp: for terms that are summed
// (|c| log |c| weighed and added up), whose error is then below the rounding of the terms' sum.
// vlog2_sum's base as its natural log: a caller folds it into its coefficients (or its result) to get ln.
constexpr double VLOG2_SUM_UNIT = 0.693147180559945309417232121458;
static inline typename Vec<float, RC_VBYTES / 4>::V vlog2_sum(typename Vec<float, RC_VBYTES / 4>::V x) {
  constexpr int W = RC_VBYTES / 4;
  typedef typename Vec<float, W>::V V;
  typedef typename Vec<float, W>::IV IV;
  typedef typename Vec<float, W>::UV UV;
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
}

}  // namespace
"""
