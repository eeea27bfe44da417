// Low-bit weight-only matmul: schema, validation and the CPU implementation (parallel over blocks
// of 16 output rows with at::parallel_for over the per-ISA block kernels), the host-side repack ops
// of the CUDA layout, and under TTSCALE_WITH_CUDA the CUDA registration (quant_matmul_cuda.cu;
// compile-checked only so far). Layouts and algorithms: quant_matmul.h.
#include "ops/quant_matmul/quant_matmul.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/cpu_dispatch.h"

#if defined(TTSCALE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "ops/quant_matmul/quant_matmul_cuda.h"
#endif

TT_DECLARE_CPU_KERNELS(ttscale::quant_matmul::CpuKernels, quant_matmul_kernels)

namespace ttscale {
namespace quant_matmul {
namespace {

using at::Tensor;

struct Shape {
  int64_t M, N, K, G, nb;
};

Shape validate(const Tensor& x, const Tensor& packed, const Tensor& scales, const c10::optional<Tensor>& zeros,
               int64_t bits, int64_t group_size, const c10::optional<Tensor>& bias) {
  TT_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  check_float_dtype(x, "x");
  TT_CHECK(x.dim() >= 1, "x must have at least one dimension [..., K], got shape ", x.sizes());
  TT_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TT_CHECK(packed.dim() == 3 && packed.size(2) == 2 * bits, "packed must be 3-D [ceil(N/16), K, 2*bits] = [*, *, ",
           2 * bits, "] (layout cpu_n16), got shape ", packed.sizes());
  TT_CHECK(packed.is_contiguous(), "packed must be contiguous");
  check_device(packed, "packed", x, "x");
  check_device(scales, "scales", x, "x");
  check_float_dtype(scales, "scales");
  TT_CHECK(scales.dim() == 2, "scales must be 2-D [N, K/group_size], got shape ", scales.sizes());
  Shape s;
  s.K = packed.size(1);
  s.N = scales.size(0);
  s.nb = packed.size(0);
  TT_CHECK_VALUE(s.K > 0, "packed must have K > 0 input features, got shape ", packed.sizes());
  TT_CHECK(x.size(-1) == s.K, "x last dimension must equal the weight's in_features K = ", s.K, ", got shape ", x.sizes());
  TT_CHECK_VALUE(group_size >= 1 && s.K % group_size == 0, "group_size must divide K = ", s.K, ", got ", group_size);
  s.G = group_size;
  TT_CHECK(scales.size(1) == s.K / s.G, "scales must be [N, K/group_size] = [", s.N, ", ", s.K / s.G, "], got shape ",
           scales.sizes());
  TT_CHECK(s.nb == (s.N + kNB - 1) / kNB, "packed must have ceil(N/16) = ", (s.N + kNB - 1) / kNB,
           " row blocks for N = ", s.N, ", got shape ", packed.sizes());
  if (zeros) {
    check_device(*zeros, "zeros", x, "x");
    TT_CHECK(zeros->scalar_type() == at::kByte, "zeros must be uint8, got ", zeros->scalar_type());
    TT_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the shape of scales ", scales.sizes(), ", got ",
             zeros->sizes());
  }
  if (bias) {
    check_device(*bias, "bias", x, "x");
    TT_CHECK(bias->dim() == 1 && bias->size(0) == s.N, "bias must be 1-D [N] = [", s.N, "], got shape ", bias->sizes());
    TT_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype must equal x dtype (", x.scalar_type(), "), got ",
             bias->scalar_type());
  }
  s.M = x.numel() / s.K;
  return s;
}

// Threads over blocks (common to both CPU paths): `body(b0, b1, next)` for ranges of work units.
// Each thread owns a contiguous share of the units and takes them `chunk` at a time from its own
// counter (its own cache line: a counter shared by all threads cost a cache-line transfer per grab,
// ~3% of an M = 1 call on 2 cores); a thread that finishes its share takes units from the others'
// counters, so a thread slowed down by other load on the machine does not hold up the rest (static
// halves did). `next` is the unit this thread will most likely run after b1 - 1 (b1 inside its
// share, else -1: unknown), for prefetching. Small products (a small model's decode step) stay on
// the calling thread (common/parallel.h).
template <class F>
void for_blocks(int64_t units, double macs, const F& body) {
  const bool small = macs < 2.0 * kMinParallelMacs;
  const int64_t nthreads = small ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  // small grabs (one super-block of a 4096-row weight): a thread preempted by another process
  // holds back at most one unit's work (~5 us at M = 1)
  const int64_t chunk = std::max<int64_t>(1, units / (nthreads * 64));
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::vector<Share> share(nthreads);
  for (int64_t t = 0; t < nthreads; ++t) {
    share[t].next.store(t * units / nthreads, std::memory_order_relaxed);
    share[t].end = (t + 1) * units / nthreads;
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t v = 0; v < nthreads; ++v) {  // own share first, then the others'
        Share& sh = share[(t + v) % nthreads];
        for (;;) {
          const int64_t b0 = sh.next.fetch_add(chunk, std::memory_order_relaxed);
          if (b0 >= sh.end) break;
          const int64_t b1 = std::min(b0 + chunk, sh.end);
          body(b0, b1, v == 0 && b1 < sh.end ? b1 : (int64_t)-1);
        }
      }
  });
}

