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
for chunks of rows; any device and floating dtype). ``C_ij`` is ``(1 + xh_i xh_j) * (-1 / n)`` off the
diagonal and ``(n - 1 - xh_i^2) / n`` in float64 on it, in both.

:func:`signed_rank1_pull` is the C++ walk for rank-one rows ``J = diag(d) + u v^T`` (softmax, log-softmax): the
formulas of :func:`~inseq_semiring.semirings.signed_rows.signed_rank1`, whose torch code is the other backend, in
two O(n) passes per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rules import jacobians as _jacobians
from .extension import CompiledExtension, _env_no_ext
from .vecmath import VECMATH_CPP

__all__ = ["signed_core_pull", "signed_rank1_pull", "active_backend"]

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
// ARG = false: values only (the same compares and values; no index work, oih / oil untouched).
template <typename T, bool ARG>
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
      if (ARG) oih[j] = oil[j] = j;
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
    const V vhi = V{} + hi_i, vlo = V{} + lo_i;
    const IV iv = IV{} + I(i);
    V bh = V{} - inf, bl = V{} + inf;
    IV bhi = IV{} + I(0), bli = IV{} + I(0);
    for (int64_t j = i + 1; j < n; j += W) {
      const V c = (vload<V>(xs + j) * xi + T(1)) * minus_invn;  // C_ij = C_ji
      const IV pos = c >= V{};
      // output i's offers to the inputs j..j+W (the factor is chosen before the product: the same rounded product
      // as choosing between the two products, half the multiplications)
      const V ch = c * (pos ? vhi : vlo);
      const V cl = c * (pos ? vlo : vhi);
      const V vj = vload<V>(vh + j), wj = vload<V>(vl + j);
      const IV mh = ch > vj, ml = cl < wj;
      vstore(vh + j, mh ? ch : vj);
      vstore(vl + j, ml ? cl : wj);
      if (ARG) {
        vstore(ih + j, mh ? iv : vload<IV>(ih + j));
        vstore(il + j, ml ? iv : vload<IV>(il + j));
      }
      // the outputs j..j+W's offers to the input i
      const V qx = vload<V>(px + j), qn = vload<V>(pn + j);
      const V dh = c * (pos ? qx : qn);
      const V dl = c * (pos ? qn : qx);
      const IV nh = dh > bh, nl = dl < bl;
      bh = nh ? dh : bh;
      bl = nl ? dl : bl;
      if (ARG) {
        bhi = nh ? lane + I(j) : bhi;
        bli = nl ? lane + I(j) : bli;
      }
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
    if (ARG) {
      oih[j] = static_cast<int64_t>(ih[j]);
      oil[j] = static_cast<int64_t>(il[j]);
    }
  }
}

// One rank-one row, J = diag(d) + u v^T: pass 1 finds the best / second-best T+_i = max(u_i M+_i, u_i M-_i), the
// smallest / second-smallest T-_i and the first two reachable i (ties: the smaller i, by strict compares in
// increasing i); pass 2 gives every j its best off-diagonal offer and compares the diagonal one.
template <typename T>
static void row_rank1(const T* d, const T* u, const T* v, const T* h, const T* l, int64_t n, T* oh, int64_t* ih,
                      T* ol, int64_t* il) {
  const T inf = std::numeric_limits<T>::infinity();
  T b1 = -inf, b2 = -inf, s1 = inf, s2 = inf;
  int64_t a1 = 0, a2 = 0, c1 = 0, c2 = 0, r1 = -1, r2 = -1, cnt = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(h[i])) continue;
    ++cnt;
    if (r1 < 0) r1 = i;
    else if (r2 < 0) r2 = i;
    const T th = u[i] * h[i], tl = u[i] * l[i];
    const T tx = tl > th ? tl : th, tn = tl < th ? tl : th;
    if (tx > b1) {
      b2 = b1; a2 = a1; b1 = tx; a1 = i;
    } else if (tx > b2) {
      b2 = tx; a2 = i;
    }
    if (tn < s1) {
      s2 = s1; c2 = c1; s1 = tn; c1 = i;
    } else if (tn < s2) {
      s2 = tn; c2 = i;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const bool rj = std::isfinite(h[j]);
    T offh = -inf, offl = inf;
    int64_t aoh = j, aol = j;
    if (cnt - (rj ? 1 : 0) > 0 && n > 1) {
      const T bx = j == a1 ? b2 : b1, bn = j == c1 ? s2 : s1;
      const int64_t ax = j == a1 ? a2 : a1, an = j == c1 ? c2 : c1, fr = j == r1 ? r2 : r1;
      const T vj = v[j];
      if (vj > T(0)) {
        offh = vj * bx; aoh = ax; offl = vj * bn; aol = an;
      } else if (vj < T(0)) {
        offh = vj * bn; aoh = an; offl = vj * bx; aol = ax;
      } else {
        offh = offl = vj * T(0); aoh = aol = fr;
      }
    }
    T dh = -inf, dl = inf;
    if (rj) {
      const T jd = d[j] + u[j] * v[j];  // as the dense Jacobian has it (no fma: -ffp-contract=off)
      const T e1 = jd * h[j], e2 = jd * l[j];
      dh = e2 > e1 ? e2 : e1;
      dl = e2 < e1 ? e2 : e1;
    }
    const bool take_h = dh > offh || (dh == offh && j < aoh) || cnt == 0;
    const bool take_l = dl < offl || (dl == offl && j < aol) || cnt == 0;
    oh[j] = take_h ? dh : offh;
    ih[j] = take_h ? j : aoh;
    ol[j] = take_l ? dl : offl;
    il[j] = take_l ? j : aol;
  }
}

}  // namespace

