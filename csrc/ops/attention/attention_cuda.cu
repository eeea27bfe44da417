// CUDA dense flash attention forward (torch-free; launched from attention.cpp).
//
// fp16 / bf16: FlashAttention-2 style. One CTA of 4 warps per (query tile of 64 rows, query head,
// sequence); each warp owns 16 query rows. Q is staged in shared memory once; K and V blocks of
// kBN keys are double-buffered with cp.async (the next block loads while the current one is used).
// S = Q K^T and O += P V run on mma.sync.m16n8k16 tensor cores with fp32 accumulators, operands read
// with ldmatrix (V with .trans); P stays in registers (the S accumulator layout is repacked as the
// A operand). Online softmax per row in registers (quad shuffles). Shared rows are padded by 16
// bytes, so ldmatrix's 8 row addresses hit distinct banks. Blocks no row of the tile can see are
// never loaded (causal / window); the mask is applied only to blocks that straddle a boundary.
// fp32: a SIMT kernel (one warp per query row, K/V tiles of 16 keys shared by the CTA's 4 rows).
//
// Semantics are those of attention.h (attn::visible, softcap, online softmax from attention_math.h),
// including its non-finite contract (compile-checked only, not yet run on a GPU):
//  - poisoned rows: row maxima are reduced with cuda::fmax_nan (NaN-propagating), so the reduced max
//    is NaN or +inf exactly when a visible score of the block is; such a row gets l = NaN
//    (OnlineSoftmax::poison), which survives every rescale; the end writes acc * attn::out_scale(l)
//    and OnlineSoftmax::lse() (NaN). No extra shuffle: the flag rides on the max reduction.
//  - masked keys in the tensor-core kernel. The P V mma adds p * v for every key of the block, 0 * v
//    for masked ones, which is NaN when v is inf / NaN. Invariants that keep the fast path exact:
//    (a) keys that no row of the CTA sees (before the first row's window, at or past the last row's
//        end, past k_len) are zero-filled in shared memory (cp.async with src-size 0), so 0 * 0;
//    (b) a block that every valid row sees whole (need_mask false) has no masked key at all.
//    What is left are keys masked for some rows only (causal diagonal, window edges) in blocks with
//    need_mask. On those blocks (1-2 per CTA for causal) the CTA scans its V tile in shared memory
//    for inf / NaN (__syncthreads_or, about 8 16-byte reads per thread) and, only if one is found,
//    runs cuda::mma_pv_exact: a SIMT product in the accumulator layout that skips every key outside
//    the row's visible range. Finite V (every real model) stays on the tensor cores; full blocks
//    never pay anything. The mask of need_mask blocks is applied from per-row tile ranges
//    (attn::visible_range clipped to the block), the same ranges the exact product uses.
//  - fp32 SIMT kernel: one row per warp; a tile the row sees whole runs today's P V loop, any other
//    adds only the row's visible keys (a select per key, not 0 * v; a loop with runtime bounds
//    made ptxas spill).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "common/attention_math.h"
#include "common/attention_nonfinite.cuh"
#include "common/cuda_mma.cuh"
#include "common/dtype.h"
#include "ops/attention/attention.h"
#include "ops/attention/attention_cuda.h"

