// Batched sampling: shared definitions for the CPU and CUDA paths (torch-free).
//
// Semantics of ttscale::sample (see python/ttscale/ops/sampling.py for the user-facing contract):
//   row r of `logits` [B, V]; output i reads row r = indices[i] (or i when indices is absent).
//   s_j = (l_j - max_l) / T_r           the temperature-scaled score, s <= 0, mass e^{s_j}
//   (probs mode: s_j = p_j and the mass is p_j itself; no temperature)
//   filters, in this order, each on the distribution renormalised by the previous ones:
//     top-k  keep the k largest (ties at the k-th value: lower token id first); k <= 0 or k >= V: off
//     top-p  keep the shortest prefix (by score, descending) whose mass >= top_p * kept mass
//            (ties at the cut value are all kept); top_p >= 1: off; top_p = 0 keeps the first token
//     min-p  keep mass_j >= min_p * max_mass; min_p <= 0: off
//   T_r == 0 is greedy (first argmax). The drawn token j satisfies  C_{j-1} <= u * Z < C_j  where C
//   is the running kept mass, Z the total kept mass and u the Philox uniform for the draw:
//   inverse-CDF sampling, so a token of zero mass is never drawn. The running mass is taken in
//   token order, except when top-k is active: then over the kept candidates best first (value
//   descending, ties by lower id), the order the top-k selection produces them in.
//   1/T is computed in double and clamped to FLT_MAX (inv_temperature), so a tiny positive T
//   behaves like greedy instead of producing 0 * inf.
//
// CPU algorithm (per row, then per draw): a row plan is built once per distinct row, then each draw
// costs O(log V + block). Plans are one of
//   kGreedy     argmax
//   kCandidates top-k present: a heap scan keeps the k best (one SIMD compare per element,
//               O(k log(V/k)) heap updates for random order), sorted; top-p / min-p cut the sorted
//               list; draws binary-search its cumulative mass.
//   kBlocks     no top-k: a score threshold tau is found (top-p from a 2048-bin histogram of mass by
//               score, then an exact sort of the one bin the cut falls in; min-p in closed form),
//               one SIMD pass writes the kept mass per block of kBlock tokens as a prefix sum, and a
//               draw binary-searches the blocks and rescans one block.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/host_device.h"
#include "common/philox.h"

namespace ttscale {
namespace sampling {

constexpr int64_t kBlock = 256;          // tokens per prefix-sum block in kBlocks plans
constexpr int kHistBins = 2048;          // top-p histogram bins
constexpr float kHistRange = 40.0f;      // logits mode: bins cover s in [-40, 0]; below: last bin
constexpr int kProbBinShift = 20;        // probs mode: bin by float bits (8 bins per octave)
constexpr int64_t kTopkScratchBytes = 8;  // per heap entry (float value, int32 id)
// probs mode: rows need not sum to 1, but their masses are summed in fp32 (per SIMD lane / CUDA
// octet) before the double totals, so a row whose largest value is above this is rejected (a clear
// error) instead of overflowing to inf and drawing from a wrong law. 2^100 leaves every block sum
// (<= 256 values) far inside float32.
constexpr float kMaxProb = 1.2676506002282294e30f;  // 2^100

// Maps a row's raw values to scores, mass and histogram bins.
struct ScoreMap {
  int probs_mode;   // 0: logits (s = (v - m) * inv_t, mass e^s); 1: probabilities (s = mass = v)
  float m;          // row max (of the raw values)
  float inv_t;      // 1 / temperature (logits mode)
  uint32_t max_bits;  // probs mode: float bits of the row max

