"""peftkern: fused kernels for parameter-efficient fine-tuning.

    lora_linear            y = x·Wᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ in one fused op (forward and backward)
    dora_linear            DoRA (weight-decomposed LoRA) with PEFT's semantics, no dense W + ΔW
    multi_lora_linear      many LoRA adapters over one base in one call (mixed-batch serving, multi-adapter training)
    QuantizedWeight        a frozen 4-bit (NF4/FP4, bitsandbytes' format) weight lora_linear takes (QLoRA)
    bottleneck_adapter     out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)
    sparse_diff_apply_ / sparse_diff_restore_ / sparse_diff_linear, SparseDiff and model helpers
    nn                     LoRALinear, BottleneckAdapter, SparseDiffLinear modules
    use_backend, backend_info   which implementation runs (auto, triton, cuda, reference)
    integrations.peft      patch()/unpatch() for Hugging Face PEFT models

Every op is a torch.library custom op with autograd; see each function's docstring for arguments,
dtypes and errors.
"""
# first: peftkern.kernels picks Triton's interpreter or GPU mode, which must happen before triton loads
from . import kernels as _kernels  # noqa: F401, I001  (first; the rest follows in isort's order)
from .core.backend import backend_info, use_backend
from .adapter import bottleneck_adapter
from .dora import dora_linear
from .lora import lora_linear
from .multi_lora import multi_lora_linear
from .quant import QuantizedWeight
from .sparse_diff import (SparseDiff, apply_sparse_diffs_, restore_sparse_diffs_, sparse_diff_apply_,
                          sparse_diff_linear, sparse_diff_restore_, sparse_diffs_applied)
from . import nn

__version__ = "0.1.0"
__all__ = ["lora_linear", "dora_linear", "multi_lora_linear", "QuantizedWeight", "bottleneck_adapter", "SparseDiff",
           "sparse_diff_apply_", "sparse_diff_restore_", "sparse_diff_linear", "apply_sparse_diffs_",
           "restore_sparse_diffs_", "sparse_diffs_applied", "nn", "use_backend", "backend_info", "__version__"]
