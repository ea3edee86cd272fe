// Single-threaded CPU kernels of the trainer step's passes over the parameters (switch_sae_core/kernels).
// Plain C++ with a C ABI, called through ctypes: no torch headers, so it compiles in about a second.
// Compiled with -ffp-contract=off, each multiply-add written as torch's own CPU kernels compute it (GCC
// contracts some of their vector multiply-adds into one fused multiply-add: std::fma here, the others rounded
// twice), so the elementwise results are torch's to the bit; reductions accumulate in double (`omp simd`
// lets them be vectorised in any order), so they differ from torch's float reductions in the last bits.
#include <cmath>
#include <cstdint>

extern "C" {

// sum of g[i]^2, in double.
double ssae_sumsq(const float* g, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(g[i]) * double(g[i]);
  return s;
}

// Per row r of the (rows, d) gradient g and unit rows w: g_r -= (g_r . w_r) w_r, the dot product rounded
// to float as torch.linalg.vecdot's. Returns the projected gradient's sum of squares (double) when
// want_sumsq, else 0.
double ssae_project_rows(float* g, const float* w, int64_t rows, int64_t d, int want_sumsq) {
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    float* gr = g + r * d;
    const float* wr = w + r * d;
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < d; ++i) dot += double(gr[i]) * double(wr[i]);
    const float dotf = float(dot);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) {
      const float gi = std::fma(-wr[i], dotf, gr[i]);  // addcmul_(w, dot, value=-1)
      gr[i] = gi;
      s += double(gi) * double(gi);
    }
    total += s;
  }
  return want_sumsq ? total : 0.0;
}

// One Adam step over n elements (torch.optim.Adam(fused=True)'s CPU kernel, float32, ADAM_MODE::ORIGINAL:
// L2 weight decay added to the gradient; no amsgrad), with
// - coef > 0: the gradient first multiplied by (float)coef and stored back (clip_grad_norm_'s scaling);
// - row_len > 0: each row of row_len elements of p divided by its norm after the update (unit-norm
//   decoder rows: w / max(||w||, 1e-12)), while the row is in L1 cache.
// The constants are rounded to float where torch's kernel rounds them (Vec(scalar_t(...))).
void ssae_adam(float* p, float* g, float* m, float* v, int64_t n, int64_t row_len, double coef,
               double lr, double beta1, double beta2, double weight_decay, double eps, int maximize,
               double step) {
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  const float lerp_w = float(1 - beta1);
  const bool small_w = std::fabs(lerp_w) < 0.5f;
  const float lerp_c = small_w ? lerp_w : lerp_w - 1.0f;
  const float b2 = float(beta2), c2 = float(1 - beta2), bc2s = float(std::sqrt(bias_correction2));
  const float epsf = float(eps), neg_step = float(-step_size), wd = float(weight_decay);
  const float scale = float(coef);
  const bool do_scale = coef > 0, do_wd = weight_decay != 0;
  const int64_t rl = row_len > 0 ? row_len : n;
  for (int64_t r0 = 0; r0 < n; r0 += rl) {
    const int64_t len = (n - r0) < rl ? (n - r0) : rl;
    float* pr = p + r0;
    float* gr = g + r0;
    float* mr = m + r0;
    float* vr = v + r0;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) {
      float gi = gr[i];
      if (do_scale) {
        gi = gi * scale;
        gr[i] = gi;
      }
      if (maximize) gi = gi * -1.0f;
      float pi = pr[i];
      if (do_wd) gi = std::fma(pi, wd, gi);
      const float mi = small_w ? std::fma(lerp_c, gi - mr[i], mr[i]) : std::fma(lerp_c, gi - mr[i], gi);
      const float vi = std::fma(c2 * gi, gi, vr[i] * b2);
      mr[i] = mi;
      vr[i] = vi;
      const float denom = std::sqrt(vi) / bc2s + epsf;
      pi = pi + neg_step * mi / denom;
      pr[i] = pi;
      s += double(pi) * double(pi);
    }
    if (row_len > 0) {
      float norm = float(std::sqrt(s));
      if (norm < 1e-12f) norm = 1e-12f;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) pr[i] = pr[i] / norm;
    }
  }
}

// --- top-k of each row, k << width ------------------------------------------------------------------------
// Order of entries: a before b when a is larger, or equal and earlier in the row. The kernel keeps, per row,
// a min-heap of the k first entries by that order; an entry replaces the heap's last one only if strictly
// larger (a later entry never wins a tie), and a block of 16 entries is skipped at once when its maximum does
// not beat the heap's last one (most blocks, after the first few).
static inline bool after(float va, int64_t ia, float vb, int64_t ib) { return va < vb || (va == vb && ia > ib); }

static void sift_down(float* hv, int64_t* hi, int64_t k, int64_t pos) {
  const float v = hv[pos];
  const int64_t id = hi[pos];
  for (;;) {
    int64_t c = 2 * pos + 1;
    if (c >= k) break;
    if (c + 1 < k && after(hv[c + 1], hi[c + 1], hv[c], hi[c])) ++c;
    if (!after(hv[c], hi[c], v, id)) break;
    hv[pos] = hv[c];
    hi[pos] = hi[c];
    pos = c;
  }
  hv[pos] = v;
  hi[pos] = id;
}

static inline void offer(float* hv, int64_t* hi, int64_t k, float v, int64_t i) {
  if (v > hv[0]) {
    hv[0] = v;
    hi[0] = i;
    sift_down(hv, hi, k, 0);
  }
}

// x (rows, width) -> vals, idx (rows, k): each row's k largest entries, largest first (ties: the earlier
// entry first). 1 <= k <= width. Returns the number of rows holding a NaN (their output is not meaningful:
// the caller then uses torch.topk, which ranks NaN above every number).
int64_t ssae_topk_rows(const float* x, int64_t rows, int64_t width, int64_t k, float* vals, int64_t* idx) {
  int64_t nan_rows = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* hv = vals + r * k;  // the heap lives in the output row
    int64_t* hi = idx + r * k;
    bool nan = false;
    for (int64_t i = 0; i < k; ++i) {
      hv[i] = xr[i];
      hi[i] = i;
      nan |= xr[i] != xr[i];
    }
    for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(hv, hi, k, p);
    int64_t i = k;
    for (; i + 16 <= width && !nan; i += 16) {
      float block_max = xr[i];
      int any_nan = 0;
#pragma omp simd reduction(max : block_max) reduction(| : any_nan)
      for (int64_t j = 0; j < 16; ++j) {
        const float v = xr[i + j];
        block_max = v > block_max ? v : block_max;
        any_nan |= v != v;
      }
      nan |= any_nan != 0;
      if (block_max > hv[0])
        for (int64_t j = 0; j < 16; ++j) offer(hv, hi, k, xr[i + j], i + j);
    }
    for (; i < width && !nan; ++i) {
      nan |= xr[i] != xr[i];
      offer(hv, hi, k, xr[i], i);
    }
    nan_rows += nan;
    for (int64_t n = k - 1; n > 0; --n) {  // heap sort: the last entry of the order goes to the end each time
      const float v = hv[0];
      const int64_t id = hi[0];
      hv[0] = hv[n];
      hi[0] = hi[n];
      hv[n] = v;
      hi[n] = id;
      sift_down(hv, hi, n, 0);
    }
  }
  return nan_rows;
}

}  // extern "C"
