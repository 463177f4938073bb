// Fused KL divergence for the CPU (F.kl_div, input in log space), called through ctypes from
// lossbench/kernels/cpu/kl_div.py (which validates, lays out and allocates, and does the autograd
// plumbing). Two streaming kernels over flat element ranges:
//   lb_kl_loss: one read of input and target; the float64 sum of the pointwise loss, or the pointwise
//               loss itself (reduction="none");
//   lb_kl_grad: one read of the target (and of grad_output for "none"), one write of the gradient
//               -t * go / scale (-exp(t) * ... for log targets), rounded once.
// The gradient does not depend on the input and grad_output is only known in backward, so the gradient
// is made there: the same bytes as scaling a gradient written in forward, without forward's write.
//
// Pointwise loss as torch: xlogy(t, t) - t * x (0 * log 0 = 0; NaN for t < 0 or NaN), or
// exp(t) * (t - x). Computed in float for float / bfloat16 / float16 and in double for double. Sums:
// float64, 16 lanes per chunk, chunks added in chunk order (the same bits for any thread count).
// log is written out below and exp is vec_exp.h's: libm's are calls the compiler does not vectorise.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_exp.h"
#include "workers.h"

namespace {

using lossbench::bits_to_float;
using lossbench::float_to_bits;

constexpr int64_t CHUNK = 1 << 15;  // elements per task: 128 KiB of float per stream
constexpr int64_t TILE = 512;       // pointwise values staged in float before the float64 sums
constexpr int W = 16;               // accumulation lanes (one AVX-512 register of floats)

// Branch-free select (a when c): float ternaries are not if-converted under -ftrapping-math (GCC's
// default), and these loops must vectorise with the loader's flags.
inline uint32_t sel(bool c, uint32_t a, uint32_t b) { return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c))); }

// log(v), any float. v = 2^e m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| < 0.172. Max error 2 ulp (tests/test_native_kl.py).
inline float log_f32(float v) {
  const uint32_t u = float_to_bits(v);
  const bool pos = u - 1u < 0x7f7fffffu;  // 0 < v < inf, subnormals included
  const bool sub = u < 0x00800000u;       // subnormal: scaled by 2^23 into the normal range first
  const uint32_t up = sel(pos, u, 0x3f800000u);
  const int32_t i = static_cast<int32_t>(sel(sub, float_to_bits(bits_to_float(up) * 8388608.0f), up));
  const int32_t e = (i - 0x3f3504f3) >> 23;
  const float m = bits_to_float(static_cast<uint32_t>(i - (e << 23)));
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (m + 1.0f);
  const float z = s * s;
  // 2 atanh(s) = 2s (1 + z/3 + z^2/5 + z^3/7 + z^4/9); the next term is below 2e-9 relative
  const float p = z * (1.0f / 3 + z * (1.0f / 5 + z * (1.0f / 7 + z * (1.0f / 9))));
  const float lm = 2.0f * s + 2.0f * s * p;
  const float ef = static_cast<float>(e - (23 & -static_cast<int32_t>(sub)));
  // ln 2 = hi + lo, hi with 16 significant bits: ef * hi is exact
  const float l = ef * 0.693145751953125f + (lm + ef * 1.42860682030941723212e-6f);
  // log(+-0) = -inf, log(inf) = inf, log(< 0) and log(NaN) = NaN
  const uint32_t special = sel((u << 1) == 0, 0xff800000u, sel(u == 0x7f800000u, u, 0x7fc00000u));
  return bits_to_float(sel(pos, float_to_bits(l), special));
}

inline float log_c(float v) { return log_f32(v); }
inline double log_c(double v) { return std::log(v); }
inline float exp_c(float v) { return lossbench::exp_f32(v); }
inline double exp_c(double v) { return std::exp(v); }

