// Batch norm (the batch's own statistics) -> 2x2 max-pool (stride 2) -> ReLU as one CPU kernel: forward,
// backward and the backward of that backward (second order), for channels-last tensors; and the stem, the
// same block with a one-channel 3x3 conv in front of it (forward and first-order backward). Built and
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

// The sums over rows r = 0..rows-1 of what add(r, acc) accumulates into acc [width]: taken in T over fixed
// blocks of `block` rows, in double across blocks, added in block order (so not dependent on the thread count).
template <typename T, typename Add>
std::vector<double> blocked_sums(int64_t rows, int64_t width, int64_t block, Add add) {
  const int64_t nblk = (rows + block - 1) / block;
  std::vector<double> part(nblk * width, 0.0);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(width);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t r1 = std::min(rows, (b + 1) * block);
      for (int64_t r = b * block; r < r1; ++r) add(r, acc.data());
      for (int64_t i = 0; i < width; ++i) part[b * width + i] = acc[i];
    }
  });
  std::vector<double> sum(width, 0.0);
  for (int64_t b = 0; b < nblk; ++b)
    for (int64_t i = 0; i < width; ++i) sum[i] += part[b * width + i];
  return sum;
}

// Per-channel sums s1, s2 [C] (double) of what add(r, a1, a2) accumulates for row r = 0..rows-1 into
// the partial sums a1, a2 [C] (`blocked_sums` over blocks of ROWS rows).
template <typename T, typename Add>
void block_sums(int64_t rows, int64_t C, Add add, std::vector<double>& s1, std::vector<double>& s2) {
  const std::vector<double> sum = blocked_sums<T>(rows, 2 * C, ROWS, [&](int64_t r, T* acc) { add(r, acc, acc + C); });
  s1.assign(sum.begin(), sum.begin() + C);
  s2.assign(sum.begin() + C, sum.end());
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

// --- The stem: Conv-4's first layer on one-channel images (a 3x3 convolution, stride 1, zero padding 1,
// Omniglot's) computed inside the block, so that its output map (C channels at full resolution, the
// largest map of the network) is never stored, read back or given a gradient: the conv output at a
// position is recomputed from its 9 input values (9 multiply-adds per channel) where the pooled pass needs
// it. Batch norm in training mode removes the conv's bias, so the block's value does not depend on it (its
// gradient is zero); the kernel works with v = W q, q the 9 taps minus the input's mean s (zero padding:
// -s), which is the conv output minus a per-channel constant. Every sum over positions that batch norm
// needs comes from the taps' sums Q = sum q [9] and Gram matrix G = sum q q^T [9, 9] (double):
// sum v = W Q, sum v^2 = W G W^T, sum v q = W G. So:
//   forward: one pass for Q and G (the input only), one pooled pass (conv, normalise, pool, ReLU);
//   backward: one pass over the pooled positions for the sums of g and g q at each channel's window
//   maximum; the conv weight's and batch norm's gradients follow from them and Q, G. No map is written.
// Saved for backward: the input, the byte map and `stats` (double): invstd [C], mean v [C], Q [9],
// G [9, 9] and s.
// (With 3 input channels, 27 taps against 32 channels at miniImageNet's size, recomputing the conv
// costs more than storing it: the stem takes one channel.)

constexpr int TAPS = 9;
constexpr int64_t STEM_MAX_C = 256;  // output channels of a stem (its per-row scratch is on the stack)
constexpr int64_t STEM_ROWS = 256;   // positions per reduction block of the stem's sums

// The input minus s, zero-padded by one pixel (the padding -s): [N, H + 2, W + 2].
template <typename T>
struct Taps {
  std::vector<T> xq;
  int64_t H, W;

  Taps(const at::Tensor& x, double s) : H(x.size(2)), W(x.size(3)) {
    const int64_t N = x.size(0), PW = W + 2;
    const T* xp = x.data_ptr<T>();
    xq.assign(N * (H + 2) * PW, T(-s));
    at::parallel_for(0, N * H, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / H, h = i % H;
        T* row = xq.data() + (n * (H + 2) + h + 1) * PW + 1;
        for (int64_t w = 0; w < W; ++w) row[w] = xp[i * W + w] - T(s);
      }
    });
  }

  // q[kh * 3 + kw] for position (n, h, w).
  void gather(int64_t n, int64_t h, int64_t w, T* __restrict q) const {
    const T* base = xq.data() + (n * (H + 2) + h) * (W + 2) + w;
    for (int kh = 0; kh < 3; ++kh)
      for (int kw = 0; kw < 3; ++kw) q[kh * 3 + kw] = base[kh * (W + 2) + kw];
  }
};