namespace ttscale {
namespace attention {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = 64;  // query rows per CTA (16 per warp)
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct TcCfg {
  static constexpr int BN = D <= 128 ? 64 : 32;  // keys per block
  static constexpr int LD = D + 8;               // padded smem row (elements)
  static constexpr int kSmemElems = kBM * LD + 4 * BN * LD;  // Q + 2 x (K, V)
  static constexpr int kSmemBytes = kSmemElems * 2;
};

// ---------------------------------------------------------------- PTX wrappers (common/cuda_mma.cuh)
using cuda::cp_async16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;
using cuda::ldmatrix_x4;
using cuda::ldmatrix_x4_trans;

template <typename T>
struct Mma;
template <>
struct Mma<half_t> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    cuda::mma_m16n8k16<half_t>(c, a, b);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <>
struct Mma<bf16_t> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const uint32_t b[2] = {b0, b1};
    cuda::mma_m16n8k16<bf16_t>(c, a, b);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// Copies `rows` rows of D 16-bit elements (global row stride `ld` elements) into smem rows of LD
// elements; rows outside [first, valid) are zero-filled (no global read; g must point at a readable
// row, it is only an address). All threads of the CTA participate.
template <int D, int LD>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* g, int64_t ld, int rows, int first,
                                          int valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r >= first && r < valid;
    cp_async16(smem + r * LD + col, ok ? (const void*)(g + (int64_t)r * ld + col) : (const void*)g, ok);
  }
}

