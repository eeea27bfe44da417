// CUDA kernels of page summaries and query-aware sparse paged decode (torch-free; launcher interface
// in sparse_paged_attention_cuda.h). NOT YET RUN ON A GPU: compiled for sm_80 / sm_90a by
// tools/cuda_compile_check.sh only. The per-element math (summarize_elem, quest_term, page_tokens,
// forced_page, attn::merge_weights) is the TT_HD code of sparse_paged_attention.h that the CPU tests
// exercise; selection follows the same total order (ranks_before: score descending, ties to the
// lower page index, NaN last), implemented as a radix select on value_key.
//
//   summarize_kernel   grid (pages, Hkv), threads over D
//   score_kernel       grid (score items), a warp per (page, KV head): lanes over D, warp sum, max over
//                      the group's query heads
//   select_kernel      grid (B * Hkv), 256 threads: 8-bit radix select of the top_k-th key of the
//                      middle pages, then an in-order compaction (block scans) of the kept pages
//   attend_kernel      grid (B * Hkv, n_split, group chunks of kCudaMaxGroupRows), 4 warps, each warp
//                      a strided share of the kept pages, online softmax per row, warps merged in smem
//   merge_kernel       grid (B * Hq): merges the n_split partials, writes out (q's dtype) and lse
//
// Non-finite contract of attention_math.h (compile-checked only): attend_kernel reads only the keys
// of kept pages (the last one up to kv_last_page_len), so no masked key is ever loaded. A NaN / +inf
// score (attn::poisons) makes the row's l NaN (sticky); the warps' merge
// keeps that NaN (a NaN l of a warp that saw no finite score used to vanish behind its -inf max), and
// the row writes O * attn::out_scale(L) and OnlineSoftmax::lse() (NaN). A -inf score adds weight 0
// (exp(-inf - -inf) was NaN for a row that had seen nothing yet).
#include "ops/sparse_paged_attention/sparse_paged_attention_cuda.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_math.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"

