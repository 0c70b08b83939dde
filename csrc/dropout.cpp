// CPU dropout multiplier (keep ? 1/(1-p) : 0) with the Philox mask of peftkern/reference/dropout.py.
// The reference path spells Philox with int64 torch ops (exact, ~100 passes over memory); this is
// the same function in one pass on torch's intra-op thread pool (at::parallel_for: it follows
// torch.set_num_threads, and a block too small to be worth a parallel region runs inline, which matters on
// a busy machine where every region waits for its slowest, possibly descheduled, thread). The CPU LoRA path asks for it one cache-sized block of rows
// at a time (row_offset says where the block starts), so no [M, K] mask ever exists.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "dropout.h"
#include "philox.h"

namespace peftkern {
namespace {

template <typename scalar_t>
void fill_multiplier(scalar_t* out, int64_t rows, int64_t cols, int64_t row_offset, uint64_t seed,
                     uint32_t threshold, scalar_t scale) {
  const int64_t groups = (cols + kColsPerCall - 1) / kColsPerCall;
  // rows per task: about 16K Philox calls (~0.1 ms), enough to amortise waking a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, groups));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* o = out + m * cols;
      const uint64_t row_counter = static_cast<uint64_t>((m + row_offset) * groups);
      for (int64_t g = 0; g < groups; ++g) {
        uint32_t r[4];
        philox4x32_10(row_counter + static_cast<uint64_t>(g), seed, r);
        const int64_t c0 = kColsPerCall * g;
        const int64_t n = cols - c0 < kColsPerCall ? cols - c0 : kColsPerCall;
        for (int64_t l = 0; l < n; ++l) {
          o[c0 + l] = uniform16(r, static_cast<int>(l)) >= threshold ? scale : scalar_t(0);
        }
      }
    }
  });
}

}  // namespace

void dropout_multiplier(torch::Tensor& out, int64_t row_offset, int64_t seed, int64_t threshold, double scale,
                        int64_t stream) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "dropout_multiplier: out must be a contiguous 2-D tensor");
  TORCH_CHECK(row_offset >= 0, "dropout_multiplier: row_offset must be >= 0");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 16), "dropout_multiplier: threshold out of range");
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
