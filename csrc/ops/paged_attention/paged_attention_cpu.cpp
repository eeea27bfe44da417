// Per-ISA CPU kernels of paged attention and attention-state merge (compiled once per ISA; see
// common/cpu_simd.h). Schedule and formats: paged_attention.h. Torch-free, no std algorithms.
#include "ops/paged_attention/paged_attention.h"
#include "common/attention_math.h"
#include "common/cpu_simd.h"
#include "common/attention_cpu_tiles.h"
#include "common/dispatch.h"

#include <cmath>
#include <cstdint>

namespace ttscale {
namespace cpu {
namespace TTSCALE_CPU_ISA {
namespace {

using paged::CpuKernels;
using paged::kKeyChunk;
using paged::kRowTile;
using paged::PagedItem;
using paged::PagedParams;

static_assert(kKeyChunk == kTileKeys, "paged chunk = tile width");

template <typename T>
inline void widen_row(const T* src, float* dst, int D) {
  for (int d = 0; d < D; d += W) store(dst + d, load(src + d));
}

constexpr int kPrefetchChunks = 1;  // software prefetch distance, in chunks (measured best of 1-4)

struct Scratch {
  float* qf;    // [rows][D] scaled queries
  uint16_t* qb; // [rows][D] the queries as stored (filled when bf16_dot<T>(): those kernels read them)
  float* acc;   // [rows + kRowTile][D] output accumulators (+ dummy rows for partial tiles)
  float* m;     // [rows] running max
  float* l;     // [rows] running sum
  int64_t* kb;  // [rows] first visible key
  int64_t* ke;  // [rows] one past the last visible key
  float* kbuf;  // [D][kKeyChunk] widened keys, transposed
  float* vbuf;  // [kKeyChunk][D] widened values
};

inline int64_t align64(int64_t x) { return (x + 63) & ~int64_t(63); }

int64_t attend_scratch_bytes(int64_t rows, int64_t D) {
  return align64(rows * D * 4) + align64(rows * D * 2) + align64((rows + kRowTile) * D * 4) + 2 * align64(rows * 4) + 2 * align64(rows * 8) +
         2 * align64(kKeyChunk * D * 4) + 64;
}

Scratch carve(void* scratch, int64_t rows, int64_t D) {
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  Scratch s;
  s.qf = reinterpret_cast<float*>(p); p += align64(rows * D * 4);
  s.qb = reinterpret_cast<uint16_t*>(p); p += align64(rows * D * 2);
  s.acc = reinterpret_cast<float*>(p); p += align64((rows + kRowTile) * D * 4);
  s.m = reinterpret_cast<float*>(p); p += align64(rows * 4);
  s.l = reinterpret_cast<float*>(p); p += align64(rows * 4);
  s.kb = reinterpret_cast<int64_t*>(p); p += align64(rows * 8);
  s.ke = reinterpret_cast<int64_t*>(p); p += align64(rows * 8);
  s.kbuf = reinterpret_cast<float*>(p); p += align64(kKeyChunk * D * 4);
  s.vbuf = reinterpret_cast<float*>(p);
  return s;
}

template <typename T, int D>
void attend_t(const PagedParams& p, const PagedItem& it, float* out, float* lse, void* scratch) {
  const int64_t group = p.Hq / p.Hkv;
  const int64_t nq = it.q_end - it.q_begin;
  const int64_t nh = it.h_end - it.h_begin;
  const int64_t rows_h = nq * group;  // rows per KV head
  const int64_t rows = nh * rows_h;
  Scratch s = carve(scratch, rows, D);
  const T* qbase = static_cast<const T*>(p.q);
  const int64_t kv_len = paged::kv_len_of(p.kv_indptr, p.kv_last_page_len, it.b, p.page_size);
  const int64_t qo0 = p.qo_indptr ? p.qo_indptr[it.b] : it.b;
  const int64_t n_q_seq = p.qo_indptr ? p.qo_indptr[it.b + 1] - qo0 : 1;
  int64_t any_b = it.k_end, any_e = it.k_begin;
  for (int64_t t = it.q_begin; t < it.q_end; ++t) {
    const int64_t q_pos = (t - qo0) + kv_len - n_q_seq;
    int64_t kb, ke;
    attn::visible_range(q_pos, kv_len, p.causal, p.window_left, &kb, &ke);
    kb = kb > it.k_begin ? kb : it.k_begin;
    ke = ke < it.k_end ? ke : it.k_end;
    if (ke < kb) ke = kb;
    if (kb < ke) { any_b = kb < any_b ? kb : any_b; any_e = ke > any_e ? ke : any_e; }
    for (int64_t hh = 0; hh < nh; ++hh) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t r = hh * rows_h + (t - it.q_begin) * group + g;
        s.kb[r] = kb;
        s.ke[r] = ke;
        const T* qr = qbase + t * p.q_stride_t + ((it.h_begin + hh) * group + g) * p.q_stride_h;
        float* dst = s.qf + r * D;
        for (int d = 0; d < D; ++d) dst[d] = to_float(qr[d]) * p.scale;
        if (bf16_dot<T>())
          for (int d = 0; d < D; ++d) s.qb[r * D + d] = reinterpret_cast<const uint16_t*>(qr)[d];
        s.m[r] = -INFINITY;
        s.l[r] = 0.0f;
      }
    }
  }
  for (int64_t i = 0; i < (rows + kRowTile) * D; ++i) s.acc[i] = 0.0f;

