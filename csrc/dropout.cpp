// CPU dropout with the Philox mask of peftkern/reference/dropout.py, fused with the multiply.
// The reference path spells Philox with int64 torch ops (exact, ~100 passes over memory); this is
// the same function in one OpenMP pass, so CPU LoRA with dropout costs about one elementwise multiply.
#include <torch/extension.h>

#include <cstdint>

#include "dropout.h"

namespace peftkern {
namespace {

struct Words4 {
  uint32_t w[4];
};

inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

inline Words4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo(0xCD9E8D57u, c2, &hi_b);
    const uint32_t lo_a = mulhilo(0xD2511F53u, c0, &hi_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

template <typename scalar_t>
void dropout_mul_rows(const scalar_t* src, scalar_t* out, int64_t rows, int64_t cols, uint64_t seed,
                      uint32_t threshold, scalar_t scale) {
  const int64_t groups = (cols + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < rows; ++m) {
    const scalar_t* s = src + m * cols;
    scalar_t* o = out + m * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const Words4 r = philox4x32_10(static_cast<uint64_t>(m * groups + g), seed);
      const int64_t c0 = 4 * g;
      const int64_t n = cols - c0 < 4 ? cols - c0 : 4;
      for (int64_t l = 0; l < n; ++l) {
        const bool keep = (r.w[l] >> 8) >= threshold;
        o[c0 + l] = keep ? s[c0 + l] * scale : scalar_t(0);
      }
    }
  }
}

}  // namespace

void dropout_mul(const torch::Tensor& src, torch::Tensor& out, int64_t seed, int64_t threshold,
                 double scale) {
  TORCH_CHECK(src.device().is_cpu() && out.device().is_cpu(), "dropout_mul: CPU tensors expected");
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && out.is_contiguous() &&
                  src.sizes() == out.sizes() && src.scalar_type() == out.scalar_type(),
              "dropout_mul: src and out must be contiguous 2-D tensors of one shape and dtype");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24), "dropout_mul: threshold out of range");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "dropout_mul", [&] {
    dropout_mul_rows<scalar_t>(src.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), src.size(0),
                               src.size(1), static_cast<uint64_t>(seed),
                               static_cast<uint32_t>(threshold), static_cast<scalar_t>(scale));
  });
}

}  // namespace peftkern