#include <torch/extension.h>
#include <ATen/Parallel.h>

// argmax = false: values only (the index tensors come back empty).
std::vector<torch::Tensor> signed_core_pull_cpu(torch::Tensor xh, torch::Tensor pmax, torch::Tensor pmin,
                                                bool argmax) {
  TORCH_CHECK(xh.dim() == 2 && xh.is_contiguous() && xh.device().is_cpu(), "signed_core_pull_cpu: 2-D CPU xh");
  TORCH_CHECK(pmax.sizes() == xh.sizes() && pmin.sizes() == xh.sizes(), "signed_core_pull_cpu: shapes differ");
  TORCH_CHECK(pmax.is_contiguous() && pmin.is_contiguous(), "signed_core_pull_cpu: contiguous inputs");
  TORCH_CHECK(pmax.scalar_type() == xh.scalar_type() && pmin.scalar_type() == xh.scalar_type(),
              "signed_core_pull_cpu: one dtype");
  TORCH_CHECK(xh.size(1) < (int64_t(1) << 31), "signed_core_pull_cpu: rows too long");
  auto vh = torch::empty_like(xh), vl = torch::empty_like(xh);
  auto ih = argmax ? torch::empty(xh.sizes(), xh.options().dtype(torch::kInt64))
                   : torch::empty({0}, xh.options().dtype(torch::kInt64));
  auto il = torch::empty_like(ih);
  const int64_t R = xh.size(0), n = xh.size(1);
  if (xh.numel() == 0) return {vh, ih, vl, il};
  int64_t* IH = argmax ? ih.data_ptr<int64_t>() : nullptr;
  int64_t* IL = argmax ? il.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "signed_core_pull_cpu", [&] {
    const scalar_t* X = xh.data_ptr<scalar_t>();
    const scalar_t* PX = pmax.data_ptr<scalar_t>();
    const scalar_t* PN = pmin.data_ptr<scalar_t>();
    scalar_t* VH = vh.data_ptr<scalar_t>();
    scalar_t* VL = vl.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
      SignedWork<scalar_t> wk;
      for (int64_t r = beg; r < end; ++r) {
        if (argmax)
          row_signed<scalar_t, true>(X + r * n, PX + r * n, PN + r * n, n, VH + r * n, IH + r * n, VL + r * n,
                                     IL + r * n, wk);
        else
          row_signed<scalar_t, false>(X + r * n, PX + r * n, PN + r * n, n, VH + r * n, nullptr, VL + r * n,
                                      nullptr, wk);
      }
    });
  });
  return {vh, ih, vl, il};
}

