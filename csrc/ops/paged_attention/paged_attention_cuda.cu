// CUDA kernels of paged attention, attention-state merge, paged KV append and page copy
// (torch-free; launcher interface in paged_attention_cuda.h). NOT YET RUN ON A GPU: this file is
// only compile-checked (tools/cuda_compile_check.sh, sm_80 and sm_90a).
//
// paged_attn_kernel<T, D>: grid (tiles, Hkv, key splits), 4 warps. A CTA owns up to 16 rows
// (queries x group heads of one KV head of one sequence: a decode GQA group, or a tile of a
// multi-query block) and one key split. K/V tiles of 32 keys are copied to shared memory with
// 16-byte cp.async through the page table (any page size), double-buffered so the next tile is in
// flight while the current one is used; every row of the CTA reuses the tile (KV read once per
// tile of queries). Warp w owns rows 4w..4w+3: S = Q K^T with one key per lane (rows padded by 16
// bytes, conflict-free), online softmax per row (attention_math.h conventions), then O += P V with
// p broadcast by shuffles and D/32 output elements per lane. Splits write fp32 partials that
// merge_splits_kernel combines with attn::merge_weights.
//
// Non-finite contract of attention_math.h (compile-checked only):
//  - a NaN / +inf visible score: row maxima are reduced NaN-propagating (cuda::fmax_nan), so the
//    reduced max is NaN / +inf exactly when a visible score of the tile is; the row gets l = NaN
//    (OnlineSoftmax::poison, sticky through rescales), writes acc * attn::out_scale(l) and a NaN LSE,
//    and the split merge propagates it. The "nothing visible in this tile" early-out tests the
//    reduced max against -inf, which a NaN max no longer passes for.
//  - masked keys never reach O. Keys outside the CTA's union [lo, hi) are zero-filled in shared
//    memory (plain stores), so 0 * 0. Keys inside it that a row cannot see (causal diagonal
//    between a tile's queries, window edges) are loaded with real data:
//    paged_attn_kernel (SIMT): a tile that every row of the warp sees whole runs today's loop;
//      otherwise the P V loop skips, per row, the keys outside the row's range (warp-uniform test).
//    paged_mq_mma_kernel: a tile that every row of the CTA sees whole (CTA-uniform, from the
//      intersection of the rows' ranges) runs today's tensor-core path; on other tiles the CTA scans
//      its V tile for inf / NaN (__syncthreads_or) and only then runs cuda::mma_pv_exact (skips the
//      masked keys per row), so finite V stays on the tensor cores.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/attention_math.h"
#include "common/attention_nonfinite.cuh"
#include "common/cuda_mma.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "ops/paged_attention/paged_attention.h"
#include "ops/paged_attention/paged_attention_cuda.h"

