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


def _is_real(value) -> bool:
    from .ops._checks import is_real  # numbers.Real but bool (numpy scalars too); imported late, as ops import us
    return is_real(value)


def _as_int(value):
    from .ops._checks import as_int  # operator.index but bool or tensor: ints and numpy integers, never 3.0
    return as_int(value)


def _check_blocksize(blocksize) -> int:
    value = _as_int(blocksize)  # an int or a numpy integer; 64.0 or True would compare equal: refused
    if value is None or value not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return value


def _check_tensor(name: str, t, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements ({what}), got {t.numel()} (shape {tuple(t.shape)})")
    return t.reshape(-1)


class QuantizedWeight:
    """A frozen [out, in] weight in bitsandbytes' 4-bit format (see the module docstring).

    Build one with `QuantizedWeight.quantize(weight)` or `QuantizedWeight.from_bnb(param)`; the constructor takes
    the raw tensors (what a checkpoint holds) and checks them:
        QuantizedWeight(packed, absmax, *, shape, quant_type, blocksize, dtype, code=None,
                        offset=None, absmax2=None, code2=None)
    packed   uint8, ceil(n/2) elements (any shape; kept flattened, a view when it can be), n = out·in
    absmax   float32 [nblocks] or, double-quantized, uint8 [nblocks] indices into code2; nblocks = ceil(n/blocksize)
    code     float32 [16]: the quant_type's table (checked against bitsandbytes' values); None uses it
    offset, absmax2, code2   all three for a double-quantized absmax (else none): offset a float or a one-element
             float32 tensor, absmax2 float32 [ceil(nblocks/256)], code2 float32 [256] (bitsandbytes' dynamic map)
    All tensors must be on one device (RuntimeError). Shapes and values raise ValueError, dtypes TypeError.
    """

    def __init__(self, packed, absmax, *, shape, quant_type, blocksize, dtype, code=None, offset=None,
                 absmax2=None, code2=None):
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise ValueError(f"shape must be 2-D [out, in], got {tuple(shape)}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"shape must have no zero dimension, got {tuple(shape)}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _check_blocksize(blocksize)
        if dtype not in DENSE_DTYPES:
            raise TypeError(f"dtype must be one of {DENSE_DTYPES}, got {dtype}")
        n = shape.numel()
        nblocks = -(-n // blocksize)
        double_quant = absmax2 is not None
        if (offset is None, code2 is None) != (not double_quant, not double_quant):
            raise ValueError("offset, absmax2 and code2 describe a double-quantized absmax: give all three or "
                             f"none (got offset={'set' if offset is not None else None}, absmax2="
                             f"{'set' if absmax2 is not None else None}, code2={'set' if code2 is not None else None})")
        packed = _check_tensor("packed", packed, torch.uint8, (n + 1) // 2,
                               f"two 4-bit codes per byte for a {tuple(shape)} weight")
        absmax = _check_tensor("absmax", absmax, torch.uint8 if double_quant else torch.float32, nblocks,
                               f"one per block of {blocksize} of the {n} elements")
        device = packed.device
        if code is None:  # a copy: the cached table must not be reachable (and writable) through an instance
            code = _code_cpu(quant_type).to(device, copy=True)
        code = _check_tensor("code", code, torch.float32, 16, "the 4-bit table")
        tensors = {"absmax": absmax, "code": code}
        if double_quant:
            absmax2 = _check_tensor("absmax2", absmax2, torch.float32, -(-nblocks // BLOCKSIZE2),
                                    f"one per {BLOCKSIZE2} of the {nblocks} absmax")
            code2 = _check_tensor("code2", code2, torch.float32, 256, "the 8-bit dynamic map")
            if isinstance(offset, torch.Tensor):
                offset = _check_tensor("offset", offset, torch.float32, 1, "the mean of absmax").reshape(())
            elif _is_real(offset):  # int, float or a numpy scalar
                offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
            else:
                raise TypeError(f"offset must be a float or a float32 tensor, got {type(offset).__name__}")
            tensors.update(absmax2=absmax2, code2=code2, offset=offset)
        for name, t in tensors.items():
            if t.device != device:
                raise RuntimeError(f"{name} is on {t.device} but packed is on {device}; all of a "
                                   "QuantizedWeight's tensors must be on one device")
        if not torch.equal(code.cpu(), _code_cpu(quant_type)):
            raise ValueError(f"code must be bitsandbytes' {quant_type} table {_code_cpu(quant_type).tolist()}, "
                             f"got {code.tolist()}")
        self.shape, self.quant_type, self.blocksize, self.dtype = shape, quant_type, blocksize, dtype
        self.packed, self.absmax, self.code = packed, absmax, code
        self.double_quant = double_quant
        self.offset, self.absmax2, self.code2 = offset, absmax2, code2
        self.blocksize2 = BLOCKSIZE2 if double_quant else None

    # ---------------------------------------------------------------- construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True) -> "QuantizedWeight":
        """Quantize a dense [out, in] weight. Same bytes as bitsandbytes.functional.quantize_4bit(weight,
        blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type) on CPU. A float64 weight is
        rounded to float32 first (the format's absmax and products are float32); dequantize() returns float64."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(f"weight must have no zero dimension, got shape {tuple(weight.shape)}")
        if weight.dtype not in DENSE_DTYPES:
            raise TypeError(f"weight must be one of {DENSE_DTYPES}, got {weight.dtype}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        w32 = weight.detach().reshape(-1).to(torch.float32)
        if not torch.isfinite(w32).all():
            raise ValueError("weight must be finite (in float32): it holds inf or nan")
        packed, absmax = _quantize_4bit(w32, blocksize, quant_type)
        if not double_quant:
            return cls(packed, absmax, shape=weight.shape, quant_type=quant_type, blocksize=blocksize,
                       dtype=weight.dtype)
        offset = absmax.mean()
        qabsmax, absmax2 = _quantize_absmax(absmax - offset)
        return cls(packed, qabsmax, shape=weight.shape, quant_type=quant_type, blocksize=blocksize,
                   dtype=weight.dtype, offset=offset, absmax2=absmax2,
                   code2=_dynamic_map_cpu().to(weight.device, copy=True))

    @classmethod
    def from_bnb(cls, param) -> "QuantizedWeight":
        """Wrap a quantized bitsandbytes Params4bit (or a Linear4bit, whose weight is used) without copying: packed,
        absmax and the double-quantization state are bitsandbytes' own tensors. Refuses (RuntimeError) the
        CPU-specific layout bitsandbytes repacks a Linear4bit into on AVX512-BF16 CPUs (see below)."""
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TypeError("param must be a bitsandbytes Params4bit, but bitsandbytes is not installed") from e
        module = None
        if isinstance(param, torch.nn.Module):
            module, param = param, getattr(param, "weight", None)
        if not isinstance(param, bnb.nn.Params4bit):
            raise TypeError(f"param must be a bitsandbytes Params4bit (or a Linear4bit), got {type(param).__name__}")
        qs = param.quant_state
        if qs is None and module is not None:  # bitsandbytes keeps a copy on the module (its FSDP recovery)
            qs = getattr(module, "quant_state", None)
        if qs is None:
            raise ValueError("param has no quant_state: bitsandbytes quantizes a Params4bit when it is moved to a "
                             "device (linear.to(device)); do that first")
        if getattr(qs, "packing_format_for_cpu", False):
            raise RuntimeError(
                "param is in bitsandbytes' CPU-specific repacked layout (quant_state.packing_format_for_cpu): a "
                "Linear4bit switches to it on CPUs with AVX512-BF16 the first time it runs in eval mode on inputs "
                "that do not require grad. That layout keeps absmax rounded to bfloat16 and drops double "
                "quantization, so the original 4-bit weight cannot be recovered exactly. Take the "
                "QuantizedWeight before the layer runs that way (or keep it in train mode), or reload the layer "
                "from its checkpoint")
        if qs.shape is None or len(qs.shape) != 2:
            raise ValueError(f"param must stand for a 2-D [out, in] weight, its quant_state.shape is {qs.shape}")
        data = param.data
        if data.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes, viewed
            data = data.view(torch.uint8)
        kwargs = dict(shape=qs.shape, quant_type=qs.quant_type, blocksize=qs.blocksize, dtype=qs.dtype,
                      code=qs.code)
        if qs.nested:
            if qs.state2.blocksize != BLOCKSIZE2:
                raise ValueError(f"param's nested absmax blocksize must be {BLOCKSIZE2}, got {qs.state2.blocksize}")
            kwargs.update(offset=qs.offset, absmax2=qs.state2.absmax, code2=qs.state2.code)
        return cls(data, qs.absmax, **kwargs)

    # ---------------------------------------------------------------- dequantization
    @property
    def nblocks(self) -> int:
        return self.absmax.numel()

    def _absmax_blocks(self, b0: int, b1: int) -> torch.Tensor:
        """float32 absmax of blocks [b0, b1). Double-quantized: code2[qa] · absmax2[b // 256], then + offset (two
        float32 roundings), as bitsandbytes' dequantize_blockwise and its `absmax += offset` compute it."""
        from .reference.qlora import resolve_absmax  # the one definition, shared with lora_linear's paths
        return resolve_absmax(self.absmax, self.absmax2, self.code2, self.offset, b0, b1)

    def absmax_float(self) -> torch.Tensor:
        """float32 [nblocks]: the per-block absmax, double quantization resolved."""
        return self._absmax_blocks(0, self.nblocks)

    def _dequantize_elements(self, e0: int, e1: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat elements [e0, e1) of the dense weight: code[q] · absmax in float32, then cast. Only the blocks
        holding them are unpacked; every element is computed the same way whatever range it is asked in."""
        from .reference.qlora import dequantize_span  # the one definition of the product, shared with lora_linear
        bs = self.blocksize
        b0, b1 = e0 // bs, -(-e1 // bs)
        return dequantize_span(self.packed, self.code, bs, e0, e1, self._absmax_blocks(b0, b1)).to(dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense [out, in] weight in self.dtype."""
        return self._dequantize_elements(0, self.shape.numel(), self.dtype).view(self.shape)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of the dense weight, [stop - start, in] in `dtype` (default self.dtype), each element
        equal to dequantize()'s, without dequantizing the other rows."""
        out, in_ = self.shape
        for name, v in (("start", start), ("stop", stop)):
            if _as_int(v) is None:  # ints and numpy integers
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        start, stop = _as_int(start), _as_int(stop)
        if not 0 <= start <= stop <= out:
            raise ValueError(f"need 0 <= start <= stop <= out_features ({out}), got start={start}, stop={stop}")
        dtype = self.dtype if dtype is None else dtype
        if dtype not in DENSE_DTYPES:
            raise TypeError(f"dtype must be one of {DENSE_DTYPES}, got {dtype}")
        if start == stop:
            return torch.empty((0, in_), dtype=dtype, device=self.device)
        return self._dequantize_elements(start * in_, stop * in_, dtype).view(stop - start, in_)

    # ---------------------------------------------------------------- bookkeeping
    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _tensors(self) -> dict:
        t = {"packed": self.packed, "absmax": self.absmax, "code": self.code}
        if self.double_quant:
            t.update(offset=self.offset, absmax2=self.absmax2, code2=self.code2)
        return t

    def to(self, device) -> "QuantizedWeight":
        """A QuantizedWeight on `device` (its tensors moved; shared when already there)."""
        device = torch.device(device)
        moved = {k: v.to(device) for k, v in self._tensors().items()}
        return type(self)(moved.pop("packed"), moved.pop("absmax"), shape=self.shape, quant_type=self.quant_type,
                          blocksize=self.blocksize, dtype=self.dtype, **moved)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, absmax and (double-quantized) offset, absmax2 and code2, plus the 16-entry code."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={tuple(self.shape)}, quant_type={self.quant_type!r}, blocksize="
                f"{self.blocksize}, double_quant={self.double_quant}, dtype={self.dtype}, device={self.device})")

