// The decode shape of multi_lora_linear on CPU: few rows per adapter (each sequence its own adapter, one token
// each). The grouped BLAS path of peftkern/reference/multi_lora.py spends that shape in per-group call overhead
// (a gather, two small GEMMs and a scatter-add per adapter: measured ~0.7 ms for 64 rows over 32 adapters,
// K=N=1024, r=16 on 2 cores, against 0.9 ms for the whole base F.linear). Here every row does its own
// rank-r work in one parallel pass: 2·r·(K + N) multiply-adds per row, reading its adapter's A and B, which stay
// in cache across the rows sharing it (an adapter of r=16, K=N=1024 is 128 KiB in float32).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "multi_lora.h"

namespace peftkern {
namespace {

// GCC clones for AVX-512, AVX2 and a baseline, picked at load time (as csrc/dropout.cpp); `omp simd reduction`
// lets the sums be vectorised (re-associated) without -ffast-math.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PEFTKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PEFTKERN_CLONES
#endif

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < n; ++k) acc += a[k] * b[k];
  return acc;
}

// one row: s = A·x (r dot products of length K), then y += scale·B·s. B·s is N sums of r products each; summing
// each row of B horizontally in a SIMD register (a reduction per output) was the kernel's bottleneck (0.25 ms at 64
// rows, 32 adapters, K=N=1024, r=16, 2 threads). Instead a block of B·diag(s) is formed with full-width multiplies
// over B's contiguous memory into `prod` (kBlock rows of r), and each run of r is summed by plain adds, which
// overlap across outputs: 0.17 ms (a transposed copy of B per adapter, for axpys, cost what it saved at ~2 rows per
// adapter; four partial sums per dot of the shrink changed nothing)
constexpr int64_t kBlock = 64;

template <typename T>
PEFTKERN_CLONES void row_term(T* y, T* s, T* prod, const T* x, const T* a, const T* b, int64_t r, int64_t k,
                              int64_t n, T scale) {
  for (int64_t j = 0; j < r; ++j) s[j] = dot(a + j * k, x, k);
  for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
    const int64_t cn = std::min<int64_t>(kBlock, n - c0);
    const T* bb = b + c0 * r;
    for (int64_t c = 0; c < cn; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < r; ++j) prod[c * r + j] = bb[c * r + j] * s[j];
    }
    for (int64_t c = 0; c < cn; ++c) {
      T acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += prod[c * r + j];
      y[c0 + c] += scale * acc;
    }
  }
}

}  // namespace

bool multi_lora_rows(torch::Tensor& y, torch::Tensor& s_down, const torch::Tensor& x, const torch::Tensor& row_ids,
                     const std::vector<torch::Tensor>& lora_a, const std::vector<torch::Tensor>& lora_b,
                     const std::vector<double>& scalings) {
  const int64_t n_adapters = static_cast<int64_t>(lora_a.size());
  TORCH_CHECK(lora_b.size() == lora_a.size() && scalings.size() == lora_a.size(),
              "multi_lora_rows: lora_a, lora_b and scalings must have one entry per adapter");
  // what this kernel does not take (the caller then runs the grouped path): checked here rather than in Python,
  // where a loop over dozens of adapters costs more than this kernel saves at small shapes
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || x.dim() != 2 || !x.is_contiguous() ||
      (dtype != torch::kFloat32 && dtype != torch::kFloat64))
    return false;
  const int64_t m = x.size(0), k = x.size(1), n = y.size(1);
  if (y.dim() != 2 || y.size(0) != m || !y.is_contiguous() || y.scalar_type() != dtype || s_down.dim() != 2 ||
      s_down.size(0) != m || !s_down.is_contiguous() || s_down.scalar_type() != dtype ||
      row_ids.scalar_type() != torch::kInt64 || row_ids.dim() != 1 || row_ids.size(0) != m ||
      !row_ids.is_contiguous() || !row_ids.device().is_cpu())
    return false;
  for (int64_t i = 0; i < n_adapters; ++i) {
    const auto& a = lora_a[i];
    const auto& b = lora_b[i];
    if (a.dim() != 2 || a.size(1) != k || !a.is_contiguous() || a.scalar_type() != dtype || !a.device().is_cpu() ||
        b.dim() != 2 || b.size(0) != n || b.size(1) != a.size(0) || !b.is_contiguous() ||
        b.scalar_type() != dtype || !b.device().is_cpu() || a.size(0) > s_down.size(1))
      return false;
  }
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  // the ids index the adapter lists below: every one is checked here, before any row is touched
  for (int64_t t = 0; t < m; ++t) {
    TORCH_CHECK_INDEX(ids[t] >= -1 && ids[t] < n_adapters, "adapter_ids holds ", ids[t], ", outside [-1, ",
                      n_adapters, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_rows", [&] {
    std::vector<const scalar_t*> a_ptr(n_adapters), b_ptr(n_adapters);
    std::vector<int64_t> rank(n_adapters);
    for (int64_t i = 0; i < n_adapters; ++i) {
      a_ptr[i] = lora_a[i].data_ptr<scalar_t>();
      b_ptr[i] = lora_b[i].data_ptr<scalar_t>();
      rank[i] = lora_a[i].size(0);
    }
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* sp = s_down.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t width = s_down.size(1);
    // rows per task: ~64K multiply-adds, enough to amortise waking a thread
    const int64_t per_row = std::max<int64_t>(1, 2 * width * (k + n));
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / per_row);
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> prod(static_cast<size_t>(kBlock * width));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = ids[t];
        if (i < 0) continue;
        row_term<scalar_t>(yp + t * n, sp + t * width, prod.data(), xp + t * k, a_ptr[i], b_ptr[i], rank[i], k, n,
                           static_cast<scalar_t>(scalings[i]));
      }
    });
  });
  return true;
}

}  // namespace peftkern
