#pragma once
// Logical row-major index -> storage offset of a strided tensor, shared by the C++ and CUDA sparse-diff
// kernels. The kernels take the user's indices as they are and check every one against `numel` right
// where it is used (no earlier validation is trusted), so a wrong index can never address memory outside
// the tensor's own elements, whatever its strides.
#include <cstdint>

#include "philox.h"  // PEFTKERN_HOST_DEVICE

namespace peftkern {

constexpr int kMaxStridedDims = 8;

struct StridedIndex {
  int64_t numel;
  int ndim;  // 1 for a contiguous tensor (sizes = {numel}, strides = {1})
  int64_t sizes[kMaxStridedDims];
  int64_t strides[kMaxStridedDims];

  PEFTKERN_HOST_DEVICE bool in_range(int64_t index) const { return index >= 0 && index < numel; }

  // callers check in_range(index) first
  PEFTKERN_HOST_DEVICE int64_t offset(int64_t index) const {
    if (ndim == 1) return index * strides[0];
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (index % sizes[d]) * strides[d];
      index /= sizes[d];
    }
    return off;
  }
};

}  // namespace peftkern
