"""The frozen base weight as the ops take it: a dense [out, in] tensor, or bitsandbytes' 4-bit storage.

Every family with a base weight (lora_linear, dora_linear, multi_lora_linear) has ONE custom op for both kinds:
the weight travels as five arguments,

    Tensor weight, Tensor[] quant, int out_features, int blocksize, ScalarType? weight_dtype

a dense weight as (weight, [], out, 0, None), a 4-bit one as (its packed codes, [absmax, code] or, double-
quantized, [absmax, code, absmax2, code2, offset], out, blocksize, the dtype it stands for). `op_args(weight)` makes
them from a tensor or a peftkern.QuantizedWeight; `resolve(a)` turns them back into what the implementations use:
the dense tensor, or a FourBit (the storage, checked against the shape: the kernels index it by that shape).

The 4-bit format: two codes per byte, the first element in the high nibble, one absmax per `blocksize` elements of
the flattened weight, code[q]·absmax computed in float32 then rounded to the weight's dtype (bitsandbytes'
dequantize_4bit). Products are made a block of output rows at a time (PackedWeight), so no dense [out, in] copy
of the weight ever exists.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..core import rules

SCHEMA = "Tensor weight, Tensor[] quant, int out_features, int blocksize, ScalarType? weight_dtype"
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
    """A 4-bit base weight's products without a dense copy: dequantized a block of output rows at a time."""

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
        acc = rules.acc_dtype(dy.dtype)
        dx = torch.zeros((dy.shape[0], self.in_features), device=dy.device, dtype=acc)
        for r0, r1, rows in self.row_blocks():
            dx.addmm_(dy[:, r0:r1].to(acc), rows.to(acc))
        return dx.to(dy.dtype)


class FourBit(NamedTuple):
    """A 4-bit base weight's storage (module docstring), checked against its shape."""
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    absmax2: Optional[torch.Tensor]
    code2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    out_features: int
    in_features: int
    blocksize: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def absmax_float(self) -> torch.Tensor:
        nblocks = -(-self.out_features * self.in_features // self.blocksize)
        return resolve_absmax(self.absmax, self.absmax2, self.code2, self.offset, 0, nblocks)

    def packed_weight(self, compute_dtype: torch.dtype) -> PackedWeight:
        """Its products in `compute_dtype` (x's), a block of rows at a time."""
        return PackedWeight(self.packed, self.absmax_float(), self.code, self.out_features, self.in_features,
                            self.blocksize, self.dtype, compute_dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole dense weight (for references and tests only): the weight's dtype, then `dtype`."""
        rows = dequantize_rows(self.packed, self.absmax_float(), self.code, self.in_features, self.blocksize, 0,
                               self.out_features, self.dtype)
        return rows if dtype is None else rows.to(dtype)


def op_args(weight) -> dict:
    """The five base-weight arguments of an op (module docstring) for a dense tensor or a QuantizedWeight."""
    if isinstance(weight, torch.Tensor):
        return dict(weight=weight, quant=[], out_features=weight.shape[0], blocksize=0, weight_dtype=None)
    quant = [weight.absmax, weight.code]
    if weight.double_quant:
        quant += [weight.absmax2, weight.code2, weight.offset]
    return dict(weight=weight.packed, quant=quant, out_features=weight.shape[0], blocksize=weight.blocksize,
                weight_dtype=weight.dtype)


def resolve(a, in_features: int):
    """The base weight of the op arguments `a`: the dense tensor, or a FourBit after checking its storage (see
    check_storage: a direct torch.ops call reaches the kernels without a validated QuantizedWeight)."""
    if not a.quant:
        if a.weight.dim() != 2 or a.weight.shape[0] != a.out_features or a.blocksize != 0:
            raise ValueError(f"a dense weight must be [out_features, in] = [{a.out_features}, {in_features}] with "
                             f"blocksize 0, got {tuple(a.weight.shape)} and blocksize {a.blocksize}")
        return a.weight
    if len(a.quant) not in (2, 5):
        raise ValueError(f"quant must be [absmax, code] or [absmax, code, absmax2, code2, offset], got "
                         f"{len(a.quant)} tensors")
    if a.weight_dtype is None:
        raise ValueError("weight_dtype is required with a 4-bit weight")
    absmax, code, absmax2, code2, offset = (list(a.quant) + [None] * 3)[:5]
    check_storage(a.weight, absmax, code, absmax2, code2, offset, a.out_features, in_features, a.blocksize)
    return FourBit(a.weight, absmax, code, absmax2, code2, offset, a.out_features, in_features, a.blocksize,
                   a.weight_dtype)


def check_storage(packed, absmax, code, absmax2, code2, offset, out_features: int, in_features: int,
                  blocksize: int) -> None:
    """The kernels index packed, absmax, code and the double quantization's code2 and absmax2 by the weight's shape
    and by absmax's uint8 codes, so their sizes and dtypes are checked at the use, whoever called the op."""
    n = out_features * in_features
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    nblocks = -(-n // blocksize)
    double_quant = absmax.dtype == torch.uint8
    expected = [("packed", packed, torch.uint8, -(-n // 2)),
                ("absmax", absmax, torch.uint8 if double_quant else torch.float32, nblocks),
                ("code", code, torch.float32, 16)]
    if double_quant:  # uint8 codes index code2's 256 entries: always in range once code2 has 256
        expected += [("absmax2", absmax2, torch.float32, -(-nblocks // NESTED_BLOCKSIZE)),
                     ("code2", code2, torch.float32, 256), ("offset", offset, torch.float32, 1)]
    elif (absmax2, code2, offset) != (None, None, None):
        raise ValueError("absmax2, code2 and offset belong to a double-quantized (uint8) absmax; absmax is float32")
    for name, t, dtype, size in expected:
        if t is None:
            raise ValueError(f"{name} is required with a double-quantized (uint8) absmax")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.numel() != size:
            raise ValueError(f"{name} must have {size} elements for a [{out_features}, {in_features}] weight at "
                             f"blocksize {blocksize}, got {t.numel()}")


def packed_weight(packed, absmax, code, absmax2, code2, offset, out_features: int, in_features: int,
                  blocksize: int, weight_dtype: torch.dtype, dtype: torch.dtype) -> PackedWeight:
    """The blocked products (in `dtype`) of a 4-bit weight given as its parts."""
    return FourBit(packed, absmax, code, absmax2, code2, offset, out_features, in_features, blocksize,
                   weight_dtype).packed_weight(dtype)
