// Sparse diff vectors on CPU: validate indices, apply (returning a backup) and restore, on torch's own
// intra-op thread pool (at::parallel_for follows torch.set_num_threads and runs small inputs inline).
// apply computes w = round(float(w) + alpha * float(v)) per entry (double for double weights), so a
// restore from the backup is bit-exact in every dtype.
// Memory safety: apply and restore check every index against the weight's element count themselves, in
// a pass before any write, on every call. Nothing cached by the Python side (which remembers only the
// duplicate check) can let an out-of-range index reach memory.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "sparse_diff.h"

namespace peftkern {
namespace {

// Indices per task. A parallel region pays off only for work well beyond a scheduler time slice: on a busy
// machine each region waits for its slowest thread, which may be descheduled for milliseconds. Measured on
// the 2-core CI machine with one busy background process, applying a 0.1% diff of a 4096x4096 weight (16.8K
// entries, ~0.3 ms of work) in two regions of 8K-entry tasks took 15.6 ms against 6.3 ms for torch's
// serial index_add_. The range check reads indices sequentially (~1 ns each), the writes are random
// accesses (~10-20 ns each), so each gets a grain worth about a millisecond.
constexpr int64_t kCheckGrain = 1 << 20;
constexpr int64_t kWriteGrain = 1 << 16;

void atomic_min(std::atomic<int64_t>& target, int64_t value) {
  int64_t cur = target.load(std::memory_order_relaxed);
  while (value < cur && !target.compare_exchange_weak(cur, value, std::memory_order_relaxed)) {
  }
}

template <typename index_t>
int64_t first_out_of_range(const index_t* idx, int64_t n, int64_t numel) {
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, kCheckGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = static_cast<int64_t>(idx[i]);
      if (v < 0 || v >= numel) {
        atomic_min(first, i);
        return;  // later entries of this chunk cannot be earlier
      }
    }
  });
  return first.load();
}

template <typename index_t>
int64_t validate_impl(const index_t* idx, int64_t n, int64_t numel, int64_t* bad_position) {
  // Range first (one pass), then duplicates with a bitmap of numel bits (atomic test-and-set). calloc
  // hands back lazily zeroed pages, so only the words touched cost anything. Each reports its first
  // position; a range error takes precedence.
  const int64_t first_bad = first_out_of_range(idx, n, numel);
  if (first_bad < n) {
    *bad_position = first_bad;
    return 1;
  }
  const size_t words = static_cast<size_t>((numel + 63) / 64);
  uint64_t* bits = static_cast<uint64_t*>(std::calloc(words > 0 ? words : 1, sizeof(uint64_t)));
  TORCH_CHECK(bits != nullptr, "sparse_diff_validate: out of memory for a ", numel, "-bit map");
  std::atomic<int64_t> first_dup{n};
  at::parallel_for(0, n, kWriteGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t v = static_cast<int64_t>(idx[i]);  // in [0, numel): checked above
      const uint64_t mask = uint64_t(1) << (v & 63);
      const uint64_t old = __atomic_fetch_or(&bits[v >> 6], mask, __ATOMIC_RELAXED);
      if (old & mask) {
        atomic_min(first_dup, i);
        return;
      }
    }
  });
  std::free(bits);
  if (first_dup.load() < n) {
    // the first index, in order, whose value appeared before it: with threads racing, the bitmap may
    // flag either of two equal entries, so find the earliest repeat exactly (rare path: errors only)
    std::vector<int64_t> seen(idx, idx + n);
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return seen[a] < seen[b]; });
    int64_t first = n;
    for (int64_t j = 1; j < n; ++j) {
      if (seen[order[j]] == seen[order[j - 1]]) first = order[j] < first ? order[j] : first;
    }
    *bad_position = first;
    return 2;
  }
  return 0;
}

template <typename acc_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename scalar_t, typename value_t, typename index_t>
void apply_impl(scalar_t* w, const StridedIndex& where, const index_t* idx, const value_t* vals, scalar_t* backup,
                int64_t n, double alpha) {
  using acc_t = typename AccOf<scalar_t>::type;
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, n, kWriteGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = where.offset(static_cast<int64_t>(idx[i]));  // in range: checked by the caller's pass
      const scalar_t old = w[j];
      backup[i] = old;
      const acc_t prod = a * static_cast<acc_t>(vals[i]);  // rounded on its own: built with -ffp-contract=off
      w[j] = static_cast<scalar_t>(static_cast<acc_t>(old) + prod);
    }
  });
}

template <typename scalar_t, typename index_t>
void restore_impl(scalar_t* w, const StridedIndex& where, const index_t* idx, const scalar_t* backup, int64_t n) {
  at::parallel_for(0, n, kWriteGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) w[where.offset(static_cast<int64_t>(idx[i]))] = backup[i];
  });
}