// The tap sums of one image row (W positions; `top` its first padded row): qs[k] += sum q[k],
// gram[k, l] += sum q[k] q[l], as dot products of shifted padded rows in double.
template <typename T>
void tap_sums_row(const T* top, int64_t W, double* __restrict qs, double* __restrict gram) {
  double rows[3][STEM_MAX_C + 2];  // (the row width is checked against STEM_MAX_C too)
  for (int kh = 0; kh < 3; ++kh)
    for (int64_t w = 0; w < W + 2; ++w) rows[kh][w] = top[kh * (W + 2) + w];
  for (int k = 0; k < TAPS; ++k) {
    const double* __restrict a = rows[k / 3] + k % 3;
    double sa = 0.0;
    for (int64_t w = 0; w < W; ++w) sa += a[w];
    qs[k] += sa;
    for (int l = k; l < TAPS; ++l) {
      const double* __restrict b = rows[l / 3] + l % 3;
      double dot = 0.0;
      for (int64_t w = 0; w < W; ++w) dot += a[w] * b[w];
      gram[k * TAPS + l] += dot;
    }
  }
}

// v[c] = sum over taps of wt[k, c] q[k] (wt: the conv weight as [9, C]).
template <typename T>
void stem_values(const T* __restrict wt, const T* __restrict q, T* __restrict v, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    T acc = wt[c] * q[0];
#pragma GCC unroll 9
    for (int k = 1; k < TAPS; ++k) acc += wt[k * C + c] * q[k];
    v[c] = acc;
  }
}

// Visit every pooled position of an [N, C, H, W] stem: finish(j, v) gets the position's first index j in the
// pooled [N, OH, OW, C] maps and v [4][STEM_MAX_C], the values wt q of its 2x2 window (row-major), in parallel
// over pooled rows.
template <typename T, typename Finish>
void for_each_window(const Taps<T>& taps, const T* wt, int64_t N, int64_t C, Finish finish) {
  const int64_t OH = taps.H / 2, OW = taps.W / 2;
  at::parallel_for(0, N * OH, 1, [&](int64_t i0, int64_t i1) {
    T q[TAPS], v[4][STEM_MAX_C];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / OH, oh = i % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        for (int w = 0; w < 4; ++w) {
          taps.gather(n, 2 * oh + w / 2, 2 * ow + w % 2, q);
          stem_values<T>(wt, q, v[w], C);
        }
        finish(((n * OH + oh) * OW + ow) * C, v);
      }
    }
  });
}

// One pooled pixel's share of the backward sums: dy = g where the window maximum was at position w (the
// taps of the 4 window positions in q [4, 9]); sdy += dy, sq[k, c] += dy q_w[k].
template <typename T>
void stem_pooled_row(const T* __restrict g, const uint8_t* __restrict win, const T* __restrict q,
                     T* __restrict sdy, T* __restrict sq, int64_t C) {
  T m[4][STEM_MAX_C];
  for (int64_t c = 0; c < C; ++c) {
    const T wc = T(win[c]), gc = g[c];
    m[0][c] = wc == T(0) ? gc : T(0);
    m[1][c] = wc == T(1) ? gc : T(0);
    m[2][c] = wc == T(2) ? gc : T(0);
    m[3][c] = wc == T(3) ? gc : T(0);
    sdy[c] += wc == T(CUT) ? T(0) : gc;
  }
  for (int k = 0; k < TAPS; ++k) {
    const T q0 = q[k], q1 = q[TAPS + k], q2 = q[2 * TAPS + k], q3 = q[3 * TAPS + k];
    T* __restrict row = sq + k * C;
    for (int64_t c = 0; c < C; ++c) row[c] += m[0][c] * q0 + m[1][c] * q1 + m[2][c] * q2 + m[3][c] * q3;
  }
}

