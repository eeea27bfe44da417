// Batched sampling ops: schemas, validation (shared by CPU and CUDA), the CPU implementation
// (row plans built in parallel with at::parallel_for over the per-ISA primitives, then draws), and,
// under TTSCALE_WITH_CUDA, the CUDA registration. Algorithm and semantics: sampling.h.
#include "ops/sampling/sampling.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/parallel.h"
#include "common/cpu_dispatch.h"
#include "common/dispatch.h"

#if defined(TTSCALE_WITH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include "ops/sampling/sampling_cuda.h"
#endif

namespace ttscale {
namespace sampling {
namespace {

using at::Tensor;

bool any_true(const Tensor& t) { return t.numel() > 0 && t.any().item<bool>(); }

// A per-row filter parameter: a scalar, or a [B] tensor (converted to a CPU float64/int64 copy
// for the CPU path; the CUDA path reads the tensor directly).
struct RowParam {
  std::vector<double> vals;  // empty: use scalar
  double scalar = 0.0;
  double at(int64_t r) const { return vals.empty() ? scalar : vals[r]; }
};

void check_row_tensor(const c10::optional<Tensor>& t, const char* name, int64_t B, const Tensor& ref, bool integer) {
  if (!t) return;
  check_device(*t, name, ref, "logits");
  TT_CHECK(t->dim() == 1 && t->size(0) == B, name, " must be a scalar or a 1-D tensor with one entry per row (",
           B, "), got shape ", t->sizes());
  if (integer) {
    TT_CHECK(!at::isFloatingType(t->scalar_type()) && t->scalar_type() != at::kBool, name,
             " must be an integer tensor, got ", t->scalar_type());
  } else {
    TT_CHECK(at::isFloatingType(t->scalar_type()), name, " must be a floating-point tensor, got ", t->scalar_type());
  }
}

// Value-range checks. On CUDA these read one flag back (a sync); they are skipped while a CUDA
// graph is being captured, where the caller vouches for the values.
void check_range(const c10::optional<Tensor>& t, double scalar, const char* name, double lo, double hi, bool closed_hi) {
  const bool hi_ok_scalar = closed_hi ? scalar <= hi : scalar < hi;
  TT_CHECK_VALUE(std::isfinite(scalar) || (!closed_hi && std::isinf(scalar) && scalar > 0), name, " must be finite, got ", scalar);
  TT_CHECK_VALUE(scalar >= lo && hi_ok_scalar, name, " must be in [", lo, ", ", hi, closed_hi ? "]" : ")", ", got ", scalar);
  if (!t) return;
  const Tensor x = t->to(at::kDouble);
  TT_CHECK_VALUE(!any_true(x.isnan()), name, " contains NaN");
  TT_CHECK_VALUE(!any_true(x < lo) && !any_true(closed_hi ? x > hi : x >= hi), name, " must be in [", lo, ", ", hi,
                 closed_hi ? "]" : ")", ", got values from ", x.min().item<double>(), " to ", x.max().item<double>());
}

bool capturing(const Tensor& t) {
#if defined(TTSCALE_WITH_CUDA)
  if (t.is_cuda()) return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
#endif
  (void)t;
  return false;
}

struct SampleInputs {
  int64_t B = 0, V = 0, N = 0;
  bool per_sample_seed = false, per_sample_offset = false;
};

SampleInputs validate_sample(const Tensor& x, const c10::optional<Tensor>& temperature, double temperature_val,
                             const c10::optional<Tensor>& top_k, const c10::optional<Tensor>& top_p, double top_p_val,
                             const c10::optional<Tensor>& min_p, double min_p_val, const c10::optional<Tensor>& indices,
                             const Tensor& seed, const Tensor& offset, bool is_probs) {
  const char* xname = is_probs ? "probs" : "logits";
  SampleInputs in;
  TT_CHECK(x.dim() == 2, xname, " must be 2-D [batch, vocab], got shape ", x.sizes());
  check_float_dtype(x, xname);
  in.B = x.size(0);
  in.V = x.size(1);
  TT_CHECK_VALUE(in.V > 0, xname, " must have a non-empty vocabulary (V > 0), got shape ", x.sizes());
  TT_CHECK_VALUE(in.V <= std::numeric_limits<int32_t>::max(), xname, " vocabulary size must fit in int32, got ", in.V);
  check_last_dim_contiguous(x, xname);
  check_row_tensor(temperature, "temperature", in.B, x, false);
  check_row_tensor(top_k, "top_k", in.B, x, true);
  check_row_tensor(top_p, "top_p", in.B, x, false);
  check_row_tensor(min_p, "min_p", in.B, x, false);
  if (is_probs)
    TT_CHECK_VALUE(!temperature && temperature_val == 1.0, "sample_from_probs takes no temperature (apply it to the "
                   "logits, or pass probs already sharpened)");
  in.N = in.B;
  if (indices) {
    check_device(*indices, "indices", x, xname);
    check_index_dtype(*indices, "indices");
    TT_CHECK(indices->dim() == 1, "indices must be 1-D [num_samples], got shape ", indices->sizes());
    in.N = indices->size(0);
  }
  for (const auto& pr : {std::make_pair(&seed, "seed"), std::make_pair(&offset, "offset")}) {
    const Tensor& t = *pr.first;
    TT_CHECK(t.scalar_type() == at::kLong, pr.second, " must be an int64 tensor, got ", t.scalar_type());
    TT_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == in.N), pr.second,
             " must be 1-D with 1 or num_samples (", in.N, ") entries, got shape ", t.sizes());
    check_device(t, pr.second, x, xname);
  }
  in.per_sample_seed = seed.size(0) == in.N && in.N != 1;
  in.per_sample_offset = offset.size(0) == in.N && in.N != 1;