namespace ttscale {
namespace sparse {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kSelectThreads = 256;

// ---------------------------------------------------------------- summaries
template <typename T>
__global__ void summarize_kernel(SummaryParams sp) {
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int64_t page = sp.pages[i], n = sp.lens[i];
  const T* k0 = static_cast<const T*>(sp.k_cache) + page * sp.k_stride_page + h * sp.k_stride_head;
  T* base = static_cast<T*>(sp.summaries) + page * sp.s_stride_page + h * sp.s_stride_head;
  for (int64_t d = threadIdx.x; d < sp.D; d += blockDim.x)
    summarize_elem<T>(k0, sp.k_stride_tok, n, d, base + kMin * sp.s_stride_kind, base + kMax * sp.s_stride_kind,
                      base + kMean * sp.s_stride_kind);
}

// ---------------------------------------------------------------- scoring
template <typename T>
__global__ void __launch_bounds__(kThreads) score_kernel(SparseParams s, SparseCudaWork w) {
  const paged::PagedParams& p = s.p;
  const ScoreItem it = w.items[blockIdx.x];
  const int64_t Hkv = p.Hkv, group = p.Hq / p.Hkv, D = p.D;
  const int lane = cuda::lane_id();
  const T* q = static_cast<const T*>(p.q) + (int64_t)it.b * p.q_stride_t;
  const T* sc = static_cast<const T*>(s.summaries);
  const int64_t base_j = p.kv_indptr[it.b];
  const int64_t n_pairs = (int64_t)(it.j1 - it.j0) * Hkv;
  for (int64_t pr = cuda::warp_id(); pr < n_pairs; pr += kWarps) {
    const int64_t j = it.j0 + pr / Hkv, h = pr % Hkv;
    const T* sb = sc + (int64_t)p.kv_indices[base_j + j] * s.s_stride_page + h * s.s_stride_head;
    const T* mn = sb + kMin * s.s_stride_kind;
    const T* mx = sb + kMax * s.s_stride_kind;
    float best = -INFINITY;
    for (int64_t g = 0; g < group; ++g) {
      const T* qr = q + (h * group + g) * p.q_stride_h;
      float acc = 0.0f;
      for (int64_t d = lane; d < D; d += 32)
        acc += quest_term(cuda::load_elem(qr + d), cuda::load_elem(mn + d), cuda::load_elem(mx + d));
      acc = cuda::warp_reduce(acc, cuda::SumOp());
      best = acc > best ? acc : best;
    }
    if (lane == 0) w.scores[(base_j + j) * Hkv + h] = best;
  }
}

// ---------------------------------------------------------------- selection
// Order key of a score: value_key (larger score <=> larger key, -0 == +0); NaN ranks last (key 0,
// below value_key(-inf)).
__device__ __forceinline__ uint32_t score_key(float v) { return v != v ? 0u : cuda::value_key(v); }

__global__ void __launch_bounds__(kSelectThreads) select_kernel(SparseParams s, SparseCudaWork w) {
  const paged::PagedParams& p = s.p;
  const int64_t Hkv = p.Hkv;
  const int64_t b = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const int64_t base_j = p.kv_indptr[b];
  const int64_t np = (int64_t)p.kv_indptr[b + 1] - base_j;
  int32_t* out = w.selected + (int64_t)blockIdx.x * s.budget;
  const int tid = threadIdx.x;
  if (np <= s.budget) {
    for (int64_t j = tid; j < np; j += kSelectThreads) out[j] = (int32_t)j;
    return;
  }
  const float* sc = w.scores + base_j * Hkv + h;  // stride Hkv
  const int64_t c0 = s.sink, c1 = np - s.local;    // candidates [c0, c1), more than top_k of them
  __shared__ unsigned hist[256];
  __shared__ uint32_t sh_prefix;
  __shared__ int64_t sh_remaining;
  __shared__ __align__(8) unsigned char red[33 * 8];
  // radix select: the top_k-th largest key T among the candidates, and how many keys equal to T are
  // kept (the rest of the top_k are the keys > T)
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = s.top_k;
  if (s.top_k == 0) {
    prefix = 0xFFFFFFFFu;  // no candidate key reaches it (NaN maps to 0, +inf to 0xFF800000)
  } else {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t j = c0 + tid; j < c1; j += kSelectThreads) {
        const uint32_t k = score_key(sc[j * Hkv]);
        if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t cum = 0;
        int bin = 255;
        for (; bin > 0; --bin) {
          if (cum + hist[bin] >= remaining) break;
          cum += hist[bin];
        }
        sh_prefix = prefix | ((uint32_t)bin << shift);
        sh_remaining = remaining - cum;
      }
      __syncthreads();
      prefix = sh_prefix;
      remaining = sh_remaining;
      mask |= 255u << shift;
      __syncthreads();
    }
  }
  // in-order compaction: forced pages, keys > T, and the first `remaining` keys == T
  int64_t kept_before = 0, eq_before = 0;
  for (int64_t j0 = 0; j0 < np; j0 += kSelectThreads) {
    const int64_t j = j0 + tid;
    bool cand = false, eq = false;
    uint32_t k = 0;
    if (j < np && j >= c0 && j < c1) {
      cand = true;
      k = score_key(sc[j * Hkv]);
      eq = k == prefix;
    }
    int eq_total = 0;
    const int eq_rank = cuda::block_exclusive_scan<kSelectThreads, int>(eq ? 1 : 0, red, &eq_total);
    const bool keep = j < np && (forced_page(j, np, s.sink, s.local) || (cand && k > prefix) ||
                                 (eq && eq_before + eq_rank < remaining));
    int kept_total = 0;
    const int pos = cuda::block_exclusive_scan<kSelectThreads, int>(keep ? 1 : 0, red, &kept_total);
    if (keep) out[kept_before + pos] = (int32_t)j;
    kept_before += kept_total;
    eq_before += eq_total;
  }
}

