#pragma once
#include <torch/extension.h>

#include <tuple>

#include "strided_index.h"

namespace peftkern {
// (0, -1) when every index is in [0, numel) and none repeats; (1, i) if indices[i] is out of range;
// (2, i) if indices[i] repeats an earlier index. CPU only (GPU validation runs as torch ops).
std::tuple<int64_t, int64_t> sparse_diff_validate(const torch::Tensor& indices, int64_t numel);

// weight: the user's tensor (any strides, at most kMaxStridedDims dims unless contiguous); indices:
// logical row-major positions, bounds-checked here before anything is written. Returns (backup,
// first_bad): first_bad is a 1-element int64 tensor on the weight's device holding the position of the
// first out-of-range index, or indices.numel() when all are in range; in that case only is the weight
// written. On CUDA the check and the write are two kernels on one stream (the write kernel reads the
// flag and does nothing when it is set); the caller reads first_bad after the launch.
std::tuple<torch::Tensor, torch::Tensor> sparse_diff_apply(torch::Tensor& weight, const torch::Tensor& indices,
                                                           const torch::Tensor& values, double alpha);
torch::Tensor sparse_diff_restore(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup);

StridedIndex strided_index_of(const torch::Tensor& t);

#ifdef PEFTKERN_WITH_CUDA
std::tuple<torch::Tensor, torch::Tensor> sparse_diff_apply_cuda(torch::Tensor& weight, const torch::Tensor& indices,
                                                                const torch::Tensor& values, double alpha,
                                                                int64_t stream);
torch::Tensor sparse_diff_restore_cuda(torch::Tensor& weight, const torch::Tensor& indices,
                                       const torch::Tensor& backup, int64_t stream);
#endif
}  // namespace peftkern
