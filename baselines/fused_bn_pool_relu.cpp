// Batch norm (the batch's own statistics) -> 2x2 max-pool (stride 2) -> ReLU as one CPU kernel: forward,
// backward and the backward of that backward (second order), for channels-last tensors. Built and
// wrapped by baselines/fused.py, which holds the autograd Functions, the switch and the fallbacks; this
// file holds only the arithmetic.
//
// Layout: x is [N, C, H, W] in channels-last memory (N, H, W, C); the output is [N, C, H/2, W/2], also
// channels-last. The kernel keeps, per output element, one byte: which of the 4 window positions was
// the maximum (0..3, row-major, the first maximum like torch's max-pool), or 4 where the ReLU cut it.
// Per-channel sums are taken over fixed blocks of ROWS rows and added in block order, so the numbers do
// not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t ROWS = 64;  // rows (one row = the C values of one pixel) per reduction block
constexpr uint8_t CUT = 4;    // the window index of an output the ReLU set to zero

// Per-channel sums s1, s2 [C] (double) of what add(r, a1, a2) accumulates for row r = 0..rows-1 into
// the partial sums a1, a2 [C]; taken in fixed blocks of ROWS rows and added in block order.
template <typename T, typename Add>
void block_sums(int64_t rows, int64_t C, Add add, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t nblk = (rows + ROWS - 1) / ROWS;
  std::vector<double> p1(nblk * C, 0.0), p2(nblk * C, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> a1(C), a2(C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(a1.begin(), a1.end(), T(0));
      std::fill(a2.begin(), a2.end(), T(0));
      const int64_t r1 = std::min(rows, (b + 1) * ROWS);
      for (int64_t r = b * ROWS; r < r1; ++r) add(r, a1.data(), a2.data());
      for (int64_t c = 0; c < C; ++c) {
        p1[b * C + c] = a1[c];
        p2[b * C + c] = a2[c];
      }
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int64_t b = 0; b < nblk; ++b)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p1[b * C + c];
      s2[c] += p2[b * C + c];
    }
}

// One pooled pixel's C channels: out = relu(max over the window of x * a + b), k = the winning window
// position or CUT. Branch-free selects, the index kept as T so every lane has T's width, and restrict
// pointers in a plain function: the compiler vectorises it (inside the lambdas it did not).
template <typename T>
void pool_pixel(const T* __restrict p0, const T* __restrict p1, const T* __restrict p2, const T* __restrict p3,
                const T* __restrict a, const T* __restrict b, T* __restrict o, uint8_t* __restrict k, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const T v0 = p0[c] * a[c] + b[c], v1 = p1[c] * a[c] + b[c], v2 = p2[c] * a[c] + b[c], v3 = p3[c] * a[c] + b[c];
    T best = v0, win = T(0);
    win = v1 > best ? T(1) : win;
    best = v1 > best ? v1 : best;
    win = v2 > best ? T(2) : win;
    best = v2 > best ? v2 : best;
    win = v3 > best ? T(3) : win;
    best = v3 > best ? v3 : best;
    const bool live = best > T(0);
    o[c] = live ? best : T(0);
    k[c] = static_cast<uint8_t>(static_cast<int32_t>(live ? win : T(CUT)));
  }
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                  at::Tensor& out, at::Tensor& idx, at::Tensor& mean_t, at::Tensor& invstd_t) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = H / 2, OW = W / 2, M = N * H * W;
  const T* xp = x.data_ptr<T>();
  std::vector<T> shift(xp, xp + C);  // the first pixel: a shift that keeps the variance sum well conditioned
  std::vector<double> s1, s2;
  const T* sh = shift.data();
  block_sums<T>(M, C, [&](int64_t r, T* __restrict a1, T* __restrict a2) {
    const T* xr = xp + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const T v = xr[c] - sh[c];
      a1[c] += v;
      a2[c] += v * v;
    }
  }, s1, s2);
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias.data_ptr<T>();
  double* mp = mean_t.data_ptr<double>();
  double* ip = invstd_t.data_ptr<double>();
  std::vector<T> alpha(C), beta(C);
  for (int64_t c = 0; c < C; ++c) {
    const double m1 = s1[c] / M;
    const double var = std::max(s2[c] / M - m1 * m1, 0.0);
    mp[c] = m1 + shift[c];
    ip[c] = 1.0 / std::sqrt(var + eps);
    alpha[c] = T(ip[c] * wp[c]);
    beta[c] = T(bp[c] - mp[c] * ip[c] * wp[c]);
  }
  T* op = out.data_ptr<T>();
  uint8_t* kp = idx.data_ptr<uint8_t>();
  const T* al = alpha.data();
  const T* be = beta.data();
  at::parallel_for(0, N * OH, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / OH, oh = i % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const T* p0 = xp + ((n * H + 2 * oh) * W + 2 * ow) * C;
        const T* p1 = p0 + C;
        const T* p2 = p0 + W * C;
        const T* p3 = p2 + C;
        T* o = op + ((n * OH + oh) * OW + ow) * C;
        uint8_t* k = kp + ((n * OH + oh) * OW + ow) * C;
        pool_pixel<T>(p0, p1, p2, p3, al, be, o, k, C);
      }
    }
  });
}