// ---------------------------------------------------------------- attention over the kept pages
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attend_kernel(SparseParams s, SparseCudaWork w) {
  constexpr int E = D / 32;  // elements per lane: d = lane + 32 * e
  constexpr int G = kCudaMaxGroupRows;
  const paged::PagedParams& p = s.p;
  const int64_t Hkv = p.Hkv, Hq = p.Hq, group = Hq / Hkv;
  const int64_t b = blockIdx.x / Hkv, h = blockIdx.x % Hkv;
  const int64_t g0 = (int64_t)blockIdx.z * G;
  const int ng = (int)(group - g0 < G ? group - g0 : G);
  const int lane = cuda::lane_id(), warp = cuda::warp_id();
  const int64_t base_j = p.kv_indptr[b];
  const int64_t np = (int64_t)p.kv_indptr[b + 1] - base_j;
  const int64_t n = np < s.budget ? np : s.budget;  // kept pages: a prefix of the selected row
  const int64_t per = (n + w.n_split - 1) / w.n_split;
  const int64_t k0 = per * blockIdx.y < n ? per * blockIdx.y : n;
  const int64_t k1 = k0 + per < n ? k0 + per : n;
  const int32_t* kept = w.selected + (int64_t)blockIdx.x * s.budget;

  float qv[G][E], acc[G][E], m[G], l[G];
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_t;
#pragma unroll
  for (int r = 0; r < G; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[r][e] = 0.0f;
      qv[r][e] = r < ng ? cuda::load_elem(qb + (h * group + g0 + r) * p.q_stride_h + lane + 32 * e) * p.scale : 0.0f;
    }
  }
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  for (int64_t i = k0 + warp; i < k1; i += kWarps) {
    const int64_t j = kept[i];
    const int64_t page = p.kv_indices[base_j + j];
    const int64_t ntok = page_tokens(j, np, p.kv_last_page_len[b], p.page_size);
    for (int64_t t = 0; t < ntok; ++t) {
      const T* kr = kc + page * p.k_stride_page + t * p.k_stride_tok + h * p.k_stride_head;
      const T* vr = vc + page * p.v_stride_page + t * p.v_stride_tok + h * p.v_stride_head;
      float kx[E], vx[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        kx[e] = cuda::load_elem(kr + lane + 32 * e);
        vx[e] = cuda::load_elem(vr + lane + 32 * e);
      }
#pragma unroll
      for (int r = 0; r < G; ++r) {
        if (r >= ng) break;
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot += qv[r][e] * kx[e];
        dot = cuda::warp_reduce(dot, cuda::SumOp());  // the same value in every lane (commutative butterfly)
        const float m_new = dot > m[r] ? dot : m[r];  // a NaN dot leaves m, +inf makes it +inf (row NaN)
        const float alpha = m[r] == -INFINITY ? 0.0f : __expf(m[r] - m_new);
        const float pr = m_new == -INFINITY ? 0.0f : __expf(dot - m_new);  // a -inf score weighs 0
        l[r] = l[r] * alpha + pr;
        // NaN / +inf score: l = NaN (OnlineSoftmax::poison), sticky through later l * alpha + pr
        if (attn::poisons(dot)) l[r] = NAN;
        m[r] = m_new;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * alpha + pr * vx[e];
      }
    }
  }
  // merge the warps' states
  __shared__ float sm[kWarps][G], sl[kWarps][G];
  __shared__ float so[kWarps][G][D];
