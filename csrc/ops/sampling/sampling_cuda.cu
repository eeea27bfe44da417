// CUDA kernels for batched sampling (torch-free; launcher interface in sampling_cuda.h, semantics
// and the CPU algorithm in sampling.h / sampling.cpp, which this file mirrors decision by decision).
//
// Design
// ------
// sample_cuda builds one plan per row (every row 0..B-1 that some sample uses), then draws:
//
//   mark   (only with `indices`) flags the rows that are sampled; other rows cost one load.
//   stats  grid (row, chunk of kChunk = 8192 tokens), 256 threads: one streaming read of the row
//          split over many CTAs (bandwidth-bound for B >= 64 at V >= 128k). Per chunk: max, first
//          argmax, first NaN/+inf, and per kBlock(256)-token block the unfiltered mass relative to
//          the chunk max (e^{(v - m_c)/T}, or p). Each warp owns 4 blocks, each lane one octet
//          (8 consecutive tokens, 16-byte loads) per block, kept in registers between the phases.
//   plan   one CTA (512 threads) per row. Combines the chunks (row max, argmax, errors -> status,
//          log Z for logprobs), then builds the same plan kind as the CPU:
//            greedy      T == 0 (logits mode)
//            candidates  0 < k < V, k <= kMaxCand: top-k found by a 2048-bin count histogram of
//                        the score (the CPU's top-p bins, monotone in the value), then either the
//                        tokens of the bins above the cut are gathered directly (<= kMaxCand), or a
//                        radix select over float_order_key inside the cut bin (4 passes of 8 bits,
//                        stopping early once the remaining range fits) finds the k-th key; ties at
//                        it are taken in token order with a block-wide prefix count. The k
//                        candidates are bitonic-sorted in shared memory by (value desc, id asc);
//                        top-p / min-p cut the sorted list exactly like the CPU; the kept ids and
//                        their running mass (double) go to the workspace.
//            blocks      no top-k: a score threshold tau. top-p: a 2048-bin (mass, count)
//                        histogram, the cut bin found by a block scan, then the exact cut inside
//                        the bin by sorting its scores (<= kMaxCand tokens) or by a mass-weighted
//                        radix select; min-p in closed form; tau = max of both.
//            large-k     k > kMaxCand: the kept set is described by thresholds (k-th key and the
//                        id of the last tie kept, the top-p key, the min-p mass) and each draw
//                        runs a mass-weighted radix select over the row (kernel draw_large_k).
//   mass   grid (row, chunk): for blocks rows with a threshold, the kept mass per 256-token block.
//   prefix one CTA per blocks row: block prefix sums (double) in place; unfiltered rows rescale the
//          stats partials by e^{(m_c - m)/T}.
//   draw   one warp per sample: Philox u as on the CPU; greedy -> argmax; candidates -> binary
//          search of the running mass (sorted order); blocks -> binary search of the block prefix
//          sums, then the warp rescans the one block in token order (the first token whose running
//          kept mass exceeds u * Z). Logprobs use the temperature-scaled unfiltered distribution.
//
// token_logprobs_cuda: one CTA per row, one pass with an online (max, sum) pair per thread.
// speculative_verify_cuda: one CTA per row; the acceptance tests run in parallel (first rejection
// = block min), then the residual max(0, p - q) (or p) is summed and sampled in token order.
//
// Numerics: scores and masses in fp32 (__expf), sums and prefix sums in double, the candidate /
// top-p-bin masses in double exp like the CPU. Tokens agree with the CPU up to fp32 rounding at a
// CDF boundary (the CPU uses a polynomial expf). Errors: status (int32[2], 8-byte aligned, host
// initialises {0, INT32_MAX}) is updated with one 64-bit atomicMin of (row << 32 | code), so
// status[1] is the smallest bad row and status[0] that row's code; such rows draw token 0.
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/philox.h"
#include "ops/sampling/sampling.h"
#include "ops/sampling/sampling_cuda.h"