// xlogy(t, t) from t log t: 0 where t == +-0 (not 0 * -inf = NaN)
inline float xlogy_self(float t, float tl) { return bits_to_float(sel((float_to_bits(t) << 1) == 0, 0u, float_to_bits(tl))); }
inline double xlogy_self(double t, double tl) { return t == 0.0 ? 0.0 : tl; }

// element types and their compute type
struct BF16 { uint16_t v; };
struct F16 { uint16_t v; };
template <class S> struct IO;
template <> struct IO<float> {
  using C = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <> struct IO<double> {
  using C = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};
template <> struct IO<BF16> {
  using C = float;
  static float load(BF16 v) { return bits_to_float(static_cast<uint32_t>(v.v) << 16); }
  static BF16 store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    return BF16{static_cast<uint16_t>(sel(nan, (u >> 16) | 0x40u, r))};  // NaN stays a quiet NaN
  }
};
// float16 by bit operations too: GCC 12 converts _Float16 through library calls without AVX512-FP16
// (16 s for 2^28 elements measured here, against 0.1 s for this)
template <> struct IO<F16> {
  using C = float;
  static float load(F16 v) {
    const uint32_t h = v.v;
    const uint32_t em = (h & 0x7fffu) << 13;                      // exponent and mantissa in float position
    const float scaled = bits_to_float(em) * 5.192296858534828e33f;  // 2^112 rebias; subnormals normalise
    const uint32_t infnan = em | 0x7f800000u;                     // half exponent 31: inf / NaN
    return bits_to_float(((h & 0x8000u) << 16) | sel((h & 0x7c00u) == 0x7c00u, infnan, float_to_bits(scaled)));
  }
  static F16 store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // normal half: rebias the exponent, round to nearest even at bit 13
    const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = (15 - 127) << 23
    // subnormal half (|f| < 2^-14): the float addition rounds (to nearest even) at the right bit
    const uint32_t subn = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
    const uint32_t big = sel(a > 0x7f800000u, 0x7e00u, 0x7c00u);          // NaN, else overflow to inf
    const uint32_t r = sel(a >= 0x477ff000u, big, sel(a < 0x38800000u, subn, normal));
    return F16{static_cast<uint16_t>(sign | r)};
  }
};

template <bool LT, class C> inline C pointwise(C x, C t) {
  if constexpr (LT) {
    return exp_c(t) * (t - x);
  } else {
    return xlogy_self(t, t * log_c(t)) - t * x;
  }
}

// body(begin, end, chunk) over [0, n) in `size` pieces handed out dynamically, so that a descheduled
// thread on a shared machine delays only the piece it holds (workers.h).
template <class F> void for_chunks(int64_t n, const F& body, int64_t size = CHUNK) {
  const int64_t chunks = (n + size - 1) / size;
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
      const int64_t a = c * size;
      body(a, std::min(n, a + size), c);
    }
  };
  run_workers(std::min<int64_t>(std::max(1, at::get_num_threads()), chunks), work);
}

template <bool LT, class S> double loss_sum(const S* x, const S* t, int64_t n) {
  using C = typename IO<S>::C;
  std::vector<double> part((n + CHUNK - 1) / CHUNK, 0.0);
  for_chunks(n, [&](int64_t a, int64_t b, int64_t c) {
    double acc[W] = {};
    C pw[TILE];
    for (int64_t i = a; i < b; i += TILE) {
      const int64_t m = std::min<int64_t>(TILE, b - i);
      const S* xi = x + i;
      const S* ti = t + i;
      for (int64_t j = 0; j < m; ++j) pw[j] = pointwise<LT, C>(IO<S>::load(xi[j]), IO<S>::load(ti[j]));
      for (int64_t j = m; j < TILE; ++j) pw[j] = C(0);
      for (int64_t j = 0; j < TILE; j += W) {
        for (int k = 0; k < W; ++k) acc[k] += static_cast<double>(pw[j + k]);
      }
    }
    double s = 0.0;
    for (int k = 0; k < W; ++k) s += acc[k];
    part[c] = s;
  });
  double total = 0.0;
  for (double p : part) total += p;
  return total;
}

