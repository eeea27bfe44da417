// Input validation helpers: every failure names the argument and what was expected.
// TT_CHECK_VALUE raises ValueError in Python (bad values); TT_CHECK raises RuntimeError (bad
// shapes, dtypes, devices, layouts), matching torch's own convention.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>

#include "common/dispatch.h"

#if defined(TTSCALE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#define TT_CHECK(cond, ...) TORCH_CHECK(cond, "ttscale: ", __VA_ARGS__)
#define TT_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "ttscale: ", __VA_ARGS__)

namespace ttscale {

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TT_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
           "), got ", t.device());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TT_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TT_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
           " must be one of " TT_FLOAT_DTYPES_STR ", got ", st);
}

// torch dtype -> kernel dtype (after check_float_dtype)
inline DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TT_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
           t.scalar_type());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TT_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1, name,
           " must be contiguous in its last dimension, got strides ", t.strides());
}

// ---------------------------------------------------------------- memory overlap of in-place outputs
// A tensor an op writes in place must give every element its own memory: through an expand()ed
// (stride-0) or as_strided view one write lands on several logical elements, and parallel writers
// race. at::has_internal_overlap only answers "yes" for stride 0 and "too hard" for any other
// non-dense layout (a cache that is a slice of a bigger buffer), so the rule here is our own:
// sorted by stride, each dim of size > 1 must step over everything the smaller-stride dims span.
// It holds for every slice, select, permutation or strided slice of a dense tensor (what real
// caches are) and fails for every overlapping layout; the only non-overlapping layouts it refuses
// are interleaved as_strided ones (e.g. sizes [3, 2], strides [2, 3]), which no cache uses.
inline bool strides_nest(at::IntArrayRef sizes, at::IntArrayRef strides) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims that take > 1 value
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) return true;  // no elements, nothing to overlap
    if (sizes[i] > 1) dims.emplace_back(std::abs(strides[i]), sizes[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest offset (elements) reachable with the smaller-stride dims
  for (const auto& d : dims) {
    if (d.first <= span) return false;
    span += d.first * (d.second - 1);
  }
  return true;
}

inline void check_no_internal_overlap(const at::Tensor& t, const char* name) {
  TT_CHECK(strides_nest(t.sizes(), t.strides()), name,
           " is written in place, so each of its elements needs its own memory, but its layout (shape ", t.sizes(),
           ", strides ", t.strides(), ") lets several elements share memory (an expand()ed, stride-0 or otherwise "
           "self-overlapping view); pass a tensor that owns its memory");
}

// Whether a and b (same device) may touch a common byte. Disjoint address ranges are the fast
// answer; two same-layout views of one buffer (k_cache = kv[:, 0], v_cache = kv[:, 1]) have
// interleaved ranges and are disjoint exactly when the pair, seen as one tensor with a leading
// dim of size 2 and stride (b - a), does not overlap itself. Anything else that shares a range is
// treated as overlapping.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto range = [](const at::Tensor& t) {
    int64_t extent = t.element_size();
    for (int64_t i = 0; i < t.dim(); ++i) extent += (t.size(i) - 1) * std::abs(t.stride(i)) * t.element_size();
    const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(lo, lo + (uintptr_t)extent);
  };
  const auto ra = range(a), rb = range(b);
  if (ra.second <= rb.first || rb.second <= ra.first) return false;
  const int64_t es = a.element_size();
  if (a.sizes() != b.sizes() || a.strides() != b.strides() || b.element_size() != es) return true;
  const int64_t delta = (int64_t)(rb.first - ra.first);  // bytes; wraps to a negative value when b < a
  if (delta % es != 0) return true;
  std::vector<int64_t> sizes{2}, strides{delta / es};
  sizes.insert(sizes.end(), a.sizes().begin(), a.sizes().end());
  strides.insert(strides.end(), a.strides().begin(), a.strides().end());
  return !strides_nest(sizes, strides);
}

// `written` is written in place while `other` is also written (both outputs) or still read (an
// input) by the same call: sharing memory would make one clobber the other.
inline void check_no_overlap(const at::Tensor& written, const char* wname, const at::Tensor& other,
                             const char* oname, bool other_is_output) {
  if (other_is_output) {
    TT_CHECK(!may_overlap(written, other), wname, " and ", oname, " share memory, but both are written in place "
             "(writing one would overwrite the other); pass tensors that do not share memory");
  } else {
    TT_CHECK(!may_overlap(written, other), oname, " shares memory with ", wname, ", which is written in place, so "
             "the op would read values it has already overwritten; pass ", oname, ".clone()");
  }
}

#if defined(TTSCALE_WITH_CUDA)
// The torch-free launchers return a cudaError_t as int; 0 is success.
inline void check_launch(int err, const char* op) {
  TT_CHECK(err == 0, op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace ttscale
