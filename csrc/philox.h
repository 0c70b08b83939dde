#pragma once
// Philox4x32-10, the one spelling of it in peftkern's compiled code (CPU and CUDA): the counter is
// (lo32, hi32, 0, 0) of a 64-bit counter and the key (lo32, hi32) of the seed, as Triton's tl.philox
// and peftkern/reference/dropout.py use them, so every backend makes the same dropout mask.
#include <cstdint>

#ifdef __CUDACC__
#define PEFTKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PEFTKERN_HOST_DEVICE inline
#endif

namespace peftkern {

PEFTKERN_HOST_DEVICE uint32_t mul_hi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// out[0..3] = Philox4x32-10(counter, seed)
PEFTKERN_HOST_DEVICE void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mul_hi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mul_hi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The dropout mask's use of it (peftkern/reference/dropout.py): one call per group of kColsPerCall
// columns of a row; column l of the group takes the 16-bit half l % 2 of word l / 2 as its uniform
// (eight decisions per call: the mask costs an eighth of a Philox call per element).
constexpr int kColsPerCall = 8;

PEFTKERN_HOST_DEVICE uint32_t uniform16(const uint32_t words[4], int l) {
  return (words[l >> 1] >> (16 * (l & 1))) & 0xFFFFu;
}

}  // namespace peftkern
