"""The 4-bit format's constants and tables, and quantization as bitsandbytes' CPU path computes it, op for op (the
format itself is described in peftkern.quant's docstring; dequantization is peftkern.quant.fourbit's, shared with
the ops)."""
import functools

import torch

QUANT_TYPES = ("nf4", "fp4")
# the 4-bit block sizes bitsandbytes' quantize_4bit / dequantize_4bit accept
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# double quantization: bitsandbytes always quantizes absmax in blocks of 256 with its dynamic map
BLOCKSIZE2 = 256

# bitsandbytes.functional.get_4bit_type's values, in its index order
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
        1.0]
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, normalised by its max as bitsandbytes does
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        table = torch.tensor(_NF4, dtype=torch.float32)
    else:  # fp4: divided in float32 like get_4bit_type (8/12 etc. round there)
        table = torch.tensor(_FP4_RAW, dtype=torch.float32)
        table.div_(table.abs().max())
    return table


@functools.lru_cache(maxsize=None)
def _quantize_bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted table entries and the sort order, computed as bitsandbytes' default
    quantize_4bit does. FP4 has +0 (index 0) and -0 (index 8): the tie order of torch.argsort decides which
    of the two a value near zero gets, so it is taken from the same call bitsandbytes makes, on CPU."""
    code = _code_cpu(quant_type)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), the 256-entry
    map of double quantization, built with the same float32 ops so every entry matches."""
    data = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    """The 65536-entry table bitsandbytes' C++ quantize_blockwise (cpu_ops.cpp, build_quantize_lut) maps a
    normalised value to a dynamic-map index with: entry i stands for -1 + 2i/65535 (float32) and holds the
    number of midpoints between consecutive map entries that lie below it."""
    code = _dynamic_map_cpu()
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(65536, dtype=torch.float32)
    val = (i + i) / torch.full_like(i, 65535.0) - 1.0  # a true float32 division, as the C++ does
    return torch.searchsorted(midpoints, val, side="left").clamp_(max=255).to(torch.uint8)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _quantize_4bit(w32: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], absmax float32 [nblocks]) for a flat float32 weight: bitsandbytes' default
    quantize_4bit kernel, op for op (a full block scales by a reciprocal, the short last block divides; the
    short block's absmax keeps its clamp to 1e-38, a full block's does not)."""
    midpoints, order = _quantize_bounds_cpu(quant_type)
    midpoints, order = _on(midpoints, w32.device), _on(order, w32.device)
    n = w32.numel()
    rem = n % blocksize
    full = n - rem
    body = w32[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().max(dim=-1)[0]
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_max = w32[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(w32[full:] / tail_max, -1, 1)])
    if scaled.numel() % 2:  # the padding nibble quantizes 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, midpoints, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    q8 = q.to(torch.uint8)
    return (q8[::2] << 4) | q8[1::2], absmax


def _quantize_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [len(x)], absmax2 float32 [ceil(len(x)/256)]) for absmax - offset: bitsandbytes' C++
    quantize_blockwise on CPU (cpu_ops.cpp quantize_cpu_impl), mirrored in torch. Per block of 256: a = max|x|
    (an all-zero block gets a = 0 and codes 0); v = clamp(x · (1/a), -1, 1); index = (uint16)
    fma((v + 1)·0.5, 65535, 0.5) into the lookup table. The fused multiply-add is exact in float64 here (at most
    48 significant bits) and is rounded once to float32 before the truncation, as the compiled code does."""
    n = x.numel()
    nb2 = -(-n // BLOCKSIZE2)
    xb = torch.nn.functional.pad(x, (0, nb2 * BLOCKSIZE2 - n)).view(nb2, BLOCKSIZE2)
    absmax2 = xb.abs().amax(dim=1)
    zero = absmax2 == 0
    inv = torch.ones_like(absmax2) / torch.where(zero, torch.ones_like(absmax2), absmax2)
    v = torch.clamp(xb * inv[:, None], -1.0, 1.0)
    t = (v + 1.0) * 0.5
    index = (t.double() * 65535.0 + 0.5).float().to(torch.int64)
    codes = _on(_dynamic_lut_cpu(), x.device)[index]
    codes = torch.where(zero[:, None], torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax2