// Rows [u0 * rows_per_unit, u1 * rows_per_unit) of a row-major [rows, width] array of `elem`-byte
// items as (first byte, 64-byte lines), clipped to `rows`; for DpArgs::pf_side.
inline std::pair<const char*, int64_t> row_lines(const void* base, int64_t u0, int64_t u1, int64_t rows_per_unit,
                                                 int64_t rows, int64_t width, int64_t elem) {
  if (!base || u0 < 0) return {nullptr, 0};
  const int64_t r0 = std::min(u0 * rows_per_unit, rows), r1 = std::min(u1 * rows_per_unit, rows);
  const char* p = (const char*)base + r0 * width * elem;
  const int64_t bytes = (r1 - r0) * width * elem;
  return {p, bytes > 0 ? (bytes + ((uintptr_t)p & 63) + 63) / 64 : 0};
}

// avx512bf16 path for bf16 / fp16 x (quant_matmul.h, DpArgs): x as exact bf16 terms (bf16: x
// itself; fp16: hi = bf16(x), lo = bf16(x - hi), exact since fp16 has 11 significant bits), each
// term a row of the kernel's input; chunk sums of the terms; super-blocks of two 16-row blocks.
Tensor quant_matmul_dp(const CpuKernels* kern, const Tensor& x2, const Tensor& packed, const Tensor& scales,
                       const c10::optional<Tensor>& zeros, int64_t bits, int64_t G, int64_t N) {
  const int64_t M = x2.size(0), K = x2.size(1), ng = K / G, nb = packed.size(0);
  const int64_t T = x2.scalar_type() == at::kHalf ? 2 : 1, Mt = M * T;
  const int64_t C = dp_chunk(K, G), nc = (K + C - 1) / C;
  // x terms as bf16 [Mt, Kp] (zero-padded to whole chunks and an even length, for the pair view)
  // and their chunk sums [Mt, nc]. A decode step's x is tiny: a plain loop here avoids the ~5
  // torch ops (each a parallel region: ~5-10 us, and a whole time slice when the other core is
  // busy); larger x goes through vectorised torch ops.
  // Row stride Ks = Kp + 32 bf16 (64 bytes more): with K a multiple of 2048 the rows of x would be
  // a multiple of 4 KiB apart and every row's slice of a tile would fall in the same L1 sets.
  const int64_t Kp = (nc * C + 1) / 2 * 2, Ks = Kp + (Mt > 1 ? 32 : 0), ldxb = Ks / 2;
  Tensor xb, xsum;
  if (Mt * K <= (1 << 16)) {
    xb = at::zeros({Mt, Ks}, x2.options().dtype(at::kShort));
    xsum = at::empty({Mt, nc}, x2.options().dtype(at::kFloat));
    const Tensor xc = x2.contiguous();
    const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    uint16_t* dst = reinterpret_cast<uint16_t*>(xb.data_ptr());
    float* xs = xsum.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < nc; ++c) {
        float acc[2] = {0.0f, 0.0f};
        const int64_t k1 = std::min(K, (c + 1) * C);
        if (T == 1) {  // 16 partial sums: a loop the compiler vectorises (one running sum is serial)
          float part[16] = {0.0f};
          int64_t k = c * C;
          for (; k + 16 <= k1; k += 16)
            for (int i = 0; i < 16; ++i) {
              const uint16_t v = src[m * K + k + i];
              dst[m * Ks + k + i] = v;
              part[i] += bf16_bits_to_float(v);
            }
          for (; k < k1; ++k) {
            dst[m * Ks + k] = src[m * K + k];
            part[0] += bf16_bits_to_float(src[m * K + k]);
          }
          for (int i = 0; i < 16; ++i) acc[0] += part[i];
        } else {  // fp16 = hi + lo exactly (module comment)
          for (int64_t k = c * C; k < k1; ++k) {
            const float f = half_bits_to_float(src[m * K + k]);
            const uint16_t hi = float_to_bf16_bits(f), lo = float_to_bf16_bits(f - bf16_bits_to_float(hi));
            dst[(2 * m) * Ks + k] = hi;
            dst[(2 * m + 1) * Ks + k] = lo;
            acc[0] += bf16_bits_to_float(hi);
            acc[1] += bf16_bits_to_float(lo);
          }
        }
        for (int64_t t = 0; t < T; ++t) xs[(m * T + t) * nc + c] = acc[t];
      }
  } else {
    Tensor xt;
    if (T == 1) {
      xt = x2;
    } else {
      const Tensor hi = x2.to(at::kBFloat16);
      const Tensor lo = (x2.to(at::kFloat) - hi.to(at::kFloat)).to(at::kBFloat16);
      xt = at::stack({hi, lo}, 1).reshape({Mt, K});
    }
    const Tensor xpad = at::constant_pad_nd(xt, {0, nc * C - K}, 0).contiguous();
    xsum = xpad.to(at::kFloat).view({Mt, nc, C}).sum(-1).contiguous();
    xb = Ks == nc * C ? xpad : at::constant_pad_nd(xpad, {0, Ks - nc * C}, 0).contiguous();
  }

  const Tensor sf = scales.to(at::kFloat).contiguous();
  const Tensor zf = zeros ? zeros->contiguous() : Tensor();
  Tensor y = at::empty({M, N}, x2.options().dtype(at::kFloat));
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb.data_ptr());
  const float* xsp = xsum.data_ptr<float>();
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  const uint8_t* zp = zeros ? zf.data_ptr<uint8_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float off = dp_code_offset((int)bits);
  const float zsym = (float)(1 << (bits - 1));
  const int64_t rec = 2 * bits, nsb = (nb + 1) / 2, L = kNB * kDpMaxNr;

  for_blocks(nsb, (double)M * (double)N * (double)K, [&](int64_t sb0, int64_t sb1, int64_t next) {
    thread_local std::vector<float> sbuf, zbuf, ybuf;
    thread_local std::vector<uint8_t> tile_raw;
    sbuf.resize(ng * L); zbuf.resize(ng * L); ybuf.resize(Mt * L);
    tile_raw.resize(2 * (kDpKTile / 2) * kDpMaxNr * 64 + 64);
    void* tile = (void*)(((uintptr_t)tile_raw.data() + 63) & ~(uintptr_t)63);
    for (int64_t sb = sb0; sb < sb1; ++sb) {
      const int64_t b0 = 2 * sb, nr = std::min<int64_t>(2, nb - b0), n0 = b0 * kNB;
      const int64_t nv = std::min<int64_t>(N - n0, nr * kNB);  // valid rows of this super-block
      DpArgs a;
      a.s_rows = sp + n0 * ng; a.z_rows = zp ? zp + n0 * ng : nullptr; a.ng = ng; a.nv = nv;
      a.zsym_off = zsym + off; a.off = off;
      a.x = xp; a.ldx = ldxb; a.xsum = xsp; a.nc = nc;
      for (int64_t r = 0; r < nr; ++r) a.codes[r] = cp + (b0 + r) * K * rec;
      a.s = sbuf.data(); a.zc = zbuf.data(); a.y = ybuf.data(); a.tile = tile;
      a.Mt = Mt; a.K = K; a.G = G; a.C = C; a.bits = (int)bits; a.nr = (int)nr;
      // scales/zeros of this thread's next super-block (none when unknown)
      const int64_t u0 = sb + 1 < sb1 ? sb + 1 : next, u1 = u0 < 0 ? u0 : u0 + 1;
      const auto ps = row_lines(sp, u0, u1, L, N, ng, sizeof(float)), pz = row_lines(zp, u0, u1, L, N, ng, 1);
      a.pf_side[0] = ps.first; a.pf_side_lines[0] = ps.second;
      a.pf_side[1] = pz.first; a.pf_side_lines[1] = pz.second;
      kern->dp_block(a);
      const int64_t w = nr * kNB;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t l = 0; l < nv; ++l) {
          float v = ybuf[(m * T) * w + l];
          if (T == 2) v += ybuf[(m * T + 1) * w + l];
          yp[m * N + n0 + l] = v;
        }
    }
  });
  return y;
}