// ---------------------------------------------------------------- tensor-core kernel (fp16 / bf16)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_tc(const AttnParams p) {
  using Cfg = TcCfg<D>;
  constexpr int BN = Cfg::BN, LD = Cfg::LD;
  constexpr int NT = BN / 8;  // S n-tiles per warp
  constexpr int DT = D / 8;   // O n-tiles per warp
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBM * LD;        // 2 stages of [BN][LD]
  uint16_t* sV = sK + 2 * BN * LD;     // 2 stages of [BN][LD]

  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t q_len = p.q_len(b), k_len = p.k_len(b);
  const int64_t m0 = (int64_t)blockIdx.x * kBM;
  if (m0 >= q_len) return;
  const int64_t G = p.Hq / p.Hkv, hk = h / G;
  const int64_t off = k_len - q_len;
  const int64_t qtok0 = p.q_begin(b);
  const uint16_t* gq = static_cast<const uint16_t*>(p.q) + b * p.q_sb + (p.cu_q ? qtok0 * p.q_st : 0) + m0 * p.q_st +
                       h * p.q_sh;
  const uint16_t* gk = static_cast<const uint16_t*>(p.k) + b * p.k_sb + p.k_begin(b) * p.k_st + hk * p.k_sh;
  const uint16_t* gv = static_cast<const uint16_t*>(p.v) + b * p.v_sb + p.k_begin(b) * p.v_st + hk * p.v_sh;

  // key range of the whole tile
  const int64_t m_last = (m0 + kBM < q_len ? m0 + kBM : q_len) - 1;
  int64_t kb_first, ke_first, kb_last, ke_last;
  attn::visible_range(m0 + off, k_len, p.causal, p.window_left, &kb_first, &ke_first);
  attn::visible_range(m_last + off, k_len, p.causal, p.window_left, &kb_last, &ke_last);
  const int64_t n_begin = (kb_first / BN) * BN;
  const int64_t n_end = ke_last;
  const int nblocks = n_end > n_begin ? (int)((n_end - n_begin + BN - 1) / BN) : 0;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  // K/V rows of block n0 that some row of the tile may see: keys [kb_first, n_end) (kb_first is the
  // smallest window start, n_end = ke_last the largest end, <= k_len); the others are zero-filled
  // (invariant (a) above), so a masked-for-all key never multiplies a non-finite v.
  auto kv_first = [&](int64_t n0) -> int { return kb_first > n0 ? (int)(kb_first - n0) : 0; };
  auto kv_valid = [&](int64_t n0) -> int { return n_end - n0 < BN ? (int)(n_end - n0) : BN; };
  load_tile<D, LD>(sQ, gq, p.q_st, kBM, 0, (int)(q_len - m0 < kBM ? q_len - m0 : kBM));
  if (nblocks > 0) {
    load_tile<D, LD>(sK, gk + n_begin * p.k_st, p.k_st, BN, kv_first(n_begin), kv_valid(n_begin));
    load_tile<D, LD>(sV, gv + n_begin * p.v_st, p.v_st, BN, kv_first(n_begin), kv_valid(n_begin));
  }
  cp_async_commit();

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.0f, 0.0f};
  const int64_t qi0 = m0 + warp * 16 + g;  // this thread's rows: qi0 and qi0 + 8 (sequence indices)
  const float scale = p.scale, cap = p.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;

  for (int jb = 0; jb < nblocks; ++jb) {
    const int64_t n0 = n_begin + (int64_t)jb * BN;
    const int stage = jb & 1;
    if (jb + 1 < nblocks) {
      const int64_t n1 = n0 + BN;
      load_tile<D, LD>(sK + (stage ^ 1) * BN * LD, gk + n1 * p.k_st, p.k_st, BN, kv_first(n1), kv_valid(n1));
      load_tile<D, LD>(sV + (stage ^ 1) * BN * LD, gv + n1 * p.v_st, p.v_st, BN, kv_first(n1), kv_valid(n1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* k_s = sK + stage * BN * LD;
    const uint16_t* v_s = sV + stage * BN * LD;
    // A block that some valid row sees only in part (CTA-uniform). Only such a block can hold a key
    // that is masked for one row and loaded (not zero-filled) for another.
    const bool need_mask = n0 + BN > k_len || n0 < kb_last || n0 + BN > ke_first;
    // Non-finite V in such a block: the exact (SIMT) P V below, else the tensor cores. The scan runs
    // after the barrier (the tile is visible to all), one more barrier (the OR) on these blocks only;
    // full blocks skip both (need_mask is CTA-uniform, so every thread takes the same branch).
    const bool exact_pv =
        need_mask && __syncthreads_or(cuda::smem_tile_has_nonfinite<T, D, LD, BN, kThreads>(v_s) ? 1 : 0) != 0;

    // ---- S = Q K^T (16 rows x BN keys per warp)
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t bb[4];
        ldmatrix_x4(bb, k_s + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        Mma<T>::run(s[nt], a, bb[0], bb[1]);
        Mma<T>::run(s[nt + 1], a, bb[2], bb[3]);
      }
    }

    // ---- scale, softcap, mask; online softmax
    // visible keys of the lane's rows qi0, qi0 + 8 as block offsets [jb, je) (empty past q_len);
    // exactly the keys attn::visible admits below k_len
    int rjb[2] = {0, 0}, rje[2] = {0, 0};
    if (need_mask) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t qi = qi0 + r * 8;
        if (qi < q_len) {
          int64_t kb, ke;
          attn::visible_range(qi + off, k_len, p.causal, p.window_left, &kb, &ke);
          cuda::tile_local_range(kb, ke, n0, BN, &rjb[r], &rje[r]);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale;
        if (cap > 0.0f) x = cap * tanhf(x * inv_cap);
        if (need_mask) {
          const int j = nt * 8 + 2 * t + (e & 1);
          if (j < rjb[e >> 1] || j >= rje[e >> 1]) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // NaN-propagating max: NaN / +inf iff a visible score of the row poisons it (masked are -inf)
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = cuda::fmax_nan(mx, cuda::fmax_nan(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = cuda::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = cuda::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      attn::OnlineSoftmax st{row_m[r], row_l[r]};
      alpha[r] = st.rescale_to(mx);
      const float mref = st.m == -INFINITY ? 0.0f : st.m * kLog2e;
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float p0 = exp2f(s[nt][2 * r] * kLog2e - mref), p1 = exp2f(s[nt][2 * r + 1] * kLog2e - mref);
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        sum += p0 + p1;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      st.l += sum;
      if (attn::poisons(mx)) st.poison();  // sticky: NaN * alpha + sum stays NaN in later blocks
      row_m[r] = st.m;
      row_l[r] = st.l;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0]; o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1]; o[dt][3] *= alpha[1];
    }

    // ---- O += P V (P from registers, V with ldmatrix.trans); exact per-row product when a
    // partially masked block holds a non-finite V (exact_pv is CTA-uniform: no divergence)
    if (!exact_pv) {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
        a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
        a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dt * 8 + (lane >> 4) * 8);
          Mma<T>::run(o[dt], a, bb[0], bb[1]);
          Mma<T>::run(o[dt + 1], a, bb[2], bb[3]);
        }
      }
    } else {
      // Scratch for P: this stage's K tile, dead once every warp has finished S = Q K^T (the
      // barrier; exact_pv is CTA-uniform). The next write into it is the prefetch issued after the
      // barrier that ends this iteration.
      static_assert(kWarps * 16 * BN <= BN * LD, "P scratch fits in a K stage");
      __syncthreads();
      cuda::mma_pv_exact<T, NT, DT, LD>(o, s, sK + stage * BN * LD + warp * 16 * BN, v_s, lane, rjb, rje);
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // ---- normalise and store
  T* out = static_cast<T*>(p.o);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t qi = qi0 + r * 8;
    if (qi >= q_len) continue;
    const int64_t tok = qtok0 + qi;
    const float inv = attn::out_scale(row_l[r]);  // 0 for an empty row, NaN for a poisoned one
    T* orow = out + (tok * p.Hq + h) * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const uint32_t v = Mma<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) = v;
    }
    if (p.lse && t == 0) {
      attn::OnlineSoftmax st{row_m[r], row_l[r]};
      p.lse[tok * p.Hq + h] = st.lse();
    }
  }
}