template <typename T>
void stem_forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_w, const at::Tensor& bn_b,
                       double eps, at::Tensor& out, at::Tensor& idx, at::Tensor& stats) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0), M = N * H * W;
  const T* xp = x.data_ptr<T>();
  double* st = stats.data_ptr<double>();  // invstd [C], mean v [C], Q [9], G [9, 9], s
  double* Q = st + 2 * C;
  double* G = Q + TAPS;
  const std::vector<double> xsum = blocked_sums<T>(M, 1, STEM_ROWS, [&](int64_t r, T* acc) { acc[0] += xp[r]; });
  const double s = double(T(xsum[0] / M));
  G[TAPS * TAPS] = s;
  const Taps<T> taps(x, s);
  const std::vector<double> sum = blocked_sums<double>(N * H, TAPS + TAPS * TAPS, 8, [&](int64_t i, double* acc) {
    tap_sums_row<T>(taps.xq.data() + ((i / H) * (H + 2) + i % H) * (W + 2), W, acc, acc + TAPS);
  });
  for (int k = 0; k < TAPS; ++k) {
    Q[k] = sum[k];
    for (int l = 0; l < TAPS; ++l) G[k * TAPS + l] = sum[TAPS + std::min(k, l) * TAPS + std::max(k, l)];
  }
  const T* wp = weight.data_ptr<T>();
  const T* bwp = bn_w.data_ptr<T>();
  const T* bbp = bn_b.data_ptr<T>();
  std::vector<T> alpha(C), beta(C), wt(TAPS * C);
  for (int64_t c = 0; c < C; ++c) {
    double sv = 0.0, svv = 0.0;
    for (int k = 0; k < TAPS; ++k) {
      double gw = 0.0;
      for (int l = 0; l < TAPS; ++l) gw += G[k * TAPS + l] * wp[c * TAPS + l];
      sv += wp[c * TAPS + k] * Q[k];
      svv += wp[c * TAPS + k] * gw;
      wt[k * C + c] = wp[c * TAPS + k];
    }
    const double m1 = sv / M;
    const double var = std::max(svv / M - m1 * m1, 0.0);
    st[c] = 1.0 / std::sqrt(var + eps);
    st[C + c] = m1;
    alpha[c] = T(st[c] * bwp[c]);
    beta[c] = T(bbp[c] - m1 * st[c] * bwp[c]);
  }
  const T* wtp = wt.data();
  T* op = out.data_ptr<T>();
  uint8_t* kp = idx.data_ptr<uint8_t>();
  const T* al = alpha.data();
  const T* be = beta.data();
  for_each_window<T>(taps, wtp, N, C, [&](int64_t j, const T (*v)[STEM_MAX_C]) {
    pool_pixel<T>(v[0], v[1], v[2], v[3], al, be, op + j, kp + j, C);
  });
}

