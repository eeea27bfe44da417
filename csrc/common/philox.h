// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), the generator behind curand's Philox. One implementation for CPU and CUDA, so a given
// (seed, offset) gives the same random numbers, hence the same tokens, on either device.
//
// ttscale's stream layout: draw number j of subsequence `subseq` under (seed, offset) is
//   counter = (offset + j/2) as 2 x 32 bits  ||  subseq as 2 x 32 bits,   key = seed (2 x 32 bits)
// and the 4 output words of that block give two 53-bit doubles: j even -> words 0,1; j odd -> 2,3.
// A call that makes at most 2*m draws per subsequence advances the caller's offset by m.
#pragma once
#include <cstdint>
#include "common/host_device.h"

namespace ttscale {

struct Philox4 { uint32_t v[4]; };

TT_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = (uint64_t)a * (uint64_t)b;
  *hi = (uint32_t)(p >> 32);
  return (uint32_t)p;
}

TT_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(M0, ctr.v[0], &hi0);
    const uint32_t lo1 = philox_mulhilo(M1, ctr.v[2], &hi1);
    Philox4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// Two 32-bit words -> uniform double in [0, 1) with 53 random bits.
TT_HD double philox_u53(uint32_t a, uint32_t b) {
  const uint64_t hi = (uint64_t)(a >> 5), lo = (uint64_t)(b >> 6);
  return (double)((hi << 26) | lo) * (1.0 / 9007199254740992.0);
}

// Draw number j of subsequence `subseq` (see the layout above).
TT_HD double philox_uniform(uint64_t seed, uint64_t offset, uint64_t subseq, uint64_t j) {
  const uint64_t c = offset + (j >> 1);
  Philox4 ctr;
  ctr.v[0] = (uint32_t)c;
  ctr.v[1] = (uint32_t)(c >> 32);
  ctr.v[2] = (uint32_t)subseq;
  ctr.v[3] = (uint32_t)(subseq >> 32);
  const Philox4 r = philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
  return (j & 1) ? philox_u53(r.v[2], r.v[3]) : philox_u53(r.v[0], r.v[1]);
}

}  // namespace ttscale