// ---------------------------------------------------------------- SIMT kernel (fp32)
constexpr int kSimtKeys = 16;  // keys per shared tile

template <int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_simt(const AttnParams p) {
  constexpr int PER = D / 32;  // dims per lane
  __shared__ float sK[kSimtKeys][D + 1];
  __shared__ float sV[kSimtKeys][D];
  __shared__ float sQ[kWarps][D];
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t q_len = p.q_len(b), k_len = p.k_len(b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t m0 = (int64_t)blockIdx.x * kWarps;
  if (m0 >= q_len) return;
  const int64_t qi = m0 + warp;
  const bool active = qi < q_len;
  const int64_t G = p.Hq / p.Hkv, hk = h / G, off = k_len - q_len, qtok0 = p.q_begin(b);
  const float* gk = static_cast<const float*>(p.k) + b * p.k_sb + p.k_begin(b) * p.k_st + hk * p.k_sh;
  const float* gv = static_cast<const float*>(p.v) + b * p.v_sb + p.k_begin(b) * p.v_st + hk * p.v_sh;

  float o[PER];
  const float* gq = static_cast<const float*>(p.q) + b * p.q_sb + (p.cu_q ? qtok0 * p.q_st : 0) +
                    (active ? qi : m0) * p.q_st + h * p.q_sh;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    sQ[warp][lane + 32 * i] = gq[lane + 32 * i] * p.scale;
    o[i] = 0.0f;
  }
  int64_t kb, ke, kb2, ke2;
  attn::visible_range(m0 + off, k_len, p.causal, p.window_left, &kb, &ke);
  const int64_t m_last = (m0 + kWarps < q_len ? m0 + kWarps : q_len) - 1;
  attn::visible_range(m_last + off, k_len, p.causal, p.window_left, &kb2, &ke2);
  int64_t my_b, my_e;
  attn::visible_range((active ? qi : m0) + off, k_len, p.causal, p.window_left, &my_b, &my_e);
  attn::OnlineSoftmax st;
  st.init();
  for (int64_t n0 = kb; n0 < ke2; n0 += kSimtKeys) {
    __syncthreads();
    for (int c = threadIdx.x; c < kSimtKeys * D; c += kThreads) {
      const int r = c / D, d = c % D;
      const bool ok = n0 + r < k_len;
      sK[r][d] = ok ? gk[(n0 + r) * p.k_st + d] : 0.0f;
      sV[r][d] = ok ? gv[(n0 + r) * p.v_st + d] : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
    // lane j < 16 scores key j with the first half of D, lane j + 16 the second half
    const int j = lane & 15, half = lane >> 4;
    float s = 0.0f;
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d)
      s += sQ[warp][d] * sK[j][d];
    s += __shfl_xor_sync(0xffffffffu, s, 16);
    if (p.softcap > 0.0f) s = attn::softcap(s, p.softcap);
    const int64_t kj = n0 + j;
    if (kj < my_b || kj >= my_e) s = -INFINITY;
    // NaN-propagating max over the 16 keys (lanes j and j + 16 hold the same s)
    float mx = s;
#pragma unroll
    for (int w = 8; w > 0; w >>= 1) mx = cuda::fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, w));
    const float alpha = st.rescale_to(mx);
    const float pj = st.m == -INFINITY ? 0.0f : __expf(s - st.m);
    float sum = pj;