  if (!capturing(x)) {
    check_range(temperature, temperature_val, "temperature", 0.0, std::numeric_limits<double>::infinity(), false);
    check_range(top_p, top_p_val, "top_p", 0.0, 1.0, true);
    check_range(min_p, min_p_val, "min_p", 0.0, 1.0, true);
    if (indices && in.N > 0) {
      const int64_t lo = indices->min().item<int64_t>(), hi = indices->max().item<int64_t>();
      TT_CHECK_VALUE(lo >= 0 && hi < in.B, "indices must be in [0, ", in.B, ") (rows of ", xname, "), got values from ",
                     lo, " to ", hi);
    }
    if (is_probs && x.numel() > 0) TT_CHECK_VALUE(!any_true(x < 0), "probs must be non-negative");
  }
  return in;
}

RowParam row_param(const c10::optional<Tensor>& t, double scalar) {
  RowParam p;
  p.scalar = scalar;
  if (t) {
    const Tensor c = t->to(at::kDouble).contiguous();
    p.vals.assign(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }
  return p;
}

std::vector<int64_t> to_int64_vec(const Tensor& t) {
  const Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

enum PlanKind { kGreedy = 0, kCandidates = 1, kBlocks = 2 };

struct RowPlan {
  PlanKind kind = kGreedy;
  int64_t argmax = 0;
  ScoreMap map{};
  float tau = -INFINITY;
  double log_z = 0.0;          // log of the unfiltered mass (for logprobs)
  ScoreMap lp_map{};           // score map the logprobs are measured in (temperature 1 for greedy rows)
  std::vector<int32_t> cand;   // kCandidates: kept token ids, best first
  std::vector<double> cum;     // kCandidates: running mass; kBlocks: block prefix sums
};

struct RowError {
  std::mutex mu;
  int64_t row = -1;
  std::string msg;
  void set(int64_t r, std::string m) {
    std::lock_guard<std::mutex> g(mu);
    if (row < 0 || r < row) { row = r; msg = std::move(m); }
  }
};

float raw_value(const RowView& row, int64_t j) {
  float v = 0.0f;
  TT_DISPATCH_FLOAT(row.dtype, T, v = to_float(static_cast<const T*>(row.data)[j]))
  return v;
}

// The error of a probs row whose largest value is above kMaxProb (CPU plans and the CUDA status).
std::string too_large_message(int64_t row, double m) {
  std::ostringstream os;
  os << "probs row " << row << " has a value of " << m << ", above 2^100: rows need not sum to 1, but their "
     << "sums must stay far inside float32 (divide the row by its maximum first)";
  return os.str();
}

// Mass of a score in double precision (plans and logprobs; the SIMD passes use the fp32 poly exp).
double mass_of(const ScoreMap& map, float s) { return map.probs_mode ? (double)s : std::exp((double)s); }

void build_plan(const CpuKernels& K, const RowView& row, bool probs, double T, int64_t k, double top_p, double min_p,
                bool want_logprobs, RowPlan& plan, RowError& err, int64_t r) {
  const int64_t V = row.n;
  const bool greedy = !probs && T == 0.0;
  const bool use_topk = !greedy && k > 0 && k < V;
  // The top-k scan also yields the max (its first candidate) and finds NaN/+inf, so that path
  // reads the row once; the others start with a max pass.
  float m;
  int64_t arg, bad;
  std::vector<float> vals;
  std::vector<int32_t> ids;
  if (use_topk) {
    vals.resize(k);
    ids.resize(k);
    std::vector<uint8_t> scratch(k * kTopkScratchBytes);
    bad = K.row_topk(row, k, vals.data(), ids.data(), scratch.data());
    m = vals[0];
    arg = ids[0];
  } else {
    arg = 0;
    K.row_max(row, &m, greedy ? &arg : nullptr, &bad);  // argmax only for greedy rows
  }
  const char* xname = probs ? "probs" : "logits";
  if (bad >= 0) {
    err.set(r, std::string(xname) + " row " + std::to_string(r) + " contains NaN or +inf (at token " +
                   std::to_string(bad) + ")");
    return;
  }
  if (!probs && m == -INFINITY) {
    err.set(r, "logits row " + std::to_string(r) + " has no finite value (every token is masked with -inf)");
    return;
  }
  if (probs && !(m > 0.0f)) {
    err.set(r, "probs row " + std::to_string(r) + " sums to zero");
    return;
  }
  if (probs && m > kMaxProb) {
    err.set(r, too_large_message(r, m));
    return;
  }
  plan.argmax = arg;
  ScoreMap map{probs ? 1 : 0, m, 1.0f, float_to_bits(m)};
  if (!probs && T > 0) map.inv_t = inv_temperature(T);
  plan.map = map;
  plan.lp_map = map;  // greedy rows: logprobs at temperature 1 (map.inv_t stays 1)
  if (want_logprobs) plan.log_z = std::log(K.row_mass(row, plan.lp_map, -INFINITY, nullptr));
  if (greedy) { plan.kind = kGreedy; return; }

  if (use_topk) {
    // ---- candidates: top-p / min-p cut the sorted top-k list
    plan.kind = kCandidates;
    std::vector<double> mass(k);
    double total = 0.0;
    for (int64_t j = 0; j < k; ++j) total += (mass[j] = mass_of(map, map.score(vals[j])));
    int64_t keep = k;
    if (top_p < 1.0) {
      const double target = top_p * total;
      double acc = 0.0;
      int64_t n = 0;
      while (n < k) { acc += mass[n++]; if (acc >= target) break; }
      while (n < k && vals[n] == vals[n - 1]) ++n;  // ties at the cut value stay
      keep = std::min(keep, std::max<int64_t>(n, 1));
    }
    if (min_p > 0.0) {
      const double thr = min_p * mass[0];
      int64_t n = 1;
      while (n < keep && mass[n] >= thr) ++n;
      keep = n;
    }
    plan.cand.assign(ids.begin(), ids.begin() + keep);
    plan.cum.resize(keep);
    double acc = 0.0;
    for (int64_t j = 0; j < keep; ++j) plan.cum[j] = (acc += mass[j]);
    return;
  }

  // ---- blocks: a score threshold, then block prefix sums of the kept mass
  plan.kind = kBlocks;
  float tau = -INFINITY;
  if (top_p < 1.0) {
    std::vector<double> hmass(kHistBins);
    std::vector<int64_t> hcount(kHistBins);
    K.row_hist(row, map, hmass.data(), hcount.data());
    double total = 0.0;
    for (double v : hmass) total += v;
    const double target = top_p * total;
    double acc = 0.0;
    int cut = kHistBins - 1;
    for (int b = 0; b < kHistBins; ++b) {
      if (hcount[b] == 0) continue;
      if (acc + hmass[b] >= target) { cut = b; break; }
      acc += hmass[b];
    }
    // exact cut inside the bin: sort its tokens by score, descending
    std::vector<float> s(hcount[cut]);
    std::vector<int32_t> id(hcount[cut]);
    // (the same fp32 arithmetic as the histogram, so c == hcount[cut]; the cap only guards memory)
    const int64_t c = K.row_collect_bin(row, map, cut, s.data(), id.data(), hcount[cut]);
    std::sort(s.begin(), s.begin() + c, [](float a, float b) { return a > b; });
    tau = c > 0 ? s[c - 1] : -INFINITY;
    for (int64_t j = 0; j < c; ++j) {
      acc += mass_of(map, s[j]);
      if (acc >= target) { tau = s[j]; break; }
    }
  }
  if (min_p > 0.0) {
    const float tau_m = probs ? (float)(min_p * (double)m) : (float)std::log(min_p);
    tau = std::max(tau, tau_m);
  }
  plan.tau = tau;
  plan.cum.resize((V + kBlock - 1) / kBlock);
  K.row_mass(row, map, tau, plan.cum.data());
}

int64_t draw(const CpuKernels& K, const RowView& row, const RowPlan& plan, double u) {
  switch (plan.kind) {
    case kGreedy: return plan.argmax;
    case kCandidates: {
      const int64_t n = (int64_t)plan.cum.size();
      return plan.cand[upper_bound_cum(plan.cum.data(), n, u * plan.cum[n - 1])];
    }
    default: {
      const int64_t nb = (int64_t)plan.cum.size();
      const double target = u * plan.cum[nb - 1];
      const int64_t b = upper_bound_cum(plan.cum.data(), nb, target);
      const double prev = b > 0 ? plan.cum[b - 1] : 0.0;
      const int64_t tok = K.row_draw_block(row, plan.map, plan.tau, b * kBlock, std::min(row.n, (b + 1) * kBlock),
                                           target - prev);
      if (tok >= 0) return tok;
      // unreachable in exact arithmetic (block b has positive kept mass): rescan the whole row
      return K.row_draw_block(row, plan.map, plan.tau, 0, row.n, target);
    }
  }
}

std::tuple<Tensor, Tensor> sample_cpu(const Tensor& x, const c10::optional<Tensor>& temperature,
                                      double temperature_val, const c10::optional<Tensor>& top_k, int64_t top_k_val,
                                      const c10::optional<Tensor>& top_p, double top_p_val,
                                      const c10::optional<Tensor>& min_p, double min_p_val,
                                      const c10::optional<Tensor>& indices, const Tensor& seed, const Tensor& offset,
                                      bool is_probs, bool return_logprobs) {
  const SampleInputs in = validate_sample(x, temperature, temperature_val, top_k, top_p, top_p_val, min_p, min_p_val,
                                          indices, seed, offset, is_probs);
  const int64_t B = in.B, V = in.V, N = in.N;
  Tensor tokens = at::empty({N}, x.options().dtype(at::kLong));
  Tensor logprobs = at::empty({return_logprobs ? N : 0}, x.options().dtype(at::kFloat));
  if (N == 0) return {tokens, logprobs};

  const RowParam T = row_param(temperature, temperature_val), P = row_param(top_p, top_p_val),
                 MP = row_param(min_p, min_p_val), Kp = row_param(top_k, (double)top_k_val);
  std::vector<int64_t> idx;
  if (indices) idx = to_int64_vec(*indices);
  const std::vector<int64_t> seeds = to_int64_vec(seed), offsets = to_int64_vec(offset);

  std::vector<int64_t> rows;  // distinct rows that are sampled
  {
    std::vector<uint8_t> used(B, indices ? 0 : 1);
    for (int64_t r : idx) used[r] = 1;
    for (int64_t r = 0; r < B; ++r)
      if (used[r]) rows.push_back(r);
  }
  const CpuKernels& K = *TT_CPU_SELECT(sampling_kernels);
  const DType dt = dtype_of(x.scalar_type());
  const char* base = static_cast<const char*>(x.data_ptr());
  const int64_t row_bytes = x.stride(0) * (int64_t)x.element_size();
  auto row_view = [&](int64_t r) { return RowView{base + r * row_bytes, dt, V}; };

  std::vector<RowPlan> plans(B);
  RowError err;
  at::parallel_for(0, (int64_t)rows.size(), grain_for((int64_t)rows.size(), (double)V, kMinParallelElems),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t q = b0; q < b1; ++q) {
      const int64_t r = rows[q];
      const double kv = Kp.at(r);
      const int64_t k = kv >= (double)V ? V : (int64_t)kv;
      build_plan(K, row_view(r), is_probs, T.at(r), k, P.at(r), MP.at(r), return_logprobs, plans[r], err, r);
    }
  });
  TT_CHECK_VALUE(err.row < 0, err.msg);

  int64_t* out = tokens.data_ptr<int64_t>();
  float* lp = return_logprobs ? logprobs.data_ptr<float>() : nullptr;
  // a draw is a binary search plus one block rescan, ~256 elements
  at::parallel_for(0, N, grain_for(N, 256.0, kMinParallelElems), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = indices ? idx[i] : i;
      const RowView row = row_view(r);
      const RowPlan& plan = plans[r];
      const uint64_t sd = (uint64_t)seeds[in.per_sample_seed ? i : 0];
      const uint64_t of = (uint64_t)offsets[in.per_sample_offset ? i : 0];
      const double u = philox_uniform(sd, of, sample_subseq(i, in.per_sample_seed), 0);
      const int64_t tok = draw(K, row, plan, u);
      out[i] = tok;
      if (lp) {
        const float v = raw_value(row, tok);
        lp[i] = plan.lp_map.probs_mode ? (float)(std::log((double)v) - plan.log_z)
                                       : (float)((double)plan.lp_map.score(v) - plan.log_z);
      }
    }
  });
  return {tokens, logprobs};
}

