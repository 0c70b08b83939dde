// CUDA dropout multiplier: csrc/dropout.cpp's function for CUDA tensors, used by the reference path on
// GPU (the Triton kernels generate the same mask on chip and never need it). One thread per group of
// eight columns: one Philox call feeds the eight elements, exactly as in peftkern/reference/dropout.py.
// Only torch/extension.h and the CUDA runtime: CI compile-checks this file with a bare nvcc against a
// CPU build of torch, whose headers lack c10/cuda's generated config. So the caller passes the stream
// (torch.cuda.current_stream().cuda_stream) and has made the tensor's device current.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cstdint>

#include "../dropout.h"
#include "../philox.h"

namespace peftkern {
namespace {

template <typename scalar_t>
__global__ void fill_multiplier_kernel(scalar_t* __restrict__ out, int64_t rows, int64_t cols, int64_t row_offset,
                                       uint64_t seed, uint32_t threshold, scalar_t scale) {
  const int64_t groups = (cols + kColsPerCall - 1) / kColsPerCall;
  const int64_t total = rows * groups;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / groups, g = i % groups;
    uint32_t w[4];
    philox4x32_10(static_cast<uint64_t>((m + row_offset) * groups + g), seed, w);
    const int64_t c0 = kColsPerCall * g;
#pragma unroll
    for (int l = 0; l < kColsPerCall; ++l) {
      if (c0 + l < cols) out[m * cols + c0 + l] = uniform16(w, l) >= threshold ? scale : scalar_t(0);
    }
  }
}

}  // namespace

void dropout_multiplier_cuda(torch::Tensor& out, int64_t row_offset, int64_t seed, int64_t threshold, double scale,
                             int64_t stream) {
  const int64_t groups = (out.size(1) + kColsPerCall - 1) / kColsPerCall;
  const int64_t total = out.size(0) * groups;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dropout_multiplier_cuda", [&] {
    fill_multiplier_kernel<scalar_t><<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        out.data_ptr<scalar_t>(), out.size(0), out.size(1), row_offset, static_cast<uint64_t>(seed),
        static_cast<uint32_t>(threshold), static_cast<scalar_t>(scale));
  });
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "dropout_multiplier_cuda: launch failed: ", cudaGetErrorString(err));
}

}  // namespace peftkern