template <typename T>
void stem_backward_impl(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_w,
                        const at::Tensor& idx, const at::Tensor& stats, at::Tensor& dw, at::Tensor& dbn_w,
                        at::Tensor& dbn_b, at::Tensor& sums) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0);
  const int64_t OH = H / 2, OW = W / 2;
  const double M = double(N * H * W);
  const double* st = stats.data_ptr<double>();
  const double *invstd = st, *vmean = st + C, *Q = st + 2 * C, *G = Q + TAPS;
  const Taps<T> taps(x, G[TAPS * TAPS]);
  const T* gp = g.data_ptr<T>();
  const uint8_t* kp = idx.data_ptr<uint8_t>();
  const std::vector<double> sum = blocked_sums<T>(N * OH * OW, C + TAPS * C, STEM_ROWS, [&](int64_t j, T* acc) {
    T q[4 * TAPS];
    const int64_t n = j / (OH * OW), rest = j % (OH * OW), oh = rest / OW, ow = rest % OW;
    for (int w = 0; w < 4; ++w) taps.gather(n, 2 * oh + w / 2, 2 * ow + w % 2, q + w * TAPS);
    stem_pooled_row<T>(gp + j * C, kp + j * C, q, acc, acc + C, C);
  });
  std::copy(sum.begin(), sum.end(), sums.data_ptr<double>());
  const T* wp = weight.data_ptr<T>();
  const T* bw = bn_w.data_ptr<T>();
  T* dwp = dw.data_ptr<T>();
  T* dbwp = dbn_w.data_ptr<T>();
  T* dbbp = dbn_b.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    // the sum of dy (v - mean v) over the window maxima: the conv weight against the tap sums, less mean v x sum dy
    const double sdy = sum[c];
    double sdyv = -vmean[c] * sdy;
    for (int k = 0; k < TAPS; ++k) sdyv += double(wp[c * TAPS + k]) * sum[C + k * C + c];
    const double s_xhat = invstd[c] * sdyv, kc = double(bw[c]) * invstd[c];
    dbbp[c] = T(sdy);
    dbwp[c] = T(s_xhat);
    // the conv output's gradient d = kc (dy - mean dy - xhat mean(dy xhat)) summed against each tap q + s (d sums
    // to zero: the s part vanishes), with sum (v - mean v) q = W G - mean v Q
    for (int k = 0; k < TAPS; ++k) {
      double vq = -vmean[c] * Q[k];
      for (int l = 0; l < TAPS; ++l) vq += double(wp[c * TAPS + l]) * G[l * TAPS + k];
      dwp[c * TAPS + k] = T(kc * (sum[C + k * C + c] - sdy / M * Q[k] - s_xhat / M * invstd[c] * vq));
    }
  }
}

// The stem's second-order pass: out = V q + k at each pooled position's window maximum (its taps q; V: [9, C],
// k: [C]), 0 where the ReLU cut. The first-order backward is linear in g through the sums of g and g q at the
// window maxima, so the gradient of any linear function of its outputs with respect to g has this form
// (stem_double_backward_impl derives V and k).
template <typename T>
void stem_select_impl(const at::Tensor& x, const at::Tensor& vt, const at::Tensor& k, const at::Tensor& idx,
                      const at::Tensor& stats, at::Tensor& out) {
  const int64_t N = x.size(0), C = vt.size(1);
  const Taps<T> taps(x, stats.data_ptr<double>()[2 * C + TAPS + TAPS * TAPS]);
  const T* vtp = vt.data_ptr<T>();
  const T* kk = k.data_ptr<T>();
  const uint8_t* kp = idx.data_ptr<uint8_t>();
  T* op = out.data_ptr<T>();
  for_each_window<T>(taps, vtp, N, C, [&](int64_t j, const T (*v)[STEM_MAX_C]) {
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t wc = kp[j + c];
      op[j + c] = wc == CUT ? T(0) : v[wc][c] + kk[c];
    }
  });
}

