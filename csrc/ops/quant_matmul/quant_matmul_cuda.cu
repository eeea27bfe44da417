// CUDA low-bit weight-only matmul (torch-free; launched from quant_matmul.cpp). Compile-checked
// only so far: no GPU has run these kernels yet.
//
// Weights in layout "cuda_k32" (quant_matmul.h): row n of W is a bit stream of K codes, 32 codes
// (a chunk, inside one group) per `bits` words; codes are read with the chunk_code helper the CPU
// repack ops (and so the CPU tests) use.
//
// GEMV (M <= kCudaGemvMaxM, and every M for fp32 activations): memory-bound SIMT kernel. A CTA of
// 4 warps covers 8 output rows (2 per warp, so each x value read from L1 feeds 2 rows); the lanes
// of a warp take consecutive chunks (coalesced: 32 * bits words per warp step, vector loads for 2,
// 4 and 8 bits). Per 8 codes and row m: qx = sum q * x, xs = sum x, then
// acc += s * (qx - z * xs) (fp32, codes exact). Warp-shuffle reduction at the end. grid.y covers
// rows of x in chunks of MR.
//
// GEMM (fp16/bf16 activations, M > kCudaGemvMaxM): tensor cores, mma.sync m16n8k16 with fp32
// accumulators. A CTA of 4 warps computes a 32 (M) x 128 (N) tile of y; each warp owns 32 columns
// (4 n8 tiles) and both m16 tiles, so every code is dequantised by exactly one warp of the CTA.
// The B operand is (q - z), exact in fp16/bf16 (|q - z| <= 256), built in registers from the
// chunk words (no shared memory); A fragments are read straight from global x (L1/L2 resident).
// Products accumulate per group in a temporary fragment, which is then scaled by s (fp32) into
// the output accumulators: y = sum_g s_g * (x_g @ (q_g - z_g)), the reference up to fp32
// summation order. Not tuned yet (no cp.async pipeline, no ldmatrix): a correct first version.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_mma.cuh"
#include "common/dtype.h"
#include "ops/quant_matmul/quant_matmul.h"
#include "ops/quant_matmul/quant_matmul_cuda.h"

namespace ttscale {
namespace quant_matmul {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kGemvRowsPerWarp = 2;
constexpr int kGemvRowsPerCta = kWarps * kGemvRowsPerWarp;
constexpr int kGemmBM = 32;            // rows of x per CTA (2 m16 tiles)
constexpr int kGemmWarpN = 32;         // output columns per warp (4 n8 tiles)
constexpr int kGemmBN = kWarps * kGemmWarpN;

TT_DEVICE float ldx(const float* p) { return __ldg(p); }
// fp16/bf16 conversions with the hardware instructions (round to nearest even, like dtype.h's
// bit-exact host versions; the branchy software fp16 path cost registers and spills here).
TT_DEVICE float ldx(const half_t* p) { return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p)))); }
TT_DEVICE float ldx(const bf16_t* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// The BITS words of one chunk (16-byte / 8-byte loads where the chunk is aligned to them: row
// strides K*BITS/32 words with K % 32 == 0 keep 2-, 4- and 8-bit chunks aligned).
template <int BITS>
TT_DEVICE void load_chunk(const uint32_t* p, uint32_t* w) {
  if constexpr (BITS == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (BITS == 8) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p)), b = __ldg(reinterpret_cast<const uint4*>(p) + 1);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
  } else if constexpr (BITS == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);
  }
}

