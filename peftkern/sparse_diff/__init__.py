"""The sparse-diff families: sparse_diff_apply_ / sparse_diff_restore_ (in place, a bit-exact round trip) and
sparse_diff_linear (x·(W + Δ)ᵀ with a sampled gradient for Δ's values), plus SparseDiff and its model helpers.

op.py the custom ops and the public functions; reference.py the plain-torch oracle; cpu.py the fast CPU path
(C++ apply/restore when built, torch.sparse products); cuda.py the compiled CUDA apply/restore; triton.py the GPU
variants of the linear layer; diffs.py SparseDiff (save/load, from_dense) and the model-level helpers;
examples.py representative arguments for tests, benchmarks and the AOT check.
"""
from ..core import dispatch
from . import cpu, cuda, reference, triton  # noqa: F401  (each registers its variants with core/dispatch.py)
from .diffs import SparseDiff, apply_sparse_diffs_, restore_sparse_diffs_, sparse_diffs_applied
from .op import sparse_diff_apply_, sparse_diff_linear, sparse_diff_restore_

dispatch.register("sparse_diff_apply", "reference", forward=reference.apply_, backward=reference.restore_)
dispatch.register("sparse_diff_linear", "reference", forward=reference.linear_forward,
                  backward=reference.linear_backward)
FAMILY = "sparse_diff_linear"
KERNELS = ("sparse_diff",)  # its modules in kernels/

__all__ = ["SparseDiff", "apply_sparse_diffs_", "restore_sparse_diffs_", "sparse_diffs_applied", "sparse_diff_apply_",
           "sparse_diff_linear", "sparse_diff_restore_"]
