"""Signed max / min pulls through the layer-norm core, both at once, one walk over each row's pairs.

For rows of length ``n`` with the symmetric core ``C_ij = delta_ij - (1 + xh_i xh_j) / n`` and, per output ``i``,
the largest and smallest offer ``p_max[i] >= p_min[i]`` (NaN: output ``i`` offers nothing)::

    hi[r, j] = max_i (C_ij >= 0 ? C_ij p_max[i] : C_ij p_min[i])      (the largest of C_ij p_max, C_ij p_min)
    lo[r, j] = min_i (C_ij >= 0 ? C_ij p_min[i] : C_ij p_max[i])

with ``arg_hi`` / ``arg_lo`` the SMALLEST ``i`` attaining them (``-inf`` / ``+inf`` and index ``j`` when no ``i``
offers anything). Used by the signed max-path semiring for ``J = diag(gain) C``, ``p = gain M``.

Backends: ``"cpp"`` (float32 / float64 CPU; compiled on first use like :mod:`~inseq_semiring.kernels.rowcore`,
whose pair walk and tie order it follows: output ``j`` sees ``i < j`` in the outer loop with strict compares, then
the diagonal, then ``i > j`` as lane-wise extremes reduced towards the smaller index) and ``"torch"`` (dense ``C``
for chunks of rows; any device and floating dtype). ``C_ij`` is ``-(1 + xh_i xh_j) / n`` with one fma off the
diagonal and ``(n - 1 - xh_i^2) / n`` in float64 on it, in both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extension import CompiledExtension, _env_no_ext
from .vecmath import VECMATH_CPP

__all__ = ["signed_core_pull", "active_backend"]

_TORCH_CHUNK_ELEMS = 1 << 20

_CPP_KERNEL = VECMATH_CPP + r"""
namespace {

template <typename T> struct SBuf {  // 64-byte aligned scratch, grown on demand
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
  ~SBuf() { std::free(p); }
};

template <typename T> struct SignedWork {
  SBuf<T> x, px, pn, vh, vl;
  SBuf<typename Bits<T>::I> ih, il;
};

// One row. NaN offers never win (every compare is strict and false on NaN); the padding lanes are NaN offers.
template <typename T>
static void row_signed(const T* x, const T* pmax, const T* pmin, int64_t n, T* ovh, int64_t* oih, T* ovl,
                       int64_t* oil, SignedWork<T>& wk) {
  constexpr int W = RC_VBYTES / sizeof(T);
  typedef typename Vec<T, W>::V V;
  typedef typename Vec<T, W>::IV IV;
  typedef typename Bits<T>::I I;
  const T inf = std::numeric_limits<T>::infinity();
  bool live = false;
  for (int64_t i = 0; i < n && !live; ++i) live = pmax[i] == pmax[i];
  if (!live) {
    for (int64_t j = 0; j < n; ++j) {
      ovh[j] = -inf;
      ovl[j] = inf;
      oih[j] = oil[j] = j;
    }
    return;
  }
  const size_t np = static_cast<size_t>(n + W);
  T* xs = wk.x.get(np);
  T* px = wk.px.get(np);
  T* pn = wk.pn.get(np);
  T* vh = wk.vh.get(np);
  T* vl = wk.vl.get(np);
  I* ih = wk.ih.get(np);
  I* il = wk.il.get(np);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (size_t i = 0; i < np; ++i) {
    const bool in = i < static_cast<size_t>(n);
    xs[i] = in ? x[i] : T(0);
    px[i] = in ? pmax[i] : nan;
    pn[i] = in ? pmin[i] : nan;
    vh[i] = -inf;
    vl[i] = inf;
    ih[i] = il[i] = I(0);
  }
  const T minus_invn = static_cast<T>(-1.0 / static_cast<double>(n));
  IV lane;
  for (int l = 0; l < W; ++l) lane[l] = I(l);
  for (int64_t i = 0; i < n; ++i) {
    const T xi = xs[i], hi_i = px[i], lo_i = pn[i];
    const IV iv = IV{} + I(i);
    V bh = V{} - inf, bl = V{} + inf;
    IV bhi = IV{} + I(0), bli = IV{} + I(0);
    for (int64_t j = i + 1; j < n; j += W) {
      const V c = (vload<V>(xs + j) * xi + T(1)) * minus_invn;  // C_ij = C_ji
      const IV pos = c >= V{};
      // output i's offers to the inputs j..j+W
      const V ch = pos ? c * hi_i : c * lo_i;
      const V cl = pos ? c * lo_i : c * hi_i;
      const V vj = vload<V>(vh + j), wj = vload<V>(vl + j);
      const IV mh = ch > vj, ml = cl < wj;
      vstore(vh + j, mh ? ch : vj);
      vstore(ih + j, mh ? iv : vload<IV>(ih + j));
      vstore(vl + j, ml ? cl : wj);
      vstore(il + j, ml ? iv : vload<IV>(il + j));
      // the outputs j..j+W's offers to the input i
      const V qx = vload<V>(px + j), qn = vload<V>(pn + j);
      const V dh = pos ? c * qx : c * qn;
      const V dl = pos ? c * qn : c * qx;
      const IV nh = dh > bh, nl = dl < bl;
      bh = nh ? dh : bh;
      bhi = nh ? lane + I(j) : bhi;
      bl = nl ? dl : bl;
      bli = nl ? lane + I(j) : bli;
    }
    const T cd = static_cast<T>((double(n - 1) - double(xi) * double(xi)) / double(n));
    const T dh = cd >= T(0) ? cd * hi_i : cd * lo_i;
    const T dl = cd >= T(0) ? cd * lo_i : cd * hi_i;
    T best_h = vh[i], best_l = vl[i];
    I arg_h = ih[i], arg_l = il[i];
    if (dh > best_h) {
      best_h = dh;
      arg_h = I(i);
    }
    if (dl < best_l) {
      best_l = dl;
      arg_l = I(i);
    }
    T lh = -inf, ll = inf;
    I lhi = I(0), lli = I(0);
    for (int l = 0; l < W; ++l) {
      if (bh[l] > lh || (bh[l] == lh && bhi[l] < lhi)) {
        lh = bh[l];
        lhi = bhi[l];
      }
      if (bl[l] < ll || (bl[l] == ll && bli[l] < lli)) {
        ll = bl[l];
        lli = bli[l];
      }
    }
    if (lh > best_h) {
      best_h = lh;
      arg_h = lhi;
    }
    if (ll < best_l) {
      best_l = ll;
      arg_l = lli;
    }
    vh[i] = best_h;
    ih[i] = arg_h;
    vl[i] = best_l;
    il[i] = arg_l;
  }
  for (int64_t j = 0; j < n; ++j) {
    ovh[j] = vh[j];
    ovl[j] = vl[j];
    oih[j] = static_cast<int64_t>(ih[j]);
    oil[j] = static_cast<int64_t>(il[j]);
  }
}

}  // namespace