#pragma unroll
  for (int r = 0; r < G; ++r) {
    if (lane == 0) { sm[warp][r] = m[r]; sl[warp][r] = l[r]; }
#pragma unroll
    for (int e = 0; e < E; ++e) so[warp][r][lane + 32 * e] = acc[r][e];
  }
  __syncthreads();
  const int64_t rows = (int64_t)gridDim.x / Hkv * Hq;  // B * Hq
  for (int idx = threadIdx.x; idx < ng * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float M = -INFINITY;
    bool poisoned = false;  // a warp's l is NaN, whatever its max (it may be -inf)
    for (int x = 0; x < kWarps; ++x) {
      M = sm[x][r] > M ? sm[x][r] : M;
      poisoned = poisoned || sl[x][r] != sl[x][r];
    }
    float L = 0.0f, O = 0.0f;
    if (M != -INFINITY) {
      for (int x = 0; x < kWarps; ++x) {
        // a warp that saw no key has acc = 0 and l = 0 (weight 0 adds exactly 0); one whose keys all
        // scored -inf keeps the IEEE 0 * v of its visible keys, as a single online softmax would
        const float f = sm[x][r] == -INFINITY ? 0.0f : __expf(sm[x][r] - M);
        L += sl[x][r] * f;
        O += so[x][r][d] * f;
      }
    }
    if (poisoned) L = NAN;
    const int64_t row = b * Hq + h * group + g0 + r;
    w.part_out[((int64_t)blockIdx.y * rows + row) * D + d] = O * attn::out_scale(L);
    if (d == 0) w.part_lse[(int64_t)blockIdx.y * rows + row] = attn::OnlineSoftmax{M, L}.lse();
  }
}

template <typename T>
__global__ void merge_kernel(const float* part_out, const float* part_lse, int n_split, int64_t rows, int64_t D,
                             T* out, float* lse) {
  const int64_t r = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float l = part_lse[r], o = part_out[r * D + d];
    for (int x = 1; x < n_split; ++x) {
      const attn::MergeWeights mw = attn::merge_weights(l, part_lse[x * rows + r]);
      o = mw.wa * o + mw.wb * part_out[(x * rows + r) * D + d];
      l = mw.lse;
    }
    store_float(out + r * D + d, o);
    if (d == 0) lse[r] = l;
  }
}

template <typename T, int D>
cudaError_t launch(const SparseParams& s, const SparseCudaWork& w, cudaStream_t st) {
  const int64_t B = s.p.B, Hkv = s.p.Hkv, group = s.p.Hq / s.p.Hkv;
  if (w.n_items > 0) score_kernel<T><<<(unsigned)w.n_items, kThreads, 0, st>>>(s, w);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  select_kernel<<<(unsigned)(B * Hkv), kSelectThreads, 0, st>>>(s, w);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const unsigned g_chunks = (unsigned)((group + kCudaMaxGroupRows - 1) / kCudaMaxGroupRows);
  const dim3 grid((unsigned)(B * Hkv), (unsigned)w.n_split, g_chunks);
  attend_kernel<T, D><<<grid, kThreads, 0, st>>>(s, w);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  merge_kernel<T><<<(unsigned)(B * s.p.Hq), 64, 0, st>>>(w.part_out, w.part_lse, w.n_split, B * s.p.Hq, D,
                                                       static_cast<T*>(w.out), w.lse);
  return cudaGetLastError();
}

}  // namespace

int summarize_pages_cuda(const SummaryParams& sp, void* stream) {
  if (sp.n == 0) return 0;
  const dim3 grid((unsigned)sp.n, (unsigned)sp.Hkv);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TT_DISPATCH_FLOAT(sp.dtype, T, summarize_kernel<T><<<grid, 128, 0, st>>>(sp))
  return (int)cudaGetLastError();
}

int sparse_paged_attention_cuda(const SparseParams& s, const SparseCudaWork& w, void* stream) {
  cudaError_t e = cudaSuccess;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  TT_DISPATCH_FLOAT(s.p.dtype, T, TT_DISPATCH_HEAD_DIM(s.p.D, D, e = launch<T, D>(s, w, st)))
  return (int)e;
}

}  // namespace sparse
}  // namespace ttscale
