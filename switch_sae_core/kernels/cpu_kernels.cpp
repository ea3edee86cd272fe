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
// Order of entries: a before b when a is larger, or equal and earlier in the row. Per row, two passes:
// 1. a bound: the row seen as lanes (entry i in lane i % L, L >= k lanes), each lane's maximum; the k-th
//    largest of the L maxima, t, is at most the row's k-th largest value (k distinct entries are >= t);
// 2. the entries >= t (a few times k for random rows) go through a min-heap of k by that order: an entry
//    replaces the heap's last one only if strictly larger (a later entry never wins a tie).
// Both passes are vectorised over blocks of the row; the heap sees only the candidates.
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

// the k-th largest of v[0..n) (n >= k), v reordered: a min-heap of the k largest in v[0..k)
static float kth_largest(float* v, int64_t n, int64_t k) {
  for (int64_t p = k / 2 - 1; p >= 0; --p) {
    int64_t pos = p;
    const float x = v[pos];
    for (;;) {
      int64_t c = 2 * pos + 1;
      if (c >= k) break;
      if (c + 1 < k && v[c + 1] < v[c]) ++c;
      if (!(v[c] < x)) break;
      v[pos] = v[c];
      pos = c;
    }
    v[pos] = x;
  }
  for (int64_t i = k; i < n; ++i) {
    if (!(v[i] > v[0])) continue;
    const float x = v[i];
    int64_t pos = 0;
    for (;;) {
      int64_t c = 2 * pos + 1;
      if (c >= k) break;
      if (c + 1 < k && v[c + 1] < v[c]) ++c;
      if (!(v[c] < x)) break;
      v[pos] = v[c];
      pos = c;
    }
    v[pos] = x;
  }
  return v[0];
}

static const int64_t LANES = 64, BLOCK = 64;  // measured at (4096, 1536) and (4096, 24576), k = 32: 32-256 lanes and
                                               // blocks of 16 or 64 within 30% of each other; 64 and 64 the fastest

// x (rows, width) -> vals, idx (rows, k): each row's k first entries by the order above (the k largest, ties to
// the earlier entry), in no particular order (the heap's; a sort would cost as much as the selection). 1 <= k <= width. Returns the number of rows holding a NaN (their output is not meaningful:
// the caller then uses torch.topk, which ranks NaN above every number).
int64_t ssae_topk_rows(const float* x, int64_t rows, int64_t width, int64_t k, float* vals, int64_t* idx) {
  int64_t lanes = k > LANES ? k : LANES;
  if (lanes > width) lanes = width;
  float* lane_max = new float[lanes];
  int64_t nan_rows = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* hv = vals + r * k;  // the heap lives in the output row
    int64_t* hi = idx + r * k;
    float* __restrict lm = lane_max;
    for (int64_t j = 0; j < lanes; ++j) lm[j] = xr[j];
    for (int64_t i = lanes; i < width; i += lanes) {
      const int64_t len = width - i < lanes ? width - i : lanes;
      const float* __restrict xi = xr + i;
      for (int64_t j = 0; j < len; ++j) lm[j] = xi[j] > lm[j] ? xi[j] : lm[j];  // NaN: caught in pass 2
    }
    const float t = kth_largest(lm, lanes, k);
    int64_t n = 0;  // candidates so far; the heap is built when the k-th arrives
    int nan = t != t;
    for (int64_t i = 0; i < width; i += BLOCK) {
      const int64_t len = width - i < BLOCK ? width - i : BLOCK;
      const float* __restrict xi = xr + i;
      int hit = 0, bad = 0;
      for (int64_t j = 0; j < len; ++j) {
        hit |= xi[j] >= t;
        bad |= xi[j] != xi[j];
      }
      nan |= bad;
      if (!hit) continue;
      for (int64_t j = 0; j < len; ++j) {
        const float v = xi[j];
        if (!(v >= t)) continue;
        if (n < k) {
          hv[n] = v;
          hi[n] = i + j;
          if (++n == k)
            for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(hv, hi, k, p);
        } else if (v > hv[0]) {
          hv[0] = v;
          hi[0] = i + j;
          sift_down(hv, hi, k, 0);
        }
      }
    }
    if (nan || n < k) {
      ++nan_rows;
      continue;
    }
    // no sort: the k entries leave in the heap's order (callers take them as a set, as torch.topk(sorted=False))
  }
  delete[] lane_max;
  return nan_rows;
}

}  // extern "C"