// ---------------------------------------------------------------- token_logprobs
void validate_token_logprobs(const Tensor& logits, const Tensor& tokens, const c10::optional<Tensor>& temperature,
                             double temperature_val) {
  TT_CHECK(logits.dim() == 2, "logits must be 2-D [batch, vocab], got shape ", logits.sizes());
  check_float_dtype(logits, "logits");
  check_last_dim_contiguous(logits, "logits");
  TT_CHECK_VALUE(logits.size(1) > 0, "logits must have a non-empty vocabulary (V > 0), got shape ", logits.sizes());
  check_device(tokens, "tokens", logits, "logits");
  check_index_dtype(tokens, "tokens");
  TT_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), "tokens must be 1-D with one entry per row (",
           logits.size(0), "), got shape ", tokens.sizes());
  check_row_tensor(temperature, "temperature", logits.size(0), logits, false);
  if (!capturing(logits)) {
    check_range(temperature, temperature_val, "temperature", 0.0, std::numeric_limits<double>::infinity(), false);
    if (tokens.numel() > 0) {
      const int64_t lo = tokens.min().item<int64_t>(), hi = tokens.max().item<int64_t>();
      TT_CHECK_VALUE(lo >= 0 && hi < logits.size(1), "tokens must be in [0, ", logits.size(1), "), got values from ",
                     lo, " to ", hi);
    }
  }
}

