// Dense flash attention: schema, validation (shared by CPU and CUDA), the CPU implementation
// (at::parallel_for over (sequence, KV head, query tile) units running the per-ISA kernel), and,
// under TTSCALE_WITH_CUDA, the CUDA registration. Semantics and algorithm: attention.h.
#include "ops/attention/attention.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/cpu_dispatch.h"
#include "common/dispatch.h"

#if defined(TTSCALE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "ops/attention/attention_cuda.h"
#endif

namespace ttscale {
namespace attention {
namespace {

using at::Tensor;

struct Layout {
  bool ragged = false;
  int64_t B = 0, Sq = 0, Sk = 0, Tq = 0, Hq = 0, Hkv = 0, D = 0;
  std::vector<int32_t> cu_q, cu_k;  // host copies (ragged)
  int64_t max_q_len = 0;
};

void check_cu_seqlens(const Tensor& cu, const char* name, int64_t T, const char* tname, const Tensor& q,
                      std::vector<int32_t>& host) {
  check_device(cu, name, q, "q");
  TT_CHECK(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TT_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D [batch + 1], got shape ", cu.sizes());
  const Tensor c = cu.to(at::kCPU).contiguous();
  host.assign(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel());
  TT_CHECK_VALUE(host[0] == 0, name, " must start at 0, got ", host[0]);
  for (size_t i = 1; i < host.size(); ++i)
    TT_CHECK_VALUE(host[i] >= host[i - 1], name, " must be non-decreasing, got ", host[i - 1], " then ", host[i],
                   " at entries ", i - 1, ", ", i);
  TT_CHECK_VALUE(host.back() == T, name, " last entry must equal the number of tokens in ", tname, " (", T,
                 "), got ", host.back());
}

Layout validate(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& cu_q,
                const c10::optional<Tensor>& cu_k, c10::optional<double> scale, int64_t window_left, double softcap) {
  Layout L;
  TT_CHECK(q.dim() == 4 || q.dim() == 3, "q must be 4-D [batch, seq, heads, head_dim] (padded) or 3-D "
           "[tokens, heads, head_dim] (ragged), got shape ", q.sizes());
  L.ragged = q.dim() == 3;
  const char* layout = L.ragged ? "[tokens, kv_heads, head_dim] (ragged, like q)" : "[batch, seq, kv_heads, head_dim] (padded, like q)";
  check_dim(k, "k", q.dim(), layout);
  check_dim(v, "v", q.dim(), layout);
  check_float_dtype(q, "q");
  TT_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ", k.scalar_type());
  TT_CHECK(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (", q.scalar_type(), "), got ", v.scalar_type());
  check_device(k, "k", q, "q");
  check_device(v, "v", q, "q");
  L.D = q.size(-1);
  TT_CHECK(k.size(-1) == L.D, "k head_dim (", k.size(-1), ") must equal q head_dim (", L.D, ")");
  TT_CHECK(v.size(-1) == L.D, "v head_dim (", v.size(-1), ") must equal q head_dim (", L.D, ")");
  TT_CHECK(head_dim_supported(L.D), "q head_dim must be one of " TT_HEAD_DIMS_STR ", got ", L.D);
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  L.Hq = q.size(-2);
  L.Hkv = k.size(-2);
  TT_CHECK(v.size(-2) == L.Hkv, "v must have as many heads as k (", L.Hkv, "), got ", v.size(-2));
  TT_CHECK(L.Hkv >= 1 && L.Hq >= 1, "q and k must have at least one head, got Hq=", L.Hq, ", Hkv=", L.Hkv);
  TT_CHECK(L.Hq % L.Hkv == 0, "q heads (", L.Hq, ") must be a multiple of k/v heads (", L.Hkv, ")");
  TT_CHECK(k.size(-3) == v.size(-3), "k and v must have the same sequence length, got ", k.size(-3), " and ", v.size(-3));
  if (L.ragged) {
    TT_CHECK(cu_q.has_value() && cu_k.has_value(), "ragged (3-D) q needs both cu_seqlens_q and cu_seqlens_k");
    L.Tq = q.size(0);
    check_cu_seqlens(*cu_q, "cu_seqlens_q", L.Tq, "q", q, L.cu_q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", k.size(0), "k", q, L.cu_k);
    TT_CHECK(L.cu_q.size() == L.cu_k.size(), "cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
             L.cu_q.size(), " and ", L.cu_k.size());
    L.B = (int64_t)L.cu_q.size() - 1;
    for (int64_t b = 0; b < L.B; ++b) L.max_q_len = std::max<int64_t>(L.max_q_len, L.cu_q[b + 1] - L.cu_q[b]);
  } else {
    TT_CHECK(!cu_q.has_value() && !cu_k.has_value(), "cu_seqlens_q / cu_seqlens_k are only for ragged (3-D) inputs; "
             "q is padded (4-D)");
    L.B = q.size(0);
    TT_CHECK(k.size(0) == L.B && v.size(0) == L.B, "k and v must have the batch size of q (", L.B, "), got ", k.size(0),
             " and ", v.size(0));
    L.Sq = q.size(1);
    L.Sk = k.size(1);
    L.Tq = L.B * L.Sq;
    L.max_q_len = L.Sq;
  }
  TT_CHECK_VALUE(window_left >= -1, "window_left must be -1 (no window) or >= 0, got ", window_left);
  TT_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0: off), got ", softcap);
  if (scale) TT_CHECK_VALUE(std::isfinite(*scale), "scale must be finite, got ", *scale);
  return L;
}

AttnParams make_params(const Layout& L, const Tensor& q, const Tensor& k, const Tensor& v, c10::optional<double> scale,
                       bool causal, int64_t window_left, double softcap) {
  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = dtype_of(q.scalar_type());
  const int o = L.ragged ? 1 : 0;  // dimension offset of (token, head)
  p.q_sb = L.ragged ? 0 : q.stride(0);
  p.k_sb = L.ragged ? 0 : k.stride(0);
  p.v_sb = L.ragged ? 0 : v.stride(0);
  p.q_st = q.stride(1 - o); p.q_sh = q.stride(2 - o);
  p.k_st = k.stride(1 - o); p.k_sh = k.stride(2 - o);
  p.v_st = v.stride(1 - o); p.v_sh = v.stride(2 - o);
  p.B = L.B; p.Hq = L.Hq; p.Hkv = L.Hkv; p.D = L.D; p.Sq = L.Sq; p.Sk = L.Sk;
  p.scale = scale ? (float)*scale : (float)(1.0 / std::sqrt((double)L.D));
  p.softcap = (float)softcap;
  p.causal = causal;
  p.window_left = window_left;
  return p;
}

std::vector<int64_t> out_shape(const Layout& L, bool with_d) {
  std::vector<int64_t> s = L.ragged ? std::vector<int64_t>{L.Tq, L.Hq} : std::vector<int64_t>{L.B, L.Sq, L.Hq};
  if (with_d) s.push_back(L.D);
  return s;
}

std::tuple<Tensor, Tensor> attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const c10::optional<Tensor>& cu_seqlens_q,
                                         const c10::optional<Tensor>& cu_seqlens_k, bool causal,
                                         c10::optional<double> scale, int64_t window_left, double softcap,
                                         bool return_lse) {
  const Layout L = validate(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_left, softcap);
  AttnParams p = make_params(L, q, k, v, scale, causal, window_left, softcap);
  if (L.ragged) { p.cu_q = L.cu_q.data(); p.cu_k = L.cu_k.data(); }
  const bool f32 = q.scalar_type() == at::kFloat;
  Tensor out32 = at::empty(out_shape(L, true), q.options().dtype(at::kFloat));
  Tensor lse = at::empty(return_lse ? out_shape(L, false) : std::vector<int64_t>{0}, q.options().dtype(at::kFloat));
  p.o = out32.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;

  // units: (sequence, kv head, query tile); per (sequence, head) the tiles are interleaved
  // cheap/expensive (causal) so that contiguous chunks of the range carry similar work.
  const int64_t G = L.Hq / L.Hkv, tq = cpu_q_tile(G);
  struct Unit { int64_t b, hk, r0, r1; };
  std::vector<Unit> units;
  for (int64_t b = 0; b < L.B; ++b) {
    const int64_t ql = p.q_len(b);
    const int64_t nt = (ql + tq - 1) / tq;
    for (int64_t hk = 0; hk < L.Hkv; ++hk)
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = (i & 1) ? nt - 1 - i / 2 : i / 2;
        units.push_back({b, hk, t * tq, std::min(ql, (t + 1) * tq)});
      }
  }
  if (!units.empty()) {
    const CpuKernels* K = TT_CPU_SELECT(attention_kernels);
    const int64_t scratch_n = cpu_scratch_floats(G * tq, L.D);
    // upper bound of the q.k and p.v multiply-adds (no causal discount): small calls stay inline
    double macs = 0.0;
    for (int64_t b = 0; b < L.B; ++b) macs += 2.0 * (double)(p.q_len(b) * L.Hq) * (double)p.k_len(b) * (double)L.D;
    at::parallel_for(0, (int64_t)units.size(), grain_for_total((int64_t)units.size(), macs, kMinParallelMacs),
                     [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(scratch_n);
      for (int64_t u = begin; u < end; ++u) {
        const Unit& w = units[u];
        K->run_unit(p, w.b, w.hk, w.r0, w.r1, scratch.data());
      }
    });
  }
  Tensor out = f32 ? out32 : out32.to(q.scalar_type());
  return {out, lse};
}

}  // namespace
}  // namespace attention
}  // namespace ttscale

