"""peftkern.QuantizedWeight: a frozen [out, in] weight in bitsandbytes' 4-bit format (QLoRA bases).

The format (bitsandbytes' `quantize_4bit` / `Params4bit`):
- the weight is flattened row-major to n = out·in elements and cut into blocks of `blocksize` elements (blocks run
  over the flattened weight, so a block may straddle two rows; the last block may be short);
- per block, absmax = max|w| in float32; each element is stored as the 4-bit index of the nearest entry of a
  16-entry table (`code`: NF4 or FP4) to w / absmax;
- two indices per byte, the earlier element in the high nibble; an odd n pads one nibble (the index of 0.0);
- double quantization (bitsandbytes' compress_statistics): absmax - mean(absmax) is itself quantized blockwise,
  256 absmax per block, to uint8 indices into bitsandbytes' 256-entry dynamic map (`code2`), with one float32
  `absmax2` per 256 blocks; `offset` is that mean.
- dequantization: w[e] = code[q[e]] · absmax[e // blocksize], a float32 product, then cast to the dense dtype; a
  double-quantized absmax is first resolved as code2[qa[b]] · absmax2[b // 256] + offset, in float32.

`QuantizedWeight.quantize` produces the same bytes as bitsandbytes' CPU path: its default `quantize_4bit` kernel
(plain torch) for the 4-bit step and its C++ `quantize_blockwise` (a 65536-entry lookup table, not an exact
nearest-entry search) for the double quantization, mirrored here op for op. bitsandbytes is imported only by
`from_bnb`. Weights with a zero dimension are refused (bitsandbytes cannot dequantize them either).
"""
from .format import (  # noqa: F401  (the tables and quantization steps: tests compare them with bitsandbytes')
    BLOCKSIZE2,
    BLOCKSIZES,
    DENSE_DTYPES,
    QUANT_TYPES,
    _code_cpu,
    _dynamic_lut_cpu,
    _dynamic_map_cpu,
    _quantize_4bit,
    _quantize_absmax,
    _quantize_bounds_cpu,
)
from .weight import QuantizedWeight

__all__ = ["QuantizedWeight", "QUANT_TYPES", "BLOCKSIZES", "DENSE_DTYPES", "BLOCKSIZE2"]