namespace ttscale {
namespace paged {
namespace {

using cuda::kFullMask;

constexpr int kThreads = kCudaWarps * 32;
constexpr int TK = kCudaTileKeys;

// NaN-propagating: NaN if any lane holds NaN (a poisoned row must not look empty)
TT_DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = cuda::fmax_nan(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
TT_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

using cuda::cp_async16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;
using cuda::ldmatrix_x2;
using cuda::ldmatrix_x2_trans;
using cuda::ldmatrix_x4;
using cuda::mma_m16n8k16;

TT_DEVICE float ld(const float* p) { return *p; }
TT_DEVICE float ld(const half_t* p) { return half_bits_to_float(p->bits); }
TT_DEVICE float ld(const bf16_t* p) { return bf16_bits_to_float(p->bits); }

// 16 bytes of T widened to fp32 (4 floats or 8 halves / bf16s)
template <typename T>
struct Vec16 {
  static constexpr int N = 16 / (int)sizeof(T);
};
TT_DEVICE void widen16(const float* p, float* o) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  o[0] = x.x; o[1] = x.y; o[2] = x.z; o[3] = x.w;
}
TT_DEVICE void widen16(const half_t* p, float* o) {
  const uint4 x = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = half_bits_to_float((uint16_t)(w[i] & 0xFFFFu));
    o[2 * i + 1] = half_bits_to_float((uint16_t)(w[i] >> 16));
  }
}
TT_DEVICE void widen16(const bf16_t* p, float* o) {
  const uint4 x = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = bits_to_float(w[i] << 16);
    o[2 * i + 1] = bits_to_float(w[i] & 0xFFFF0000u);
  }
}

template <typename T, int D>
struct Smem {
  static constexpr int kPad = 16 / (int)sizeof(T);
  static constexpr int kRow = D + kPad;  // elements per shared row
  static constexpr size_t kBytes = 2 * 2 * ((size_t)TK * kRow * sizeof(T)) + (size_t)kCudaRowsPerCta * D * 4;
};

// Issue the copies of keys [k0, k0 + TK) (clipped to [lo, hi)) of KV head h into a stage.
template <typename T, int D>
TT_DEVICE void load_tile(const PagedParams& p, const int32_t* pages, int64_t h, int64_t k0, int64_t lo, int64_t hi,
                         T* ks, T* vs, bool aligned16) {
  using S = Smem<T, D>;
  constexpr int kChunks = D * (int)sizeof(T) / 16;  // 16-byte chunks per row
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  for (int c = threadIdx.x; c < 2 * TK * kChunks; c += kThreads) {
    const int which = c / (TK * kChunks);  // 0: K, 1: V
    const int rem = c - which * TK * kChunks;
    const int j = rem / kChunks;
    const int ch = rem - j * kChunks;
    T* dst = (which ? vs : ks) + j * S::kRow + ch * Vec16<T>::N;
    const int64_t key = k0 + j;
    if (key < lo || key >= hi) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    const int64_t pi = key / p.page_size;
    const int64_t page = pages[pi];
    const int64_t off = key - pi * p.page_size;
    const T* src = which ? vc + page * p.v_stride_page + off * p.v_stride_tok + h * p.v_stride_head
                         : kc + page * p.k_stride_page + off * p.k_stride_tok + h * p.k_stride_head;
    src += ch * Vec16<T>::N;
    if (aligned16) {
      cp_async16(dst, src);
    } else {
#pragma unroll
      for (int e = 0; e < Vec16<T>::N; ++e) dst[e] = src[e];
    }
  }
}

// Where a CTA's sequence b sits and which keys its split may read: the query token t has key
// position t - qo0 + kv_len - n_q_seq (bottom-right aligned), and split z reads keys
// [z * keys_per_split, (z + 1) * keys_per_split).
struct CtaKeys {
  int64_t kv_len, qo0, n_q_seq, s_lo, s_hi;
  // visible keys of query token t, clamped to the split: [*kb, *ke) (empty when *kb >= *ke)
  TT_DEVICE void row_range(const PagedParams& p, int64_t t, int64_t* kb, int64_t* ke) const {
    attn::visible_range(t - qo0 + kv_len - n_q_seq, kv_len, p.causal, p.window_left, kb, ke);
    *kb = *kb > s_lo ? *kb : s_lo;
    *ke = *ke < s_hi ? *ke : s_hi;
  }
  // keys the whole tile reads: the union of its query tokens' row ranges ([lo, hi), empty if lo >= hi);
  // with clo / chi: also the keys every row sees, the intersection [*clo, *chi) (empty if *clo >= *chi,
  // in particular when some row sees nothing)
  TT_DEVICE void tile_range(const PagedParams& p, const CudaTile& tile, int64_t* lo, int64_t* hi,
                            int64_t* clo = nullptr, int64_t* chi = nullptr) const {
    *lo = kv_len;
    *hi = 0;
    int64_t c_lo = 0, c_hi = kv_len;
    const int nq = tile.q1 - tile.q0;
    for (int qi = 0; qi < nq; ++qi) {
      int64_t kb, ke;
      row_range(p, tile.q0 + qi, &kb, &ke);
      if (kb < ke) { *lo = kb < *lo ? kb : *lo; *hi = ke > *hi ? ke : *hi; }
      c_lo = kb > c_lo ? kb : c_lo;
      c_hi = ke < c_hi ? ke : c_hi;
    }
    if (clo) *clo = c_lo;
    if (chi) *chi = c_hi;
  }
};
TT_DEVICE CtaKeys cta_keys(const PagedParams& p, const PagedCudaWork& w, int64_t b, int split) {
  CtaKeys k;
  k.kv_len = kv_len_of(p.kv_indptr, p.kv_last_page_len, b, p.page_size);
  k.qo0 = p.qo_indptr ? p.qo_indptr[b] : b;
  k.n_q_seq = p.qo_indptr ? p.qo_indptr[b + 1] - k.qo0 : 1;
  k.s_lo = (int64_t)split * w.keys_per_split;
  k.s_hi = k.s_lo + w.keys_per_split;
  return k;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) paged_attn_kernel(PagedParams p, PagedCudaWork w) {
  using S = Smem<T, D>;
  constexpr int EPL = D / 32;  // output elements per lane
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks_all = reinterpret_cast<T*>(smem_raw);       // [2][TK][kRow]
  T* vs_all = ks_all + 2 * TK * S::kRow;            // [2][TK][kRow]
  float* qs = reinterpret_cast<float*>(vs_all + 2 * TK * S::kRow);  // [16][D]

  const CudaTile tile = w.tiles[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int split = blockIdx.z;
  const int64_t group = p.Hq / p.Hkv;
  const int nq = tile.q1 - tile.q0, ng = tile.g1 - tile.g0;
  const int rows = nq * ng;
  const int lane = cuda::lane_id(), warp = cuda::warp_id();
  const int64_t b = tile.b;
  const CtaKeys keys = cta_keys(p, w, b, split);

  // key range of the CTA: the union of its rows' visible ranges, within the split
  int64_t lo, hi;
  keys.tile_range(p, tile, &lo, &hi);

  // scaled queries to shared memory
  const T* qg = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    const int64_t t = tile.q0 + r / ng;
    const int64_t hq = h * group + tile.g0 + r % ng;
    qs[i] = ld(qg + t * p.q_stride_t + hq * p.q_stride_h + d) * p.scale;
  }

  // this warp's rows and their visible ranges
  float m[kCudaRowsPerWarp], l[kCudaRowsPerWarp], acc[kCudaRowsPerWarp][EPL];
  int64_t rkb[kCudaRowsPerWarp], rke[kCudaRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kCudaRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[i][e] = 0.0f;
    const int r = warp * kCudaRowsPerWarp + i;
    rkb[i] = 0;
    rke[i] = 0;
    if (r < rows) {
      keys.row_range(p, tile.q0 + r / ng, &rkb[i], &rke[i]);
    }
  }
  const int my_rows = rows - warp * kCudaRowsPerWarp;  // may be <= 0

  const int32_t* pages = p.kv_indices + p.kv_indptr[b];
  const int n_tiles = hi > lo ? (int)((hi - lo + TK - 1) / TK) : 0;
  if (n_tiles > 0) {
    load_tile<T, D>(p, pages, h, lo, lo, hi, ks_all, vs_all, w.aligned16);
    cp_async_commit();
  }
  __syncthreads();  // qs visible
  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    const int64_t k0 = lo + (int64_t)it * TK;
    if (it + 1 < n_tiles) {
      load_tile<T, D>(p, pages, h, k0 + TK, lo, hi, ks_all + (stage ^ 1) * TK * S::kRow,
                      vs_all + (stage ^ 1) * TK * S::kRow, w.aligned16);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks = ks_all + stage * TK * S::kRow;
    const T* vs = vs_all + stage * TK * S::kRow;
    if (my_rows > 0) {
      // S = Q K^T: lane j scores key k0 + j for the warp's rows
      float s[kCudaRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kCudaRowsPerWarp; ++i) s[i] = 0.0f;
      const T* krow = ks + lane * S::kRow;
#pragma unroll 4
      for (int d = 0; d < D; d += Vec16<T>::N) {
        float kv[Vec16<T>::N];
        widen16(krow + d, kv);
#pragma unroll
        for (int i = 0; i < kCudaRowsPerWarp; ++i) {
          const float* qrow = qs + (warp * kCudaRowsPerWarp + (i < my_rows ? i : 0)) * D + d;
#pragma unroll
          for (int e = 0; e < Vec16<T>::N; ++e) s[i] = fmaf(qrow[e], kv[e], s[i]);
        }
      }
      const int64_t key = k0 + lane;
      float pr[kCudaRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kCudaRowsPerWarp; ++i) {
        pr[i] = 0.0f;
        if (i >= my_rows) continue;  // warp-uniform
        float si = attn::softcap(s[i], p.softcap);
        if (key < rkb[i] || key >= rke[i]) si = -INFINITY;
        const float mt = warp_max(si);  // NaN / +inf: a visible score poisons the row
        if (mt == -INFINITY) continue;  // warp-uniform: nothing visible in this tile
        attn::OnlineSoftmax os{m[i], l[i]};
        const float alpha = os.rescale_to(mt);
        const float pi = __expf(si - os.m);  // 0 for masked keys
        os.l += warp_sum(pi);
        if (attn::poisons(mt)) os.poison();  // l = NaN, sticky
        m[i] = os.m;
        l[i] = os.l;
        pr[i] = pi;
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[i][e] *= alpha;
      }
      // O += P V: p of key j broadcast from lane j; lane owns elements [lane * EPL, +EPL).
      // Keys k0 + j >= hi are zero-filled; a tile whose loaded keys [k0, min(k0 + TK, hi)) every row
      // of the warp sees (warp-uniform) has no masked key with data: today's loop. Otherwise each
      // row adds only the keys of its own range (a masked key must not add 0 * v: NaN for v = inf).
      const int64_t k_end = k0 + TK < hi ? k0 + TK : hi;
      bool clean = true;
#pragma unroll
      for (int i = 0; i < kCudaRowsPerWarp; ++i)
        if (i < my_rows) clean = clean && rkb[i] <= k0 && rke[i] >= k_end;
      if (clean) {
#pragma unroll 2
        for (int j = 0; j < TK; ++j) {
          const T* vrow = vs + j * S::kRow + lane * EPL;
          float vv[EPL];
#pragma unroll
          for (int e = 0; e < EPL; ++e) vv[e] = ld(vrow + e);
#pragma unroll
          for (int i = 0; i < kCudaRowsPerWarp; ++i) {
            const float pj = __shfl_sync(kFullMask, pr[i], j);
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[i][e] = fmaf(pj, vv[e], acc[i][e]);
          }
        }
      } else {
        static_assert(TK <= 32, "one visibility bit per key of the tile");
        uint32_t vis_bits[kCudaRowsPerWarp];  // bit j: key k0 + j is in row i's range (0: unused row)
#pragma unroll
        for (int i = 0; i < kCudaRowsPerWarp; ++i) {
          int jb, je;
          cuda::tile_local_range(rkb[i], rke[i], k0, TK, &jb, &je);
          vis_bits[i] = cuda::range_bits32(jb, je);
        }
#pragma unroll 1
        for (int j = 0; j < TK; ++j) {
          const T* vrow = vs + j * S::kRow + lane * EPL;
          float vv[EPL];
#pragma unroll
          for (int e = 0; e < EPL; ++e) vv[e] = ld(vrow + e);
#pragma unroll
          for (int i = 0; i < kCudaRowsPerWarp; ++i) {
            const float pj = __shfl_sync(kFullMask, pr[i], j);
            const bool vis = (vis_bits[i] >> j) & 1u;  // warp-uniform
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[i][e] = vis ? fmaf(pj, vv[e], acc[i][e]) : acc[i][e];
          }
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the next iteration's copies
  }

  // write this split's result
#pragma unroll
  for (int i = 0; i < kCudaRowsPerWarp; ++i) {
    if (i >= my_rows) continue;
    const int r = warp * kCudaRowsPerWarp + i;
    const int64_t t = tile.q0 + r / ng;
    const int64_t hq = h * group + tile.g0 + r % ng;
    const int64_t row = t * p.Hq + hq;
    const float inv = attn::out_scale(l[i]);  // 0: empty, NaN: poisoned
    const float lse = attn::OnlineSoftmax{m[i], l[i]}.lse();
    if (w.n_split > 1) {
      float* o = w.part_out + ((int64_t)split * p.T * p.Hq + row) * D + lane * EPL;
#pragma unroll
      for (int e = 0; e < EPL; ++e) o[e] = acc[i][e] * inv;
      if (lane == 0) w.part_lse[(int64_t)split * p.T * p.Hq + row] = lse;
    } else {
      T* o = static_cast<T*>(w.out) + row * D + lane * EPL;
#pragma unroll
      for (int e = 0; e < EPL; ++e) store_float(o + e, acc[i][e] * inv);
      if (lane == 0) w.lse[row] = lse;
    }
  }
}


// ---------------------------------------------------------------- tensor-core multi-query kernel
// paged_mq_mma_kernel<T, D> (fp16 / bf16, D <= 128): grid (tiles of <= 64 rows, Hkv, key splits),
// 4 warps x 16 rows. Per 32-key tile (cp.async double-buffered, as above): S = Q K^T with
// mma.sync m16n8k16 (Q fragments held in registers for the whole CTA, K fragments by ldmatrix),
// online softmax on the accumulator fragments (a row's 8 values live in one quad of lanes), then the
// S fragments are re-packed in registers as the A operand of O += P V (V fragments by ldmatrix.trans),
// FlashAttention-2 style. This is the shared-prefix path: all branches' queries reuse each K/V tile.
template <typename T, int D>
struct MmaSmem {
  static constexpr int kRow = D + 8;  // 16-byte pad: conflict-free ldmatrix
  static constexpr size_t kBytes = ((size_t)kCudaMmaRows * kRow + 4 * (size_t)TK * kRow) * sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) paged_mq_mma_kernel(PagedParams p, PagedCudaWork w) {
  static_assert(D % 16 == 0 && D <= 128, "mma kernel: D in {64, 128}");
  constexpr int kRow = MmaSmem<T, D>::kRow;
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int NB = D / 8;   // n8 blocks of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);        // [64][kRow]
  T* ks_all = qs + kCudaMmaRows * kRow;          // [2][TK][kRow]
  T* vs_all = ks_all + 2 * TK * kRow;            // [2][TK][kRow]

  const CudaTile tile = w.tiles[blockIdx.x];
  const int64_t h = blockIdx.y;
  const int split = blockIdx.z;
  const int64_t group = p.Hq / p.Hkv;
  const int nq = tile.q1 - tile.q0, ng = tile.g1 - tile.g0;
  const int rows = nq * ng;
  const int lane = cuda::lane_id(), warp = cuda::warp_id();
  const int64_t b = tile.b;
  const CtaKeys keys = cta_keys(p, w, b, split);
  int64_t lo, hi, clo, chi;  // union and intersection of the rows' visible keys (CTA-uniform)
  keys.tile_range(p, tile, &lo, &hi, &clo, &chi);
  // queries (unscaled, in T) to shared memory; rows past `rows` are zero
  const T* qg = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < kCudaMmaRows * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    T v;
    v = T();
    if (r < rows) {
      const int64_t t = tile.q0 + r / ng;
      const int64_t hq = h * group + tile.g0 + r % ng;
      v = qg[t * p.q_stride_t + hq * p.q_stride_h + d];
    } else {
      store_float(&v, 0.0f);
    }
    qs[r * kRow + d] = v;
  }
  const int64_t pre_lo = lo, pre_hi = hi;
  const int32_t* pages = p.kv_indices + p.kv_indptr[b];
  const int n_tiles = hi > lo ? (int)((hi - lo + TK - 1) / TK) : 0;
  if (n_tiles > 0) {
    load_tile<T, D>(p, pages, h, lo, pre_lo, pre_hi, ks_all, vs_all, w.aligned16);
    cp_async_commit();
  }
  __syncthreads();
  // Q fragments of this warp's 16 rows
  uint32_t qf[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
    ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * kRow + kk * 16 + (lane >> 4) * 8);
  // the two rows this lane holds accumulator values of, and their visible ranges
  const int g = lane >> 2, qd = lane & 3;
  int64_t rkb[2], rke[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    rkb[i] = 0;
    rke[i] = 0;
    if (r < rows) {
      keys.row_range(p, tile.q0 + r / ng, &rkb[i], &rke[i]);
    }
  }
  float o[NB][4];
#pragma unroll
  for (int nb = 0; nb < NB; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    const int64_t k0 = lo + (int64_t)it * TK;
    if (it + 1 < n_tiles) {
      load_tile<T, D>(p, pages, h, k0 + TK, pre_lo, pre_hi, ks_all + (stage ^ 1) * TK * kRow,
                      vs_all + (stage ^ 1) * TK * kRow, w.aligned16);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* ks = ks_all + stage * TK * kRow;
    const T* vs = vs_all + stage * TK * kRow;
    // A tile some row sees only in part: its loaded keys [k0, min(k0 + TK, hi)) are not all inside
    // the intersection (CTA-uniform). Only there can a key be masked for a row and hold real data
    // (keys >= hi are zero-filled). On such a tile a non-finite V sends P V to the exact path.
    const int64_t k_end = k0 + TK < hi ? k0 + TK : hi;
    const bool partial = !(clo <= k0 && chi >= k_end);
    const bool exact_pv =
        partial && __syncthreads_or(cuda::smem_tile_has_nonfinite<T, D, kRow, TK, kThreads>(vs) ? 1 : 0) != 0;
    if (warp * 16 < rows) {  // warp-uniform
      // S = Q K^T: 4 n8 blocks of keys
      float sc[4][4];
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        sc[nb][0] = sc[nb][1] = sc[nb][2] = sc[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t bf[2];
          ldmatrix_x2(bf, ks + (nb * 8 + (lane & 7)) * kRow + kk * 16 + ((lane >> 3) & 1) * 8);
          mma_m16n8k16<T>(sc[nb], qf[kk], bf);
        }
      }
      // scale, softcap, mask; online softmax per row (values of a row are in one lane quad)
      float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const int64_t key = k0 + nb * 8 + qd * 2 + (e & 1);
          float s = attn::softcap(sc[nb][e] * p.scale, p.softcap);
          if (key < rkb[i] || key >= rke[i]) s = -INFINITY;
          sc[nb][e] = s;
          mt[i] = cuda::fmax_nan(mt[i], s);  // NaN / +inf iff a visible score poisons the row
        }
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mt[i] = cuda::fmax_nan(mt[i], __shfl_xor_sync(kFullMask, mt[i], 1));
        mt[i] = cuda::fmax_nan(mt[i], __shfl_xor_sync(kFullMask, mt[i], 2));
        const float m_new = fmaxf(m[i], mt[i]);  // a NaN mt leaves m (the row is poisoned below)
        alpha[i] = (m[i] == -INFINITY) ? (m_new == -INFINITY ? 1.0f : 0.0f) : __expf(m[i] - m_new);
        m[i] = m_new;
      }
      float rs[2] = {0.0f, 0.0f};
#pragma unroll
      for (int nb = 0; nb < 4; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          const float pv = m[i] == -INFINITY ? 0.0f : __expf(sc[nb][e] - m[i]);
          sc[nb][e] = pv;
          rs[i] += pv;
        }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        rs[i] += __shfl_xor_sync(kFullMask, rs[i], 1);
        rs[i] += __shfl_xor_sync(kFullMask, rs[i], 2);
        l[i] = l[i] * alpha[i] + rs[i];
        if (attn::poisons(mt[i])) l[i] = NAN;  // OnlineSoftmax::poison: sticky through l * alpha + rs
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        o[nb][0] *= alpha[0]; o[nb][1] *= alpha[0];
        o[nb][2] *= alpha[1]; o[nb][3] *= alpha[1];
      }
      if (!exact_pv) {
        // O += P V: P re-packed from the S fragments as two m16k16 A operands
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          uint32_t pa[4];
          pa[0] = cuda::pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
          pa[1] = cuda::pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
          pa[2] = cuda::pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
          pa[3] = cuda::pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) {
            uint32_t bf[2];
            ldmatrix_x2_trans(bf, vs + (kk * 16 + (lane & 15)) * kRow + nb * 8);
            mma_m16n8k16<T>(o[nb], pa, bf);
          }
        }
      } else {
        // exact: row i adds only keys [rkb[i], rke[i]) of the tile (the mask above, tile offsets).
        // P scratch: this warp's own 16 rows of qs, read by nobody since its Q fragments went to
        // registers before the loop (qf), so no CTA barrier is needed.
        static_assert(16 * TK <= 16 * kRow, "P scratch fits in the warp's Q rows");
        int jb[2], je[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) cuda::tile_local_range(rkb[i], rke[i], k0, TK, &jb[i], &je[i]);
        cuda::mma_pv_exact<T, 4, NB, kRow>(o, sc, reinterpret_cast<uint16_t*>(qs + warp * 16 * kRow), vs, lane, jb,
                                           je);
      }
    }
    __syncthreads();
  }
  // write: lane holds columns nb*8 + 2*qd, +1 of rows g and g+8
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    if (r >= rows) continue;
    const int64_t t = tile.q0 + r / ng;
    const int64_t hq = h * group + tile.g0 + r % ng;
    const int64_t row = t * p.Hq + hq;
    const float inv = attn::out_scale(l[i]);  // 0: empty, NaN: poisoned
    const float lse = attn::OnlineSoftmax{m[i], l[i]}.lse();
    if (w.n_split > 1) {
      float* op = w.part_out + ((int64_t)split * p.T * p.Hq + row) * D;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        op[nb * 8 + 2 * qd] = o[nb][2 * i] * inv;
        op[nb * 8 + 2 * qd + 1] = o[nb][2 * i + 1] * inv;
      }
      if (qd == 0) w.part_lse[(int64_t)split * p.T * p.Hq + row] = lse;
    } else {
      T* op = static_cast<T*>(w.out) + row * D;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        store_float(op + nb * 8 + 2 * qd, o[nb][2 * i] * inv);
        store_float(op + nb * 8 + 2 * qd + 1, o[nb][2 * i + 1] * inv);
      }
      if (qd == 0) w.lse[row] = lse;
    }
  }
}

