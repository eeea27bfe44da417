// Low-bit weight-only matmul: shared definitions for the CPU and CUDA paths (torch-free).
//
// Logical format (reference semantics, python/ttscale/reference/quant_matmul.py):
//   W [N, K] (nn.Linear orientation), groups of G consecutive input features (G = K: per channel),
//   codes q in [0, 2^b - 1], b in {2, 3, 4, 8}; scales s [N, K/G] (fp32/fp16/bf16);
//   zeros z [N, K/G] uint8 (absent: symmetric, z = 2^(b-1)).
//   w'[n, k] = (q[n, k] - z[n, k/G]) * s[n, k/G];   y = x @ w'^T, fp32 accumulation.
//
// CPU packed layout "cpu_n16" (uint8 tensor [ceil(N/16), K, 2*b]):
//   Output rows are taken in blocks of kNB = 16 (the last block padded with code 0; padded rows
//   are never written). For block nb and input feature k, the 16 codes q[16*nb + i, k] occupy one
//   record of 2*b bytes, little-endian bit order:
//     rows i = 0..7  : bits [b*i, b*i + b) of bytes [0, b)
//     rows i = 8..15 : bits [b*(i-8), b*(i-8) + b) of bytes [b, 2b)
//   so one half-record (b bytes: 4-bit -> one 32-bit word, 3-bit -> 24 bits, 2-bit -> 16 bits,
//   8-bit -> 8 bytes) unpacks to 8 consecutive output rows with one broadcast, one variable shift
//   and one mask (AVX2: one 8-lane vector; AVX-512 unpacks both halves into one 16-lane vector).
//   Records for consecutive k are contiguous, so a block streams its K*2b bytes once, and every
//   SIMD lane of an accumulator is an output row (no horizontal reductions).
//   Scales and zeros stay in the logical [N, K/G] layout. The fp32 paths' host loop gathers them per
//   block into fp32 [K/G][16] (16 scalar conversions per group of 16*G weights); the avx512bf16
//   kernel gathers a super-block's with register transposes, its scales/zeros having been prefetched
//   during the previous super-block (DpArgs::pf_side; from DRAM the gather was 20% of an M = 1 call).
//
// CPU algorithm, parallel over row blocks:
//   M <= kGemvMaxM (GEMV): rows of x in chunks of 6 (AVX2/generic; 8 on AVX-512); per chunk the
//     block's codes are streamed once (from memory for the first chunk, from L2 after); per group g
//     and row m acc = sum_k q[n,k] x[m,k] (codes converted exactly to fp32), then
//     y[m,n] += s[n,g] * (acc - z[n,g] * xsum[m,g]) with xsum the group sum of x. Each unpacked
//     record feeds every row of the chunk and both 8-lane halves of the block (one broadcast of x
//     per row and feature); >= 8 independent FMA chains.
//     AVX2, 4-bit: one 8-byte vpmovzxbd + vpand + vpsrld + 2 vcvtdq2ps per 16 codes (rows land in
//     even/odd lane order, see CpuKernels::lane_rows), then 2 FMAs per row.
//     Measured (2-core AVX2 EPYC, busy): the GEMV path is faster than the GEMM path at M = 16 and
//     equal at M = 64, hence kGemvMaxM = 32.
//   M > kGemvMaxM (GEMM): a tile of kKTile features of the block is dequantised once into an fp32
//     buffer [kKTile][16] ((q - z) * s) and reused by every row of x (register tiles of 8 rows x 1
//     vector on AVX-512, 6 rows x 2 vectors on AVX2).
//   These fp32 kernels serve every activation dtype on generic / AVX2 / AVX-512, and fp32
//   activations on avx512bf16; bf16 / fp16 activations on avx512bf16 take the vdpbf16ps path
//   (DpArgs below). All four ISA paths are tested on a Zen 5 (tests/ops/test_quant_matmul.py,
//   cpu_isa fixture).
//   Each thread owns a contiguous share of the blocks (its own counter) and takes over the others'
//   when it is done, so a thread slowed by other load on the machine does not hold up the rest
//   (for_blocks in quant_matmul.cpp).
//
// CUDA algorithm (quant_matmul_cuda.cu; compile-checked only, never run on a GPU yet): a SIMT GEMV
// for M <= 8 (and every M with fp32 x) and an mma.sync m16n8k16 GEMM for fp16/bf16 x, both on the
// "cuda_k32" layout below. Input permutations (act-order imports) are applied to x in Python.
//
// CUDA packed layout "cuda_k32" (int32 tensor [N, K*b/32], K a multiple of 32):
//   row n holds its K codes as one little-endian bit stream (code k at stream bits [b*k, b*k + b),
//   stream bit i = bit i % 32 of word i / 32), so every 32 consecutive codes (a "chunk", always
//   inside one group since G is a multiple of 32) are exactly b words; 3-bit codes straddle words.
//   This is GPTQ's qweight transposed ([K*b/32, N] -> [N, K*b/32]). The chunk helpers below are
//   the only code that reads or writes it: the CUDA kernels (quant_matmul_cuda.cu) and the CPU
//   repack ops (quant_pack_k32 / quant_unpack_k32, run by the tests) share them.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace ttscale {
namespace quant_matmul {

// Code j (0..31) of a chunk of `bits` words.
TT_HD uint32_t chunk_code(const uint32_t* w, int bits, int j) {
  const int bit = j * bits, i = bit >> 5, o = bit & 31;
  uint32_t v = w[i] >> o;
  if (o + bits > 32) v |= w[i + 1] << (32 - o);  // straddles into the next word (3 bits)
  return v & ((1u << bits) - 1u);
}
// Writes code q (< 2^bits) as code j of a chunk whose words start zeroed.
TT_HD void chunk_set(uint32_t* w, int bits, int j, uint32_t q) {
  const int bit = j * bits, i = bit >> 5, o = bit & 31;
  w[i] |= q << o;
  if (o + bits > 32) w[i + 1] |= q >> (32 - o);
}
// The reference dequantisation w' = (q - z) * s, in fp32.
TT_HD float dequant(uint32_t q, float z, float s) { return ((float)q - z) * s; }

constexpr int kNB = 16;          // output rows per packed block
constexpr int kGemvMaxM = 32;    // M <= this: the streaming GEMV path
constexpr int64_t kKTile = 256;  // features dequantised at once in the GEMM path

// One block of 16 output rows: y[m][0..16) = x[m] . w'[n0 + i] for all m < M.
struct BlockArgs {
  const float* x;        // [M, K] fp32, row stride ldx
  int64_t ldx;
  const float* xsum;     // [M, K/G] group sums of x (GEMV path only)
  const uint8_t* codes;  // [K, 2*bits] this block's records
  const float* s;        // [K/G, 16] scales
  const float* z;        // [K/G, 16] zeros (as floats)
  float* y;              // [M, 16] output (overwritten)
  float* tile;           // scratch, kKTile * 16 floats (GEMM path)
  int64_t M, K, G;
  int bits;
};

// avx512bf16 path for bf16 / fp16 activations (CpuKernels::dp_block; nullptr on other ISAs).
// One call computes one "super-block" of nr (1 or 2) blocks of 16 output rows, i.e. 16*nr lanes,
// for all Mt rows of x. Activations arrive as bf16 (fp16 x is split exactly into two bf16 terms
// hi + lo, each an extra row of x that the host sums afterwards), so every product in vdpbf16ps
// is exact in fp32. Codes are turned into bf16 values c = q + off (off = dp_code_offset(bits):
// 16 for 4 bits, where the value is built by OR-ing q<<3 into the mantissa of bf16(16.0); 0 where
// it is converted through fp32), which is exact because c < 256. K is cut into chunks of C features
// (C = G for G <= 256, else 256; every chunk lies in one group, only the last chunk of K can be
// odd) and per chunk and row acc = sum_k c[n,k] x[m,k] (fp32, vdpbf16ps on feature pairs), then
//   y[m,n] += s[n,g] * (acc - (z[n,g] + off) * xsum[m,chunk])
// with xsum the chunk sum of the bf16 x values (host, fp32). Mt <= 4 (decode): the codes are
// unpacked in registers and used at once (a streaming GEMV). Mt > 4: a tile of kDpKTile features
// of the super-block is dequantised once into `tile` as [pair][nr][32 bf16] (64-byte vectors:
// element 2i + e = row i, feature 2p + e) and reused by every row of x (register tiles of 8 rows
// x nr vectors, 16 accumulators); two tiles alternate, the next one dequantised a few records at a
// time from inside the vdpbf16ps loop over the current one (its shifts and permutes then issue
// beside the dot products; as a separate pass it was 13% of an M = 16 call). Rounding: none beyond
// fp32 accumulation (every product is exact); the offset adds off * |x| to the magnitudes being
// summed, which for 4 bits (off = 16) is of the order of the q + z the test bound already allows for.
constexpr int64_t kDpKTile = 256;  // features per dequantised tile (16 KiB for nr = 2; two in flight)
constexpr int kDpMaxNr = 2;
constexpr int64_t kDpDirectMaxM = 4;  // Mt <= this: streaming GEMV without a tile
// Whether the vdpbf16ps path is used (given bf16 / fp16 x on avx512bf16) for Mt = M * terms rows.
// Decode of 2, 3 and 8 bits stays on the fp32 GEMV: their codes are converted through fp32 either
// way (no single-op bf16 unpack), which costs more vector ops per weight than the fp32 FMA saved,
// while with > kDpDirectMaxM rows the dequantised tile amortises it over the rows.
inline bool dp_use(int bits, int64_t Mt) { return bits == 4 || Mt > kDpDirectMaxM; }
inline float dp_code_offset(int bits) { return bits == 4 ? 16.0f : 0.0f; }
inline int64_t dp_chunk(int64_t K, int64_t G) { return G <= 256 ? G : (K < 256 ? K : 256); }

struct DpArgs {
  const uint32_t* x;                // [Mt, ldx] bf16 pairs: low half = feature 2p, high = 2p + 1
  int64_t ldx;                      // pairs per row (ceil(K/2); an odd K's last feature is 0)
  const float* xsum;                // [Mt, nc] chunk sums of x
  int64_t nc;
  const uint8_t* codes[kDpMaxNr];   // [K, 2*bits] records of each block
  const float* s_rows;              // [nv, ng] scales of this super-block's rows (logical layout)
  const uint8_t* z_rows;            // [nv, ng] zeros, or nullptr (symmetric: zsym_off for all)
  int64_t ng, nv;                   // groups per row, valid rows (<= 16*nr; padded rows repeat the last)
  float zsym_off, off;              // 2^(bits-1) + off, off = dp_code_offset(bits)
  float* s;                         // scratch [K/G, 16*nr]: the kernel gathers scales (lane = row)
  float* zc;                        // scratch [K/G, 16*nr]: z + off
  float* y;                         // [Mt, 16*nr] output (overwritten)
  void* tile;                       // scratch: 2 tiles of kDpKTile/2 * nr * 64 bytes, 64-byte aligned
  int64_t Mt, K, G, C;
  int bits, nr;
  // Scales/zeros of this thread's next super-block (known while it works through its own share of
  // super-blocks; none after its last one), prefetched a line at a time alongside the code stream.
  // Without them the gather above starts each super-block with ~8 dependent-ish DRAM round trips on
  // 5 KiB of scales/zeros (K = 4096, G = 128): measured 20% of an M = 1 call with the weights in
  // DRAM. Empty ranges (lines = 0) are fine.
  const char* pf_side[2];           // start of each range (64-byte lines; prefetches never fault)
  int64_t pf_side_lines[2];
};

// Both block kernels keep the 16 rows of a block in SIMD lanes in the order lane_rows(bits) gives
// (lane L holds row lane_rows(bits)[L]; the identity except where a cheaper unpack permutes rows):
// BlockArgs::s, ::z and ::y are in lane order.
struct CpuKernels {
  void (*gemv_block)(const BlockArgs& a);  // a.M <= kGemvMaxM rows
  void (*gemm_block)(const BlockArgs& a);
  const uint8_t* (*lane_rows)(int bits);
  void (*dp_block)(const DpArgs& a);  // avx512bf16 only, else nullptr
};

}  // namespace quant_matmul
}  // namespace ttscale
