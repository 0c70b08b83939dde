// CPU dropout multiplier (keep ? 1/(1-p) : 0) with the Philox mask of peftkern/reference/dropout.py.
// The reference path spells Philox with int64 torch ops (exact, ~100 passes over memory); this is
// the same function in one OpenMP pass. The CPU LoRA path asks for it one cache-sized block of rows
// at a time (row_offset says where the block starts), so no [M, K] mask ever exists.
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
void fill_multiplier(scalar_t* out, int64_t rows, int64_t cols, int64_t row_offset, uint64_t seed,
                     uint32_t threshold, scalar_t scale) {
  const int64_t groups = (cols + 3) / 4;
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < rows; ++m) {
    scalar_t* o = out + m * cols;
    const uint64_t row_counter = static_cast<uint64_t>((m + row_offset) * groups);
    for (int64_t g = 0; g < groups; ++g) {
      const Words4 r = philox4x32_10(row_counter + static_cast<uint64_t>(g), seed);
      const int64_t c0 = 4 * g;
      const int64_t n = cols - c0 < 4 ? cols - c0 : 4;
      for (int64_t l = 0; l < n; ++l) {
        o[c0 + l] = (r.w[l] >> 8) >= threshold ? scale : scalar_t(0);
      }
    }
  }
}

}  // namespace

void dropout_multiplier(torch::Tensor& out, int64_t row_offset, int64_t seed, int64_t threshold, double scale,
                        int64_t stream) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "dropout_multiplier: out must be a contiguous 2-D tensor");
  TORCH_CHECK(row_offset >= 0, "dropout_multiplier: row_offset must be >= 0");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 24), "dropout_multiplier: threshold out of range");
  if (out.device().is_cuda()) {
#ifdef PEFTKERN_WITH_CUDA
    dropout_multiplier_cuda(out, row_offset, seed, threshold, scale, stream);
    return;
#else
    TORCH_CHECK(false, "dropout_multiplier: peftkern._C was built without CUDA");
#endif
  }
  TORCH_CHECK(out.device().is_cpu(), "dropout_multiplier: a CPU or CUDA tensor expected");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "dropout_multiplier", [&] {
    fill_multiplier<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), out.size(1), row_offset,
                              static_cast<uint64_t>(seed), static_cast<uint32_t>(threshold),
                              static_cast<scalar_t>(scale));
  });
}

}  // namespace peftkern