// One CTA per (t, hq) row: merge the n_split partials.
template <typename T>
__global__ void merge_splits_kernel(const float* part_out, const float* part_lse, int n_split, int64_t rows, int64_t D,
                                    T* out, float* lse) {
  const int64_t row = blockIdx.x;
  float L = part_lse[row];
  // the merged LSE first (every thread computes the same sequence of weights)
  for (int s = 1; s < n_split; ++s) L = attn::merge_weights(L, part_lse[(int64_t)s * rows + row]).lse;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    if (L != -INFINITY) {
      for (int s = 0; s < n_split; ++s) {
        const float ls = part_lse[(int64_t)s * rows + row];
        if (ls != -INFINITY) acc += __expf(ls - L) * part_out[((int64_t)s * rows + row) * D + d];
      }
    }
    store_float(out + row * D + d, acc);
  }
  if (threadIdx.x == 0) lse[row] = L;
}

// In-place merges alias lse_out with lse_a: the LSE is written by a second kernel after every
// output element has read the old value.
__global__ void merge_lse_kernel(int64_t n_rows, const float* la, const float* lb, float* lo) {
  for (int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; r < n_rows; r += (int64_t)gridDim.x * blockDim.x)
    lo[r] = attn::merge_weights(la[r], lb[r]).lse;
}

