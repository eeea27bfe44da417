// Dense flash attention forward: shared definitions for the CPU and CUDA paths (torch-free).
//
// Semantics (python/ttscale/ops/attention.py has the user-facing contract):
//   o[t, h] = sum_j softmax_j(s_j) v[j, h / G],  s_j = softcap(scale * q[t, h] . k[j, h / G])
//   over the keys j visible to query t (attn::visible: causal aligned bottom-right, sliding window),
//   G = Hq / Hkv. LSE = natural log of sum_j exp(s_j), float32; no visible key: o = 0, LSE = -inf.
//
// Layout seen by the kernels: sequence b has q_len(b) queries and k_len(b) keys. Padded inputs
// ([B, S, H, D]) use batch strides and cu == nullptr; ragged inputs ([T, H, D]) use cu_seqlens
// (token offsets) and batch stride 0. The output is [total query tokens, Hq, D] contiguous (fp32
// on the CPU path, q's dtype on CUDA) and LSE [total query tokens, Hq].
//
// CPU algorithm (attention_cpu.cpp): one work unit = (sequence, KV head, tile of query rows) and
// covers all G query heads that share the KV head, so M = G * tile rows share every K/V block.
// The unit's Q is scaled, widened to fp32 and transposed once (Q^T [D][ldq], queries along SIMD
// lanes); each block of kBlockK keys is widened once (K and V [kBlockK][D]). The micro-kernels
// compute S^T = K Q^T (keys x queries), so the online softmax runs down the columns, W queries per
// vector, with no horizontal reductions; then O += P V with P read from S^T. Blocks that no row of
// the unit can see are skipped (causal / window); masks are applied only on boundary blocks.
#pragma once
#include <cstdint>

#include "common/attention_math.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace ttscale {
namespace attention {

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;     // [Tq, Hq, D] contiguous
  float* lse = nullptr;  // [Tq, Hq] or nullptr
  DType dtype = DType::kFloat32;
  // element strides: batch (0 when ragged), token, head; the last dim is contiguous
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t Sq = 0, Sk = 0;              // padded layout: query / key length of every sequence
  const int32_t* cu_q = nullptr;       // ragged layout: [B+1] token offsets (host or device memory)
  const int32_t* cu_k = nullptr;
  float scale = 1.0f;
  float softcap = 0.0f;                // <= 0: off
  bool causal = false;
  int64_t window_left = -1;            // < 0: off

  TT_HD int64_t q_begin(int64_t b) const { return cu_q ? (int64_t)cu_q[b] : b * Sq; }  // global query token
  TT_HD int64_t q_len(int64_t b) const { return cu_q ? (int64_t)(cu_q[b + 1] - cu_q[b]) : Sq; }
  TT_HD int64_t k_begin(int64_t b) const { return cu_k ? (int64_t)cu_k[b] : 0; }  // token offset (ragged)
  TT_HD int64_t k_len(int64_t b) const { return cu_k ? (int64_t)(cu_k[b + 1] - cu_k[b]) : Sk; }
};

constexpr int kBlockK = 96;  // CPU: keys per block (a multiple of the micro-kernels' 4 / 6 rows)
constexpr int kPadD = 16;    // CPU: K / V block rows are D + kPadD floats apart (no 4 KiB L1 aliasing)

// CPU: query rows per tile, so that a unit has about 96 rows (G heads x rows), preferably a
// multiple of 48 (16 SIMD columns of S^T and 6 micro-kernel rows of O).
inline int64_t cpu_q_tile(int64_t G) {
  G = G > 0 ? G : 1;
  const int64_t t = (96 + G - 1) / G;
  int64_t best = t < 1 ? 1 : t, best_cost = -1;
  for (int64_t c = t > 16 ? t - 16 : 1; c <= t + 16; ++c) {
    const int64_t m = G * c;
    const int64_t cost = (m > 96 ? m - 96 : 96 - m) + (m % 48 == 0 ? 0 : m % 16 == 0 ? 32 : m % 6 == 0 ? 48 : 64);
    if (best_cost < 0 || cost < best_cost) { best = c; best_cost = cost; }
  }
  return best;
}
// Leading dimension of Q^T and S^T for M queries: M rounded up to 64 (the widest SIMD column
// tile), plus 16 so rows are not 4 KiB-aliased.
inline int64_t cpu_ldq(int64_t M) { return (M + 63) / 64 * 64 + 16; }
// CPU scratch floats for one unit of M rows: Q^T [D][ldq]; O [M][D]; K, V [kBlockK][D + kPadD];
// S^T [kBlockK][ldq]; m, l, alpha, visible-begin, visible-end [ldq]; key ranges int64 [2M];
// non-finite value rows of a block [kBlockK][D].
inline int64_t cpu_scratch_floats(int64_t M, int64_t D) {
  const int64_t ldq = cpu_ldq(M);
  return D * ldq + M * D + 2 * kBlockK * (D + kPadD) + kBlockK * ldq + 5 * ldq + 4 * M + kBlockK * D + 64;
}

struct CpuKernels {
  // One unit: sequence b, KV head hk, query rows [r0, r1) of the sequence, all G query heads.
  // Writes fp32 o and lse (if non-null). scratch: cpu_scratch_floats(G * (r1 - r0), D) floats.
  void (*run_unit)(const AttnParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1, float* scratch);
};

}  // namespace attention
}  // namespace ttscale

#include "common/cpu_dispatch.h"
TT_DECLARE_CPU_KERNELS(ttscale::attention::CpuKernels, attention_kernels)