void check_common(const torch::Tensor& weight, const torch::Tensor& indices) {
  TORCH_CHECK(weight.device().is_cpu() && indices.device().is_cpu(), "sparse_diff: CPU tensors expected");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous(), "sparse_diff: indices must be contiguous 1-D");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "sparse_diff: indices must be int32 or int64");
}

int64_t first_out_of_range(const torch::Tensor& indices, int64_t numel) {
  const int64_t n = indices.numel();
  return indices.scalar_type() == at::kInt ? first_out_of_range(indices.data_ptr<int32_t>(), n, numel)
                                           : first_out_of_range(indices.data_ptr<int64_t>(), n, numel);
}

torch::Tensor position_tensor(int64_t pos) { return torch::full({1}, pos, torch::dtype(torch::kLong)); }

}  // namespace

StridedIndex strided_index_of(const torch::Tensor& t) {
  StridedIndex s{};
  s.numel = t.numel();
  if (t.is_contiguous() || t.dim() <= 1) {
    s.ndim = 1;
    s.sizes[0] = t.numel();
    s.strides[0] = t.dim() == 1 ? t.stride(0) : 1;
    return s;
  }
  TORCH_CHECK(t.dim() <= kMaxStridedDims, "sparse_diff: a non-contiguous weight may have at most ",
              kMaxStridedDims, " dims");
  s.ndim = static_cast<int>(t.dim());
  for (int d = 0; d < s.ndim; ++d) {
    s.sizes[d] = t.size(d);
    s.strides[d] = t.stride(d);
  }
  return s;
}

std::tuple<int64_t, int64_t> sparse_diff_validate(const torch::Tensor& indices, int64_t numel) {
  TORCH_CHECK(indices.device().is_cpu() && indices.dim() == 1 && indices.is_contiguous(),
              "sparse_diff_validate: contiguous 1-D CPU indices expected");
  int64_t bad = -1, code = 0;
  if (indices.scalar_type() == at::kInt) {
    code = validate_impl(indices.data_ptr<int32_t>(), indices.numel(), numel, &bad);
  } else {
    TORCH_CHECK(indices.scalar_type() == at::kLong, "sparse_diff_validate: indices must be int32 or int64");
    code = validate_impl(indices.data_ptr<int64_t>(), indices.numel(), numel, &bad);
  }
  return {code, bad};
}

std::tuple<torch::Tensor, torch::Tensor> sparse_diff_apply(torch::Tensor& weight, const torch::Tensor& indices,
                                                           const torch::Tensor& values, double alpha) {
  check_common(weight, indices);
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == indices.numel(),
              "sparse_diff_apply: values must be contiguous 1-D with one entry per index");
  TORCH_CHECK(values.scalar_type() == weight.scalar_type() || values.scalar_type() == at::kFloat,
              "sparse_diff_apply: values must have the weight's dtype or float32");
  const StridedIndex where = strided_index_of(weight);
  const int64_t n = indices.numel();
  auto backup = torch::empty({n}, weight.options());
  const int64_t bad = first_out_of_range(indices, where.numel);
  if (bad < n) return {backup, position_tensor(bad)};  // nothing written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_apply", [&] {
    using w_t = scalar_t;
    auto run = [&](auto* vals) {
      if (indices.scalar_type() == at::kInt) {
        apply_impl(weight.data_ptr<w_t>(), where, indices.data_ptr<int32_t>(), vals, backup.data_ptr<w_t>(), n,
                   alpha);
      } else {
        apply_impl(weight.data_ptr<w_t>(), where, indices.data_ptr<int64_t>(), vals, backup.data_ptr<w_t>(), n,
                   alpha);
      }
    };
    if (values.scalar_type() == weight.scalar_type()) {
      run(values.data_ptr<w_t>());
    } else {
      run(values.data_ptr<float>());
    }
  });
  return {backup, position_tensor(n)};
}

torch::Tensor sparse_diff_restore(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup) {
  check_common(weight, indices);
  TORCH_CHECK(backup.dim() == 1 && backup.is_contiguous() && backup.numel() == indices.numel() &&
                  backup.scalar_type() == weight.scalar_type(),
              "sparse_diff_restore: backup must be contiguous 1-D, one entry per index, in the weight's dtype");
  const StridedIndex where = strided_index_of(weight);
  const int64_t n = indices.numel();
  const int64_t bad = first_out_of_range(indices, where.numel);
  if (bad < n) return position_tensor(bad);  // nothing written
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_restore", [&] {
    if (indices.scalar_type() == at::kInt) {
      restore_impl(weight.data_ptr<scalar_t>(), where, indices.data_ptr<int32_t>(), backup.data_ptr<scalar_t>(), n);
    } else {
      restore_impl(weight.data_ptr<scalar_t>(), where, indices.data_ptr<int64_t>(), backup.data_ptr<scalar_t>(), n);
    }
  });
  return position_tensor(n);
}

}  // namespace peftkern