template <bool LT, class S> void loss_none(const S* x, const S* t, S* out, int64_t n) {
  using C = typename IO<S>::C;
  for_chunks(n, [&](int64_t a, int64_t b, int64_t) {
    for (int64_t i = a; i < b; ++i) out[i] = IO<S>::store(pointwise<LT, C>(IO<S>::load(x[i]), IO<S>::load(t[i])));
  });
}

// g = -t' * factor (go null) or -t' * go elementwise (reduction="none"); t' = t, or exp(t) for log targets
template <bool LT, class S> void grad_kernel(const S* t, const S* go, S* g, int64_t n, double factor) {
  using C = typename IO<S>::C;
  const double f = -factor;
  for_chunks(n, [&](int64_t a, int64_t b, int64_t) {
    if (go == nullptr) {
      for (int64_t i = a; i < b; ++i) {  // the product in double: t * factor rounded once
        const C v = IO<S>::load(t[i]);
        g[i] = IO<S>::store(static_cast<C>(static_cast<double>(LT ? exp_c(v) : v) * f));
      }
    } else {
      for (int64_t i = a; i < b; ++i) {
        const C v = IO<S>::load(t[i]);
        g[i] = IO<S>::store(-((LT ? exp_c(v) : v) * IO<S>::load(go[i])));
      }
    }
  }, HUGE_PAGE_BYTES / static_cast<int64_t>(sizeof(S)));  // pieces of one huge page (workers.h)
}

template <class S> int loss(int log_target, const void* x, const void* t, void* out, int64_t n, double* sum) {
  const S* xs = static_cast<const S*>(x);
  const S* ts = static_cast<const S*>(t);
  if (out != nullptr) {
    S* o = static_cast<S*>(out);
    log_target ? loss_none<true>(xs, ts, o, n) : loss_none<false>(xs, ts, o, n);
  } else {
    *sum = log_target ? loss_sum<true>(xs, ts, n) : loss_sum<false>(xs, ts, n);
  }
  return 0;
}

template <class S> int grad(int log_target, const void* t, const void* go, void* g, int64_t n, double factor) {
  const S* ts = static_cast<const S*>(t);
  const S* gs = static_cast<const S*>(go);
  S* out = static_cast<S*>(g);
  log_target ? grad_kernel<true>(ts, gs, out, n, factor) : grad_kernel<false>(ts, gs, out, n, factor);
  return 0;
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. Returns 0, or -1 for an unknown dtype.
// out null: *sum receives the float64 sum of the pointwise loss; else out receives the pointwise loss.
extern "C" int lb_kl_loss(int dtype, int log_target, const void* x, const void* t, void* out, int64_t n,
                          double* sum) {
  switch (dtype) {
    case 0: return loss<float>(log_target, x, t, out, n, sum);
    case 1: return loss<double>(log_target, x, t, out, n, sum);
    case 2: return loss<BF16>(log_target, x, t, out, n, sum);
    case 3: return loss<F16>(log_target, x, t, out, n, sum);
    default: return -1;
  }
}

// g = -t' * factor, or -t' * go elementwise when go is not null (t' = t, or exp(t) for log targets).
extern "C" int lb_kl_grad(int dtype, int log_target, const void* t, const void* go, void* g, int64_t n,
                          double factor) {
  switch (dtype) {
    case 0: return grad<float>(log_target, t, go, g, n, factor);
    case 1: return grad<double>(log_target, t, go, g, n, factor);
    case 2: return grad<BF16>(log_target, t, go, g, n, factor);
    case 3: return grad<F16>(log_target, t, go, g, n, factor);
    default: return -1;
  }
}

// log_f32 over an array: what the tests measure the ulp error of.
extern "C" void lb_kl_log_f32(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = log_f32(x[i]);
}