Tensor quant_matmul_cpu(const Tensor& x, const Tensor& packed, const Tensor& scales, const c10::optional<Tensor>& zeros,
                        int64_t bits, int64_t group_size, const c10::optional<Tensor>& bias) {
  const Shape sh = validate(x, packed, scales, zeros, bits, group_size, bias);
  const int64_t M = sh.M, N = sh.N, K = sh.K, G = sh.G, ng = K / G;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (M == 0 || N == 0) return at::zeros(out_shape, x.options());

  const CpuKernels* kern = TT_CPU_SELECT(quant_matmul_kernels);
  if (kern->dp_block && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
      dp_use((int)bits, M * (x.scalar_type() == at::kHalf ? 2 : 1))) {
    Tensor y = quant_matmul_dp(kern, x.reshape({M, K}), packed, scales, zeros, bits, G, N);
    if (bias) y.add_(bias->to(at::kFloat));
    return y.to(x.scalar_type()).view(out_shape);
  }

  const Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const Tensor sf = scales.to(at::kFloat).contiguous();
  const Tensor zf = zeros ? zeros->contiguous() : Tensor();
  const bool gemv = M <= kGemvMaxM;
  Tensor xsum;
  if (gemv) xsum = xf.view({M, ng, G}).sum(-1).contiguous();
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));

  const float* xp = xf.data_ptr<float>();
  const float* xsp = gemv ? xsum.data_ptr<float>() : nullptr;
  const uint8_t* cp = packed.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  const uint8_t* zp = zeros ? zf.data_ptr<uint8_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float zsym = (float)(1 << (bits - 1));
  const int64_t rec = 2 * bits;
  const uint8_t* lanes = kern->lane_rows((int)bits);

  for_blocks(sh.nb, (double)M * (double)N * (double)K, [&](int64_t b0, int64_t b1, int64_t) {
    thread_local std::vector<float> sbuf, zbuf, ybuf, tile;
    sbuf.resize(ng * kNB); zbuf.resize(ng * kNB); ybuf.resize(M * kNB);
    if (!gemv) tile.resize(kKTile * kNB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kNB;
      const int64_t nv = N - n0 < kNB ? N - n0 : kNB;
      for (int64_t l = 0; l < kNB; ++l) {
        const int64_t i = lanes[l];
        const int64_t n = n0 + (i < nv ? i : nv - 1);  // padded rows reuse a valid row (never written)
        for (int64_t g = 0; g < ng; ++g) {
          sbuf[g * kNB + l] = sp[n * ng + g];
          zbuf[g * kNB + l] = zp ? (float)zp[n * ng + g] : zsym;
        }
      }
      BlockArgs a;
      a.x = xp; a.ldx = K; a.xsum = xsp; a.codes = cp + b * K * rec;
      a.s = sbuf.data(); a.z = zbuf.data(); a.y = ybuf.data(); a.tile = tile.data();
      a.M = M; a.K = K; a.G = G; a.bits = (int)bits;
      if (gemv) kern->gemv_block(a); else kern->gemm_block(a);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t l = 0; l < kNB; ++l)
          if (lanes[l] < nv) yp[m * N + n0 + lanes[l]] = ybuf[m * kNB + l];
    }
  });
  if (bias) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).view(out_shape);
}

