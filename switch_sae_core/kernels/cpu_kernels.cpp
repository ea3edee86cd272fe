// Single-threaded CPU kernels of the trainer step's passes over the parameters (switch_sae_core/kernels).
// Plain C++ with a C ABI, called through ctypes: no torch headers, so it compiles in about a second.
// Compiled with -ffp-contract=off, each multiply-add written as torch's own CPU kernels compute it (GCC
// contracts some of their vector multiply-adds into one fused multiply-add: std::fma here, the others rounded
// twice), so the elementwise results are torch's to the bit; reductions accumulate in double (`omp simd`
// lets them be vectorised in any order), so they differ from torch's float reductions in the last bits.
#include <cmath>
#include <cstdint>

// sum of g[i]^2, in double.
extern "C" double ssae_sumsq(const float* g, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += double(g[i]) * double(g[i]);
  return s;
}

// Per row r of the (rows, d) gradient g and unit rows w: g_r -= (g_r . w_r) w_r, the dot product rounded
// to float as torch.linalg.vecdot's. Returns the projected gradient's sum of squares (double) when
// want_sumsq, else 0.
extern "C" double ssae_project_rows(float* g, const float* w, int64_t rows, int64_t d, int want_sumsq) {
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
// - SCALE: the gradient first multiplied by `scale` and stored back (clip_grad_norm_'s scaling);
// - ROWS: each row of row_len elements of p divided by its norm after the update (unit-norm decoder rows:
//   w / max(||w||, 1e-12)), while the row is in L1 cache.
// The constants are rounded to float where torch's kernel rounds them (Vec(scalar_t(...))). The options are
// template arguments so that each loop the compiler vectorises has no branch inside.
struct AdamConsts {
  float lerp_c, b2, c2, bc2s, eps, neg_step, wd, sign, scale;
  bool small_w;
};

template <bool SCALE, bool WD>
static inline float adam_element(const AdamConsts c, float* pr, float* gr, float* mr, float* vr, int64_t i) {
  float gi = gr[i];
  if (SCALE) {
    gi = gi * c.scale;
    gr[i] = gi;
  }
  gi = gi * c.sign;  // maximize: -1 (exact either way)
  float pi = pr[i];
  if (WD) gi = std::fma(pi, c.wd, gi);
  const float mi = std::fma(c.lerp_c, gi - mr[i], c.small_w ? mr[i] : gi);  // exp_avg.lerp_(grad, 1 - beta1)
  const float vi = std::fma(c.c2 * gi, gi, vr[i] * c.b2);
  mr[i] = mi;
  vr[i] = vi;
  const float denom = std::sqrt(vi) / c.bc2s + c.eps;
  pi = pi + c.neg_step * mi / denom;
  pr[i] = pi;
  return pi;
}

template <bool SCALE, bool WD>
static void adam_flat(const AdamConsts c, float* p, float* g, float* m, float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) adam_element<SCALE, WD>(c, p, g, m, v, i);
}

template <bool SCALE, bool WD>
static void adam_rows(const AdamConsts c, float* p, float* g, float* m, float* v, int64_t n, int64_t row_len) {
  for (int64_t r0 = 0; r0 < n; r0 += row_len) {
    const int64_t len = (n - r0) < row_len ? (n - r0) : row_len;
    float *pr = p + r0, *gr = g + r0, *mr = m + r0, *vr = v + r0;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) {
      const float pi = adam_element<SCALE, WD>(c, pr, gr, mr, vr, i);
      s += double(pi) * double(pi);
    }
    float norm = float(std::sqrt(s));
    if (norm < 1e-12f) norm = 1e-12f;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) pr[i] = pr[i] / norm;
  }
}

template <bool SCALE, bool WD>
static void adam_any(const AdamConsts c, float* p, float* g, float* m, float* v, int64_t n, int64_t row_len) {
  if (row_len > 0)
    adam_rows<SCALE, WD>(c, p, g, m, v, n, row_len);
  else
    adam_flat<SCALE, WD>(c, p, g, m, v, n);
}

// coef > 0: SCALE by (float)coef; row_len > 0: ROWS of that length.
extern "C" void ssae_adam(float* p, float* g, float* m, float* v, int64_t n, int64_t row_len, double coef,
               double lr, double beta1, double beta2, double weight_decay, double eps, int maximize,
               double step) {
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  const double step_size = lr / bias_correction1;
  AdamConsts c;
  const float lerp_w = float(1 - beta1);
  c.small_w = std::fabs(lerp_w) < 0.5f;
  c.lerp_c = c.small_w ? lerp_w : lerp_w - 1.0f;
  c.b2 = float(beta2);
  c.c2 = float(1 - beta2);
  c.bc2s = float(std::sqrt(bias_correction2));
  c.eps = float(eps);
  c.neg_step = float(-step_size);
  c.wd = float(weight_decay);
  c.sign = maximize ? -1.0f : 1.0f;
  c.scale = float(coef);
  const bool scale = coef > 0, wd = weight_decay != 0;
  if (scale && wd) adam_any<true, true>(c, p, g, m, v, n, row_len);
  else if (scale) adam_any<true, false>(c, p, g, m, v, n, row_len);
  else if (wd) adam_any<false, true>(c, p, g, m, v, n, row_len);
  else adam_any<false, false>(c, p, g, m, v, n, row_len);
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

// put x at heap position pos of the min-heap v[0..k) and sift it down to where it belongs
static inline void sift_down(float* v, int64_t k, int64_t pos, float x) {
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

// the k-th largest of v[0..n) (n >= k), v reordered: a min-heap of the k largest in v[0..k)
static float kth_largest(float* v, int64_t n, int64_t k) {
  for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(v, k, p, v[p]);
  for (int64_t i = k; i < n; ++i) {
    if (v[i] > v[0]) sift_down(v, k, 0, v[i]);
  }
  return v[0];
}

static const int64_t LANES = 64, BLOCK = 64;  // measured at (4096, 1536) and (4096, 24576), k = 32: 32-256 lanes and
                                               // blocks of 16 or 64 within 30% of each other; 64 and 64 the fastest

// x (rows, width) -> vals, idx (rows, k): each row's k first entries by the order above (the k largest, ties to
// the earlier entry), in no particular order (the heap's; a sort would cost as much as the selection). 1 <= k <= width. Returns the number of rows holding a NaN (their output is not meaningful:
// the caller then uses torch.topk, which ranks NaN above every number).
extern "C" int64_t ssae_topk_rows(const float* x, int64_t rows, int64_t width, int64_t k, float* vals, int64_t* idx) {
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