  const int64_t n_tiles_h = (rows_h + kRowTile - 1) / kRowTile;
  const bool widen = n_tiles_h > 2;
  // bf16 caches on avx512bf16: the widened chunk is packed into vdpbf16ps pair layouts instead
  constexpr bool pairs = bf16_dot<T>();
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  const int32_t* pages = p.kv_indices + p.kv_indptr[it.b];
  const T* kbase[kKeyChunk];
  const T* vbase[kKeyChunk];
  const T* kp[kKeyChunk];
  const T* vp[kKeyChunk];
  const float* vpf[kKeyChunk];
  alignas(64) float S[kRowTile][kKeyChunk];
  const float cap = p.softcap;
  // bytes of the heads this item reads, per token (contiguous when the heads are adjacent)
  const int64_t span = ((nh - 1) * p.k_stride_head + D) * (int64_t)sizeof(T);

  // keys per chunk: K of the chunk over all the item's heads around 32 KiB (16 keys for 8 heads of
  // D=128 in fp32 or bf16; never fewer than 16), so the chunk and the kPrefetchChunks chunks streamed
  // ahead of it stay in L1/L2 (chunk size and distance measured on Zen 5, see prefetch())
  int ck = (int)((32 * 1024) / span);
  ck = ck < 16 ? 16 : (ck > kKeyChunk ? kKeyChunk : ck);
  ck = ck / 16 * 16;  // multiple of W
  {
    // the first chunk has nobody to prefetch it
    const int64_t e0 = any_b + kPrefetchChunks * ck < any_e ? any_b + kPrefetchChunks * ck : any_e;
    for (int64_t key = any_b; key < e0; ++key) {
      const int64_t pi = key / p.page_size;
      const char* kr = reinterpret_cast<const char*>(kc + pages[pi] * p.k_stride_page + (key - pi * p.page_size) * p.k_stride_tok + it.h_begin * p.k_stride_head);
      const char* vr = reinterpret_cast<const char*>(vc + pages[pi] * p.v_stride_page + (key - pi * p.page_size) * p.v_stride_tok + it.h_begin * p.v_stride_head);
      for (int64_t b = 0; b < span; b += 64) { prefetch(kr + b); prefetch(vr + b); }
    }
  }
  for (int64_t c0 = any_b; c0 < any_e; c0 += ck) {
    const int nk = (int)((any_e - c0) < ck ? (any_e - c0) : ck);
    for (int j = 0; j < nk; ++j) {
      const int64_t key = c0 + j;
      const int64_t pi = key / p.page_size;
      const int64_t page = pages[pi];
      const int64_t off = key - pi * p.page_size;
      kbase[j] = kc + page * p.k_stride_page + off * p.k_stride_tok + it.h_begin * p.k_stride_head;
      vbase[j] = vc + page * p.v_stride_page + off * p.v_stride_tok + it.h_begin * p.v_stride_head;
    }
    // the next chunk's rows go out through `pf`, paced by the micro-kernels (decode path), or a
    // slice per head (widened multi-query path, whose inner loops run from the widened buffers)
    PrefetchStream pf;
    {
      const int64_t n0 = c0 + kPrefetchChunks * ck;
      const int64_t n1 = n0 + ck < any_e ? n0 + ck : any_e;
      pf.n = n1 > n0 ? (int)(n1 - n0) : 0;
      pf.span = span;
      for (int j = 0; j < pf.n; ++j) {
        const int64_t key = n0 + j;
        const int64_t pi = key / p.page_size;
        const int64_t off = key - pi * p.page_size;
        pf.k[j] = reinterpret_cast<const char*>(kc + pages[pi] * p.k_stride_page + off * p.k_stride_tok + it.h_begin * p.k_stride_head);
        pf.v[j] = reinterpret_cast<const char*>(vc + pages[pi] * p.v_stride_page + off * p.v_stride_tok + it.h_begin * p.v_stride_head);
      }
      // step() calls per chunk: the tile kernels' calls for every head and row tile
      pf.pace(nh * n_tiles_h * tile_step_calls<T>(nk, D));
    }
    for (int64_t hh = 0; hh < nh; ++hh) {
      if (widen) {
        const int64_t n0 = c0 + kPrefetchChunks * ck + (hh * ck) / nh;
        const int64_t n1a = c0 + kPrefetchChunks * ck + ((hh + 1) * ck) / nh;
        const int64_t n1 = n1a < any_e ? n1a : any_e;
        for (int64_t key = n0; key < n1; ++key) {
          const int j = (int)(key - (c0 + kPrefetchChunks * ck));
          for (int64_t b = 0; b < span; b += 64) { prefetch(pf.k[j] + b); prefetch(pf.v[j] + b); }
        }
      }
      for (int j = 0; j < nk; ++j) {
        kp[j] = kbase[j] + hh * p.k_stride_head;
        vp[j] = vbase[j] + hh * p.v_stride_head;
      }
      // keys of this chunk whose value row holds a non-finite element, found on the first tile
      // that masks part of the chunk (see exact_pv below); clean chunks never scan
      uint64_t vbad = 0;
      bool vbad_known = false;
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
      if (widen && pairs) {
        pack_chunk_bf16pairs(reinterpret_cast<const bf16_t* const*>(kp), reinterpret_cast<const bf16_t* const*>(vp), nk,
                             D, reinterpret_cast<uint32_t*>(s.kbuf), reinterpret_cast<uint32_t*>(s.vbuf));
      } else
#endif
      if (widen) {
        for (int j = 0; j < nk; ++j) {
          const T* kr = kp[j];
          for (int d = 0; d < D; ++d) s.kbuf[d * kKeyChunk + j] = to_float(kr[d]);  // transposed
          widen_row<T>(vp[j], s.vbuf + j * D, D);
          vpf[j] = s.vbuf + j * D;
        }
      }
      for (int64_t t0 = hh * rows_h; t0 < (hh + 1) * rows_h; t0 += kRowTile) {
        const int64_t rend = (hh + 1) * rows_h;
        const int nr = (int)((rend - t0) < kRowTile ? (rend - t0) : kRowTile);
        // skip the tile when no row sees any key of the chunk
        bool any = false, full = true;
        for (int r = 0; r < nr; ++r) {
          const int64_t kb = s.kb[t0 + r], ke = s.ke[t0 + r];
          if (kb < c0 + nk && ke > c0) any = true;
          if (!(kb <= c0 && ke >= c0 + nk)) full = false;
        }
        if (!any) continue;
        const float* qrows[kRowTile];
        float* orows[kRowTile];
        for (int r = 0; r < kRowTile; ++r) {
          qrows[r] = s.qf + (t0 + (r < nr ? r : 0)) * D;
          orows[r] = r < nr ? s.acc + (t0 + r) * D : s.acc + (rows + r) * D;  // dummy rows
        }
        const T* qraw[kRowTile];
        for (int r = 0; r < kRowTile; ++r) qraw[r] = reinterpret_cast<const T*>(s.qb) + (t0 + (r < nr ? r : 0)) * D;
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
        if (widen && pairs)
          qk_tile_t_bf16dot<D>(reinterpret_cast<const bf16_t* const*>(qraw), reinterpret_cast<const uint32_t*>(s.kbuf),
                               nk, p.scale, S);
        else
#endif
        if (widen) qk_tile_t<D>(qrows, s.kbuf, nk, S);
        else qk4<T, D>(qrows, qraw, kp, nk, p.scale, S, &pf);
        for (int r = 0; r < kRowTile; ++r) {
          float* sr = S[r];
          if (r >= nr) {
            for (int j = 0; j < ck; ++j) sr[j] = 0.0f;
            continue;
          }
          const int64_t row = t0 + r;
          if (cap > 0.0f)
            for (int j = 0; j < nk; ++j) sr[j] = attn::softcap(sr[j], cap);
          if (!full) {
            const int64_t kb = s.kb[row], ke = s.ke[row];
            for (int j = 0; j < nk; ++j)
              if (c0 + j < kb || c0 + j >= ke) sr[j] = -INFINITY;
          }
          for (int j = nk; j < ck; ++j) sr[j] = -INFINITY;
          VF mx = load(sr);
          VM poisoned = bad(mx);
          for (int j = W; j < ck; j += W) {
            const VF x = load(sr + j);
            mx = max(mx, x);
            poisoned = mask_or(poisoned, bad(x));
          }
          const float bm = hmax(mx);
          if (bits(poisoned)) s.l[row] = NAN;  // a NaN / +inf visible score: the row is NaN (sticky)
          if (bm == -INFINITY || bits(poisoned)) {
            for (int j = 0; j < ck; ++j) sr[j] = 0.0f;
            continue;
          }
          attn::OnlineSoftmax os{s.m[row], s.l[row]};
          const float alpha = os.rescale_to(bm);
          if (alpha != 1.0f) {
            float* o = s.acc + row * D;
            const VF va = set1(alpha);
            for (int d = 0; d < D; d += W) store(o + d, mul(load(o + d), va));
          }
          const VF vm = set1(os.m);
          VF sum = set1(0.0f);
          for (int j = 0; j < ck; j += W) {
            const VF e = exp(sub(load(sr + j), vm));
            store(sr + j, e);
            sum = add(sum, e);
          }
          os.l += hsum(sum);
          s.m[row] = os.m;
          s.l[row] = os.l;
        }
        // A masked key has P = 0 and 0 * inf = NaN, so a tile that masks a key whose value row is
        // not finite runs P.V row by row over each row's own visible keys (attention_math.h's
        // contract); tiles without such a key (all of them, unless V holds inf / NaN) stay on the
        // 4-row kernels.
        bool exact_pv = false;
        if (!full) {
          if (!vbad_known) {
            for (int j = 0; j < nk; ++j)
              if (row_nonfinite(vp[j], D)) vbad |= uint64_t(1) << j;
            vbad_known = true;
          }
          for (int r = 0; r < nr && vbad; ++r) {
            const int64_t jb = s.kb[t0 + r] - c0, je = s.ke[t0 + r] - c0;
            uint64_t seen = 0;  // bits [max(jb, 0), min(je, nk)) of the chunk
            for (int64_t j = jb < 0 ? 0 : jb; j < (je < nk ? je : nk); ++j) seen |= uint64_t(1) << j;
            if (vbad & ~seen) exact_pv = true;
          }
        }
        if (exact_pv) {
          alignas(64) float P1[kRowTile][kKeyChunk];
          for (int r = 0; r < nr; ++r) {
            int64_t jb = s.kb[t0 + r] - c0, je = s.ke[t0 + r] - c0;
            jb = jb < 0 ? 0 : jb;
            je = je < nk ? je : nk;
            if (jb >= je) continue;
            for (int rr = 0; rr < kRowTile; ++rr)
              for (int j = 0; j < kKeyChunk; ++j) P1[rr][j] = 0.0f;
            for (int64_t j = jb; j < je; ++j) P1[0][j - jb] = S[r][j];
            float* o1[kRowTile] = {orows[r], s.acc + rows * D, s.acc + (rows + 1) * D, s.acc + (rows + 2) * D};
            pv4<T, D>(o1, P1, vp + jb, (int)(je - jb), nullptr);
          }
        } else
#if defined(TTSCALE_CPU_ISA_AVX512BF16)
        if (widen && pairs) pv_tile_t_bf16dot<D>(orows, S, reinterpret_cast<const uint32_t*>(s.vbuf), nk);
        else
#endif
        if (widen) pv_tile<float, D>(orows, S, vpf, nk, nullptr);
        else pv4<T, D>(orows, S, vp, nk, &pf);
      }
    }
    if (!widen) pf.drain();  // rows whose tiles were skipped (masked) still feed the next chunk
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * D;
    const float* a = s.acc + r * D;
    const float l = s.l[r];
    if (l > 0.0f) {
      const VF inv = set1(1.0f / l);
      for (int d = 0; d < D; d += W) store(o + d, mul(load(a + d), inv));
      lse[r] = s.m[r] + std::log(l);
    } else {  // empty (0, -inf) or poisoned (NaN, NaN)
      for (int d = 0; d < D; ++d) o[d] = attn::out_scale(l);
      lse[r] = attn::OnlineSoftmax{s.m[r], l}.lse();
    }
  }
}

void attend(const PagedParams& p, const PagedItem& it, float* out, float* lse, void* scratch) {
  TT_DISPATCH_FLOAT(p.dtype, T, TT_DISPATCH_HEAD_DIM(p.D, D, attend_t<T, D>(p, it, out, lse, scratch)))
}

template <typename T>
void merge_rows_t(int64_t n, int64_t D, const T* a, int64_t sa, const float* la, const T* b, int64_t sb,
                  const float* lb, T* o, int64_t so, float* lo) {
  for (int64_t r = 0; r < n; ++r) {
    const attn::MergeWeights w = attn::merge_weights(la[r], lb[r]);
    const T* ar = a + r * sa;
    const T* br = b + r * sb;
    T* orow = o + r * so;
    if (sizeof(T) == 4 && D % W == 0) {
      const VF wa = set1(w.wa), wb = set1(w.wb);
      for (int64_t d = 0; d < D; d += W)
        store(reinterpret_cast<float*>(orow) + d, fmadd(wa, load(ar + d), mul(wb, load(br + d))));
    } else {
      for (int64_t d = 0; d < D; ++d) store_float(orow + d, w.wa * to_float(ar[d]) + w.wb * to_float(br[d]));
    }
    lo[r] = w.lse;
  }
}

void merge_rows(DType dtype, int64_t n, int64_t D, const void* a, int64_t sa, const float* la, const void* b,
                int64_t sb, const float* lb, void* o, int64_t so, float* lo) {
  TT_DISPATCH_FLOAT(dtype, T,
                    merge_rows_t<T>(n, D, static_cast<const T*>(a), sa, la, static_cast<const T*>(b), sb, lb,
                                    static_cast<T*>(o), so, lo))
}

const CpuKernels kKernels = {attend_scratch_bytes, attend, merge_rows};

}  // namespace

const CpuKernels* paged_kernels() { return &kKernels; }

}  // namespace TTSCALE_CPU_ISA
}  // namespace cpu
}  // namespace ttscale