// ---------------------------------------------------------------- CUDA layout repack (on CPU)
// codes [N, K] uint8 -> "cuda_k32" int32 [N, K*bits/32] (quant_matmul.h), through chunk_set.
Tensor quant_pack_k32(const Tensor& codes, int64_t bits) {
  TT_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TT_CHECK(codes.device().is_cpu(), "codes must be a CPU tensor (repack runs on the host), got ", codes.device());
  TT_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "codes must be a 2-D uint8 tensor [N, K], got ",
           codes.scalar_type(), " ", codes.sizes());
  const int64_t N = codes.size(0), K = codes.size(1);
  TT_CHECK_VALUE(K % 32 == 0, "codes K = ", K, " must be a multiple of 32 for the cuda_k32 layout");
  const Tensor c = codes.contiguous();
  TT_CHECK_VALUE(N * K == 0 || c.max().item<int64_t>() < (1 << bits), "codes must be < 2^bits = ", 1 << bits);
  Tensor out = at::zeros({N, K * bits / 32}, codes.options().dtype(at::kInt));
  const uint8_t* cp = c.data_ptr<uint8_t>();
  uint32_t* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c0 = 0; c0 < K / 32; ++c0)
        for (int j = 0; j < 32; ++j)
          chunk_set(op + (n * (K / 32) + c0) * bits, (int)bits, j, cp[n * K + c0 * 32 + j]);
  });
  return out;
}

