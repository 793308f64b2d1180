// The one task runner of the CPU kernels (attention and pooling).
//
// run_tasks<Scratch>(n, work, make, fn) runs fn(task, scratch) for task in [0, n) on all threads:
// a shared counter hands tasks out (load balance only: a task's result does not depend on the
// thread that runs it, so results are deterministic whatever the number of threads); each thread
// makes its scratch once. `work` estimates the whole call in multiply-adds: below kSerialWork
// (and with one thread, one task, or inside a parallel region) the tasks run on the calling
// thread, where a parallel region would cost more than it saves (much more on a loaded machine).
// The estimate is an argument of the call (no global state). `block` > 1 hands out that many
// consecutive tasks per claim: for many short, equal tasks (the decode step: one (sequence, head)
// state of 32 KiB each), where each claim would move the counter's cache line between cores and
// break the threads' sequential streams through memory; a few claims per thread keep the balance.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace lk {

constexpr double kSerialWork = double(int64_t(1) << 21);

template <typename Scratch, typename MakeScratch, typename Fn>
void run_tasks(int64_t n, double work, const MakeScratch& make, const Fn& fn, int64_t block = 1) {
  if (n <= 0) return;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  if (nt == 1 || n == 1 || at::in_parallel_region() || work < kSerialWork) {
    Scratch sc = make();
    for (int64_t i = 0; i < n; ++i) fn(i, sc);
    return;
  }
  std::atomic<int64_t> next(0);
  const int64_t bl = std::max<int64_t>(1, block);
  at::parallel_for(0, std::min(nt, n), 1, [&](int64_t, int64_t) {
    Scratch sc = make();
    for (;;) {
      const int64_t i0 = next.fetch_add(bl);
      if (i0 >= n) break;
      const int64_t i1 = std::min(n, i0 + bl);
      for (int64_t i = i0; i < i1; ++i) fn(i, sc);
    }
  });
}

}  // namespace lk