// The stem's second order: the backward of stem_backward's (d conv weight, d weight, d bias) as a function of
// (g, conv weight, weight), for their cotangents U [C, 9], uw, ub [C]. Per channel, with t the taps centred on
// their mean, Gc = sum t t^T = G - Q Q^T / M, W the conv weight [9], w the batch-norm weight, s = invstd,
// h = Gc W / M and B = sum over the window maxima of g t = (the backward's sum of g q) - (its sum of g) Q / M:
// the first-order backward is d W = w s B - w s^3 (W.B) h, d w = s (W.B), d b = sum g; so, with m = U.h,
// r = U.B, q = W.B and a = uw s - w s^3 m:
//   grad g (at a window maximum, taps t) = V.t + ub, V = w s U + a W  (stem_select's V and k),
//   grad w = s r - s^3 q m,
//   grad W = (3 w s^5 q m - w s^3 r - uw s^3 q) h + a B - w s^3 q Gc U / M.
// (The window maxima, where the ReLU cuts and the conv bias do not enter: the conv bias drops out of batch norm
// and the batch-norm bias only moves the cuts.)
template <typename T>
void stem_double_backward_impl(const at::Tensor& u, const at::Tensor& uw, const at::Tensor& ub,
                               const at::Tensor& weight, const at::Tensor& bn_w, const at::Tensor& stats,
                               const at::Tensor& sums, double M, at::Tensor& vt, at::Tensor& k, at::Tensor& dconv,
                               at::Tensor& dbn_w) {
  const int64_t C = weight.size(0);
  const double* st = stats.data_ptr<double>();
  const double *invstd = st, *Q = st + 2 * C, *G = Q + TAPS;
  const double* sm = sums.data_ptr<double>();
  const T *up = u.data_ptr<T>(), *uwp = uw.data_ptr<T>(), *ubp = ub.data_ptr<T>();
  const T *wp = weight.data_ptr<T>(), *bwp = bn_w.data_ptr<T>();
  T *vtp = vt.data_ptr<T>(), *kp = k.data_ptr<T>(), *dcp = dconv.data_ptr<T>(), *dbp = dbn_w.data_ptr<T>();
  double Gc[TAPS * TAPS];
  for (int i = 0; i < TAPS; ++i)
    for (int j = 0; j < TAPS; ++j) Gc[i * TAPS + j] = G[i * TAPS + j] - Q[i] * Q[j] / M;
  for (int64_t c = 0; c < C; ++c) {
    double Wc[TAPS], U[TAPS], B[TAPS], h[TAPS], GU[TAPS], q = 0.0, r = 0.0, m = 0.0;
    for (int i = 0; i < TAPS; ++i) {
      Wc[i] = double(wp[c * TAPS + i]);
      U[i] = double(up[c * TAPS + i]);
      B[i] = sm[C + i * C + c] - sm[c] * Q[i] / M;
    }
    for (int i = 0; i < TAPS; ++i) {
      double hw = 0.0, hu = 0.0;
      for (int j = 0; j < TAPS; ++j) {
        hw += Gc[i * TAPS + j] * Wc[j];
        hu += Gc[i * TAPS + j] * U[j];
      }
      h[i] = hw / M;
      GU[i] = hu / M;
      q += Wc[i] * B[i];
      r += U[i] * B[i];
    }
    for (int i = 0; i < TAPS; ++i) m += U[i] * h[i];
    const double s = invstd[c], s3 = s * s * s, w = double(bwp[c]), uwc = double(uwp[c]);
    const double a = uwc * s - w * s3 * m, ch = 3.0 * w * s3 * s * s * q * m - w * s3 * r - uwc * s3 * q;
    double vq = 0.0;
    for (int i = 0; i < TAPS; ++i) {
      const double v = w * s * U[i] + a * Wc[i];
      vtp[i * C + c] = T(v);
      vq += v * Q[i];
      dcp[c * TAPS + i] = T(ch * h[i] + a * B[i] - w * s3 * q * GU[i]);
    }
    kp[c] = T(double(ubp[c]) - vq / M);  // (the kernel's taps are centred on the input's mean, not on theirs)
    dbp[c] = T(s * r - s3 * q * m);
  }
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

void check_stem(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_w) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(2) >= 2 && x.size(3) >= 2,
              "fused stem: x must be a 4-d CPU tensor of at least 2x2");
  TORCH_CHECK(x.size(1) == 1 && x.size(3) <= STEM_MAX_C, "fused stem: x must be [N, 1, H, W <= 256]");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) <= STEM_MAX_C && weight.size(1) == 1 && weight.size(2) == 3 &&
                  weight.size(3) == 3 && weight.scalar_type() == x.scalar_type(),
              "fused stem: the conv weight must be [C <= 256, 1, 3, 3] of x's dtype");
  TORCH_CHECK(bn_w.numel() == weight.size(0) && bn_w.scalar_type() == x.scalar_type(),
              "fused stem: one batch-norm weight per output channel, of x's dtype");
}

