// Grain sizes for at::parallel_for that keep small work on the calling thread.
//
// A parallel region costs a few microseconds on an idle machine, and milliseconds on a loaded one:
// an OpenMP fork/join waits for every team thread, and a descheduled thread holds the region up
// for a scheduler quantum (measured here: a 30 us F.linear or ttscale.sample call took 400-800 us
// with 2 threads on a 2-core machine running other jobs). The engine's decode steps on small models
// are made of many such tiny ops, so an op whose total work is below `min_work` runs inline, and
// larger work is cut into chunks of at least `min_work`.
//
// Work is counted in the caller's unit (elements touched, multiply-adds); each call site states its
// unit and picks `min_work` as roughly 20-50 us of single-thread time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ttscale {

// Grain for at::parallel_for(0, n, grain, f) given the work of one item.
inline int64_t grain_for(int64_t n, double work_per_item, double min_work) {
  if (n <= 1) return 1;
  const double w = std::max(work_per_item, 1e-9);
  if (w * (double)n < 2.0 * min_work) return n + 1;  // not worth a second thread: run inline
  const double g = std::ceil(min_work / w);
  return g >= (double)n ? n + 1 : std::max<int64_t>(1, (int64_t)g);
}

// Grain when the items are uneven and best handed out one at a time (attention work items): one
// per grab when the total is worth parallelising, else everything inline.
inline int64_t grain_for_total(int64_t n, double total_work, double min_work) {
  return (n > 1 && total_work >= 2.0 * min_work) ? 1 : n + 1;
}

constexpr double kMinParallelElems = 32768.0;      // sampling: logits touched (a few passes each)
constexpr double kMinParallelMacs = 1024.0 * 1024.0;  // attention / matmul: multiply-adds

}  // namespace ttscale
