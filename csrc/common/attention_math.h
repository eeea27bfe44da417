// Attention math shared by every attention op (dense, paged, shared-prefix, sparse) and by the CPU
// and CUDA paths. Conventions (DESIGN.md): LSE is the natural log of the softmax normaliser,
// float32, [T, Hq]; an empty key set gives output 0 and LSE -inf.
//
// Non-finite values (the contract of every attention op on every device, as torch's SDPA math):
//  - keys a query cannot see (causal / window mask, past the sequence, unselected sparse pages,
//    tile padding) never touch its output or LSE, whatever their K and V hold: kernels must not
//    accumulate 0 * v for them (0 * inf = NaN);
//  - a NaN or +inf visible score (NaN / inf in the query or a visible key, softcap of NaN) makes the
//    row's output all NaN and its LSE NaN. The online softmax marks such a row by a NaN running sum
//    l, which sticks through every rescale and merge (poison());
//  - a non-finite value at a visible key of V gives the IEEE result of sum p_j v_j / l.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace ttscale {
namespace attn {

// Which keys a query may see. Positions are in key coordinates: a query's position is
// q_pos = q_idx + (kv_len - q_len) (causal masks aligned bottom-right, as FlashAttention >= 2.1 and
// FlashInfer). Causal: k_pos <= q_pos. Sliding window (window_left >= 0): k_pos >= q_pos - window_left.
TT_HD bool visible(int64_t q_pos, int64_t k_pos, bool causal, int64_t window_left) {
  if (causal && k_pos > q_pos) return false;
  // q_pos - k_pos > window_left: q_pos - window_left would overflow for a window near INT64_MAX
  // (sys.maxsize as "no window") and a negative q_pos (more queries than keys)
  if (window_left >= 0 && q_pos - k_pos > window_left) return false;
  return true;
}

// First and one-past-last visible key for a query (the visible keys are a contiguous range).
TT_HD void visible_range(int64_t q_pos, int64_t kv_len, bool causal, int64_t window_left, int64_t* k_begin,
                         int64_t* k_end) {
  int64_t e = causal ? (q_pos + 1 < kv_len ? q_pos + 1 : kv_len) : kv_len;
  int64_t b = (window_left >= 0 && window_left < q_pos) ? q_pos - window_left : 0;  // no overflow (see visible)
  if (e < b) e = b;
  *k_begin = b;
  *k_end = e;
}

// tanh soft-capping of a logit (Gemma 2): cap * tanh(x / cap); cap <= 0 disables.
TT_HD float softcap(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

// Online softmax state of one query row: running max m (of scaled logits) and running sum l of
// exp(s - m). out accumulates sum exp(s - m) * v with the same rescaling.
struct OnlineSoftmax {
  float m;
  float l;
  TT_HD void init() { m = -INFINITY; l = 0.0f; }
  // Returns the factor the accumulated output must be multiplied by before adding p * v for the
  // new block whose max is blk_max; updates m (l is updated by the caller with the block sum).
  TT_HD float rescale_to(float blk_max) {
    const float m_new = blk_max > m ? blk_max : m;
    const float alpha = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    l *= alpha;
    m = m_new;
    return alpha;
  }
  TT_HD float lse() const { return l > 0.0f ? m + logf(l) : (l == 0.0f ? -INFINITY : NAN); }
  // A NaN / +inf visible score: the row's result is NaN (see the contract above).
  TT_HD void poison() { l = NAN; }
};

// Scale of the accumulated output at the end: 1 / l, 0 for an empty row (l = 0), NaN for a
// poisoned one (l = NaN), so that out = acc * out_scale(l) follows the contract.
TT_HD float out_scale(float l) { return l > 0.0f ? 1.0f / l : (l == 0.0f ? 0.0f : NAN); }

// Whether a score makes its row NaN: NaN or +inf (-inf is a masked / impossible key).
TT_HD bool poisons(float s) { return !(s < INFINITY); }

// Merging two partial attention results over disjoint key sets (FlashInfer's merge_state, natural
// log): w_a = e^{lse_a - lse}, w_b = e^{lse_b - lse}, lse = log(e^{lse_a} + e^{lse_b}),
// out = w_a out_a + w_b out_b. Both empty (-inf): weights 0 and lse -inf. A NaN (poisoned) or
// +inf state makes the result NaN (weights and lse NaN), whichever side it is on.
struct MergeWeights {
  float wa, wb, lse;
};
TT_HD MergeWeights merge_weights(float lse_a, float lse_b) {
  MergeWeights r;
  if (lse_a != lse_a || lse_b != lse_b || lse_a == INFINITY || lse_b == INFINITY) {
    r.wa = NAN; r.wb = NAN; r.lse = NAN;
    return r;
  }
  const float mx = lse_a > lse_b ? lse_a : lse_b;
  if (mx == -INFINITY) {
    r.wa = 0.0f; r.wb = 0.0f; r.lse = -INFINITY;
    return r;
  }
  const float ea = expf(lse_a - mx), eb = expf(lse_b - mx);
  const float s = ea + eb;
  r.wa = ea / s;
  r.wb = eb / s;
  r.lse = mx + logf(s);
  return r;
}

}  // namespace attn
}  // namespace ttscale