  TT_HD float score(float v) const { return probs_mode ? v : (v - m) * inv_t; }
  TT_HD int bin(float s) const {
    if (probs_mode) {
      const uint32_t b = float_to_bits(s);
      // -0.0 (bits 0x80000000; negative probabilities are rejected before) has no mass: last bin,
      // as in the SIMD form, where max_bits - b wraps around. Bin 0 would put it beside the row max.
      if (b & 0x80000000u) return kHistBins - 1;
      const uint32_t d = b >= max_bits ? 0u : (max_bits - b) >> kProbBinShift;
      return d < (uint32_t)(kHistBins - 1) ? (int)d : kHistBins - 1;
    }
    const float x = -s * (kHistBins / kHistRange);  // +inf for s = -inf
    return x < (float)(kHistBins - 1) ? (x > 0.0f ? (int)x : 0) : kHistBins - 1;
  }
};

// Row view for the CPU kernels.
struct RowView {
  const void* data;
  DType dtype;
  int64_t n;
};

// Per-ISA CPU primitives (csrc/ops/sampling/sampling_cpu.cpp, one copy per ISA).
struct CpuKernels {
  // max over the row (fp32), index of its first occurrence (skipped when argmax is nullptr: it
  // costs another partial pass), index of the first NaN or +inf (-1: none)
  void (*row_max)(RowView row, float* max, int64_t* argmax, int64_t* first_bad);
  // Sum of the mass of tokens with s >= tau. If block_cum != nullptr, block_cum[b] = kept mass of
  // tokens [0, (b+1)*kBlock) (inclusive prefix sums over blocks).
  double (*row_mass)(RowView row, ScoreMap map, float tau, double* block_cum);
  // mass and count per histogram bin (arrays of kHistBins, zeroed by the callee)
  void (*row_hist)(RowView row, ScoreMap map, double* mass, int64_t* count);
  // scores and token ids of the tokens in `bin`, in token order, at most `cap`; returns how many
  int64_t (*row_collect_bin)(RowView row, ScoreMap map, int bin, float* s_out, int32_t* idx_out, int64_t cap);
  // the k largest raw values with their ids, sorted (value desc, id asc); 1 <= k <= n;
  // scratch holds k * kTopkScratchBytes bytes (the heap). Returns the index of the first NaN or
  // +inf met (the scan stops there), or -1.
  int64_t (*row_topk)(RowView row, int64_t k, float* val_out, int32_t* idx_out, void* scratch);
  // the first token j in [begin, end) with s_j >= tau whose running mass exceeds `target`
  // (falls back to the last kept token of positive mass in the range; -1 if there is none)
  int64_t (*row_draw_block)(RowView row, ScoreMap map, float tau, int64_t begin, int64_t end,
                            double target);
};

// ---- math shared by CPU and CUDA ----

// Largest index i in [0, n) with cum[i] <= target, plus one (i.e. the first i with cum[i] > target),
// clamped to n - 1. `cum` is non-decreasing.
TT_HD int64_t upper_bound_cum(const double* cum, int64_t n, double target) {
  int64_t lo = 0, hi = n;  // invariant: answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (cum[mid] > target) hi = mid; else lo = mid + 1;
  }
  return lo < n ? lo : n - 1;
}

// 1 / T for the score map, clamped so that (v - max) * inv_t is 0 for the max and -inf (never NaN)
// for the rest when T is tiny (1/T would overflow fp32 below T ~ 3e-39).
TT_HD float inv_temperature(double T) {
  const double inv = 1.0 / T;
  return inv < 3.4028234663852886e38 ? (float)inv : 3.4028234663852886e38f;
}

// Speculative verification, one draft position: accept token t drafted with probability q under
// the draft and p under the target iff u * q < p (i.e. u < p / q; q = 0 accepts iff p > 0).
TT_HD bool spec_accept(double u, float p, float q) { return u * (double)q < (double)p; }

// Random stream of sample i: with a single seed every sample has its own subsequence (i); with one
// seed per sample the subsequence is 0, so a request's tokens do not depend on its batch position.
TT_HD uint64_t sample_subseq(int64_t i, bool per_sample_seed) { return per_sample_seed ? 0 : (uint64_t)i; }

}  // namespace sampling
}  // namespace ttscale

#include "common/cpu_dispatch.h"
TT_DECLARE_CPU_KERNELS(ttscale::sampling::CpuKernels, sampling_kernels)
