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
#include <vector>

#include "dropout.h"
#include "philox.h"

namespace peftkern {
namespace {

// The 16-bit uniforms of `n_groups` consecutive Philox groups (8 columns each) from counter `counter0`: kLanes
// groups side by side, so that the compiler runs the rounds' 32x32->64-bit multiplies on SIMD lanes. One build
// carries an AVX-512, an AVX2 and a baseline clone (GCC target_clones; the best one for the CPU is picked when
// the library loads): measured on a 2-core AVX-512 machine, a [2048, 1024] multiplier took 4.7 ms with the
// scalar loop, most of a LoRA/DoRA step's non-GEMM time with dropout.
constexpr int kLanes = 16;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void philox_uniforms(uint64_t counter0, int64_t n_groups, uint64_t seed, uint16_t* u) {
  for (int64_t g0 = 0; g0 < n_groups; g0 += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      const uint64_t c = counter0 + static_cast<uint64_t>(g0 + i);
      c0[i] = static_cast<uint32_t>(c);
      c1[i] = static_cast<uint32_t>(c >> 32);
      c2[i] = 0;
      c3[i] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {  // philox.h's philox4x32_10, lane by lane
      for (int i = 0; i < kLanes; ++i) {
        const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2[i];
        const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0[i];
        const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[i] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[i] ^ k1;
        c1[i] = static_cast<uint32_t>(pb);
        c3[i] = static_cast<uint32_t>(pa);
        c0[i] = n0;
        c2[i] = n2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const int64_t n = std::min<int64_t>(kLanes, n_groups - g0);
    for (int64_t i = 0; i < n; ++i) {  // column 8g + 2w + h takes half h of word w (philox.h uniform16)
      uint16_t* o = u + (g0 + i) * kColsPerCall;
      const uint32_t words[4] = {c0[i], c1[i], c2[i], c3[i]};
      for (int w = 0; w < 4; ++w) {
        o[2 * w] = static_cast<uint16_t>(words[w] & 0xFFFFu);
        o[2 * w + 1] = static_cast<uint16_t>(words[w] >> 16);
      }
    }
  }
}

template <typename scalar_t>
void fill_multiplier(scalar_t* out, int64_t rows, int64_t cols, int64_t row_offset, uint64_t seed,
                     uint32_t threshold, scalar_t scale) {
  const int64_t groups = (cols + kColsPerCall - 1) / kColsPerCall;
  // rows per task: about 16K Philox calls (~0.1 ms), enough to amortise waking a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, groups));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> uniforms(static_cast<size_t>(groups * kColsPerCall));
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* o = out + m * cols;
      philox_uniforms(static_cast<uint64_t>((m + row_offset) * groups), groups, seed, uniforms.data());
      for (int64_t c = 0; c < cols; ++c) {
        o[c] = uniforms[c] >= threshold ? scale : scalar_t(0);
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
