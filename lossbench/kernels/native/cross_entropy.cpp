// Fused cross-entropy for the CPU: 2-D logits [N, C], class-index targets, per-row loss and gradient.
// Called through ctypes from lossbench/kernels/cpu/cross_entropy.py, which validates the inputs,
// reduces the per-row losses and does the autograd plumbing; the maths and the accuracy argument are
// in that file's docstring and are the same here:
//  - e_c = exp(x_c) unshifted while the row max is in a safe range (one exp of an exact argument),
//    else exp(x_c - max);
//  - q = sum over c != y of e_c, accumulated in double: 1 - p_y = q / tot as a sum of positive terms,
//    never a difference; loss = log1p(q / e_y) in double (from the log-sum-exp when e_y underflows);
//  - the target's gradient entry is computed in double from q and rounded once.
// Memory traffic per row: the row is read from memory once, by the exp pass, which also finds the row
// max (a row whose max is out of the safe range is redone shifted, from L2: a 32768-class float32 row
// is 128 KiB); e goes into the gradient row (or a per-thread float scratch row for bf16 / fp16), which
// the scale pass then finishes while it is still in cache.
// Rows are handed out dynamically to the worker threads (workers.h): on a shared machine a descheduled
// thread delays only the rows it holds.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_exp.h"
#include "workers.h"

