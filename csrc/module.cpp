// peftkern._C: the optional compiled part. Python never requires it: peftkern/_backend.py
// imports it lazily and backend_info() reports whether it is there and whether CUDA was built in.
#include <torch/extension.h>

#include "dropout.h"
#include "multi_lora.h"
#include "sparse_diff.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftkern compiled kernels (CPU, and CUDA when built with nvcc)";
#ifdef PEFTKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("dropout_multiplier", &peftkern::dropout_multiplier,
        "out = scale where the Philox mask keeps (row_offset + m, k), else 0 (CPU, or CUDA when built)", pybind11::arg("out"),
        pybind11::arg("row_offset"), pybind11::arg("seed"), pybind11::arg("threshold"), pybind11::arg("scale"),
        pybind11::arg("stream") = 0);
  m.def("multi_lora_rows", &peftkern::multi_lora_rows,
        "for each row t with adapter i = row_ids[t] >= 0: s_down[t, :r_i] = A_i x_t, y[t] += scalings[i] B_i s (CPU); "
        "false (nothing done) for layouts/dtypes it does not take",
        pybind11::arg("y"), pybind11::arg("s_down"), pybind11::arg("x"), pybind11::arg("row_ids"),
        pybind11::arg("lora_a"), pybind11::arg("lora_b"), pybind11::arg("scalings"));
  m.def("sparse_diff_validate", &peftkern::sparse_diff_validate,
        "(0, -1) if indices are in range and unique, (1, i) out of range at i, (2, i) duplicate at i (CPU)");
  // apply/restore check every index against the weight themselves (see csrc/sparse_diff.cpp) and return
  // the first out-of-range position as a 1-element tensor (== indices.numel() when all are in range)
  m.def("sparse_diff_apply",
        [](torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& values, double alpha,
           int64_t stream) {
          if (weight.is_cuda()) {
#ifdef PEFTKERN_WITH_CUDA
            return peftkern::sparse_diff_apply_cuda(weight, indices, values, alpha, stream);
#else
            TORCH_CHECK(false, "sparse_diff_apply: peftkern._C was built without CUDA");
#endif
          }
          return peftkern::sparse_diff_apply(weight, indices, values, alpha);
        },
        "weight[indices] += alpha * values, indices bounds-checked first; returns (backup, first_bad)",
        pybind11::arg("weight"), pybind11::arg("indices"), pybind11::arg("values"), pybind11::arg("alpha"),
        pybind11::arg("stream") = 0);
  m.def("sparse_diff_restore",
        [](torch::Tensor& weight, const torch::Tensor& indices, const torch::Tensor& backup, int64_t stream) {
          if (weight.is_cuda()) {
#ifdef PEFTKERN_WITH_CUDA
            return peftkern::sparse_diff_restore_cuda(weight, indices, backup, stream);
#else
            TORCH_CHECK(false, "sparse_diff_restore: peftkern._C was built without CUDA");
#endif
          }
          return peftkern::sparse_diff_restore(weight, indices, backup);
        },
        "weight[indices] = backup, indices bounds-checked first; returns first_bad", pybind11::arg("weight"),
        pybind11::arg("indices"), pybind11::arg("backup"), pybind11::arg("stream") = 0);
}