Tensor token_logprobs_cpu(const Tensor& logits, const Tensor& tokens, const c10::optional<Tensor>& temperature,
                          double temperature_val) {
  validate_token_logprobs(logits, tokens, temperature, temperature_val);
  const int64_t B = logits.size(0), V = logits.size(1);
  Tensor out = at::empty({B}, logits.options().dtype(at::kFloat));
  const RowParam T = row_param(temperature, temperature_val);
  const std::vector<int64_t> tok = to_int64_vec(tokens);
  const CpuKernels& K = *TT_CPU_SELECT(sampling_kernels);
  const DType dt = dtype_of(logits.scalar_type());
  const char* base = static_cast<const char*>(logits.data_ptr());
  const int64_t row_bytes = logits.stride(0) * (int64_t)logits.element_size();
  float* o = out.data_ptr<float>();
  RowError err;
  at::parallel_for(0, B, grain_for(B, 2.0 * (double)V, kMinParallelElems), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowView row{base + r * row_bytes, dt, V};
      float m;
      int64_t bad;
      K.row_max(row, &m, nullptr, &bad);
      if (bad >= 0) { err.set(r, "logits row " + std::to_string(r) + " contains NaN or +inf"); continue; }
      if (m == -INFINITY) { err.set(r, "logits row " + std::to_string(r) + " has no finite value"); continue; }
      const double t = T.at(r);
      const ScoreMap map{0, m, (t > 0 ? inv_temperature(t) : 1.0f), 0u};
      const double log_z = std::log(K.row_mass(row, map, -INFINITY, nullptr));
      o[r] = (float)((double)map.score(raw_value(row, tok[r])) - log_z);
    }
  });
  TT_CHECK_VALUE(err.row < 0, err.msg);
  return out;
}