std::vector<at::Tensor> stem_forward(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_w,
                                     const at::Tensor& bn_b, double eps) {
  check_stem(x_, weight, bn_w);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), C = weight.size(0);
  auto opts = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, opts);
  at::Tensor idx = at::empty({N, C, H / 2, W / 2}, opts.dtype(at::kByte));
  at::Tensor stats = at::empty({2 * C + TAPS + TAPS * TAPS + 1}, x.options().dtype(at::kDouble));
  at::Tensor w = weight.contiguous(), bw = bn_w.contiguous(), bb = bn_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_stem_forward",
                             [&] { stem_forward_impl<scalar_t>(x, w, bw, bb, eps, out, idx, stats); });
  return {out, idx, stats};
}

std::vector<at::Tensor> stem_backward(const at::Tensor& grad, const at::Tensor& x_, const at::Tensor& weight,
                                      const at::Tensor& bn_w, const at::Tensor& idx, const at::Tensor& stats) {
  check_stem(x_, weight, bn_w);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor g = grad.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor w = weight.contiguous(), bw = bn_w.contiguous();
  at::Tensor dw = at::empty_like(w), dbw = at::empty_like(bw), dbb = at::empty_like(bw);
  at::Tensor sums = at::empty({(TAPS + 1) * w.size(0)}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_stem_backward",
                             [&] { stem_backward_impl<scalar_t>(g, x, w, bw, idx, stats, dw, dbw, dbb, sums); });
  return {dw, dbw, dbb, sums};
}

std::vector<at::Tensor> stem_double_backward(const at::Tensor& u_, const at::Tensor& uw_, const at::Tensor& ub_,
                                             const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bn_w,
                                             const at::Tensor& idx, const at::Tensor& stats, const at::Tensor& sums,
                                             bool need_grad) {
  check_stem(x_, weight, bn_w);
  at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor u = u_.contiguous(), uw = uw_.contiguous(), ub = ub_.contiguous(), w = weight.contiguous(),
             bw = bn_w.contiguous();
  const int64_t C = w.size(0);
  TORCH_CHECK(u.numel() == TAPS * C && uw.numel() == C && ub.numel() == C && u.scalar_type() == x.scalar_type() &&
                  uw.scalar_type() == x.scalar_type() && ub.scalar_type() == x.scalar_type() && idx.size(1) == C &&
                  stats.numel() == 2 * C + TAPS + TAPS * TAPS + 1 && sums.numel() == (TAPS + 1) * C,
              "fused stem_double_backward: cotangents of x's dtype for (conv weight, weight, bias), and the stem's "
              "idx, stats and sums");
  at::Tensor vt = at::empty({TAPS, C}, x.options()), k = at::empty({C}, x.options());
  at::Tensor dconv = at::empty_like(w), dbw = at::empty_like(bw);
  const double M = double(x.size(0) * x.size(2) * x.size(3));
  at::Tensor dg;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_stem_double_backward", [&] {
    stem_double_backward_impl<scalar_t>(u, uw, ub, w, bw, stats, sums, M, vt, k, dconv, dbw);
    if (need_grad) {
      dg = at::empty(idx.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
      stem_select_impl<scalar_t>(x, vt, k, idx, stats, dg);
    }
  });
  return {need_grad ? dg : at::Tensor(), dconv, dbw};
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
  m.def("stem_forward", &stem_forward,
        "3x3 conv (one input channel, no bias) -> the block, no map stored: out, window index, stats", nogil());
  m.def("stem_backward", &stem_backward,
        "first-order backward of stem_forward: dconv_weight, dweight, dbias and the sums of g, g q (double)", nogil());
  m.def("stem_double_backward", &stem_double_backward,
        "backward of stem_backward: gradients of g (if asked), conv weight, weight from those of its outputs",
        nogil());
}
