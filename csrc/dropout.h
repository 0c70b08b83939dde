#pragma once
#include <torch/extension.h>

namespace peftkern {
// out[m, k] = scale if Philox keeps element (row_offset + m, k) else 0; out is a contiguous 2-D block
// of rows of the logical input whose row length is out.size(1).
// On CUDA tensors `stream` is the cudaStream_t to launch on, as an integer; the caller has made
// out's device current. On CPU it is ignored.
void dropout_multiplier(torch::Tensor& out, int64_t row_offset, int64_t seed, int64_t threshold, double scale,
                        int64_t stream);
#ifdef PEFTKERN_WITH_CUDA
void dropout_multiplier_cuda(torch::Tensor& out, int64_t row_offset, int64_t seed, int64_t threshold, double scale,
                             int64_t stream);
#endif
}  // namespace peftkern