// Per-channel coefficients of `full_pass`.
template <typename T>
struct Coef {
  const T* k;
  const T* a;
  const T* b;
  const T* l;
};

// One pixel's C channels of `full_pass` (restrict pointers in a plain function: it vectorises).
template <typename T>
void row_pass(const T* __restrict x, const T* __restrict u, const T* __restrict g, const uint8_t* __restrict k,
              uint8_t here, Coef<T> co, T* __restrict d, int64_t C) {
  const T* __restrict kc = co.k;
  const T* __restrict ac = co.a;
  const T* __restrict bc = co.b;
  const T* __restrict lc = co.l;
  if (g && u) {
    for (int64_t c = 0; c < C; ++c) d[c] = kc[c] * (k[c] == here ? g[c] : T(0)) + ac[c] + bc[c] * x[c] + lc[c] * u[c];
  } else if (g) {
    for (int64_t c = 0; c < C; ++c) d[c] = kc[c] * (k[c] == here ? g[c] : T(0)) + ac[c] + bc[c] * x[c];
  } else if (u) {
    for (int64_t c = 0; c < C; ++c) d[c] = ac[c] + bc[c] * x[c] + lc[c] * u[c];
  } else {
    for (int64_t c = 0; c < C; ++c) d[c] = ac[c] + bc[c] * x[c];
  }
}

// out = K * dy + A + B * x + L * u at every input position (per-channel K, A, B, L), where dy is g at
// the window maximum it came from (zero elsewhere and where the ReLU cut it) and u another full-size
// map (nullptr: L * u is left out). The input gradient of backward and of double_backward.
template <typename T>
void full_pass(const at::Tensor& x, const at::Tensor& g, const at::Tensor& idx, const T* up, Coef<T> co, T* dp) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  const T* xp = x.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const uint8_t* kp = idx.data_ptr<uint8_t>();
  at::parallel_for(0, N * H, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / H, h = i % H, oh = h / 2;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t ow = w / 2, at_pos = (i * W + w) * C;
        const bool pooled = oh < OH && ow < OW;
        const int64_t j = ((n * OH + oh) * OW + ow) * C;
        row_pass<T>(xp + at_pos, up ? up + at_pos : nullptr, pooled ? gp + j : nullptr, pooled ? kp + j : nullptr,
                    uint8_t((h % 2) * 2 + (w % 2)), co, dp + at_pos, C);
      }
    }
  });
}

// Per-channel sums over the pooled positions, with dy = g where the ReLU let it through (else 0) and v the
// value of `src` (x or u, full-size maps like x) at the window maximum: s_dy = sum dy, s_dyv = sum dy (v - shift).
template <typename T>
void pooled_sums(const at::Tensor& x, const at::Tensor& g, const at::Tensor& idx, const T* src, const T* shift,
                 std::vector<double>& s_dy, std::vector<double>& s_dyv) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  const T* gp = g.data_ptr<T>();
  const uint8_t* kp = idx.data_ptr<uint8_t>();
  block_sums<T>(N * OH * OW, C, [&](int64_t j, T* __restrict a1, T* __restrict a2) {
    const int64_t n = j / (OH * OW), rest = j % (OH * OW), oh = rest / OW, ow = rest % OW;
    const T* p0 = src + ((n * H + 2 * oh) * W + 2 * ow) * C;
    const T* p1 = p0 + C;
    const T* p2 = p0 + W * C;
    const T* p3 = p2 + C;
    const uint8_t* k = kp + j * C;
    const T* gg = gp + j * C;
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t win = k[c];
      const T dy = win == CUT ? T(0) : gg[c];
      const T v = win == 0 ? p0[c] : win == 1 ? p1[c] : win == 2 ? p2[c] : p3[c];
      a1[c] += dy;
      a2[c] += dy * (v - shift[c]);
    }
  }, s_dy, s_dyv);
}