namespace ttscale {
namespace sampling {
namespace {

using namespace ::ttscale::cuda;

constexpr int kStatsThreads = 256;                   // split passes: 8 warps
constexpr int kWarpBlocks = 4;                       // kBlock-token blocks per warp in split passes
constexpr int kChunkBlocks = (kStatsThreads / 32) * kWarpBlocks;  // 32 blocks
constexpr int64_t kChunk = kChunkBlocks * kBlock;    // 8192 tokens per CTA
constexpr int kPlanThreads = 512;
constexpr int kMaxCand = 2048;                       // sorted candidate list capacity
constexpr int kDrawWarps = 8;
constexpr int kLargeThreads = 512;
constexpr int kPrefixThreads = 256;
constexpr int kLogprobThreads = 512;
constexpr int kSpecThreads = 256;
static_assert(kPlanThreads * 4 == kHistBins, "plan kernel scans 4 histogram bins per thread");
static_assert(kPlanThreads * 4 >= kMaxCand, "plan kernel scans 4 candidates per thread");
static_assert(kBlock == 256, "a warp covers one block with one octet per lane");

enum DevKind : int { kUnused = 0, kError = 1, kGreedyK = 2, kCandK = 3, kBlocksK = 4, kLargeK = 5 };

struct DevPlan {
  int kind;
  int probs;
  int argmax;
  int nkeep;          // candidates: kept count
  float m;            // row max (raw)
  float inv_t;        // 1/T (1 for greedy rows and probs)
  float tau;          // blocks: kept iff score >= tau
  int blocks_scaled;  // blocks: 1 = block sums are the stats partials (no threshold)
  double log_z;       // log of the unfiltered mass (logprobs)
  // large-k
  uint32_t kstar;     // k-th largest value key
  uint32_t kp;        // top-p: kept iff key >= kp
  int tie_last;       // ties at kstar kept iff id <= tie_last
  int pad;
  double thr;         // min-p: kept iff mass >= thr
  double z;           // kept mass
};

struct Layout {
  DevPlan* plans = nullptr;
  uint8_t* used = nullptr;
  float* chunk_max = nullptr;
  int* chunk_arg = nullptr;
  int* chunk_bad = nullptr;
  double* chunk_sum = nullptr;
  double* blk = nullptr;       // [B, nb]
  int* cand_id = nullptr;      // [B, kMaxCand]
  double* cand_cum = nullptr;  // [B, kMaxCand]
  int64_t C = 0, nb = 0;
  size_t bytes = 0;
};

bool topk_possible(const SampleCudaParams& p) {
  return p.top_k != nullptr || (p.top_k_val > 0 && p.top_k_val < p.V);
}
bool largek_possible(const SampleCudaParams& p) {
  if (p.top_k != nullptr) return p.V - 1 > kMaxCand;
  return p.top_k_val > kMaxCand && p.top_k_val < p.V;
}
bool threshold_possible(const SampleCudaParams& p) {
  return p.top_p != nullptr || p.top_p_val < 1.0f || p.min_p != nullptr || p.min_p_val > 0.0f;
}

Layout make_layout(const SampleCudaParams& p, void* base) {
  Layout L;
  const int64_t B = p.B;
  L.nb = (p.V + kBlock - 1) / kBlock;
  L.C = (p.V + kChunk - 1) / kChunk;
  size_t off = 0;
  auto take = [&](size_t bytes) -> void* {
    void* ptr = base ? static_cast<char*>(base) + off : nullptr;
    off += (bytes + 255) & ~(size_t)255;
    return ptr;
  };
  L.plans = static_cast<DevPlan*>(take(sizeof(DevPlan) * B));
  if (p.indices) L.used = static_cast<uint8_t*>(take((size_t)B));
  L.chunk_max = static_cast<float*>(take(sizeof(float) * B * L.C));
  L.chunk_arg = static_cast<int*>(take(sizeof(int) * B * L.C));
  L.chunk_bad = static_cast<int*>(take(sizeof(int) * B * L.C));
  L.chunk_sum = static_cast<double*>(take(sizeof(double) * B * L.C));
  L.blk = static_cast<double*>(take(sizeof(double) * B * L.nb));
  if (topk_possible(p)) {
    L.cand_id = static_cast<int*>(take(sizeof(int) * B * kMaxCand));
    L.cand_cum = static_cast<double*>(take(sizeof(double) * B * kMaxCand));
  }
  L.bytes = off;
  return L;
}

// ---------------------------------------------------------------- per-row helpers
struct RowParams {
  double T;
  int64_t k;
  double top_p, min_p;
};

TT_DEVICE RowParams row_params(const SampleCudaParams& p, int64_t r) {
  RowParams rp;
  rp.T = p.probs ? 1.0 : (double)(p.temperature ? p.temperature[r] : p.temperature_val);
  int64_t k = p.top_k ? p.top_k[r] : p.top_k_val;
  rp.k = k >= p.V ? p.V : k;
  rp.top_p = (double)(p.top_p ? p.top_p[r] : p.top_p_val);
  rp.min_p = (double)(p.min_p ? p.min_p[r] : p.min_p_val);
  return rp;
}

TT_DEVICE float inv_temperature(bool probs, double T) { return (!probs && T > 0.0) ? sampling::inv_temperature(T) : 1.0f; }

TT_DEVICE ScoreMap make_map(bool probs, float m, float inv_t) {
  ScoreMap map;
  map.probs_mode = probs ? 1 : 0;
  map.m = m;
  map.inv_t = inv_t;
  map.max_bits = __float_as_uint(m);
  return map;
}

TT_DEVICE float fmass(const ScoreMap& map, float s) { return map.probs_mode ? s : __expf(s); }
TT_DEVICE double dmass(const ScoreMap& map, float s) { return map.probs_mode ? (double)s : exp((double)s); }

// Kept mass of an octet at threshold tau (token order), fp32 per token and per lane; shared by the
// mass pass and the draw rescan so that both see the same lane sums.
TT_DEVICE float octet_mass(const ScoreMap& map, float tau, const float (&v)[8], int cnt, float (&ms)[8]) {
  float sum = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float s = map.score(v[e]);
    const float w = (e < cnt && s >= tau) ? fmass(map, s) : 0.0f;
    ms[e] = w;
    sum += w;
  }
  return sum;
}

TT_DEVICE void report(int32_t* status, int64_t row, int code) {
  atomicMin(reinterpret_cast<unsigned long long*>(status),
            ((unsigned long long)row << 32) | (unsigned long long)(unsigned)code);
}

template <typename E>
TT_DEVICE const E* row_ptr(const SampleCudaParams& p, int64_t r) {
  return static_cast<const E*>(p.x) + r * p.row_stride;
}

// Calls f(j0, cnt, v) once per tile of NT octets on every thread (cnt = 0 past the end), so f may
// use block-wide helpers. f returns true to stop (must then be the same on every thread).
template <int NT, typename E, typename F>
TT_DEVICE void for_each_tile(const E* row, int64_t n, bool aligned, F f) {
  const int64_t nO = (n + 7) >> 3;
  for (int64_t t0 = 0; t0 < nO; t0 += NT) {
    const int64_t o = t0 + threadIdx.x;
    float v[8];
    int cnt = 0;
    if (o < nO) {
      cnt = load_octet(row, n, o * 8, aligned, v);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = 0.0f;
    }
    if (f(o * 8, cnt, v)) break;
  }
}

// ---------------------------------------------------------------- CTA-level selection
struct SelShared {
  int ok;
  uint32_t digit;
  double above_w;      // weight of the digits above the chosen one (this pass)
  unsigned above_cnt;
  unsigned cnt_d;
  double total_w;      // first pass: weight and count of the whole set
  unsigned total_cnt;
};

struct SelResult {
  bool found;
  bool early;
  uint32_t key;        // the selected key (early: the lowest key of the selected range)
  double above_w;      // weight of set members with key > key (exact range above when early)
  unsigned above_cnt;
  unsigned cnt_at;     // members with exactly this key (early: in the selected range)
  double total_w;
  unsigned total_cnt;
};

// Largest key K of the set {f(j, v, key, w)} with W(key >= K) >= target (strict: > target), W the
// count or (kWeighted) the sum of w, by 4 passes of 8 bits over the row. early_cap > 0: stop once
// extra_above + (members above the range) + (members in the range) <= early_cap. If no key
// qualifies, found = false; if rounding makes a later pass miss, the lowest present digit is taken.
template <int NT, bool kWeighted, typename E, typename F>
TT_DEVICE SelResult radix_select(const E* row, int64_t n, bool aligned, F f, double target, bool strict,
                                 unsigned extra_above, int early_cap, unsigned* rcnt, double* rw, SelShared* ss) {
  SelResult res{};
  res.found = true;
  uint32_t prefix = 0u, mask = 0u;
  double remaining = target;
  const int lane = lane_id();
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = (int)threadIdx.x; i < 256; i += NT) {
      rcnt[i] = 0u;
      if (kWeighted) rw[i] = 0.0;
    }
    __syncthreads();
    for_each_tile<NT>(row, n, aligned, [&](int64_t j0, int cnt, const float (&v)[8]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        uint32_t key = 0u;
        double w = 0.0;
        bool in = false;
        if (e < cnt) in = f(j0 + e, v[e], key, w) && (key & mask) == prefix;
        hist_add<kWeighted>(in, (key >> shift) & 255u, w, rcnt, rw);
      }
      return false;
    });
    __syncthreads();
    if (warp_id() == 0) {
      // lane l owns digits 255 - 8l .. 248 - 8l (scanned in descending digit order)
      double lw[8];
      unsigned lc[8];
      double lsum = 0.0;
      unsigned csum = 0u;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int d = 255 - 8 * lane - q;
        lc[q] = rcnt[d];
        lw[q] = kWeighted ? rw[d] : (double)lc[q];
        lsum += lw[q];
        csum += lc[q];
      }
      const double wincl = warp_inclusive_scan(lsum);
      const unsigned cincl = warp_inclusive_scan(csum);
      const double wexcl = warp_exclusive_from_inclusive(wincl);
      const unsigned cexcl = warp_exclusive_from_inclusive(cincl);
      int qsel = -1;
      double a_sel = 0.0;
      unsigned ac_sel = 0u, c_sel = 0u;
      double a = wexcl;
      unsigned ac = cexcl;
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (qsel < 0) {
          const double t = a + lw[q];
          const bool ok = lc[q] > 0u && (strict ? t > remaining : t >= remaining);
          if (ok) {
            qsel = q;
            a_sel = a;
            ac_sel = ac;
            c_sel = lc[q];
          } else {
            a += lw[q];
            ac += lc[q];
          }
        }
      }
      const unsigned hit = __ballot_sync(kFullMask, qsel >= 0);
      int src = -1;
      if (hit) {
        src = __ffs(hit) - 1;
      } else if (pass > 0) {
        // rounding between passes left no qualifying digit: take the lowest digit present
        const unsigned nonempty = __ballot_sync(kFullMask, csum > 0u);
        if (nonempty) {
          src = 31 - __clz(nonempty);
          double run = wexcl;
          unsigned runc = cexcl;
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (lc[q] > 0u) {
              qsel = q;
              a_sel = run;
              ac_sel = runc;
              c_sel = lc[q];
            }
            run += lw[q];
            runc += lc[q];
          }
        }
      }
      if (lane == 31 && pass == 0) {
        ss->total_w = wincl;
        ss->total_cnt = cincl;
      }
      if (src < 0) {
        if (lane == 0) ss->ok = 0;
      } else if (lane == src) {
        ss->ok = 1;
        ss->digit = (uint32_t)(255 - 8 * lane - qsel);
        ss->above_w = a_sel;
        ss->above_cnt = ac_sel;
        ss->cnt_d = c_sel;
      }
    }
    __syncthreads();
    if (pass == 0) {
      res.total_w = ss->total_w;
      res.total_cnt = ss->total_cnt;
    }
    if (!ss->ok) {
      res.found = false;
      break;
    }
    const uint32_t d = ss->digit;
    remaining -= ss->above_w;
    res.above_w += ss->above_w;
    res.above_cnt += ss->above_cnt;
    res.cnt_at = ss->cnt_d;
    prefix |= d << shift;
    mask |= 0xffu << shift;
    if (early_cap > 0 && pass < 3 &&
        (uint64_t)extra_above + res.above_cnt + res.cnt_at <= (uint64_t)early_cap) {
      res.early = true;
      break;
    }
  }
  res.key = prefix;
  __syncthreads();  // ss is rewritten by the next call
  return res;
}