#pragma unroll
    for (int w = 8; w > 0; w >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
    st.l += sum;
    if (attn::poisons(mx)) st.poison();
    // P V over the row's visible keys of the tile only (masked keys never touch the row, whatever
    // V holds); the bounds are warp-uniform (one row per warp)
    int jb, je;
    cuda::tile_local_range(my_b, my_e, n0, kSimtKeys, &jb, &je);
    if (jb == 0 && je == kSimtKeys) {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        float acc = o[i] * alpha;
        for (int jj = 0; jj < kSimtKeys; ++jj) acc += __shfl_sync(0xffffffffu, pj, jj) * sV[jj][lane + 32 * i];
        o[i] = acc;
      }
    } else {
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        float acc = o[i] * alpha;
        for (int jj = 0; jj < kSimtKeys; ++jj) {
          const float pjj = __shfl_sync(0xffffffffu, pj, jj);
          acc = (jj >= jb && jj < je) ? fmaf(pjj, sV[jj][lane + 32 * i], acc) : acc;  // a select, never 0 * v
        }
        o[i] = acc;
      }
    }
  }
  if (!active) return;
  const int64_t tok = qtok0 + qi;
  const float inv = attn::out_scale(st.l);
  float* orow = static_cast<float*>(p.o) + (tok * p.Hq + h) * D;
#pragma unroll
  for (int i = 0; i < PER; ++i) orow[lane + 32 * i] = o[i] * inv;
  if (p.lse && lane == 0) p.lse[tok * p.Hq + h] = st.lse();
}

template <typename T, int D>
int launch_tc(const AttnParams& p, int64_t max_q_len, cudaStream_t stream) {
  constexpr int bytes = TcCfg<D>::kSmemBytes;
  cudaError_t e = cudaFuncSetAttribute(attn_fwd_tc<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return (int)e;
  const dim3 grid((unsigned)((max_q_len + kBM - 1) / kBM), (unsigned)p.Hq, (unsigned)p.B);
  attn_fwd_tc<T, D><<<grid, kThreads, bytes, stream>>>(p);
  return (int)cudaGetLastError();
}

template <int D>
int launch_simt(const AttnParams& p, int64_t max_q_len, cudaStream_t stream) {
  const dim3 grid((unsigned)((max_q_len + kWarps - 1) / kWarps), (unsigned)p.Hq, (unsigned)p.B);
  attn_fwd_simt<D><<<grid, kThreads, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

template <int D>
int launch_d(const AttnParams& p, int64_t max_q_len, cudaStream_t s) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_tc<half_t, D>(p, max_q_len, s);
    case DType::kBFloat16: return launch_tc<bf16_t, D>(p, max_q_len, s);
    default: return launch_simt<D>(p, max_q_len, s);
  }
}

}  // namespace

int attention_cuda(const AttnParams& p, int64_t max_q_len, void* stream) {
  if (max_q_len <= 0 || p.B <= 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.D) {
    case 64: return launch_d<64>(p, max_q_len, s);
    case 128: return launch_d<128>(p, max_q_len, s);
    case 256: return launch_d<256>(p, max_q_len, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace attention
}  // namespace ttscale
