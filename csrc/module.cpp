// peftkern._C: the optional compiled part. Python never requires it: peftkern/_backend.py
// imports it lazily and backend_info() reports whether it is there and whether CUDA was built in.
#include <torch/extension.h>

#include "dropout.h"

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
}