// Collects into keys[] the composite key (value key << 32 | ~id) of every token with class 1 and of
// the first `need` tokens (in id order) with class 2; classify(j, v, key) returns 0, 1 or 2.
template <int NT, typename E, typename F>
TT_DEVICE int gather(const E* row, int64_t n, bool aligned, F classify, int64_t need, unsigned long long* keys,
                     int cap, int* counter, void* red) {
  if (threadIdx.x == 0) *counter = 0;
  __syncthreads();
  int64_t base = 0;
  for_each_tile<NT>(row, n, aligned, [&](int64_t j0, int cnt, const float (&v)[8]) {
    uint32_t kk[8];
    int cls[8];
    int64_t tc = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      kk[e] = 0u;
      cls[e] = e < cnt ? classify(j0 + e, v[e], kk[e]) : 0;
      tc += cls[e] == 2;
    }
    int64_t tot;
    int64_t rank = base + block_exclusive_scan<NT>(tc, red, &tot);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      bool take = cls[e] == 1;
      if (cls[e] == 2) take = rank++ < need;
      if (take) {
        const int slot = atomicAdd(counter, 1);
        if (slot < cap)
          keys[slot] = ((unsigned long long)kk[e] << 32) | (unsigned long long)(0xffffffffu - (uint32_t)(j0 + e));
      }
    }
    base += tot;
    return false;
  });
  __syncthreads();
  const int c = *counter;
  __syncthreads();
  return c < cap ? c : cap;
}

// Id of the nth (0-based, id order) token with pred(j, v); -1 if there are fewer.
template <int NT, typename E, typename F>
TT_DEVICE int64_t find_nth(const E* row, int64_t n, bool aligned, F pred, int64_t nth, void* red, long long* found) {
  if (threadIdx.x == 0) *found = -1;
  __syncthreads();
  int64_t base = 0;
  for_each_tile<NT>(row, n, aligned, [&](int64_t j0, int cnt, const float (&v)[8]) {
    unsigned bits = 0u;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (e < cnt && pred(j0 + e, v[e])) bits |= 1u << e;
    const int64_t c = __popc(bits);
    int64_t tot;
    const int64_t ex = block_exclusive_scan<NT>(c, red, &tot);
    if (c > 0 && base + ex <= nth && nth < base + ex + c) {
      int want = (int)(nth - base - ex);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if ((bits >> e) & 1u) {
          if (want == 0) *found = j0 + e;
          --want;
        }
      }
    }
    base += tot;
    __syncthreads();
    return *found >= 0 || base > nth;
  });
  __syncthreads();
  const int64_t r = *found;
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------- kernels
__global__ void mark_rows_kernel(const int64_t* indices, int64_t N, int64_t B, uint8_t* used) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) {
    const int64_t r = indices[i];
    if (r >= 0 && r < B) used[r] = 1;
  }
}

template <typename E>
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(SampleCudaParams p, Layout L) {
  const int64_t r = blockIdx.x / L.C, c = blockIdx.x % L.C;
  if (L.used && !L.used[r]) return;
  __shared__ __align__(8) unsigned char red[33 * 8];
  const E* row = row_ptr<E>(p, r);
  const bool aligned = aligned16(row);
  const int lane = lane_id(), warp = warp_id();
  const float inv_t = inv_temperature(p.probs, row_params(p, r).T);

  float v[kWarpBlocks][8];
  int cnt[kWarpBlocks];
#pragma unroll
  for (int i = 0; i < kWarpBlocks; ++i) {
    const int64_t b = c * kChunkBlocks + warp + 8 * i;
    const int64_t j0 = b * kBlock + lane * 8;
    if (b < L.nb) {
      cnt[i] = load_octet(row, p.V, j0, aligned, v[i]);
    } else {
      cnt[i] = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i][e] = 0.0f;
    }
  }
  float best = -INFINITY;
  int best_j = INT_MAX, bad = INT_MAX;
#pragma unroll
  for (int i = 0; i < kWarpBlocks; ++i) {
    const int64_t j0 = (c * kChunkBlocks + warp + 8 * i) * kBlock + lane * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e < cnt[i]) {
        const float x = v[i][e];
        const int j = (int)(j0 + e);
        if (is_nan_or_posinf(x)) {
          bad = min(bad, j);
        } else if (x > best || (x == best && j < best_j)) {
          best = x;
          best_j = j;
        }
      }
    }
  }
  const float mc = block_reduce<kStatsThreads>(best, MaxOp(), red);
  const int arg = block_reduce<kStatsThreads>(best == mc ? best_j : INT_MAX, MinOp(), red);
  const int badc = block_reduce<kStatsThreads>(bad, MinOp(), red);

  const ScoreMap map = make_map(p.probs, mc, inv_t);
  const bool empty = !p.probs && mc == -INFINITY;
  double wsum = 0.0;