template <typename T>
__global__ void merge_states_out_kernel(int64_t n_rows, int64_t D, const T* a, const float* la, const T* b,
                                        const float* lb, T* out) {
  const int64_t n = n_rows * D;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / D;
    const attn::MergeWeights wts = attn::merge_weights(la[r], lb[r]);
    store_float(out + i, wts.wa * ld(a + i) + wts.wb * ld(b + i));
  }
}

__global__ void append_kernel(AppendCudaParams p) {
  // one CTA per (token, head); 16-bit units (every supported element is 2 or 4 bytes)
  const int64_t i = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int units = (int)(p.D * p.elem_size / 2);
  const int64_t es2 = p.elem_size / 2;  // 16-bit units per element
  const uint16_t* ks = static_cast<const uint16_t*>(p.k) + (i * p.k_stride_n + h * p.k_stride_h) * es2;
  const uint16_t* vs = static_cast<const uint16_t*>(p.v) + (i * p.v_stride_n + h * p.v_stride_h) * es2;
  uint16_t* kd = static_cast<uint16_t*>(p.k_cache) +
                 (p.page[i] * p.kc_stride[0] + p.off[i] * p.kc_stride[1] + h * p.kc_stride[2]) * es2;
  uint16_t* vd = static_cast<uint16_t*>(p.v_cache) +
                 (p.page[i] * p.vc_stride[0] + p.off[i] * p.vc_stride[1] + h * p.vc_stride[2]) * es2;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    kd[u] = ks[u];
    vd[u] = vs[u];
  }
}