TORCH_LIBRARY_FRAGMENT(ttscale, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal, "
      "float? scale, int window_left, float softcap, bool return_lse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ttscale, CPU, m) { m.impl("attention", &ttscale::attention::attention_cpu); }

#if defined(TTSCALE_WITH_CUDA)
// ---------------------------------------------------------------- CUDA registration
// Validation is shared with the CPU path (it reads cu_seqlens back to the host: one sync per call
// for ragged inputs, also needed to size the grid by the longest query sequence).
namespace ttscale {
namespace attention {
namespace {

std::tuple<Tensor, Tensor> attention_cuda_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const c10::optional<Tensor>& cu_seqlens_q,
                                               const c10::optional<Tensor>& cu_seqlens_k, bool causal,
                                               c10::optional<double> scale, int64_t window_left, double softcap,
                                               bool return_lse) {
  const Layout L = validate(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_left, softcap);
  const c10::cuda::CUDAGuard guard(q.device());
  TT_CHECK(L.B <= 65535 && L.Hq <= 65535, "attention (CUDA): batch and q heads must be <= 65535, got ", L.B, ", ", L.Hq);
  // The fp16/bf16 kernel copies rows with 16-byte cp.async: rows must start 16-byte aligned.
  auto aligned = [](const Tensor& t) {
    if (t.scalar_type() == at::kFloat) return true;
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    for (int64_t i = 0; i + 1 < t.dim(); ++i)
      if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
    return true;
  };
  const Tensor qa = aligned(q) ? q : q.clone(at::MemoryFormat::Contiguous);
  const Tensor ka = aligned(k) ? k : k.clone(at::MemoryFormat::Contiguous);
  const Tensor va = aligned(v) ? v : v.clone(at::MemoryFormat::Contiguous);
  AttnParams p = make_params(L, qa, ka, va, scale, causal, window_left, softcap);
  Tensor cuq, cuk;
  if (L.ragged) {
    cuq = cu_seqlens_q->contiguous();
    cuk = cu_seqlens_k->contiguous();
    p.cu_q = cuq.data_ptr<int32_t>();
    p.cu_k = cuk.data_ptr<int32_t>();
  }
  Tensor out = at::empty(out_shape(L, true), q.options());
  Tensor lse = at::empty(return_lse ? out_shape(L, false) : std::vector<int64_t>{0}, q.options().dtype(at::kFloat));
  p.o = out.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  if (L.Tq == 0 || L.B == 0) return {out, lse};
  const int err = attention_cuda(p, L.max_q_len, at::cuda::getCurrentCUDAStream().stream());
  TT_CHECK(err == 0, "attention: CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {out, lse};
}

}  // namespace
}  // namespace attention
}  // namespace ttscale

TORCH_LIBRARY_IMPL(ttscale, CUDA, m) { m.impl("attention", &ttscale::attention::attention_cuda_impl); }
#endif  // TTSCALE_WITH_CUDA