#pragma unroll
  for (int i = 0; i < kWarpBlocks; ++i) {
    const int64_t b = c * kChunkBlocks + warp + 8 * i;
    float ms[8];
    const float ls = empty ? 0.0f : octet_mass(map, -INFINITY, v[i], cnt[i], ms);
    const double s = warp_reduce((double)ls, SumOp());
    if (b < L.nb) {
      if (lane == 0) L.blk[r * L.nb + b] = s;
      wsum += s;
    }
  }
  const double tot = block_reduce<kStatsThreads>(lane == 0 ? wsum : 0.0, SumOp(), red);
  if (threadIdx.x == 0) {
    L.chunk_max[r * L.C + c] = mc;
    L.chunk_arg[r * L.C + c] = arg;
    L.chunk_bad[r * L.C + c] = badc;
    L.chunk_sum[r * L.C + c] = tot;
  }
}

struct PlanSmem {
  union {
    double hmass[kHistBins];
    double dbl[kMaxCand];
  } a;
  union {
    unsigned hcnt[kHistBins];
    unsigned long long keys[kMaxCand];
  } b;
  unsigned rcnt[256];
  double rw[256];
  __align__(8) unsigned char red[33 * 8];
  SelShared ss;
  int counter;
  long long found;
  int cut;
  double acc;
};

// Sorts keys[0, n) of the plan's shared memory descending.
TT_DEVICE void sort_keys(PlanSmem& sm, int n) {
  const int P = next_pow2(n < 1 ? 1 : n);
  for (int i = n + (int)threadIdx.x; i < P; i += kPlanThreads) sm.b.keys[i] = 0ull;
  bitonic_sort_desc<kPlanThreads>(sm.b.keys, P);
}

// Top-p threshold of a blocks row (sampling.cpp build_plan, kBlocks branch).
template <typename E>
TT_DEVICE float topp_tau(const E* row, int64_t V, bool aligned, const ScoreMap& map, double top_p, PlanSmem& sm) {
  const int tid = threadIdx.x;
  for (int i = tid; i < kHistBins; i += kPlanThreads) {
    sm.a.hmass[i] = 0.0;
    sm.b.hcnt[i] = 0u;
  }
  __syncthreads();
  for_each_tile<kPlanThreads>(row, V, aligned, [&](int64_t, int cnt, const float (&v)[8]) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float s = map.score(v[e]);
      const bool in = e < cnt;
      hist_add<true>(in, in ? (uint32_t)map.bin(s) : 0u, in ? (double)fmass(map, s) : 0.0, sm.b.hcnt, sm.a.hmass);
    }
    return false;
  });
  __syncthreads();
  // cut bin: the first non-empty bin whose inclusive mass prefix reaches top_p * total
  double w4[4];
  unsigned c4[4];
  double tsum = 0.0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    w4[q] = sm.a.hmass[tid * 4 + q];
    c4[q] = sm.b.hcnt[tid * 4 + q];
    tsum += w4[q];
  }
  double total;
  double run = block_exclusive_scan<kPlanThreads>(tsum, sm.red, &total);
  const double target = top_p * total;
  int cand = INT_MAX;
  double cand_acc = 0.0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (cand == INT_MAX && c4[q] > 0u && run + w4[q] >= target) {
      cand = tid * 4 + q;
      cand_acc = run;
    }
    run += w4[q];
  }
  const int cut0 = block_reduce<kPlanThreads>(cand, MinOp(), sm.red);
  if (cut0 != INT_MAX && cand == cut0) sm.acc = cand_acc;
  const int cut = cut0 == INT_MAX ? kHistBins - 1 : cut0;
  __syncthreads();
  const double acc = cut0 == INT_MAX ? total : sm.acc;
  const unsigned c = sm.b.hcnt[cut];
  __syncthreads();  // hcnt / hmass are reused below
  if (c == 0u) return -INFINITY;

  if (c <= (unsigned)kMaxCand) {
    // exact cut: sort the bin's scores descending, accumulate their mass (double exp)
    const int nc = gather<kPlanThreads>(
        row, V, aligned,
        [&](int64_t, float x, uint32_t& key) {
          const float s = map.score(x);
          key = value_key(s);
          return map.bin(s) == cut ? 1 : 0;
        },
        0, sm.b.keys, kMaxCand, &sm.counter, sm.red);
    sort_keys(sm, nc);
    double m4[4];
    double msum = 0.0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = tid * 4 + q;
      m4[q] = i < nc ? dmass(map, key_value((uint32_t)(sm.b.keys[i] >> 32))) : 0.0;
      msum += m4[q];
    }
    double tot2;
    double run2 = acc + block_exclusive_scan<kPlanThreads>(msum, sm.red, &tot2);
    int first = INT_MAX;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = tid * 4 + q;
      run2 += m4[q];
      if (first == INT_MAX && i < nc && run2 >= target) first = i;
    }
    const int f = block_reduce<kPlanThreads>(first, MinOp(), sm.red);
    const int pick = f == INT_MAX ? nc - 1 : f;
    const float tau = pick >= 0 ? key_value((uint32_t)(sm.b.keys[pick] >> 32)) : -INFINITY;
    __syncthreads();
    return tau;
  }
  // large bin: mass-weighted radix select over the bin's score keys
  auto in_bin = [&](int64_t, float x, uint32_t& key, double& w) {
    const float s = map.score(x);
    key = value_key(s);
    w = dmass(map, s);
    return map.bin(s) == cut;
  };
  const SelResult sel = radix_select<kPlanThreads, true>(row, V, aligned, in_bin, target - acc, false, 0u, 0,
                                                          sm.rcnt, sm.rw, &sm.ss);
  if (sel.found) return key_value(sel.key);
  // never reached in exact arithmetic: the smallest score of the bin
  const SelResult low = radix_select<kPlanThreads, false>(row, V, aligned, in_bin, (double)c, false, 0u, 0,
                                                           sm.rcnt, sm.rw, &sm.ss);
  return low.found ? key_value(low.key) : -INFINITY;
}

