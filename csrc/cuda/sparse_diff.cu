// Sparse diff apply/restore on CUDA: one thread per entry, grid-stride. Same arithmetic as
// csrc/sparse_diff.cpp: w = round(float(w) + alpha * float(v)).
// Memory safety, on every call and trusting no earlier validation: a first kernel records the position
// of the first out-of-range index in a device flag (atomicMin); the write kernel, launched behind it on
// the same stream, reads the flag and writes nothing if it is set, and still skips any index outside the
// weight on its own. The host reads the flag after the launch and raises. Duplicates (checked once by the
// caller and remembered) cannot address memory outside the weight, so they need no per-call check.
// Like csrc/cuda/dropout.cu this includes only torch/extension.h and the CUDA runtime; the caller
// passes the stream and has made the weight's device current.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <cstdint>

#include "../sparse_diff.h"
#include "../strided_index.h"

namespace peftkern {
namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<c10::Half>(c10::Half v) {
  return __half2float(static_cast<__half>(v));
}
template <>
__device__ __forceinline__ float to_acc<c10::BFloat16>(c10::BFloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.x) << 16);
}

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ c10::Half from_acc<c10::Half>(float v) {
  return c10::Half(__float2half_rn(v));
}
template <>
__device__ __forceinline__ c10::BFloat16 from_acc<c10::BFloat16>(float v) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return c10::BFloat16(*reinterpret_cast<const uint16_t*>(&b), c10::BFloat16::from_bits());
}

// round-to-nearest multiply and add as separate operations (nvcc would otherwise fuse them into an
// FMA, rounding once where the CPU path rounds twice)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__global__ void init_flag_kernel(long long* first_bad, int64_t n) { *first_bad = static_cast<long long>(n); }

template <typename index_t>
__global__ void find_out_of_range_kernel(const index_t* __restrict__ idx, int64_t n, int64_t numel,
                                         long long* __restrict__ first_bad) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[i]);
    if (v < 0 || v >= numel) atomicMin(first_bad, static_cast<long long>(i));
  }
}

template <typename w_t, typename v_t, typename index_t>
__global__ void apply_kernel(w_t* __restrict__ w, StridedIndex where, const index_t* __restrict__ idx,
                             const v_t* __restrict__ vals, w_t* __restrict__ backup, int64_t n, double alpha,
                             const long long* __restrict__ first_bad) {
  using acc_t = typename Acc<w_t>::type;
  const acc_t a = static_cast<acc_t>(alpha);
  if (*first_bad < n) return;  // an index is out of range: the whole call writes nothing
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[i]);
    if (!where.in_range(v)) continue;
    const int64_t j = where.offset(v);
    const w_t old = w[j];
    backup[i] = old;
    const acc_t val = static_cast<acc_t>(to_acc(vals[i]));
    w[j] = from_acc<w_t>(add_rn(static_cast<acc_t>(to_acc(old)), mul_rn(a, val)));
  }
}

template <typename w_t, typename index_t>
__global__ void restore_kernel(w_t* __restrict__ w, StridedIndex where, const index_t* __restrict__ idx,
                               const w_t* __restrict__ backup, int64_t n, const long long* __restrict__ first_bad) {
  if (*first_bad < n) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[i]);
    if (where.in_range(v)) w[where.offset(v)] = backup[i];
  }
}

inline int64_t blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return b < 1 ? 1 : (b > 65535 ? 65535 : b);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": launch failed: ", cudaGetErrorString(err));
}

// a 1-element int64 flag on the weight's device, set to the first out-of-range position (or n) on `s`
torch::Tensor flag_out_of_range(const torch::Tensor& weight, const torch::Tensor& indices, int64_t numel,
                                cudaStream_t s) {
  const int64_t n = indices.numel();
  auto first_bad = torch::empty({1}, weight.options().dtype(torch::kLong));
  auto* flag = reinterpret_cast<long long*>(first_bad.data_ptr<int64_t>());
  init_flag_kernel<<<1, 1, 0, s>>>(flag, n);
  if (n > 0) {
    const int threads = 256;
    if (indices.scalar_type() == at::kInt) {
      find_out_of_range_kernel<<<blocks_for(n, threads), threads, 0, s>>>(indices.data_ptr<int32_t>(), n, numel, flag);
    } else {
      find_out_of_range_kernel<<<blocks_for(n, threads), threads, 0, s>>>(indices.data_ptr<int64_t>(), n, numel, flag);
    }
  }
  check_launch("sparse_diff: index check");
  return first_bad;
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> sparse_diff_apply_cuda(torch::Tensor& weight, const torch::Tensor& indices,
                                                                const torch::Tensor& values, double alpha,
                                                                int64_t stream) {
  const StridedIndex where = strided_index_of(weight);
  auto backup = torch::empty({indices.numel()}, weight.options());
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto first_bad = flag_out_of_range(weight, indices, where.numel, s);
  const int64_t n = indices.numel();
  if (n == 0) return {backup, first_bad};
  const long long* flag = reinterpret_cast<const long long*>(first_bad.data_ptr<int64_t>());
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_apply_cuda", [&] {
    using w_t = scalar_t;
    auto run = [&](auto* vals) {
      if (indices.scalar_type() == at::kInt) {
        apply_kernel<<<blocks_for(n, threads), threads, 0, s>>>(weight.data_ptr<w_t>(), where,
                                                                 indices.data_ptr<int32_t>(), vals,
                                                                 backup.data_ptr<w_t>(), n, alpha, flag);
      } else {
        apply_kernel<<<blocks_for(n, threads), threads, 0, s>>>(weight.data_ptr<w_t>(), where,
                                                                 indices.data_ptr<int64_t>(), vals,
                                                                 backup.data_ptr<w_t>(), n, alpha, flag);
      }
    };
    if (values.scalar_type() == weight.scalar_type()) {
      run(values.data_ptr<w_t>());
    } else {
      run(values.data_ptr<float>());
    }
  });
  check_launch("sparse_diff_apply_cuda");
  return {backup, first_bad};
}

torch::Tensor sparse_diff_restore_cuda(torch::Tensor& weight, const torch::Tensor& indices,
                                       const torch::Tensor& backup, int64_t stream) {
  const StridedIndex where = strided_index_of(weight);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  auto first_bad = flag_out_of_range(weight, indices, where.numel, s);
  const int64_t n = indices.numel();
  if (n == 0) return first_bad;
  const long long* flag = reinterpret_cast<const long long*>(first_bad.data_ptr<int64_t>());
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_restore_cuda", [&] {
    if (indices.scalar_type() == at::kInt) {
      restore_kernel<<<blocks_for(n, threads), threads, 0, s>>>(weight.data_ptr<scalar_t>(), where,
                                                                 indices.data_ptr<int32_t>(),
                                                                 backup.data_ptr<scalar_t>(), n, flag);
    } else {
      restore_kernel<<<blocks_for(n, threads), threads, 0, s>>>(weight.data_ptr<scalar_t>(), where,
                                                                 indices.data_ptr<int64_t>(),
                                                                 backup.data_ptr<scalar_t>(), n, flag);
    }
  });
  check_launch("sparse_diff_restore_cuda");
  return first_bad;
}

}  // namespace peftkern