std::vector<torch::Tensor> signed_rank1_pull_cpu(torch::Tensor d, torch::Tensor u, torch::Tensor v, torch::Tensor h,
                                                 torch::Tensor l) {
  for (const auto* t : {&d, &u, &v, &h, &l}) {
    TORCH_CHECK(t->dim() == 2 && t->sizes() == d.sizes() && t->is_contiguous() && t->device().is_cpu() &&
                    t->scalar_type() == d.scalar_type(),
                "signed_rank1_pull_cpu: five contiguous 2-D CPU tensors of one shape and dtype");
  }
  auto oh = torch::empty_like(d), ol = torch::empty_like(d);
  auto ih = torch::empty(d.sizes(), d.options().dtype(torch::kInt64)), il = torch::empty_like(ih);
  const int64_t R = d.size(0), n = d.size(1);
  if (d.numel() == 0) return {oh, ih, ol, il};
  int64_t* IH = ih.data_ptr<int64_t>();
  int64_t* IL = il.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "signed_rank1_pull_cpu", [&] {
    const scalar_t *D = d.data_ptr<scalar_t>(), *U = u.data_ptr<scalar_t>(), *V = v.data_ptr<scalar_t>();
    const scalar_t *H = h.data_ptr<scalar_t>(), *L = l.data_ptr<scalar_t>();
    scalar_t* OH = oh.data_ptr<scalar_t>();
    scalar_t* OL = ol.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t beg, int64_t end) {
      for (int64_t r = beg; r < end; ++r) {
        const int64_t o = r * n;
        row_rank1<scalar_t>(D + o, U + o, V + o, H + o, L + o, n, OH + o, IH + o, OL + o, IL + o);
      }
    });
  });
  return {oh, ih, ol, il};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("signed_rank1_pull_cpu", &signed_rank1_pull_cpu, "signed max/min pulls through diag(d) + u v^T rows",
          pybind11::arg("d"), pybind11::arg("u"), pybind11::arg("v"), pybind11::arg("h"), pybind11::arg("l"),
          pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("signed_core_pull_cpu", &signed_core_pull_cpu, "signed max/min pulls through the layer-norm core",
          pybind11::arg("xh"), pybind11::arg("pmax"), pybind11::arg("pmin"), pybind11::arg("argmax") = true,
          pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

# -ffp-contract=off: every product and sum rounded on its own, as torch's elementwise ops do (the rank-one diagonal
# d + u v must equal the dense Jacobian's). No -ffast-math: NaN offers must lose every strict compare.
_EXT_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]

EXTENSION = CompiledExtension("signed_rowcore", _CPP_KERNEL, _EXT_CFLAGS, "signed row-dense")

#: The kernels as dispatcher operators (one opaque call each in a traced sweep).
_rank1_kernel = EXTENSION.op("signed_rank1_pull_cpu",
                             "(Tensor d, Tensor u, Tensor v, Tensor h, Tensor l) -> (Tensor, Tensor, Tensor, Tensor)")
_core_kernel = EXTENSION.op("signed_core_pull_cpu",
                            "(Tensor xh, Tensor pmax, Tensor pmin, bool argmax) -> (Tensor, Tensor, Tensor, Tensor)")


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
    if _jacobians.reads_on_host(pmax):  # skip dead rows; off the CPU every row (a dead one gives what is skipped)
        live = (~torch.isnan(pmax)).any(-1).nonzero().flatten()
    else:
        live = torch.arange(rows, device=xh.device)
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


def _extension(device: torch.device, dtype: torch.dtype, backend: str | None, fname: str):
    if backend not in (None, "cpp", "torch"):
        raise ValueError(f"{fname}: backend must be None, 'cpp' or 'torch', got {backend!r}")
    ext = None
    if backend in (None, "cpp") and device.type == "cpu" and dtype in (torch.float32, torch.float64) \
            and not _env_no_ext():
        ext = EXTENSION.load(stacklevel=4)
    if backend == "cpp" and ext is None:
        raise RuntimeError(f"{fname}: the C++ backend is not available for {device}/{dtype}")
    return ext


def signed_rank1_pull(d: Tensor, u: Tensor, v: Tensor, hi: Tensor, lo: Tensor):
    """The C++ rank-one walk (``[*rows, n]`` each; ``u``, ``v`` the single rank-one factors): ``(hi', in-row
    argmax, lo', in-row argmin)``, or None where the C++ backend does not apply (the caller uses torch code)."""
    dtype = hi.dtype
    if any(t.dtype != dtype for t in (d, u, v, lo)):
        return None
    ext = _extension(hi.device, dtype, None, "signed_rank1_pull")
    if ext is None:
        return None
    n = hi.shape[-1]
    flat = [t.detach().expand(hi.shape).reshape(-1, n).contiguous() for t in (d, u, v, hi, lo)]
    with torch.no_grad():
        out = _rank1_kernel(*flat)
    return tuple(t.reshape(hi.shape) for t in out)


def signed_core_pull(xh: Tensor, pmax: Tensor, pmin: Tensor, *, index: bool = True, _backend: str | None = None):
    """``(hi, arg_hi, lo, arg_lo)``, each ``[*rows, n]`` (see the module docstring); ``index=False``: the C++ walk
    skips the index work and both args are None (the values are the same); ``_backend``: ``None`` (automatic),
    ``"cpp"`` or ``"torch"`` (tests and benchmarks)."""
    shape = xh.shape
    n = shape[-1]
    dtype = torch.promote_types(xh.dtype, pmax.dtype)
    x2, px, pn = (t.detach().to(dtype).reshape(-1, n).contiguous() for t in (xh, pmax, pmin))
    ext = _extension(x2.device, dtype, _backend, "signed_core_pull")
    with torch.no_grad():
        out = _core_kernel(x2, px, pn, index) if ext is not None else _torch_pull(x2, px, pn)
    if not index:
        return out[0].reshape(shape), None, out[2].reshape(shape), None
    return tuple(t.reshape(shape) for t in out)