namespace {

using lossbench::bits_to_float;
using lossbench::float_to_bits;

struct BF16 { uint16_t v; };
struct F16 { _Float16 v; };

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(BF16 x) { return bits_to_float((uint32_t)x.v << 16); }
inline float load(F16 x) { return (float)x.v; }

template <class In> inline In store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline F16 store<F16>(float f) { return F16{(_Float16)f}; }
template <> inline BF16 store<BF16>(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  uint32_t q = (u >> 16) | 0x40u;                          // NaN stays a (quiet) NaN
  return BF16{(uint16_t)((f != f) ? q : r)};
}
template <class In> inline In store(double d);
template <> inline double store<double>(double d) { return d; }

inline float exp_t(float x) { return lossbench::exp_f32(x); }
inline double exp_t(double x) { return std::exp(x); }

template <class T> struct Limits;
// unshifted exp(x) while the row max is in [lo, hi]: no overflow, and the max's exp stays normal
template <> struct Limits<float> { static constexpr double lo = -40, hi = 60, tiny = 1e-30; };
template <> struct Limits<double> { static constexpr double lo = -500, hi = 600, tiny = 1e-300; };

struct Args {
  const void* x; int64_t N, C, ldx;  // logits, row stride in elements (column stride 1)
  const int64_t* y; int64_t ignore_index;
  const double* wy;                  // [N] class weight of each row's target, or null (1)
  const void* w;                     // [C] class weights in the compute type, or null
  double eps, W, kmean;              // label smoothing, sum of class weights (C unweighted), mean's 1/total
  double* loss;                      // [N] forward: per-row loss (0 on ignored rows)
  double* stats;                     // [N, 3]: shift, tot, q (forward writes, backward reads)
  const double* go;                  // [N] per-row grad_output, or null: go_scalar for every row
  double go_scalar;
  void* G;                           // [N, C] contiguous gradient, or null (forward without gradient)
  void* Gout;                        // rescale: where G * grad_output goes (may be G itself)
};

// Per-row coefficients of the gradient: G_c = e_c * a - b * w_c (w_c = 1 unweighted), G_y = ty.
struct Coef { double a, b, ty; };
inline Coef coef(const Args& A, double wy, double tot, double q, double go) {
  double k = A.kmean * go;
  if (A.eps == 0.0) {
    double a = k * wy / tot;
    return {a, 0.0, -q * a};  // -(1 - p_y) * k wy, from the sum q: no cancellation
  }
  double C = (double)A.C;
  double c1 = (1.0 - A.eps) * wy + A.eps * A.W / C;
  return {k * c1 / tot, k * A.eps / C, k * (A.eps * (A.W - wy) / C - c1 * q / tot)};
}

// `omp simd reduction` (-fopenmp-simd: the pragma only, no OpenMP runtime) lets GCC vectorise the
// reductions with per-lane partial results in registers, without -ffast-math.

// sum_c w_c x_c (w_c = 1 unweighted) in double: the label-smoothing term
template <class In, class T>
double row_sx(const In* x, int64_t C, const T* w) {
  double t = 0.0;
  if (w) {
#pragma omp simd reduction(+ : t)
    for (int64_t c = 0; c < C; ++c) t += (double)load(x[c]) * (double)w[c];
  } else {
#pragma omp simd reduction(+ : t)
    for (int64_t c = 0; c < C; ++c) t += (double)load(x[c]);
  }
  return t;
}

// buf[c] = exp(x[c] - shift) for c in [c0, c1), returning their sum (accumulated in double) and folding
// the x[c] into the running max m (a NaN is skipped by the max but makes the sum NaN)
template <class In, class T>
double exp_sum(const In* x, T* buf, int64_t c0, int64_t c1, T shift, T& m) {
  double t = 0.0;
  T mm = m;
#pragma omp simd reduction(+ : t) reduction(max : mm)
  for (int64_t c = c0; c < c1; ++c) {
    T v = load(x[c]);
    mm = v > mm ? v : mm;
    T e = exp_t(v - shift);
    buf[c] = e;
    t += (double)e;
  }
  m = mm;
  return t;
}

// out[c] = e[c] * a - b * w[c], rounded once into the output type
template <class In, class T>
void emit(const T* e, In* out, int64_t C, T a, T b, const T* w) {
  if (w) {
    for (int64_t c = 0; c < C; ++c) out[c] = store<In>(e[c] * a - b * w[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = store<In>(e[c] * a - b);
  }
}

// out[c] = exp(x[c] - shift) * a - b * w[c] (backward: recompute from the stored row statistics)
template <class In, class T>
void emit_exp(const In* x, In* out, int64_t C, T shift, T a, T b, const T* w) {
  if (w) {
    for (int64_t c = 0; c < C; ++c) out[c] = store<In>(exp_t(load(x[c]) - shift) * a - b * w[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = store<In>(exp_t(load(x[c]) - shift) * a - b);
  }
}

// Rows are taken from a shared counter in grabs of about one huge page of gradient (workers.h).
template <class F>
void for_rows(int64_t N, int64_t row_bytes, F&& body) {
  const int64_t grab = std::max<int64_t>(1, HUGE_PAGE_BYTES / std::max<int64_t>(row_bytes, 1));
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + grab - 1) / grab));
  auto work = [&] {
    std::vector<float> scratch;
    for (;;) {
      int64_t r0 = next.fetch_add(grab, std::memory_order_relaxed);
      if (r0 >= N) break;
      int64_t r1 = std::min(N, r0 + grab);
      for (int64_t i = r0; i < r1; ++i) body(i, scratch);
    }
  };
  run_workers(nt, work);
}

template <class In, class T>
void forward(const Args& A) {
  const In* X = static_cast<const In*>(A.x);
  In* G = static_cast<In*>(A.G);
  const T* w = static_cast<const T*>(A.w);
  const int64_t C = A.C;
  const bool smooth = A.eps != 0.0;
  for_rows(A.N, C * (int64_t)sizeof(In), [&](int64_t i, std::vector<float>& scratch) {
    const int64_t y = A.y[i];
    double* st = A.stats + 3 * i;
    if (y == A.ignore_index) {
      A.loss[i] = 0.0;
      st[0] = 0.0; st[1] = 1.0; st[2] = 0.0;
      if (G) std::memset(G + i * C, 0, sizeof(In) * C);
      return;
    }
    const In* xr = X + i * A.ldx;
    T* buf;
    if (G && std::is_same<In, T>::value) {
      buf = reinterpret_cast<T*>(G + i * C);
    } else {
      if ((int64_t)scratch.size() < C * (int64_t)(sizeof(T) / sizeof(float))) scratch.resize(C * (sizeof(T) / sizeof(float)));
      buf = reinterpret_cast<T*>(scratch.data());
    }
    // One pass from memory: exp of the unshifted logits (one exp of an exact argument) and the row
    // max together; a row whose max is out of the safe range is redone as exp(x - max) from L2.
    T shift = T(0);
    T m = load(xr[y]);
    double q = exp_sum<In, T>(xr, buf, 0, y, shift, m);
    q += exp_sum<In, T>(xr, buf, y + 1, C, shift, m);
    if (!((double)m >= Limits<T>::lo && (double)m <= Limits<T>::hi)) {
      shift = m;
      q = exp_sum<In, T>(xr, buf, 0, y, shift, m);
      q += exp_sum<In, T>(xr, buf, y + 1, C, shift, m);
    }
    const double sx = smooth ? row_sx<In, T>(xr, C, w) : 0.0;
    const double xy = (double)load(xr[y]);
    const double ey = (double)exp_t(load(xr[y]) - shift);
    buf[y] = (T)ey;
    const double tot = q + ey;
    // -log p_y: log1p of the other classes' share, accurate as p_y -> 1; when e_y is (near) underflow
    // the log-sum-exp form (large loss: nothing cancels)
    const double nll = ey >= Limits<T>::tiny ? std::log1p(q / ey) : std::log(tot) + (double)shift - xy;
    const double wy = A.wy ? A.wy[i] : 1.0;
    double loss;
    if (!smooth) {
      loss = wy * nll;
    } else {  // sum_c w_c (-log p_c) = W lse - sum_c w_c x_c, lse = x_y + nll
      loss = (1.0 - A.eps) * wy * nll + A.eps / (double)C * (A.W * (xy + nll) - sx);
    }
    A.loss[i] = loss;
    st[0] = (double)shift; st[1] = tot; st[2] = q;
    if (!G) return;
    const double go = A.go ? A.go[i] : A.go_scalar;
    Coef k = coef(A, wy, tot, q, go);
    In* gr = G + i * C;
    emit<In, T>(buf, gr, C, (T)k.a, (T)k.b, w);
    gr[y] = store<In>((T)k.ty);
  });
}

template <class In, class T>
void backward(const Args& A) {
  const In* X = static_cast<const In*>(A.x);
  In* G = static_cast<In*>(A.G);
  const T* w = static_cast<const T*>(A.w);
  const int64_t C = A.C;
  for_rows(A.N, C * (int64_t)sizeof(In), [&](int64_t i, std::vector<float>&) {
    const int64_t y = A.y[i];
    In* gr = G + i * C;
    if (y == A.ignore_index) { std::memset(gr, 0, sizeof(In) * C); return; }
    const double* st = A.stats + 3 * i;
    const double go = A.go ? A.go[i] : A.go_scalar;
    Coef k = coef(A, A.wy ? A.wy[i] : 1.0, st[1], st[2], go);
    emit_exp<In, T>(X + i * A.ldx, gr, C, (T)st[0], (T)k.a, (T)k.b, w);
    gr[y] = store<In>((T)k.ty);
  });
}

// Gout = G * grad_output per row (G from forward, for grad_output 1), the target entry recomputed in
// double from the row statistics and rounded once
template <class In, class T>
void rescale(const Args& A) {
  const In* G = static_cast<const In*>(A.G);
  In* O = static_cast<In*>(A.Gout);
  const int64_t C = A.C;
  for_rows(A.N, C * (int64_t)sizeof(In), [&](int64_t i, std::vector<float>&) {
    const int64_t y = A.y[i];
    const In* gr = G + i * C;
    In* orow = O + i * C;
    if (y == A.ignore_index) { if (orow != gr) std::memset(orow, 0, sizeof(In) * C); return; }
    const double* st = A.stats + 3 * i;
    const double go = A.go ? A.go[i] : A.go_scalar;
    const T r = (T)go;
    for (int64_t c = 0; c < C; ++c) orow[c] = store<In>((T)load(gr[c]) * r);
    orow[y] = store<In>((T)coef(A, A.wy ? A.wy[i] : 1.0, st[1], st[2], go).ty);
  });
}

template <void (*F32)(const Args&), void (*BF)(const Args&), void (*H)(const Args&), void (*F64)(const Args&)>
int dispatch(int dtype, const Args& A) {
  switch (dtype) {
    case 0: F32(A); return 0;
    case 1: BF(A); return 0;
    case 2: H(A); return 0;
    case 3: F64(A); return 0;
    default: return 1;
  }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16, 3 float64. Returns 0, or 1 for an unknown dtype.
extern "C" int lb_ce_forward(int dtype, const Args* A) {
  return dispatch<forward<float, float>, forward<BF16, float>, forward<F16, float>, forward<double, double>>(dtype, *A);
}

extern "C" int lb_ce_backward(int dtype, const Args* A) {
  return dispatch<backward<float, float>, backward<BF16, float>, backward<F16, float>, backward<double, double>>(dtype, *A);
}

extern "C" int lb_ce_rescale(int dtype, const Args* A) {
  return dispatch<rescale<float, float>, rescale<BF16, float>, rescale<F16, float>, rescale<double, double>>(dtype, *A);
}

extern "C" int lb_ce_args_size() { return (int)sizeof(Args); }
