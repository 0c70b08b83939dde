// Sparse diff vectors on CPU: validate indices, apply (returning a backup) and restore, with OpenMP.
// apply computes w = round(float(w) + alpha * float(v)) per entry (double for double weights), so a
// restore from the backup is bit-exact in every dtype. Validation happens before any write.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "sparse_diff.h"

namespace peftkern {
namespace {

template <typename index_t>
int64_t validate_impl(const index_t* idx, int64_t n, int64_t numel, int64_t* bad_position) {
  // One parallel pass: range check, then duplicate check with a bitmap of numel bits (atomic
  // test-and-set). calloc hands back lazily zeroed pages, so only the words touched cost anything.
  // A range error takes precedence over a duplicate; each reports its first position.
  const size_t words = static_cast<size_t>((numel + 63) / 64);
  uint64_t* bits = static_cast<uint64_t*>(std::calloc(words > 0 ? words : 1, sizeof(uint64_t)));
  TORCH_CHECK(bits != nullptr, "sparse_diff_validate: out of memory for a ", numel, "-bit map");
  int64_t first_bad = n, first_dup = n;
#pragma omp parallel for reduction(min : first_bad, first_dup) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(idx[i]);
    if (v < 0 || v >= numel) {
      first_bad = i < first_bad ? i : first_bad;
      continue;
    }
    const uint64_t mask = uint64_t(1) << (v & 63);
    const uint64_t old = __atomic_fetch_or(&bits[v >> 6], mask, __ATOMIC_RELAXED);
    if (old & mask) first_dup = i < first_dup ? i : first_dup;
  }
  std::free(bits);
  if (first_bad < n) {
    *bad_position = first_bad;
    return 1;
  }
  if (first_dup < n) {
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
void apply_impl(scalar_t* w, const index_t* idx, const value_t* vals, scalar_t* backup, int64_t n, double alpha) {
  using acc_t = typename AccOf<scalar_t>::type;
  const acc_t a = static_cast<acc_t>(alpha);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = static_cast<int64_t>(idx[i]);
    const scalar_t old = w[j];
    backup[i] = old;
    const acc_t prod = a * static_cast<acc_t>(vals[i]);  // rounded on its own: built with -ffp-contract=off
    w[j] = static_cast<scalar_t>(static_cast<acc_t>(old) + prod);
  }
}

template <typename scalar_t, typename index_t>
void restore_impl(scalar_t* w, const index_t* idx, const scalar_t* backup, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) w[static_cast<int64_t>(idx[i])] = backup[i];
}

void check_common(const torch::Tensor& weight, const torch::Tensor& indices) {
  TORCH_CHECK(weight.device().is_cpu() && indices.device().is_cpu(), "sparse_diff: CPU tensors expected");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "sparse_diff: weight must be a contiguous 1-D view");
  TORCH_CHECK(indices.dim() == 1 && indices.is_contiguous(), "sparse_diff: indices must be contiguous 1-D");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "sparse_diff: indices must be int32 or int64");
}

}  // namespace

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

torch::Tensor sparse_diff_apply(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& values,
                                double alpha) {
  check_common(weight, indices);
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == indices.numel(),
              "sparse_diff_apply: values must be contiguous 1-D with one entry per index");
  TORCH_CHECK(values.scalar_type() == weight.scalar_type() || values.scalar_type() == at::kFloat,
              "sparse_diff_apply: values must have the weight's dtype or float32");
  auto backup = torch::empty({indices.numel()}, weight.options());
  const int64_t n = indices.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_apply", [&] {
    using w_t = scalar_t;
    auto run = [&](auto* vals) {
      if (indices.scalar_type() == at::kInt) {
        apply_impl(weight.data_ptr<w_t>(), indices.data_ptr<int32_t>(), vals, backup.data_ptr<w_t>(), n, alpha);
      } else {
        apply_impl(weight.data_ptr<w_t>(), indices.data_ptr<int64_t>(), vals, backup.data_ptr<w_t>(), n, alpha);
      }
    };
    if (values.scalar_type() == weight.scalar_type()) {
      run(values.data_ptr<w_t>());
    } else {
      run(values.data_ptr<float>());
    }
  });
  return backup;
}

void sparse_diff_restore(torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup) {
  check_common(weight, indices);
  TORCH_CHECK(backup.dim() == 1 && backup.is_contiguous() && backup.numel() == indices.numel() &&
                  backup.scalar_type() == weight.scalar_type(),
              "sparse_diff_restore: backup must be contiguous 1-D, one entry per index, in the weight's dtype");
  const int64_t n = indices.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_diff_restore", [&] {
    if (indices.scalar_type() == at::kInt) {
      restore_impl(weight.data_ptr<scalar_t>(), indices.data_ptr<int32_t>(), backup.data_ptr<scalar_t>(), n);
    } else {
      restore_impl(weight.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), backup.data_ptr<scalar_t>(), n);
    }
  });
}

}  // namespace peftkern
