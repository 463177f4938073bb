// exp_f32 (vec_exp.h) over an array: what tests/test_native_kernels.py measures the ulp error of, and
// the smallest native library (the loader's own tests build it).
#include <ATen/Parallel.h>
#include <cstdint>

#include "vec_exp.h"

extern "C" void lb_exp_f32(const float* x, float* y, int64_t n) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = lossbench::exp_f32(x[i]);
  });
}

extern "C" int lb_num_threads() { return at::get_num_threads(); }
