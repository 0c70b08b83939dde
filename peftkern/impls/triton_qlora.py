"""lora_linear over a 4-bit QuantizedWeight on the Triton backend, two variants:

  fused      y = x·deq(W)ᵀ + bias + s·S·Bᵀ in one GEMM that dequantizes W's 4-bit tiles in registers
             (kernels/qlora.py), the rank-r term as its accumulator's initial value; dx = dy·deq(W) + mask ⊙
             (dS·A)/(1-p) likewise; S, dS, dA and dBᵀ by the rank-r kernels of kernels/rank.py
  composite  the reference path (peftkern/reference/qlora.py): blocks of W dequantized by torch, the
             library GEMM (cuBLAS on a GPU) on each, and torch's rank-r products

Neither writes a dense [out, in] weight. peftkern.core.dispatch picks one per call shape.
"""
import torch

from ..core import backend as _backend, dispatch
from ..reference import qlora as reference
from . import triton_lora


def _kernels():
    return _backend.kernels("qlora"), _backend.kernels("rank")


def _double_quant(absmax2, code2, offset) -> dict:
    """qlora_gemm's double-quantization arguments (resolved in the kernel), contiguous, or none."""
    if absmax2 is None:
        return {}
    return dict(absmax2=absmax2.contiguous(), code2=code2.contiguous(), offset=offset.contiguous())


def forward_fused(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a,
                  lora_b, bias, scaling, dropout_p, seed):
    gemm, rank = _kernels()
    s_down = rank.rank_down(x, lora_a, scale=1.0, seed=seed, dropout_p=dropout_p)
    y = gemm.qlora_gemm(x, packed.contiguous(), absmax.contiguous(), code.contiguous(), s_down, lora_b.t(), bias,
                        out_features=out_features, in_features=x.shape[1], blocksize=blocksize,
                        weight_dtype=weight_dtype, transpose_w=True, lora_scale=scaling,
                        **_double_quant(absmax2, code2, offset))
    return y, s_down


def backward_fused(dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a,
                   lora_b, s_down, scaling, dropout_p, seed, need_x, need_a, need_b, need_bias):
    ds, da, db, dbias = triton_lora.rank_backward(dy, x, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                                                  need_a, need_b, need_bias)
    dx = x.new_empty(0)
    if need_x:  # dx = dy·deq(W) + mask ⊙ (dS·A) / (1 - p)
        gemm, _ = _kernels()
        dx = gemm.qlora_gemm(dy, packed.contiguous(), absmax.contiguous(), code.contiguous(), ds, lora_a, None,
                             out_features=out_features, in_features=x.shape[1], blocksize=blocksize,
                             weight_dtype=weight_dtype, transpose_w=False, seed=seed, dropout_p=dropout_p,
                             **_double_quant(absmax2, code2, offset))
    return dx, da, db, dbias


def fused_unsupported(phase, *args):
    """The kernel dequantizes into fp16, bf16 or fp32 (a float64 QuantizedWeight runs on the composite path)."""
    weight_dtype = args[9] if phase == "forward" else args[10]
    if weight_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the 4-bit GEMM dequantizes to float16, bfloat16 or float32, not the weight's {weight_dtype}"
    return None


dispatch.register("qlora_linear", "triton", "fused", forward=forward_fused, backward=backward_fused,
                  unsupported=fused_unsupported)
dispatch.register("qlora_linear", "triton", "composite", forward=reference.qlora_fwd, backward=reference.qlora_bwd)
