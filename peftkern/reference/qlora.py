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


NESTED_BLOCKSIZE = 256  # absmax values per absmax2 entry in bitsandbytes' double quantization


def resolve_absmax(absmax, absmax2, code2, offset, b0: int, b1: int) -> torch.Tensor:
    """float32 absmax of blocks [b0, b1): absmax itself, or, double-quantized (absmax uint8 codes),
    code2[q]·absmax2[b // 256] then + offset (two float32 roundings), as bitsandbytes' dequantize_blockwise and
    its `absmax += offset` compute it."""
    if absmax2 is None:
        return absmax[b0:b1]
    groups = torch.arange(b0, b1, device=absmax.device) // NESTED_BLOCKSIZE
    return code2[absmax[b0:b1].long()] * absmax2[groups] + offset


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256] int64: the bits of the two float32 values a packed byte stands for (high nibble first), before the
    absmax. Gathering one 8-byte integer per byte is a plain 1-D gather (twice as fast on CPU as gathering rows
    of two floats) and copies bits exactly."""
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).to(torch.float32).contiguous()
    return pairs.view(torch.int64).view(256)


def dequantize_span(packed: torch.Tensor, code: torch.Tensor, blocksize: int, e0: int, e1: int,
                    absmax_blocks: torch.Tensor) -> torch.Tensor:
    """Flat elements [e0, e1) of the dense weight in float32: code[q]·absmax, bitsandbytes' product.

    Works on whole blocks (`absmax_blocks` is the float32 absmax of blocks e0 // blocksize up to the one holding
    e1 - 1) and on whole bytes (a block starts on a byte: blocksize is even): each byte is looked up once in a
    256-entry table of value pairs with int32 indices, so the temporaries are a float32 span and an int32 index
    of half its length, no per-element int64 index."""
    bs = blocksize
    b0, b1 = e0 // bs, -(-e1 // bs)
    byte0, byte1 = b0 * bs // 2, min(b1 * bs // 2, packed.numel())
    values = torch.empty((b1 - b0) * bs, device=packed.device, dtype=torch.float32)
    # the global last block may be short: its missing tail stays unset and is sliced off below
    torch.index_select(_pair_table(code), 0, packed[byte0:byte1].to(torch.int32),
                       out=values[:2 * (byte1 - byte0)].view(torch.int64))
    values.view(b1 - b0, bs).mul_(absmax_blocks.view(-1, 1))
    return values[e0 - b0 * bs:e1 - b0 * bs]


def dequantize_rows(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, in_features: int,
                    blocksize: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of the dense weight, [stop - start, in_features] in `dtype` (the weight's own dtype:
    bitsandbytes rounds code·absmax to it).

    packed: uint8 [ceil(n / 2)] (n = out·in); absmax: float32 [ceil(n / blocksize)] (double quantization
    already resolved); code: float32 [16]. Blocks run over the flattened weight, so a block may straddle
    rows: each element takes the absmax of the block its flat index falls in."""
    e0, e1 = start * in_features, stop * in_features
    if e0 == e1:
        return torch.empty((stop - start, in_features), device=packed.device, dtype=dtype)
    blocks = absmax[e0 // blocksize:-(-e1 // blocksize)]
    return dequantize_span(packed, code, blocksize, e0, e1, blocks).to(dtype).view(stop - start, in_features)


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
        # at most half the rows per block: the whole weight is never dequantized at once, however small
        step = max(1, min(BLOCK_ELEMENTS // max(1, self.in_features), -(-self.out_features // 2)))
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


def _packed_weight(packed, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize,
                   weight_dtype, dtype) -> PackedWeight:
    nblocks = -(-out_features * in_features // blocksize)
    absmax = resolve_absmax(absmax, absmax2, code2, offset, 0, nblocks)  # [nblocks]: 1/blocksize of the weight
    return PackedWeight(packed, absmax, code, out_features, in_features, blocksize, weight_dtype, dtype)


def qlora_fwd(x, packed, absmax, code, absmax2, code2, offset, out_features: int, blocksize: int, weight_dtype,
              lora_a, lora_b, bias, scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r]); deq(W) in x's dtype."""
    weight = _packed_weight(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize,
                            weight_dtype, x.dtype)
    return lora.lora_fwd(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed)


def qlora_bwd(dy, x, packed, absmax, code, absmax2, code2, offset, out_features: int, blocksize: int, weight_dtype,
              lora_a, lora_b, s_down, scaling: float, dropout_p: float, seed: int, need_x: bool, need_a: bool,
              need_b: bool, need_bias: bool):
    """(dx, dA, dB, dbias); entries not needed are empty tensors. The base weight is frozen: no dW."""
    weight = _packed_weight(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize,
                            weight_dtype, x.dtype)
    dx, _, da, db, dbias = lora.lora_bwd(dy, x, weight, lora_a, lora_b, s_down, scaling, dropout_p, seed,
                                         need_x, False, need_a, need_b, need_bias)
    return dx, da, db, dbias