TT_DEVICE void store_out(float* p, float v) { *p = v; }
TT_DEVICE void store_out(half_t* p, float v) { p->bits = __half_as_ushort(__float2half_rn(v)); }
TT_DEVICE void store_out(bf16_t* p, float v) { p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// ---------------------------------------------------------------- GEMV
template <int BITS, int MR, typename T>
__global__ void __launch_bounds__(kThreads) qmm_gemv(const QmmCudaParams p) {
  constexpr int R = kGemvRowsPerWarp;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = (int64_t)blockIdx.x * kGemvRowsPerCta + warp * R;
  const int64_t m0 = (int64_t)blockIdx.y * MR;
  if (n0 >= p.N) return;
  const int mc = (int)(p.M - m0 < MR ? p.M - m0 : MR);
  const T* x = static_cast<const T*>(p.x) + m0 * p.K;
  const int64_t rw = p.K / 32 * BITS, ng = p.K / p.G, nchunks = p.K / 32;
  const float zsym = (float)(1 << (BITS - 1));

  float acc[R][MR];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[r][m] = 0.0f;

  for (int64_t c = lane; c < nchunks; c += 32) {
    const int64_t k0 = c * 32, g = k0 / p.G;
    uint32_t w[R][BITS];
    float s[R], z[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      if (n < p.N) {
        load_chunk<BITS>(p.codes + n * rw + c * BITS, w[r]);
        s[r] = __ldg(p.scales + n * ng + g);
        z[r] = p.zeros ? (float)__ldg(p.zeros + n * ng + g) : zsym;
      } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[r][i] = 0u;
        s[r] = 0.0f; z[r] = 0.0f;
      }
    }
#pragma unroll
    for (int j0 = 0; j0 < 32; j0 += 8) {
      float xv[MR][8], xs[MR];
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        xs[m] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          xv[m][e] = m < mc ? ldx(x + m * p.K + k0 + j0 + e) : 0.0f;
          xs[m] += xv[m][e];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float qx[MR];
#pragma unroll
        for (int m = 0; m < MR; ++m) qx[m] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float q = (float)chunk_code(w[r], BITS, j0 + e);
#pragma unroll
          for (int m = 0; m < MR; ++m) qx[m] = fmaf(q, xv[m][e], qx[m]);
        }
#pragma unroll
        for (int m = 0; m < MR; ++m) acc[r][m] = fmaf(s[r], qx[m] - z[r] * xs[m], acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MR; ++m)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
  if (lane == 0) {
    T* y = static_cast<T*>(p.y);
    const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t n = n0 + r;
      if (n >= p.N) continue;
      const float b = bias ? ldx(bias + n) : 0.0f;
#pragma unroll
      for (int m = 0; m < MR; ++m)
        if (m < mc) store_out(y + (m0 + m) * p.N + n, acc[r][m] + b);
    }
  }
}

// ---------------------------------------------------------------- GEMM (tensor cores)
// The A-operand register holding x[row][k], x[row][k+1] (k even; zero outside the M rows).
template <typename T>
TT_DEVICE uint32_t load_a(const T* x, int64_t row, int64_t M, int64_t K, int64_t k) {
  if (row >= M) return 0u;
  return __ldg(reinterpret_cast<const unsigned int*>(x + row * K + k));
}

