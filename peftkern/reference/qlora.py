"""LoRA over a 4-bit base in plain torch (SPEC section 7): the CPU path and the tests' oracle.

The base weight stays packed (bitsandbytes' 4-bit layout: two codes per byte, first element in the high
nibble, one absmax per `blocksize` elements of the flattened weight). Its products are computed a block of
output rows at a time: each block is dequantized exactly as bitsandbytes' dequantize_4bit computes those
elements (code[q] * absmax in float32, then one cast to the compute dtype), used, and dropped, so no dense
[out, in] copy of the weight ever exists (the tests record every allocation's shape to prove it). The rest,
the rank-r branch with its regenerated dropout mask, is reference/lora.py's own code.
"""
from __future__ import annotations

import torch

from . import lora

# Elements of the dense weight per dequantized block: 4 Mi elements (16 MiB in float32) keeps the block far
# smaller than an LLM's [out, in] weight while each block's GEMM is still large enough to run at full speed.
BLOCK_ELEMENTS = 1 << 22


def dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, in_features: int,
                    blocksize: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of the dense weight, [stop - start, in_features] in `dtype` (the weight's own dtype:
    bitsandbytes rounds code·absmax to it).

    packed: uint8 [ceil(n / 2)] (n = out·in); absmax: float32 [ceil(n / blocksize)] (double quantization
    already resolved); code: float32 [16]. Blocks run over the flattened weight, so a block may straddle
    rows: each element takes the absmax of the block its flat index falls in."""
    first, last = start * in_features, stop * in_features
    flat = torch.arange(first, last, device=packed.device)
    byte = packed[flat // 2].to(torch.int64)
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # the first element of a byte is its high nibble
    values = code[nibble] * absmax[flat // blocksize]  # float32 product, as bitsandbytes computes it
    return values.to(dtype).view(stop - start, in_features)


class PackedWeight:
    """The frozen base of reference/lora.py's products (see lora._base_linear), kept 4-bit."""

    def __init__(self, packed, absmax, code, out_features: int, in_features: int, blocksize: int,
                 weight_dtype: torch.dtype, dtype: torch.dtype):
        self.packed, self.absmax, self.code = packed, absmax, code
        self.out_features, self.in_features, self.blocksize = out_features, in_features, blocksize
        self.weight_dtype, self.dtype = weight_dtype, dtype

    def row_blocks(self):
        """(start, stop, rows) for each block of output rows: deq(W) in the weight's dtype, then in self.dtype
        (the compute dtype), as bitsandbytes' matmul_4bit rounds it."""
        step = max(1, BLOCK_ELEMENTS // max(1, self.in_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(self.out_features, r0 + step)
            rows = dequantize_rows(self.packed, self.absmax, self.code, self.in_features, self.blocksize, r0, r1,
                                   self.weight_dtype)
            yield r0, r1, rows.to(self.dtype)

    def linear(self, x: torch.Tensor, bias):
        """x·deq(W)ᵀ (+bias), [M, out] in x's dtype: each block of rows fills its columns of y."""
        y = torch.empty((x.shape[0], self.out_features), device=x.device, dtype=x.dtype)
        for r0, r1, rows in self.row_blocks():
            if bias is not None:
                y[:, r0:r1] = torch.addmm(bias[r0:r1], x, rows.t())
            else:
                y[:, r0:r1] = torch.mm(x, rows.t())
        return y

    def grad_input(self, dy: torch.Tensor):
        """dy·deq(W), [M, in]: the blocks' contributions summed in the accumulation dtype (float32 for
        half-precision dy), then rounded once."""
        acc_dtype = lora.acc_dtype(dy.dtype)
        dx = torch.zeros((dy.shape[0], self.in_features), device=dy.device, dtype=acc_dtype)
        for r0, r1, rows in self.row_blocks():
            dx.addmm_(dy[:, r0:r1].to(acc_dtype), rows.to(acc_dtype))
        return dx.to(dy.dtype)


def qlora_fwd(x, packed, absmax, code, out_features: int, blocksize: int, weight_dtype, lora_a, lora_b, bias,
              scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r]); deq(W) in x's dtype."""
    weight = PackedWeight(packed, absmax, code, out_features, x.shape[1], blocksize, weight_dtype, x.dtype)
    return lora.lora_fwd(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed)


def qlora_bwd(dy, x, packed, absmax, code, out_features: int, blocksize: int, weight_dtype, lora_a, lora_b,
              s_down, scaling: float, dropout_p: float, seed: int, need_x: bool, need_a: bool, need_b: bool,
              need_bias: bool):
    """(dx, dA, dB, dbias); entries not needed are empty tensors. The base weight is frozen: no dW."""
    weight = PackedWeight(packed, absmax, code, out_features, x.shape[1], blocksize, weight_dtype, x.dtype)
    dx, _, da, db, dbias = lora.lora_bwd(dy, x, weight, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                                         need_x, False, need_a, need_b, need_bias)
    return dx, da, db, dbias