template <typename E>
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(SampleCudaParams p, Layout L) {
  __shared__ PlanSmem sm;
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  DevPlan* out = L.plans + r;
  if (L.used && !L.used[r]) {
    if (tid == 0) out->kind = kUnused;
    return;
  }
  const int64_t V = p.V, C = L.C;
  const E* row = row_ptr<E>(p, r);
  const bool aligned = aligned16(row);
  const bool probs = p.probs;

  // ---- combine the chunk statistics
  float m = -INFINITY;
  int bad = INT_MAX;
  for (int64_t c = tid; c < C; c += kPlanThreads) {
    m = fmaxf(m, L.chunk_max[r * C + c]);
    bad = min(bad, L.chunk_bad[r * C + c]);
  }
  m = block_reduce<kPlanThreads>(m, MaxOp(), sm.red);
  bad = block_reduce<kPlanThreads>(bad, MinOp(), sm.red);
  int arg = INT_MAX;
  for (int64_t c = tid; c < C; c += kPlanThreads)
    if (L.chunk_max[r * C + c] == m) arg = min(arg, L.chunk_arg[r * C + c]);
  arg = block_reduce<kPlanThreads>(arg, MinOp(), sm.red);

  DevPlan pl{};
  pl.probs = probs ? 1 : 0;
  pl.tau = -INFINITY;
  pl.m = m;
  int code = kStatusOk;
  if (bad != INT_MAX) code = kStatusBadValue;
  else if (!probs && m == -INFINITY) code = kStatusNoMass;
  else if (probs && !(m > 0.0f)) code = kStatusNoMass;
  else if (probs && m > kMaxProb) code = kStatusTooLarge;
  if (code != kStatusOk) {
    if (tid == 0) {
      pl.kind = kError;
      pl.argmax = 0;
      pl.inv_t = 1.0f;
      *out = pl;
      report(p.status, r, code);
    }
    return;
  }
  pl.argmax = arg;
  const RowParams rp = row_params(p, r);
  const float inv_t = inv_temperature(probs, rp.T);
  const ScoreMap map = make_map(probs, m, inv_t);
  pl.inv_t = inv_t;

  // log of the unfiltered mass: chunk sums are relative to the chunk max
  double z = 0.0;
  for (int64_t c = tid; c < C; c += kPlanThreads) {
    const double s = L.chunk_sum[r * C + c];
    const float cm = L.chunk_max[r * C + c];
    if (s > 0.0) z += probs ? s : s * exp(((double)cm - (double)m) * (double)inv_t);
  }
  z = block_reduce<kPlanThreads>(z, SumOp(), sm.red);
  pl.log_z = log(z);

  if (!probs && rp.T == 0.0) {
    pl.kind = kGreedyK;
    if (tid == 0) *out = pl;
    return;
  }

  const int64_t k = rp.k;
  if (!(k > 0 && k < V)) {
    // ---- blocks: a score threshold
    float tau = -INFINITY;
    if (rp.top_p < 1.0) tau = topp_tau(row, V, aligned, map, rp.top_p, sm);
    if (rp.min_p > 0.0) {
      const float tm = probs ? (float)(rp.min_p * (double)m) : (float)log(rp.min_p);
      tau = fmaxf(tau, tm);
    }
    pl.kind = kBlocksK;
    pl.tau = tau;
    pl.blocks_scaled = tau == -INFINITY ? 1 : 0;
    if (tid == 0) *out = pl;
    return;
  }

  // ---- top-k: count histogram over the score bins (bin is monotone in the value)
  for (int i = tid; i < kHistBins; i += kPlanThreads) sm.b.hcnt[i] = 0u;
  __syncthreads();
  for_each_tile<kPlanThreads>(row, V, aligned, [&](int64_t, int cnt, const float (&v)[8]) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool in = e < cnt;
      hist_add<false>(in, in ? (uint32_t)map.bin(map.score(v[e])) : 0u, 0.0, sm.b.hcnt, nullptr);
    }
    return false;
  });
  __syncthreads();
  unsigned c4[4];
  unsigned csum = 0u;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    c4[q] = sm.b.hcnt[tid * 4 + q];
    csum += c4[q];
  }
  unsigned ctot;
  unsigned crun = block_exclusive_scan<kPlanThreads>(csum, sm.red, &ctot);
  int cand = INT_MAX;
  unsigned cand_above = 0u, cand_cnt = 0u;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (cand == INT_MAX && (int64_t)crun + c4[q] >= k) {
      cand = tid * 4 + q;
      cand_above = crun;
      cand_cnt = c4[q];
    }
    crun += c4[q];
  }
  const int cut = block_reduce<kPlanThreads>(cand, MinOp(), sm.red);  // exists: the row has V > k tokens
  if (cand == cut) {
    sm.counter = (int)cand_above;
    sm.cut = (int)cand_cnt;
  }
  __syncthreads();
  const unsigned cnt_above = (unsigned)sm.counter, cnt_cut = (unsigned)sm.cut;
  __syncthreads();

  auto bin_of = [&](float x) { return map.bin(map.score(x)); };
  int ncand = -1;  // >= 0: sm.b.keys holds ncand composite keys, best first after sort
  if (k <= kMaxCand && (int64_t)cnt_above + cnt_cut <= kMaxCand) {
    ncand = gather<kPlanThreads>(
        row, V, aligned,
        [&](int64_t, float x, uint32_t& key) {
          key = value_key(x);
          return bin_of(x) <= cut ? 1 : 0;
        },
        0, sm.b.keys, kMaxCand, &sm.counter, sm.red);
  } else {
    auto in_cut = [&](int64_t, float x, uint32_t& key, double& w) {
      key = value_key(x);
      w = 1.0;
      return bin_of(x) == cut;
    };
    const SelResult sel = radix_select<kPlanThreads, false>(row, V, aligned, in_cut, (double)(k - cnt_above), false,
                                                             cnt_above, k <= kMaxCand ? kMaxCand : 0, sm.rcnt,
                                                             sm.rw, &sm.ss);
    const uint32_t ks = sel.key;
    if (sel.early) {
      ncand = gather<kPlanThreads>(
          row, V, aligned,
          [&](int64_t, float x, uint32_t& key) {
            key = value_key(x);
            return key >= ks ? 1 : 0;
          },
          0, sm.b.keys, kMaxCand, &sm.counter, sm.red);
    } else {
      const int64_t cnt_gt = (int64_t)cnt_above + sel.above_cnt;
      const int64_t need = k - cnt_gt;
      if (k <= kMaxCand) {
        ncand = gather<kPlanThreads>(
            row, V, aligned,
            [&](int64_t, float x, uint32_t& key) {
              key = value_key(x);
              return key > ks ? 1 : (key == ks ? 2 : 0);
            },
            need, sm.b.keys, kMaxCand, &sm.counter, sm.red);
      } else {
        // ---- large k: the kept set by thresholds; draws search it (draw_large_k_kernel)
        const int64_t tie_last = find_nth<kPlanThreads>(
            row, V, aligned, [&](int64_t, float x) { return value_key(x) == ks; }, need - 1, sm.red, &sm.found);
        auto in_s = [&](int64_t j, float x, uint32_t& key, double& w) {
          key = value_key(x);
          w = dmass(map, map.score(x));
          return key > ks || (key == ks && j <= tie_last);
        };
        double tsum = 0.0;
        for_each_tile<kPlanThreads>(row, V, aligned, [&](int64_t j0, int cnt, const float (&v)[8]) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            uint32_t key;
            double w;
            if (e < cnt && in_s(j0 + e, v[e], key, w)) tsum += w;
          }
          return false;
        });
        const double total_s = block_reduce<kPlanThreads>(tsum, SumOp(), sm.red);
        uint32_t kp = 0u;
        if (rp.top_p < 1.0) {
          const SelResult sp = radix_select<kPlanThreads, true>(row, V, aligned, in_s, rp.top_p * total_s, false, 0u,
                                                                 0, sm.rcnt, sm.rw, &sm.ss);
          if (sp.found) kp = sp.key;
        }
        const double thr = rp.min_p > 0.0 ? rp.min_p * dmass(map, map.score(m)) : -1.0;
        double ksum = 0.0;
        for_each_tile<kPlanThreads>(row, V, aligned, [&](int64_t j0, int cnt, const float (&v)[8]) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            uint32_t key;
            double w;
            if (e < cnt && in_s(j0 + e, v[e], key, w) && key >= kp && w >= thr) ksum += w;
          }
          return false;
        });
        pl.z = block_reduce<kPlanThreads>(ksum, SumOp(), sm.red);
        pl.kind = kLargeK;
        pl.kstar = ks;
        pl.tie_last = (int)tie_last;
        pl.kp = kp;
        pl.thr = thr;
        if (tid == 0) *out = pl;
        return;
      }
    }
  }

  // ---- candidates: sort (value desc, id asc), keep k, then top-p and min-p on the sorted list
  sort_keys(sm, ncand);
  const int kk = (int)(k < ncand ? k : ncand);
  double m4[4];
  double msum = 0.0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int i = tid * 4 + q;
    m4[q] = i < kk ? dmass(map, map.score(key_value((uint32_t)(sm.b.keys[i] >> 32)))) : 0.0;
    msum += m4[q];
  }
  double total;
  double run = block_exclusive_scan<kPlanThreads>(msum, sm.red, &total);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int i = tid * 4 + q;
    run += m4[q];
    if (i < kk) sm.a.dbl[i] = run;
  }
  __syncthreads();
  int keep = kk;
  if (rp.top_p < 1.0) {
    const double target = rp.top_p * total;
    int first = INT_MAX;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = tid * 4 + q;
      if (first == INT_MAX && i < kk && sm.a.dbl[i] >= target) first = i;
    }
    first = block_reduce<kPlanThreads>(first, MinOp(), sm.red);
    int n = first == INT_MAX ? kk : first + 1;
    if (n < kk) {
      // ties at the cut value stay
      const uint32_t kc = (uint32_t)(sm.b.keys[n - 1] >> 32);
      int stop = INT_MAX;
      for (int i = n + tid; i < kk; i += kPlanThreads)
        if ((uint32_t)(sm.b.keys[i] >> 32) != kc) stop = min(stop, i);
      stop = block_reduce<kPlanThreads>(stop, MinOp(), sm.red);
      n = stop == INT_MAX ? kk : stop;
    }
    keep = n > 1 ? n : 1;
  }
  if (rp.min_p > 0.0) {
    const double thr = rp.min_p * dmass(map, map.score(key_value((uint32_t)(sm.b.keys[0] >> 32))));
    int stop = INT_MAX;
    for (int i = 1 + tid; i < keep; i += kPlanThreads)
      if (dmass(map, map.score(key_value((uint32_t)(sm.b.keys[i] >> 32)))) < thr) stop = min(stop, i);
    stop = block_reduce<kPlanThreads>(stop, MinOp(), sm.red);
    if (stop != INT_MAX) keep = stop;
  }
  int* ids = L.cand_id + r * kMaxCand;
  double* cum = L.cand_cum + r * kMaxCand;
  for (int i = tid; i < keep; i += kPlanThreads) {
    ids[i] = (int)(0xffffffffu - (uint32_t)(sm.b.keys[i] & 0xffffffffull));
    cum[i] = sm.a.dbl[i];
  }
  pl.kind = kCandK;
  pl.nkeep = keep;
  if (tid == 0) *out = pl;
}

