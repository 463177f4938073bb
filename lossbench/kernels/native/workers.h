// The worker threads of lossbench's native CPU kernels.
//
// run_workers(n, work): work() on n threads at once (the caller's among them); each work() takes its
// pieces from a shared counter, so a thread descheduled on a shared machine delays only the piece it
// holds. torch's OpenMP pool where the build has OpenMP; the loader builds without -fopenmp (one
// runtime per process: torch's), and there at::parallel_for's pragma is ignored and it would run one
// thread, so the workers are std::threads, as many as torch.get_num_threads() asks for.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <thread>
#include <vector>

// Work that writes a fresh gradient is handed out in pieces of this many bytes of it: one huge page
// (native.grad_buffer advises the buffer for them). Smaller pieces interleave the threads inside one
// fresh huge page, whose first touch (the kernel zeroing 2 MiB) then holds both: the CE forward into a
// fresh 1 GiB float32 gradient took 189 ms with one-row pieces, 133 ms with these, and 79 ms into mapped
// pages (2026-12-05, 2 threads; the zeroing itself costs about 50 ms per GiB here, in any piece size).
constexpr int64_t HUGE_PAGE_BYTES = 2 << 20;

template <class F> void run_workers(int64_t n, const F& work) {
  if (n <= 1) {
    work();
    return;
  }
#ifdef _OPENMP
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { work(); });
#else
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  for (int64_t w = 1; w < n; ++w) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
#endif
}