template <typename T>
void backward_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx,
                   const at::Tensor& mean_t, const at::Tensor& invstd_t, at::Tensor& dx, at::Tensor& dw,
                   at::Tensor& db) {
  const int64_t C = x.size(1), M = x.size(0) * x.size(2) * x.size(3);
  const double* mp = mean_t.data_ptr<double>();
  const double* ip = invstd_t.data_ptr<double>();
  // The gradient reaching batch norm is g at each window's maximum (where the ReLU let it through) and
  // zero elsewhere: sums of dy and dy * (x - mean) over the output positions, x at the maximum.
  std::vector<T> mean_T(mp, mp + C);
  std::vector<double> sdy, sdyx;
  pooled_sums<T>(x, g, idx, x.data_ptr<T>(), mean_T.data(), sdy, sdyx);
  const T* wp = weight.data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  T* dbp = db.data_ptr<T>();
  std::vector<T> kc(C), ac(C), bc(C);
  for (int64_t c = 0; c < C; ++c) {
    const double s_xhat = ip[c] * sdyx[c];  // sum of dy * xhat
    dbp[c] = T(sdy[c]);
    dwp[c] = T(s_xhat);
    const double k = wp[c] * ip[c], mdy = sdy[c] / M, mdyx = s_xhat / M;
    // dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)) = k * dy + A + B * x
    kc[c] = T(k);
    ac[c] = T(-k * mdy + k * mdyx * ip[c] * mp[c]);
    bc[c] = T(-k * mdyx * ip[c]);
  }
  std::vector<T> lc(C, T(0));
  full_pass<T>(x, g, idx, nullptr, {kc.data(), ac.data(), bc.data(), lc.data()}, dx.data_ptr<T>());
}

// One pooled pixel of the g-gradient: P u + Q x at the window maximum, plus R; zero where the ReLU cut.
// x0, u0 point at the window's first position; `row` is one image row (W * C) further.
template <typename T>
void gather_pass(const T* __restrict x0, const T* __restrict u0, int64_t row, const uint8_t* __restrict k,
                 const T* __restrict p, const T* __restrict q, const T* __restrict r, T* __restrict out, int64_t C) {
  const T* x1 = x0 + C;
  const T* x2 = x0 + row;
  const T* x3 = x2 + C;
  const T* u1 = u0 + C;
  const T* u2 = u0 + row;
  const T* u3 = u2 + C;
  for (int64_t c = 0; c < C; ++c) {
    const uint8_t win = k[c];
    const T xm = win == 0 ? x0[c] : win == 1 ? x1[c] : win == 2 ? x2[c] : x3[c];
    const T um = win == 0 ? u0[c] : win == 1 ? u1[c] : win == 2 ? u2[c] : u3[c];
    out[c] = win == CUT ? T(0) : p[c] * um + q[c] * xm + r[c];
  }
}