template <typename E>
__global__ void __launch_bounds__(kStatsThreads) block_mass_kernel(SampleCudaParams p, Layout L) {
  const int64_t r = blockIdx.x / L.C, c = blockIdx.x % L.C;
  const DevPlan& pl = L.plans[r];
  if (pl.kind != kBlocksK || pl.blocks_scaled) return;
  const E* row = row_ptr<E>(p, r);
  const bool aligned = aligned16(row);
  const int lane = lane_id(), warp = warp_id();
  const ScoreMap map = make_map(pl.probs != 0, pl.m, pl.inv_t);
  const float tau = pl.tau;
  float v[kWarpBlocks][8];
  int cnt[kWarpBlocks];
#pragma unroll
  for (int i = 0; i < kWarpBlocks; ++i) {
    const int64_t b = c * kChunkBlocks + warp + 8 * i;
    if (b < L.nb) {
      cnt[i] = load_octet(row, p.V, b * kBlock + lane * 8, aligned, v[i]);
    } else {
      cnt[i] = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) v[i][e] = 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < kWarpBlocks; ++i) {
    const int64_t b = c * kChunkBlocks + warp + 8 * i;
    float ms[8];
    const double s = warp_reduce((double)octet_mass(map, tau, v[i], cnt[i], ms), SumOp());
    if (b < L.nb && lane == 0) L.blk[r * L.nb + b] = s;
  }
}

__global__ void __launch_bounds__(kPrefixThreads) block_prefix_kernel(SampleCudaParams p, Layout L) {
  __shared__ __align__(8) unsigned char red[33 * 8];
  const int64_t r = blockIdx.x;
  const DevPlan pl = L.plans[r];
  if (pl.kind != kBlocksK) return;
  double* cum = L.blk + r * L.nb;
  const int64_t nb = L.nb;
  double carry = 0.0;
  for (int64_t t0 = 0; t0 < nb; t0 += kPrefixThreads * 4) {
    double x[4];
    double s = 0.0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = t0 + threadIdx.x * 4 + q;
      double val = 0.0;
      if (i < nb) {
        val = cum[i];
        if (pl.blocks_scaled && !pl.probs) {
          const float cm = L.chunk_max[r * L.C + i / kChunkBlocks];
          val = val > 0.0 ? val * exp(((double)cm - (double)pl.m) * (double)pl.inv_t) : 0.0;
        }
      }
      x[q] = val;
      s += val;
    }
    double tot;
    double run = carry + block_exclusive_scan<kPrefixThreads>(s, red, &tot);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = t0 + threadIdx.x * 4 + q;
      run += x[q];
      if (i < nb) cum[i] = run;
    }
    carry += tot;
  }
}

TT_DEVICE double sample_uniform(const SampleCudaParams& p, int64_t i) {
  const bool ps = p.seed_len == p.N && p.N != 1;
  const bool po = p.offset_len == p.N && p.N != 1;
  const uint64_t sd = (uint64_t)p.seed[ps ? i : 0];
  const uint64_t of = (uint64_t)p.offset[po ? i : 0];
  return philox_uniform(sd, of, sample_subseq(i, ps), 0);
}

template <typename E>
TT_DEVICE void write_sample(const SampleCudaParams& p, int64_t i, const E* row, const DevPlan& pl, int64_t tok) {
  p.out_tokens[i] = tok;
  if (p.out_logprobs) {
    float lp = __int_as_float(0x7fc00000);  // NaN for error rows (the host raises)
    if (pl.kind != kError && pl.kind != kUnused) {
      const float x = load_elem(row + tok);
      lp = pl.probs ? (float)(log((double)x) - pl.log_z) : (float)((double)((x - pl.m) * pl.inv_t) - pl.log_z);
    }
    p.out_logprobs[i] = lp;
  }
}

