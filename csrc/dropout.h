#pragma once
#include <torch/extension.h>

namespace peftkern {
// out = src * keep(seed, threshold) * scale, row-major 2-D; out may alias src.
void dropout_mul(const torch::Tensor& src, torch::Tensor& out, int64_t seed, int64_t threshold,
                 double scale);
}  // namespace peftkern