// ---------------------------------------------------------------- speculative_verify
void validate_speculative(const Tensor& draft_tokens, const Tensor& draft_probs, const Tensor& target_probs,
                          const Tensor& seed, const Tensor& offset) {
  check_index_dtype(draft_tokens, "draft_tokens");
  TT_CHECK(draft_tokens.dim() == 2, "draft_tokens must be 2-D [batch, n], got shape ", draft_tokens.sizes());
  const int64_t B = draft_tokens.size(0), n = draft_tokens.size(1);
  TT_CHECK(draft_probs.dim() == 3 && draft_probs.size(0) == B && draft_probs.size(1) == n,
           "draft_probs must be [batch, n, vocab] = [", B, ", ", n, ", V], got shape ", draft_probs.sizes());
  const int64_t V = draft_probs.size(2);
  TT_CHECK_VALUE(V > 0, "draft_probs must have a non-empty vocabulary");
  TT_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == n + 1 &&
               target_probs.size(2) == V,
           "target_probs must be [batch, n + 1, vocab] = [", B, ", ", n + 1, ", ", V, "], got shape ",
           target_probs.sizes());
  check_float_dtype(draft_probs, "draft_probs");
  check_float_dtype(target_probs, "target_probs");
  TT_CHECK(draft_probs.scalar_type() == target_probs.scalar_type(), "draft_probs and target_probs must have the same "
           "dtype, got ", draft_probs.scalar_type(), " and ", target_probs.scalar_type());
  check_device(draft_probs, "draft_probs", draft_tokens, "draft_tokens");
  check_device(target_probs, "target_probs", draft_tokens, "draft_tokens");
  for (const auto& pr : {std::make_pair(&seed, "seed"), std::make_pair(&offset, "offset")}) {
    const Tensor& t = *pr.first;
    TT_CHECK(t.scalar_type() == at::kLong, pr.second, " must be an int64 tensor, got ", t.scalar_type());
    TT_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == B), pr.second, " must be 1-D with 1 or batch (", B,
             ") entries, got shape ", t.sizes());
    check_device(t, pr.second, draft_tokens, "draft_tokens");
  }
  if (capturing(draft_probs)) return;
  if (draft_tokens.numel() > 0) {
    const int64_t lo = draft_tokens.min().item<int64_t>(), hi = draft_tokens.max().item<int64_t>();
    TT_CHECK_VALUE(lo >= 0 && hi < V, "draft_tokens must be in [0, ", V, "), got values from ", lo, " to ", hi);
  }
  for (const auto& pr : {std::make_pair(&draft_probs, "draft_probs"), std::make_pair(&target_probs, "target_probs")}) {
    const Tensor& t = *pr.first;
    if (t.numel() == 0) continue;
    TT_CHECK_VALUE(!any_true(t < 0), pr.second, " must be non-negative");
    TT_CHECK_VALUE(!any_true(~at::isfinite(t)), pr.second, " contains NaN or inf");
  }
  if (target_probs.numel() > 0)
    TT_CHECK_VALUE(!any_true(target_probs.sum(-1, false, at::kFloat) <= 0), "target_probs has a row that sums to zero");
}