template <typename E>
__global__ void __launch_bounds__(kDrawWarps * 32) draw_kernel(SampleCudaParams p, Layout L) {
  const int64_t i = (int64_t)blockIdx.x * kDrawWarps + warp_id();
  if (i >= p.N) return;
  const int lane = lane_id();
  const int64_t r = p.indices ? p.indices[i] : i;
  if (r < 0 || r >= p.B) {  // only reachable with unchecked indices (CUDA graph capture)
    if (lane == 0) {
      p.out_tokens[i] = 0;
      if (p.out_logprobs) p.out_logprobs[i] = __int_as_float(0x7fc00000);
    }
    return;
  }
  const DevPlan pl = L.plans[r];
  if (pl.kind == kLargeK) return;  // draw_large_k_kernel
  const E* row = row_ptr<E>(p, r);
  int64_t tok = 0;
  if (pl.kind == kGreedyK) {
    tok = pl.argmax;
  } else if (pl.kind == kCandK) {
    const double u = sample_uniform(p, i);
    const double* cum = L.cand_cum + r * kMaxCand;
    const int64_t n = pl.nkeep;
    tok = L.cand_id[r * kMaxCand + upper_bound_cum(cum, n, u * cum[n - 1])];
  } else if (pl.kind == kBlocksK) {
    const double u = sample_uniform(p, i);
    const double* cum = L.blk + r * L.nb;
    const int64_t nb = L.nb;
    const double target = u * cum[nb - 1];
    const int64_t b = upper_bound_cum(cum, nb, target);
    const double tl = target - (b > 0 ? cum[b - 1] : 0.0);
    const ScoreMap map = make_map(pl.probs != 0, pl.m, pl.inv_t);
    const int64_t j0 = b * kBlock + lane * 8;
    float v[8], ms[8];
    const int cnt = load_octet(row, p.V, j0, aligned16(row), v);
    const float ls = octet_mass(map, pl.tau, v, cnt, ms);
    const double incl = warp_inclusive_scan((double)ls);
    const double excl = warp_exclusive_from_inclusive(incl);
    const unsigned hit = __ballot_sync(kFullMask, incl > tl);
    int64_t t = -1;
    if (hit) {
      const int src = __ffs(hit) - 1;
      if (lane == src) {
        double acc = excl;
        int64_t last = -1;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (t < 0 && ms[e] > 0.0f) {
            acc += (double)ms[e];
            last = j0 + e;
            if (acc > tl) t = j0 + e;
          }
        }
        if (t < 0) t = last;
      }
      t = __shfl_sync(kFullMask, t, src);
    }
    if (t < 0) {  // rounding: the last token of positive mass in the block
      int64_t last = -1;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (ms[e] > 0.0f) last = j0 + e;
      t = warp_reduce(last, MaxOp());
    }
    tok = t >= 0 ? t : pl.argmax;
  }
  if (lane == 0) write_sample(p, i, row, pl, tok);
}

template <typename E>
__global__ void __launch_bounds__(kLargeThreads) draw_large_k_kernel(SampleCudaParams p, Layout L) {
  __shared__ unsigned rcnt[256];
  __shared__ double rw[256];
  __shared__ SelShared ss;
  __shared__ __align__(8) unsigned char red[33 * 8];
  __shared__ long long found;
  const int64_t i = blockIdx.x;
  const int64_t r = p.indices ? p.indices[i] : i;
  if (r < 0 || r >= p.B) return;
  const DevPlan pl = L.plans[r];
  if (pl.kind != kLargeK) return;
  const E* row = row_ptr<E>(p, r);
  const bool aligned = aligned16(row);
  const ScoreMap map = make_map(pl.probs != 0, pl.m, pl.inv_t);
  auto in_k = [&](int64_t j, float x, uint32_t& key, double& w) {
    key = value_key(x);
    w = dmass(map, map.score(x));
    return (key > pl.kstar || (key == pl.kstar && j <= pl.tie_last)) && key >= pl.kp && w >= pl.thr;
  };
  const double target = sample_uniform(p, i) * pl.z;
  // the first token (sorted order) whose running mass exceeds target: the largest key K with
  // mass(key >= K) > target, then the right tie of K in id order
  SelResult sel = radix_select<kLargeThreads, true>(row, p.V, aligned, in_k, target, true, 0u, 0, rcnt, rw, &ss);
  int64_t t = 0;
  uint32_t kq = sel.key;
  if (sel.found) {
    const double mk = dmass(map, map.score(key_value(kq)));
    double q = mk > 0.0 ? floor((target - sel.above_w) / mk) : 0.0;
    if (q < 0.0) q = 0.0;
    t = (int64_t)q;
    if (t > (int64_t)sel.cnt_at - 1) t = (int64_t)sel.cnt_at - 1;
  } else {
    // u * Z beyond the recomputed total (rounding): the last kept token, as upper_bound_cum clamps
    const SelResult low = radix_select<kLargeThreads, false>(row, p.V, aligned, in_k, (double)sel.total_cnt, false,
                                                              0u, 0, rcnt, rw, &ss);
    kq = low.key;
    t = (int64_t)low.cnt_at - 1;
  }
  if (t < 0) t = 0;
  const int64_t tok = find_nth<kLargeThreads>(
      row, p.V, aligned,
      [&](int64_t j, float x) {
        uint32_t key;
        double w;
        return in_k(j, x, key, w) && key == kq;
      },
      t, red, &found);
  if (threadIdx.x == 0) write_sample(p, i, row, pl, tok >= 0 ? tok : (int64_t)pl.argmax);
}

// ---------------------------------------------------------------- token_logprobs
template <typename E>
__global__ void __launch_bounds__(kLogprobThreads) token_logprobs_kernel(TokenLogprobsCudaParams p) {
  __shared__ __align__(8) unsigned char red[33 * 8];
  const int64_t r = blockIdx.x;
  const E* row = static_cast<const E*>(p.x) + r * p.row_stride;
  const bool aligned = aligned16(row);
  const double T = (double)(p.temperature ? p.temperature[r] : p.temperature_val);
  const float inv_t = T > 0.0 ? sampling::inv_temperature(T) : 1.0f;
  float mt = -INFINITY, st = 0.0f;
  int bad = INT_MAX;
  const int64_t nO = (p.V + 7) >> 3;
  for (int64_t o = threadIdx.x; o < nO; o += kLogprobThreads) {
    float v[8];
    const int cnt = load_octet(row, p.V, o * 8, aligned, v);
    float lm = -INFINITY;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (e < cnt) {
        if (is_nan_or_posinf(v[e])) bad = min(bad, (int)(o * 8 + e));
        else lm = fmaxf(lm, v[e]);
      }
    }
    if (lm > mt) {
      st = mt == -INFINITY ? 0.0f : st * __expf((mt - lm) * inv_t);
      mt = lm;
    }
    if (mt != -INFINITY) {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (e < cnt && !is_nan_or_posinf(v[e])) st += __expf((v[e] - mt) * inv_t);
    }
  }
  const float m = block_reduce<kLogprobThreads>(mt, MaxOp(), red);
  bad = block_reduce<kLogprobThreads>(bad, MinOp(), red);
  const double part = (mt == -INFINITY || m == -INFINITY) ? 0.0 : (double)st * exp(((double)mt - (double)m) * (double)inv_t);
  const double z = block_reduce<kLogprobThreads>(part, SumOp(), red);
  if (threadIdx.x != 0) return;
  float out = __int_as_float(0x7fc00000);
  if (bad != INT_MAX) {
    report(p.status, r, kStatusBadValue);
  } else if (m == -INFINITY) {
    report(p.status, r, kStatusNoMass);
  } else {
    const int64_t tok = p.tokens[r];
    if (tok >= 0 && tok < p.V) out = (float)((double)((load_elem(row + tok) - m) * inv_t) - log(z));
  }
  p.out[r] = out;
}