__global__ void copy_pages_kernel(CopyPagesCudaParams p) {
  // one CTA per (copy, token, head) row
  const int64_t rows_per_page = p.page_size * p.H;
  const int64_t c = blockIdx.x / rows_per_page;
  const int64_t rem = blockIdx.x % rows_per_page;
  const int64_t tok = rem / p.H, h = rem % p.H;
  const int64_t es2 = p.elem_size / 2;
  uint16_t* base = static_cast<uint16_t*>(p.cache);
  const uint16_t* s = base + (p.src[c] * p.stride[0] + tok * p.stride[1] + h * p.stride[2]) * es2;
  uint16_t* d = base + (p.dst[c] * p.stride[0] + tok * p.stride[1] + h * p.stride[2]) * es2;
  const int units = (int)(p.D * es2);
  for (int u = threadIdx.x; u < units; u += blockDim.x) d[u] = s[u];
}

template <typename T, int D>
cudaError_t launch_main(const PagedParams& p, const PagedCudaWork& w, cudaStream_t st) {
  const dim3 grid((unsigned)w.n_tiles, (unsigned)p.Hkv, (unsigned)w.n_split);
  if constexpr (!std::is_same<T, float>::value && D <= 128) {
    if (w.use_mma) {
      const size_t smem = MmaSmem<T, D>::kBytes;
      cudaError_t e = cudaFuncSetAttribute(paged_mq_mma_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)smem);
      if (e != cudaSuccess) return e;
      paged_mq_mma_kernel<T, D><<<grid, kThreads, smem, st>>>(p, w);
      return cudaGetLastError();
    }
  }
  const size_t smem = Smem<T, D>::kBytes;
  cudaError_t e = cudaFuncSetAttribute(paged_attn_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  paged_attn_kernel<T, D><<<grid, kThreads, smem, st>>>(p, w);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_attn(const PagedParams& p, const PagedCudaWork& w, cudaStream_t st) {
  cudaError_t e = launch_main<T, D>(p, w, st);
  if (e != cudaSuccess || w.n_split <= 1) return e;
  const int64_t rows = p.T * p.Hq;
  merge_splits_kernel<T><<<(unsigned)rows, 64, 0, st>>>(w.part_out, w.part_lse, w.n_split, rows, p.D,
                                                         static_cast<T*>(w.out), w.lse);
  return cudaGetLastError();
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return (unsigned)(g < 65535 ? (g > 0 ? g : 1) : 65535);
}

}  // namespace