// "cuda_k32" int32 [N, K*bits/32] -> codes [N, K] uint8, through chunk_code.
Tensor quant_unpack_k32(const Tensor& packed, int64_t bits) {
  TT_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TT_CHECK(packed.device().is_cpu(), "packed must be a CPU tensor (repack runs on the host), got ", packed.device());
  TT_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2 && packed.size(1) % bits == 0,
           "packed must be a 2-D int32 tensor [N, K*bits/32] (layout cuda_k32), got ", packed.scalar_type(), " ",
           packed.sizes());
  const int64_t N = packed.size(0), K = packed.size(1) * 32 / bits;
  const Tensor p = packed.contiguous();
  Tensor out = at::empty({N, K}, packed.options().dtype(at::kByte));
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t c0 = 0; c0 < K / 32; ++c0)
        for (int j = 0; j < 32; ++j)
          op[n * K + c0 * 32 + j] = (uint8_t)chunk_code(pp + (n * (K / 32) + c0) * bits, (int)bits, j);
  });
  return out;
}

#if defined(TTSCALE_WITH_CUDA)
// ---------------------------------------------------------------- CUDA ("cuda_k32" layout)
Tensor quant_matmul_cuda_impl(const Tensor& x, const Tensor& packed, const Tensor& scales,
                              const c10::optional<Tensor>& zeros, int64_t bits, int64_t group_size,
                              const c10::optional<Tensor>& bias) {
  TT_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  check_float_dtype(x, "x");
  TT_CHECK(x.dim() >= 1, "x must have at least one dimension [..., K], got shape ", x.sizes());
  check_device(packed, "packed", x, "x");
  check_device(scales, "scales", x, "x");
  check_float_dtype(scales, "scales");
  const int64_t K = x.size(-1);
  TT_CHECK_VALUE(K > 0 && K % 32 == 0, "x last dimension K must be a positive multiple of 32 on CUDA (layout "
                 "cuda_k32), got shape ", x.sizes());
  TT_CHECK(scales.dim() == 2, "scales must be 2-D [N, K/group_size], got shape ", scales.sizes());
  const int64_t N = scales.size(0);
  TT_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2 && packed.size(0) == N &&
               packed.size(1) == K / 32 * bits,
           "packed must be int32 [N, K*bits/32] = [", N, ", ", K / 32 * bits, "] (layout cuda_k32), got ",
           packed.scalar_type(), " ", packed.sizes());
  TT_CHECK(packed.is_contiguous(), "packed must be contiguous");
  TT_CHECK_VALUE(group_size >= 32 && group_size % 32 == 0 && K % group_size == 0,
                 "group_size must be a multiple of 32 dividing K = ", K, " on CUDA, got ", group_size);
  TT_CHECK(scales.size(1) == K / group_size, "scales must be [N, K/group_size] = [", N, ", ", K / group_size,
           "], got shape ", scales.sizes());
  if (zeros) {
    check_device(*zeros, "zeros", x, "x");
    TT_CHECK(zeros->scalar_type() == at::kByte, "zeros must be uint8, got ", zeros->scalar_type());
    TT_CHECK(zeros->sizes() == scales.sizes(), "zeros must have the shape of scales ", scales.sizes(), ", got ",
             zeros->sizes());
  }
  if (bias) {
    check_device(*bias, "bias", x, "x");
    TT_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be 1-D [N] = [", N, "], got shape ", bias->sizes());
    TT_CHECK(bias->scalar_type() == x.scalar_type(), "bias dtype must equal x dtype (", x.scalar_type(), "), got ",
             bias->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.numel() / K;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_shape);
  // The kernels load x in 4-byte words and the codes in 8/16-byte vectors: a contiguous view that
  // starts mid-word (e.g. buf[1:].view(...)) would fault with a sticky misaligned-address error, so
  // such inputs are copied to a fresh (aligned) buffer first.
  auto aligned = [](const Tensor& t) {
    const Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
  };
  const Tensor xc = aligned(x.reshape({M, K}));
  const Tensor pc = aligned(packed);
  const Tensor sf = scales.to(at::kFloat).contiguous();
  const Tensor zc = zeros ? zeros->contiguous() : Tensor();
  const Tensor bc = bias ? bias->contiguous() : Tensor();
  QmmCudaParams p;
  p.dtype = dtype_of(x.scalar_type());
  p.N = N; p.K = K; p.G = group_size; p.bits = (int)bits;
  p.codes = reinterpret_cast<const uint32_t*>(pc.data_ptr<int32_t>());
  p.scales = sf.data_ptr<float>();
  p.zeros = zeros ? zc.data_ptr<uint8_t>() : nullptr;
  p.bias = bias ? bc.data_ptr() : nullptr;
  // The row tiles go on gridDim.y (at most 65535): very tall inputs run as slabs of kSlab rows, a
  // multiple of 8 so every slab of x and y keeps the base's 16-byte alignment.
  constexpr int64_t kSlab = 65528;
  const int64_t esz = x.element_size();
  for (int64_t m0 = 0; m0 < M; m0 += kSlab) {
    p.M = M - m0 < kSlab ? M - m0 : kSlab;
    p.x = static_cast<const char*>(xc.data_ptr()) + m0 * K * esz;
    p.y = static_cast<char*>(y.data_ptr()) + m0 * N * esz;
    check_launch(quant_matmul_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "quant_matmul");
  }
  return y.view(out_shape);
}
#endif  // TTSCALE_WITH_CUDA

}  // namespace
}  // namespace quant_matmul
}  // namespace ttscale

TORCH_LIBRARY_FRAGMENT(ttscale, m) {
  m.def("quant_pack_k32(Tensor codes, int bits) -> Tensor");
  m.def("quant_unpack_k32(Tensor packed, int bits) -> Tensor");
  m.def("quant_matmul(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int bits, int group_size, Tensor? bias)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(ttscale, CPU, m) {
  m.impl("quant_matmul", &ttscale::quant_matmul::quant_matmul_cpu);
  m.impl("quant_pack_k32", &ttscale::quant_matmul::quant_pack_k32);
  m.impl("quant_unpack_k32", &ttscale::quant_matmul::quant_unpack_k32);
}

#if defined(TTSCALE_WITH_CUDA)
TORCH_LIBRARY_IMPL(ttscale, CUDA, m) { m.impl("quant_matmul", &ttscale::quant_matmul::quant_matmul_cuda_impl); }
#endif  // TTSCALE_WITH_CUDA
