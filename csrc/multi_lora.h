#pragma once
#include <torch/extension.h>

#include <vector>

namespace peftkern {
// The rank-r term of many LoRA adapters, row by row (CPU): for every row t with i = row_ids[t] >= 0,
//   s_down[t, :r_i] = lora_a[i] · x[t]      y[t] += scalings[i] · lora_b[i] · s_down[t, :r_i]
// x [M, K], y [M, N], s_down [M, R >= max r_i] contiguous, one floating dtype (float32 or float64) for all of
// them and the adapters; row_ids int64 [M]. Returns false, doing nothing, when the tensors are not so (the caller
// then takes its general path). Every id is checked against [-1, n) here, where it is used (IndexError).
bool multi_lora_rows(torch::Tensor& y, torch::Tensor& s_down, const torch::Tensor& x, const torch::Tensor& row_ids,
                     const std::vector<torch::Tensor>& lora_a, const std::vector<torch::Tensor>& lora_b,
                     const std::vector<double>& scalings);
}  // namespace peftkern