template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads) qmm_gemm_tc(const QmmCudaParams p) {
  constexpr int MT = kGemmBM / 16, NT = kGemmWarpN / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment coordinates (group, thread in group)
  const int64_t mbase = (int64_t)blockIdx.y * kGemmBM;
  const int64_t nbase = (int64_t)blockIdx.x * kGemmBN + warp * kGemmWarpN;
  if (nbase >= p.N) return;
  const T* x = static_cast<const T*>(p.x);
  const int64_t rw = p.K / 32 * BITS, ng = p.K / p.G, nchunks = p.K / 32;
  const int64_t chunks_per_group = p.G / 32;
  const float zsym = (float)(1 << (BITS - 1));

  float acc[MT][NT][4], tmp[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = tmp[i][j][e] = 0.0f;

  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t k0 = c * 32, g = k0 / p.G;
    // B operand column of this thread in n8 tile j: n = nbase + 8j + gq.
    uint32_t w[NT][BITS];
    float zc[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t n = nbase + 8 * j + gq;
      if (n < p.N) {
        load_chunk<BITS>(p.codes + n * rw + c * BITS, w[j]);
        zc[j] = p.zeros ? (float)__ldg(p.zeros + n * ng + g) : zsym;
      } else {
#pragma unroll
        for (int i = 0; i < BITS; ++i) w[j][i] = 0u;
        zc[j] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {  // two k16 steps per chunk
      const int kk = ks * 16;
      uint32_t a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t r0 = mbase + 16 * i + gq;
        a[i][0] = load_a(x, r0, p.M, p.K, k0 + kk + 2 * tq);
        a[i][1] = load_a(x, r0 + 8, p.M, p.K, k0 + kk + 2 * tq);
        a[i][2] = load_a(x, r0, p.M, p.K, k0 + kk + 2 * tq + 8);
        a[i][3] = load_a(x, r0 + 8, p.M, p.K, k0 + kk + 2 * tq + 8);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int jb = kk + 2 * tq;
        uint32_t b[2];
        b[0] = cuda::pack2<T>((float)chunk_code(w[j], BITS, jb) - zc[j], (float)chunk_code(w[j], BITS, jb + 1) - zc[j]);
        b[1] = cuda::pack2<T>((float)chunk_code(w[j], BITS, jb + 8) - zc[j], (float)chunk_code(w[j], BITS, jb + 9) - zc[j]);
#pragma unroll
        for (int i = 0; i < MT; ++i) cuda::mma_m16n8k16<T>(tmp[i][j], a[i], b);
      }
    }
    if ((c + 1) % chunks_per_group == 0) {  // end of group g: acc += s * tmp
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t n = nbase + 8 * j + 2 * tq;  // C fragment columns n, n + 1
        const float s0 = n < p.N ? __ldg(p.scales + n * ng + g) : 0.0f;
        const float s1 = n + 1 < p.N ? __ldg(p.scales + (n + 1) * ng + g) : 0.0f;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          acc[i][j][0] = fmaf(s0, tmp[i][j][0], acc[i][j][0]);
          acc[i][j][1] = fmaf(s1, tmp[i][j][1], acc[i][j][1]);
          acc[i][j][2] = fmaf(s0, tmp[i][j][2], acc[i][j][2]);
          acc[i][j][3] = fmaf(s1, tmp[i][j][3], acc[i][j][3]);
#pragma unroll
          for (int e = 0; e < 4; ++e) tmp[i][j][e] = 0.0f;
        }
      }
    }
  }
  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t n = nbase + 8 * j + 2 * tq + (e & 1);
      if (n >= p.N) continue;
      const float b = bias ? ldx(bias + n) : 0.0f;
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t m = mbase + 16 * i + gq + (e >> 1) * 8;
        if (m < p.M) store_out(y + m * p.N + n, acc[i][j][e] + b);
      }
    }
  }
}

// ---------------------------------------------------------------- launchers
template <int BITS, int MR, typename T>
int launch_gemv(const QmmCudaParams& p, cudaStream_t s) {
  const dim3 grid((unsigned)((p.N + kGemvRowsPerCta - 1) / kGemvRowsPerCta), (unsigned)((p.M + MR - 1) / MR));
  qmm_gemv<BITS, MR, T><<<grid, kThreads, 0, s>>>(p);
  return (int)cudaGetLastError();
}

template <int BITS, typename T>
int launch_t(const QmmCudaParams& p, cudaStream_t s) {
  if (p.M > kCudaGemvMaxM) {
    if constexpr (sizeof(T) == 2) {
      const dim3 grid((unsigned)((p.N + kGemmBN - 1) / kGemmBN), (unsigned)((p.M + kGemmBM - 1) / kGemmBM));
      qmm_gemm_tc<BITS, T><<<grid, kThreads, 0, s>>>(p);
      return (int)cudaGetLastError();
    }
    return launch_gemv<BITS, 8, T>(p, s);  // fp32 activations: exact SIMT path for every M
  }
  if (p.M <= 1) return launch_gemv<BITS, 1, T>(p, s);
  if (p.M <= 2) return launch_gemv<BITS, 2, T>(p, s);
  if (p.M <= 4) return launch_gemv<BITS, 4, T>(p, s);
  return launch_gemv<BITS, 8, T>(p, s);
}

template <int BITS>
int launch_bits(const QmmCudaParams& p, cudaStream_t s) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_t<BITS, half_t>(p, s);
    case DType::kBFloat16: return launch_t<BITS, bf16_t>(p, s);
    default: return launch_t<BITS, float>(p, s);
  }
}

}  // namespace

int quant_matmul_cuda(const QmmCudaParams& p, void* stream) {
  if (p.M == 0 || p.N == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.bits) {
    case 2: return launch_bits<2>(p, s);
    case 3: return launch_bits<3>(p, s);
    case 8: return launch_bits<8>(p, s);
    default: return launch_bits<4>(p, s);
  }
}

}  // namespace quant_matmul
}  // namespace ttscale