#include <torch/extension.h>
#include <ATen/Parallel.h>

std::vector<torch::Tensor> signed_core_pull_cpu(torch::Tensor xh, torch::Tensor pmax, torch::Tensor pmin) {
  TORCH_CHECK(xh.dim() == 2 && xh.is_contiguous() && xh.device().is_cpu(), "signed_core_pull_cpu: 2-D CPU xh");
  TORCH_CHECK(pmax.sizes() == xh.sizes() && pmin.sizes() == xh.sizes(), "signed_core_pull_cpu: shapes differ");
  TORCH_CHECK(pmax.is_contiguous() && pmin.is_contiguous(), "signed_core_pull_cpu: contiguous inputs");
  TORCH_CHECK(pmax.scalar_type() == xh.scalar_type() && pmin.scalar_type() == xh.scalar_type(),
              "signed_core_pull_cpu: one dtype");
  TORCH_CHECK(xh.size(1) < (int64_t(1) << 31), "signed_core_pull_cpu: rows too long");
  auto vh = torch::empty_like(xh), vl = torch::empty_like(xh);
  auto ih = torch::empty(xh.sizes(), xh.options().dtype(torch::kInt64)), il = torch::empty_like(ih);
  const int64_t R = xh.size(0), n = xh.size(1);
  if (xh.numel() == 0) return {vh, ih, vl, il};
  int64_t* IH = ih.data_ptr<int64_t>();
  int64_t* IL = il.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "signed_core_pull_cpu", [&] {
    const scalar_t* X = xh.data_ptr<scalar_t>();
    const scalar_t* PX = pmax.data_ptr<scalar_t>();
    const scalar_t* PN = pmin.data_ptr<scalar_t>();
    scalar_t* VH = vh.data_ptr<scalar_t>();
    scalar_t* VL = vl.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
      SignedWork<scalar_t> wk;
      for (int64_t r = beg; r < end; ++r)
        row_signed<scalar_t>(X + r * n, PX + r * n, PN + r * n, n, VH + r * n, IH + r * n, VL + r * n, IL + r * n,
                             wk);
    });
  });
  return {vh, ih, vl, il};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("signed_core_pull_cpu", &signed_core_pull_cpu, "signed max/min pulls through the layer-norm core",
          pybind11::arg("xh"), pybind11::arg("pmax"), pybind11::arg("pmin"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

# -ffp-contract=fast: 1 + xh_i xh_j is one fma, as in the layer-norm |core| kernel. No -ffast-math: NaN offers
# must lose every strict compare.
_EXT_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]

EXTENSION = CompiledExtension("signed_rowcore", _CPP_KERNEL, _EXT_CFLAGS, "signed layer-norm core")


def active_backend(device: str | torch.device = "cpu") -> str:
    """``"cpp"`` or ``"torch"``: the backend float32/float64 tensors on ``device`` get (builds the kernel on CPU)."""
    if torch.device(device).type != "cpu" or _env_no_ext():
        return "torch"
    return "cpp" if EXTENSION.load() is not None else "torch"


def _torch_pull(xh: Tensor, pmax: Tensor, pmin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rows, n = xh.shape
    vh = torch.full_like(pmax, float("-inf"))
    vl = torch.full_like(pmax, float("inf"))
    ih = torch.arange(n, device=xh.device).repeat(rows, 1)
    il = ih.clone()
    live = (~torch.isnan(pmax)).any(-1).nonzero().flatten()
    step = max(1, _TORCH_CHUNK_ELEMS // max(1, n * n))
    eye = torch.eye(n, dtype=torch.bool, device=xh.device)
    for r0 in range(0, live.numel(), step):
        sel = live[r0:r0 + step]
        x = xh[sel]
        c = torch.addcmul(torch.ones_like(x).unsqueeze(-1), x.unsqueeze(-1), x.unsqueeze(-2)) * (-1.0 / n)
        diag = ((n - 1 - x.double() ** 2) / n).to(x.dtype)
        c = torch.where(eye, diag.unsqueeze(-1), c)  # [k, i, j]
        px, pn = pmax[sel].unsqueeze(-1), pmin[sel].unsqueeze(-1)
        pos = c >= 0
        ch = torch.where(pos, c * px, c * pn).nan_to_num_(nan=float("-inf"), posinf=float("inf"),
                                                         neginf=float("-inf"))
        cl = torch.where(pos, c * pn, c * px).nan_to_num_(nan=float("inf"), posinf=float("inf"),
                                                         neginf=float("-inf"))
        b_h = ch.amax(-2, keepdim=True)
        b_l = cl.amin(-2, keepdim=True)
        idx = torch.arange(n, device=xh.device).view(1, n, 1)
        a_h = torch.where(ch == b_h, idx, n).amin(-2)
        a_l = torch.where(cl == b_l, idx, n).amin(-2)
        none = torch.isinf(b_h.squeeze(-2)) & (b_h.squeeze(-2) < 0)  # no offer at all: index j
        vh[sel], vl[sel] = b_h.squeeze(-2), b_l.squeeze(-2)
        ih[sel] = torch.where(none, ih[sel], a_h.clamp(max=n - 1))
        il[sel] = torch.where(none, il[sel], a_l.clamp(max=n - 1))
    return vh, ih, vl, il


def signed_core_pull(xh: Tensor, pmax: Tensor, pmin: Tensor, *, _backend: str | None = None):
    """``(hi, arg_hi, lo, arg_lo)``, each ``[*rows, n]`` (see the module docstring); ``_backend``: ``None`` (automatic),
    ``"cpp"`` or ``"torch"`` (tests and benchmarks)."""
    shape = xh.shape
    n = shape[-1]
    dtype = torch.promote_types(xh.dtype, pmax.dtype)
    x2, px, pn = (t.detach().to(dtype).reshape(-1, n).contiguous() for t in (xh, pmax, pmin))
    with torch.no_grad():
        ext = None
        if _backend in (None, "cpp") and x2.device.type == "cpu" and dtype in (torch.float32, torch.float64) \
                and not _env_no_ext():
            ext = EXTENSION.load()
        if _backend == "cpp" and ext is None:
            raise RuntimeError(f"signed_core_pull: the C++ backend is not available for {x2.device}/{dtype}")
        if _backend not in (None, "cpp", "torch"):
            raise ValueError(f"signed_core_pull: backend must be None, 'cpp' or 'torch', got {_backend!r}")
        out = ext.signed_core_pull_cpu(x2, px, pn) if ext is not None else _torch_pull(x2, px, pn)
    return tuple(t.reshape(shape) for t in out)