// ---------------------------------------------------------------- speculative_verify
template <typename E>
__global__ void __launch_bounds__(kSpecThreads) speculative_kernel(SpeculativeCudaParams p) {
  __shared__ __align__(8) unsigned char red[33 * 8];
  __shared__ long long found;
  const int64_t b = blockIdx.x, n = p.n, V = p.V;
  const E* dp = static_cast<const E*>(p.draft_probs);
  const E* tp = static_cast<const E*>(p.target_probs);
  const bool per_seed = p.seed_len == p.B && p.B != 1, per_off = p.offset_len == p.B && p.B != 1;
  const uint64_t sd = (uint64_t)p.seed[per_seed ? b : 0], of = (uint64_t)p.offset[per_off ? b : 0];
  const uint64_t ss = sample_subseq(b, per_seed);

  // first rejected position (n: all accepted)
  int64_t jr = n;
  for (int64_t j = threadIdx.x; j < n; j += kSpecThreads) {
    const int64_t t = p.draft_tokens[b * n + j];
    bool ok = t >= 0 && t < V;
    if (ok) {
      const float pj = load_elem(tp + (b * (n + 1) + j) * V + t), qj = load_elem(dp + (b * n + j) * V + t);
      ok = spec_accept(philox_uniform(sd, of, ss, 2 * (uint64_t)j), pj, qj);
    }
    if (!ok) jr = min(jr, j);
  }
  jr = block_reduce<kSpecThreads>(jr, MinOp(), red);
  for (int64_t j = threadIdx.x; j < jr; j += kSpecThreads) p.out_tokens[b * (n + 1) + j] = p.draft_tokens[b * n + j];

  // position jr: resample from max(0, p - q) (rejection) or from p (bonus token, jr == n)
  const E* prow = tp + (b * (n + 1) + jr) * V;
  const E* qrow = jr < n ? dp + (b * n + jr) * V : nullptr;
  const bool pal = aligned16(prow), qal = qrow ? aligned16(qrow) : false;
  auto resid = [&](const float (&pv)[8], const float (&qv)[8], bool use_q, int cnt, double (&out)[8]) {
    double s = 0.0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      double x = 0.0;
      if (e < cnt) {
        x = (double)pv[e];
        if (use_q) x = fmax(0.0, x - (double)qv[e]);
      }
      out[e] = x;
      s += x;
    }
    return s;
  };
  const int64_t nO = (V + 7) >> 3;
  auto total_mass = [&](bool use_q) {
    double s = 0.0;
    for (int64_t o = threadIdx.x; o < nO; o += kSpecThreads) {
      float pv[8], qv[8];
      double rv[8];
      const int cnt = load_octet(prow, V, o * 8, pal, pv);
      if (use_q) load_octet(qrow, V, o * 8, qal, qv);
      else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qv[e] = 0.0f;
      }
      s += resid(pv, qv, use_q, cnt, rv);
    }
    return block_reduce<kSpecThreads>(s, SumOp(), red);
  };
  bool use_q = qrow != nullptr;
  double z = total_mass(use_q);
  if (!(z > 0.0) && use_q) {  // p == q exactly: the residual is empty, fall back to p
    use_q = false;
    z = total_mass(false);
  }
  const double target = philox_uniform(sd, of, ss, 2 * (uint64_t)jr + 1) * z;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  double base = 0.0;
  int64_t last = -1;
  for (int64_t t0 = 0; t0 < nO; t0 += kSpecThreads) {
    const int64_t o = t0 + threadIdx.x;
    float pv[8], qv[8];
    double rv[8];
    int cnt = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) pv[e] = qv[e] = 0.0f;
    if (o < nO) {
      cnt = load_octet(prow, V, o * 8, pal, pv);
      if (use_q) load_octet(qrow, V, o * 8, qal, qv);
    }
    const double s = resid(pv, qv, use_q, cnt, rv);
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (rv[e] > 0.0) last = o * 8 + e;
    double tot;
    const double ex = base + block_exclusive_scan<kSpecThreads>(s, red, &tot);
    if (s > 0.0 && ex <= target && target < ex + s) {
      double c = ex;
      int64_t pick = -1, lastp = -1;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (pick < 0 && rv[e] > 0.0) {
          c += rv[e];
          lastp = o * 8 + e;
          if (c > target) pick = o * 8 + e;
        }
      }
      found = pick >= 0 ? pick : lastp;
    }
    base += tot;
    __syncthreads();
    if (found >= 0) break;
  }
  __syncthreads();
  int64_t tok = found;
  if (tok < 0) tok = block_reduce<kSpecThreads>(last, MaxOp(), red);  // rounding: the last token of positive mass
  if (threadIdx.x == 0) {
    p.out_tokens[b * (n + 1) + jr] = tok;
    for (int64_t k = jr + 1; k <= n; ++k) p.out_tokens[b * (n + 1) + k] = -1;
    p.num_accepted[b] = jr;
  }
}

// ---------------------------------------------------------------- launchers
template <typename E>
cudaError_t launch_sample(const SampleCudaParams& p, const Layout& L, cudaStream_t st) {
  const int64_t B = p.B;
  stats_kernel<E><<<(unsigned)(B * L.C), kStatsThreads, 0, st>>>(p, L);
  plan_kernel<E><<<(unsigned)B, kPlanThreads, 0, st>>>(p, L);
  if (threshold_possible(p)) block_mass_kernel<E><<<(unsigned)(B * L.C), kStatsThreads, 0, st>>>(p, L);
  block_prefix_kernel<<<(unsigned)B, kPrefixThreads, 0, st>>>(p, L);
  draw_kernel<E><<<(unsigned)((p.N + kDrawWarps - 1) / kDrawWarps), kDrawWarps * 32, 0, st>>>(p, L);
  if (largek_possible(p)) draw_large_k_kernel<E><<<(unsigned)p.N, kLargeThreads, 0, st>>>(p, L);
  return cudaGetLastError();
}

}  // namespace

size_t sample_cuda_workspace_bytes(const SampleCudaParams& p) { return make_layout(p, nullptr).bytes; }

int sample_cuda(const SampleCudaParams& p, void* stream) {
  if (p.N <= 0 || p.B <= 0 || p.V <= 0) return (int)cudaSuccess;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const Layout L = make_layout(p, p.workspace);
  if (p.indices) {
    cudaError_t e = cudaMemsetAsync(L.used, 0, (size_t)p.B, st);
    if (e != cudaSuccess) return (int)e;
    mark_rows_kernel<<<(unsigned)((p.N + 255) / 256), 256, 0, st>>>(p.indices, p.N, p.B, L.used);
  }
  cudaError_t err = cudaSuccess;
  TT_DISPATCH_FLOAT(p.dtype, E, err = launch_sample<E>(p, L, st))
  return (int)err;
}

int token_logprobs_cuda(const TokenLogprobsCudaParams& p, void* stream) {
  if (p.B <= 0) return (int)cudaSuccess;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  TT_DISPATCH_FLOAT(p.dtype, E, token_logprobs_kernel<E><<<(unsigned)p.B, kLogprobThreads, 0, st>>>(p))
  return (int)cudaGetLastError();
}

int speculative_verify_cuda(const SpeculativeCudaParams& p, void* stream) {
  if (p.B <= 0) return (int)cudaSuccess;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  TT_DISPATCH_FLOAT(p.dtype, E, speculative_kernel<E><<<(unsigned)p.B, kSpecThreads, 0, st>>>(p))
  return (int)cudaGetLastError();
}

}  // namespace sampling
}  // namespace ttscale
