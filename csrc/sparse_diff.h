#pragma once
#include <torch/extension.h>

#include <tuple>

namespace peftkern {
// (0, -1) when every index is in [0, numel) and none repeats; (1, i) if indices[i] is out of range;
// (2, i) if indices[i] repeats an earlier index. CPU only (GPU validation runs as torch ops).
std::tuple<int64_t, int64_t> sparse_diff_validate(const torch::Tensor& indices, int64_t numel);
// weight: a contiguous 1-D view; indices validated. Returns the previous values (weight's dtype).
torch::Tensor sparse_diff_apply(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& values,
                                double alpha);
void sparse_diff_restore(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup);
#ifdef PEFTKERN_WITH_CUDA
torch::Tensor sparse_diff_apply_cuda(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& values,
                                     double alpha, int64_t stream);
void sparse_diff_restore_cuda(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup,
                              int64_t stream);
#endif
}  // namespace peftkern