template <typename T>
void speculative_rows(const Tensor& draft_tokens, const Tensor& draft_probs,
                      const Tensor& target_probs, const Tensor& seed, const Tensor& offset, Tensor& out_tokens,
                      Tensor& num_accepted) {
  const int64_t B = draft_tokens.size(0), n = draft_tokens.size(1), V = draft_probs.size(2);
  const std::vector<int64_t> dt = to_int64_vec(draft_tokens), seeds = to_int64_vec(seed), offs = to_int64_vec(offset);
  const bool per_seed = seed.size(0) == B && B != 1, per_off = offset.size(0) == B && B != 1;
  const Tensor q = draft_probs.contiguous(), p = target_probs.contiguous();
  const T* qd = static_cast<const T*>(q.data_ptr());
  const T* pd = static_cast<const T*>(p.data_ptr());
  int64_t* ot = out_tokens.data_ptr<int64_t>();
  int64_t* na = num_accepted.data_ptr<int64_t>();
  at::parallel_for(0, B, grain_for(B, (double)(n * V), kMinParallelElems), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint64_t sd = (uint64_t)seeds[per_seed ? b : 0], of = (uint64_t)offs[per_off ? b : 0];
      const uint64_t ss = sample_subseq(b, per_seed);
      int64_t j = 0;
      for (; j < n; ++j) {
        const int64_t t = dt[b * n + j];
        const float pj = to_float(pd[(b * (n + 1) + j) * V + t]), qj = to_float(qd[(b * n + j) * V + t]);
        if (!spec_accept(philox_uniform(sd, of, ss, 2 * j), pj, qj)) break;
        ot[b * (n + 1) + j] = t;
      }
      // position j: resample from max(0, p - q) (rejection) or from p (bonus token, j == n)
      const T* prow = pd + (b * (n + 1) + j) * V;
      const T* qrow = j < n ? qd + (b * n + j) * V : nullptr;
      auto resid = [&](int64_t v) {
        const double pv = to_float(prow[v]);
        return qrow ? std::max(0.0, pv - (double)to_float(qrow[v])) : pv;
      };
      double z = 0.0;
      for (int64_t v = 0; v < V; ++v) z += resid(v);
      const bool use_p = !(z > 0.0);  // p == q exactly: the residual is empty, fall back to p
      if (use_p) { qrow = nullptr; z = 0.0; for (int64_t v = 0; v < V; ++v) z += resid(v); }
      const double target = philox_uniform(sd, of, ss, 2 * j + 1) * z;
      double c = 0.0;
      int64_t tok = -1;
      for (int64_t v = 0; v < V; ++v) {
        const double m = resid(v);
        if (m <= 0.0) continue;
        c += m;
        tok = v;
        if (c > target) break;
      }
      ot[b * (n + 1) + j] = tok;
      for (int64_t k = j + 1; k <= n; ++k) ot[b * (n + 1) + k] = -1;
      na[b] = j;
    }
  });
}

std::tuple<Tensor, Tensor> speculative_verify_cpu(const Tensor& draft_tokens, const Tensor& draft_probs,
                                                  const Tensor& target_probs, const Tensor& seed,
                                                  const Tensor& offset) {
  validate_speculative(draft_tokens, draft_probs, target_probs, seed, offset);
  const int64_t B = draft_tokens.size(0), n = draft_tokens.size(1);
  Tensor out = at::empty({B, n + 1}, draft_tokens.options().dtype(at::kLong));
  Tensor acc = at::empty({B}, draft_tokens.options().dtype(at::kLong));
  if (B == 0) return {out, acc};
  TT_DISPATCH_FLOAT(dtype_of(draft_probs.scalar_type()), T,
                    speculative_rows<T>(draft_tokens, draft_probs, target_probs, seed, offset, out, acc))
  return {out, acc};
}

}  // namespace
}  // namespace sampling
}  // namespace ttscale