int paged_attention_cuda(const PagedParams& p, const PagedCudaWork& w, void* stream) {
  if (w.n_tiles == 0) return 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSuccess;
  TT_DISPATCH_FLOAT(p.dtype, T, TT_DISPATCH_HEAD_DIM(p.D, D, e = launch_attn<T, D>(p, w, st)))
  return (int)e;
}

int merge_states_cuda(DType dtype, int64_t n_rows, int64_t D, const void* a, const float* lse_a, const void* b,
                      const float* lse_b, void* out, float* lse_out, void* stream) {
  if (n_rows == 0) return 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  TT_DISPATCH_FLOAT(dtype, T, {
    merge_states_out_kernel<T><<<grid_for(n_rows * D, 256), 256, 0, st>>>(
        n_rows, D, static_cast<const T*>(a), lse_a, static_cast<const T*>(b), lse_b, static_cast<T*>(out));
  });
  merge_lse_kernel<<<grid_for(n_rows, 256), 256, 0, st>>>(n_rows, lse_a, lse_b, lse_out);
  return (int)cudaGetLastError();
}

int append_paged_kv_cuda(const AppendCudaParams& p, void* stream) {
  if (p.N == 0 || p.H == 0) return 0;
  append_kernel<<<(unsigned)(p.N * p.H), 64, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return (int)cudaGetLastError();
}

int copy_pages_cuda(const CopyPagesCudaParams& p, void* stream) {
  if (p.n == 0) return 0;
  copy_pages_kernel<<<(unsigned)(p.n * p.page_size * p.H), 64, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return (int)cudaGetLastError();
}

}  // namespace paged
}  // namespace ttscale