// The backward of `backward` (second-order gradients): given u, v, t, the gradients reaching dx [N, C, H, W],
// dweight [C] and dbias [C], the gradients of g, x and weight. The formulas are batch norm's double
// backward in training mode (mean and invstd as functions of x), with dy = g routed to the window maxima.
template <typename T>
void double_backward_impl(const at::Tensor& u, const at::Tensor& v, const at::Tensor& t, const at::Tensor& g,
                          const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, const at::Tensor& mean_t,
                          const at::Tensor& invstd_t, at::Tensor& gg, at::Tensor& gx, at::Tensor& gw) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = H / 2, OW = W / 2;
  const double M = double(N * H * W);
  const T* xp = x.data_ptr<T>();
  const T* upp = u.data_ptr<T>();
  const double* mp = mean_t.data_ptr<double>();
  const double* ip = invstd_t.data_ptr<double>();
  std::vector<T> mean_T(mp, mp + C), zero(C, T(0));
  // Sg = sum dy, Sgx = sum dy (x - mean), Sgu = sum dy u (pooled positions); Su = sum u, Sux = sum u (x - mean).
  std::vector<double> Sg, Sgx, Sg_again, Sgu, Su, Sux;
  pooled_sums<T>(x, g, idx, xp, mean_T.data(), Sg, Sgx);
  pooled_sums<T>(x, g, idx, upp, zero.data(), Sg_again, Sgu);
  const T* mt = mean_T.data();
  block_sums<T>(N * H * W, C, [&](int64_t r, T* __restrict a1, T* __restrict a2) {
    const T* xr = xp + r * C;
    const T* ur = upp + r * C;
    for (int64_t c = 0; c < C; ++c) {
      a1[c] += ur[c];
      a2[c] += ur[c] * (xr[c] - mt[c]);
    }
  }, Su, Sux);
  const T* wp = weight.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* tp = t.data_ptr<T>();
  T* gwp = gw.data_ptr<T>();
  std::vector<T> kc(C), ac(C), bc(C), lc(C), pc(C), qc(C), rc(C);
  for (int64_t c = 0; c < C; ++c) {
    const double s = ip[c], s3 = s * s * s, w = wp[c], vv = vp[c], mu = mp[c];
    const double all_sub = Su[c] * Sg[c] / M - Sgu[c] + 3.0 * s * s * Sgx[c] * Sux[c] / M;
    // gx = A (x - mean) + B + K dy + L u
    const double A = w * s3 * all_sub / M - vv * s3 * Sgx[c] / M;
    const double B = w * (Sux[c] * s3 / M) * (Sg[c] / M) + w * (Sgx[c] * s3 / M) * (Su[c] / M) - vv * s * Sg[c] / M;
    kc[c] = T(-w * Sux[c] * s3 / M + vv * s);
    lc[c] = T(-w * Sgx[c] * s3 / M);
    bc[c] = T(A);
    ac[c] = T(B - A * mu);
    gwp[c] = T(s * (Sgu[c] - Su[c] * Sg[c] / M - s * s * Sgx[c] * Sux[c] / M));
    // gg (at a live window maximum) = P u + Q x + R
    pc[c] = T(w * s);
    qc[c] = T(-w * s3 * Sux[c] / M + vv * s);
    rc[c] = T(-w * s * Su[c] / M + w * s3 * Sux[c] * mu / M - vv * s * mu + tp[c]);
  }
  full_pass<T>(x, g, idx, upp, {kc.data(), ac.data(), bc.data(), lc.data()}, gx.data_ptr<T>());
  const uint8_t* kp = idx.data_ptr<uint8_t>();
  T* ggp = gg.data_ptr<T>();
  const T* pcp = pc.data();
  const T* qcp = qc.data();
  const T* rcp = rc.data();
  at::parallel_for(0, N * OH * OW, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = j / (OH * OW), rest = j % (OH * OW), oh = rest / OW, ow = rest % OW;
      const int64_t base = ((n * H + 2 * oh) * W + 2 * ow) * C;
      gather_pass<T>(xp + base, upp + base, W * C, kp + j * C, pcp, qcp, rcp, ggp + j * C, C);
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fused bn-pool-relu: x must be a 4-d CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "fused bn-pool-relu: x must be channels-last");
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "fused bn-pool-relu: the map must be at least 2x2");
  TORCH_CHECK(weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "fused bn-pool-relu: one weight per channel, of x's dtype");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check(x, weight);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, opts);
  at::Tensor idx = at::empty({N, C, H / 2, W / 2}, opts.dtype(at::kByte));
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor invstd = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bn_pool_relu_forward",
                             [&] { forward_impl<scalar_t>(x, w, b, eps, out, idx, mean, invstd); });
  return {out, idx, mean, invstd};
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& invstd) {
  check(x, weight);
  at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor w = weight.contiguous();
  at::Tensor dx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor dw = at::empty({x.size(1)}, x.options());
  at::Tensor db = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bn_pool_relu_backward",
                             [&] { backward_impl<scalar_t>(g, x, w, idx, mean, invstd, dx, dw, db); });
  return {dx, dw, db};
}

std::vector<at::Tensor> double_backward(const at::Tensor& u, const at::Tensor& v, const at::Tensor& t,
                                        const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& idx, const at::Tensor& mean, const at::Tensor& invstd) {
  check(x, weight);
  at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor uu = u.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor w = weight.contiguous(), vv = v.contiguous(), tt = t.contiguous();
  at::Tensor gg = at::empty_like(g, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor gx = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor gw = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bn_pool_relu_double_backward", [&] {
    double_backward_impl<scalar_t>(uu, vv, tt, g, x, w, idx, mean, invstd, gg, gx, gw);
  });
  return {gg, gx, gw};
}

// Each call releases the GIL while it runs (it touches no Python object), as torch's own operators do: the
// task pool's threads (baselines/parallel.py) would otherwise wait for one another's kernel calls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("double_backward", &double_backward,
        "backward of backward: gradients of g, x, weight from those of dx, dweight, dbias", nogil());
  m.def("forward", &forward, "batch norm -> 2x2 max-pool -> ReLU (channels-last): out, window index, mean, invstd",
        nogil());
  m.def("backward", &backward, "first-order backward of forward: dx, dweight, dbias", nogil());
}