TORCH_LIBRARY_FRAGMENT(ttscale, m) {
  m.def(
      "sample(Tensor logits, Tensor? temperature, float temperature_val, Tensor? top_k, int top_k_val, "
      "Tensor? top_p, float top_p_val, Tensor? min_p, float min_p_val, Tensor? indices, Tensor seed, "
      "Tensor offset, bool is_probs, bool return_logprobs) -> (Tensor, Tensor)");
  m.def("token_logprobs(Tensor logits, Tensor tokens, Tensor? temperature, float temperature_val) -> Tensor");
  m.def(
      "speculative_verify(Tensor draft_tokens, Tensor draft_probs, Tensor target_probs, Tensor seed, Tensor offset)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ttscale, CPU, m) {
  m.impl("sample", &ttscale::sampling::sample_cpu);
  m.impl("token_logprobs", &ttscale::sampling::token_logprobs_cpu);
  m.impl("speculative_verify", &ttscale::sampling::speculative_verify_cpu);
}

#if defined(TTSCALE_WITH_CUDA)
// ---------------------------------------------------------------- CUDA registration
// Validation is shared with the CPU path; per-row parameters are converted on the device (no sync),
// the launcher (sampling_cuda.cu) runs on the current stream, and unless a CUDA graph is being
// captured one int32[2] status word is read back to raise the same errors as the CPU path.
namespace ttscale {
namespace sampling {
namespace {

const double* cuda_float_param(const c10::optional<Tensor>& t, Tensor& holder) {
  if (!t) return nullptr;
  holder = t->to(at::kDouble).contiguous();
  return holder.data_ptr<double>();
}

const int64_t* cuda_long_param(const c10::optional<Tensor>& t, Tensor& holder) {
  if (!t) return nullptr;
  holder = t->to(at::kLong).contiguous();
  return holder.data_ptr<int64_t>();
}

// {0, INT32_MAX}: status[0] the error code, status[1] the smallest offending row (sampling_cuda.h).
Tensor cuda_status(const Tensor& like) {
  Tensor s = at::empty({2}, like.options().dtype(at::kInt));
  s.narrow(0, 0, 1).fill_(0);
  s.narrow(0, 1, 1).fill_(std::numeric_limits<int32_t>::max());
  return s;
}


// First NaN / +inf token of a row (the kernels report only the row).
int64_t first_bad_token(const Tensor& row) {
  const Tensor r = row.to(at::kFloat);
  const Tensor bad = (r.isnan() | (r == std::numeric_limits<float>::infinity())).nonzero();
  return bad.numel() > 0 ? bad[0][0].item<int64_t>() : -1;
}

std::tuple<Tensor, Tensor> sample_cuda_impl(const Tensor& x, const c10::optional<Tensor>& temperature,
                                            double temperature_val, const c10::optional<Tensor>& top_k,
                                            int64_t top_k_val, const c10::optional<Tensor>& top_p, double top_p_val,
                                            const c10::optional<Tensor>& min_p, double min_p_val,
                                            const c10::optional<Tensor>& indices, const Tensor& seed,
                                            const Tensor& offset, bool is_probs, bool return_logprobs) {
  const SampleInputs in = validate_sample(x, temperature, temperature_val, top_k, top_p, top_p_val, min_p, min_p_val,
                                          indices, seed, offset, is_probs);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = in.N;
  Tensor tokens = at::empty({N}, x.options().dtype(at::kLong));
  Tensor logprobs = at::empty({return_logprobs ? N : 0}, x.options().dtype(at::kFloat));
  if (N == 0) return {tokens, logprobs};

  Tensor t_h, k_h, p_h, m_h, i_h;
  const Tensor seed_c = seed.contiguous(), offset_c = offset.contiguous();
  SampleCudaParams p;
  p.x = x.data_ptr();
  p.dtype = dtype_of(x.scalar_type());
  p.B = in.B;
  p.V = in.V;
  p.row_stride = x.stride(0);
  p.probs = is_probs;
  p.temperature = cuda_float_param(temperature, t_h);
  p.temperature_val = temperature_val;
  p.top_k = cuda_long_param(top_k, k_h);
  p.top_k_val = top_k_val;
  p.top_p = cuda_float_param(top_p, p_h);
  p.top_p_val = top_p_val;
  p.min_p = cuda_float_param(min_p, m_h);
  p.min_p_val = min_p_val;
  p.indices = cuda_long_param(indices, i_h);
  p.N = N;
  p.seed = seed_c.data_ptr<int64_t>();
  p.seed_len = seed_c.size(0);
  p.offset = offset_c.data_ptr<int64_t>();
  p.offset_len = offset_c.size(0);
  p.out_tokens = tokens.data_ptr<int64_t>();
  p.out_logprobs = return_logprobs ? logprobs.data_ptr<float>() : nullptr;
  Tensor status = cuda_status(x);
  p.status = status.data_ptr<int32_t>();
  Tensor workspace = at::empty({(int64_t)std::max<size_t>(sample_cuda_workspace_bytes(p), 1)},
                               x.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  check_launch(sample_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "sample");

  if (!capturing(x)) {
    const Tensor s = status.cpu();
    const int32_t code = s.data_ptr<int32_t>()[0], row = s.data_ptr<int32_t>()[1];
    const char* xname = is_probs ? "probs" : "logits";
    TT_CHECK_VALUE(code != kStatusBadValue, xname, " row ", row, " contains NaN or +inf (at token ",
                   first_bad_token(x.select(0, row)), ")");
    TT_CHECK_VALUE(code != kStatusNoMass || is_probs, "logits row ", row,
                   " has no finite value (every token is masked with -inf)");
    TT_CHECK_VALUE(code != kStatusNoMass || !is_probs, "probs row ", row, " sums to zero");
    TT_CHECK_VALUE(code != kStatusTooLarge, too_large_message(row, x.select(0, row).max().item<double>()));
  }
  return {tokens, logprobs};
}

Tensor token_logprobs_cuda_impl(const Tensor& logits, const Tensor& tokens, const c10::optional<Tensor>& temperature,
                                double temperature_val) {
  validate_token_logprobs(logits, tokens, temperature, temperature_val);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0);
  Tensor out = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return out;
  Tensor t_h;
  const Tensor tok = tokens.to(at::kLong).contiguous();
  TokenLogprobsCudaParams p;
  p.x = logits.data_ptr();
  p.dtype = dtype_of(logits.scalar_type());
  p.B = B;
  p.V = logits.size(1);
  p.row_stride = logits.stride(0);
  p.tokens = tok.data_ptr<int64_t>();
  p.temperature = cuda_float_param(temperature, t_h);
  p.temperature_val = temperature_val;
  p.out = out.data_ptr<float>();
  Tensor status = cuda_status(logits);
  p.status = status.data_ptr<int32_t>();
  check_launch(token_logprobs_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "token_logprobs");

  if (!capturing(logits)) {
    const Tensor s = status.cpu();
    const int32_t code = s.data_ptr<int32_t>()[0], row = s.data_ptr<int32_t>()[1];
    TT_CHECK_VALUE(code != kStatusBadValue, "logits row ", row, " contains NaN or +inf");
    TT_CHECK_VALUE(code != kStatusNoMass, "logits row ", row, " has no finite value");
  }
  return out;
}

std::tuple<Tensor, Tensor> speculative_verify_cuda_impl(const Tensor& draft_tokens, const Tensor& draft_probs,
                                                        const Tensor& target_probs, const Tensor& seed,
                                                        const Tensor& offset) {
  validate_speculative(draft_tokens, draft_probs, target_probs, seed, offset);
  const c10::cuda::CUDAGuard guard(draft_tokens.device());
  const int64_t B = draft_tokens.size(0), n = draft_tokens.size(1);
  Tensor out = at::empty({B, n + 1}, draft_tokens.options().dtype(at::kLong));
  Tensor acc = at::empty({B}, draft_tokens.options().dtype(at::kLong));
  if (B == 0) return {out, acc};
  const Tensor dt = draft_tokens.to(at::kLong).contiguous();
  const Tensor q = draft_probs.contiguous(), pr = target_probs.contiguous();
  const Tensor seed_c = seed.contiguous(), offset_c = offset.contiguous();
  SpeculativeCudaParams p;
  p.draft_tokens = dt.data_ptr<int64_t>();
  p.draft_probs = q.data_ptr();
  p.target_probs = pr.data_ptr();
  p.dtype = dtype_of(draft_probs.scalar_type());
  p.B = B;
  p.n = n;
  p.V = draft_probs.size(2);
  p.seed = seed_c.data_ptr<int64_t>();
  p.seed_len = seed_c.size(0);
  p.offset = offset_c.data_ptr<int64_t>();
  p.offset_len = offset_c.size(0);
  p.out_tokens = out.data_ptr<int64_t>();
  p.num_accepted = acc.data_ptr<int64_t>();
  check_launch(speculative_verify_cuda(p, at::cuda::getCurrentCUDAStream().stream()), "speculative_verify");
  return {out, acc};
}

}  // namespace
}  // namespace sampling
}  // namespace ttscale

TORCH_LIBRARY_IMPL(ttscale, CUDA, m) {
  m.impl("sample", &ttscale::sampling::sample_cuda_impl);
  m.impl("token_logprobs", &ttscale::sampling::token_logprobs_cuda_impl);
  m.impl("speculative_verify", &ttscale::sampling::speculative_verify_cuda_impl);
}
#endif  // TTSCALE_WITH_CUDA
