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
import json
import math
import operator

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
    from .core.checks import is_real  # numbers.Real but bool (numpy scalars too); imported late, as ops import us
    return is_real(value)


def _as_int(value):
    from .core.checks import as_int  # operator.index but bool or tensor: ints and numpy integers, never 3.0
    return as_int(value)


def _check_blocksize(blocksize) -> int:
    value = _as_int(blocksize)  # an int or a numpy integer; 64.0 or True would compare equal: refused
    if value is None or value not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return value


def _check_shape(shape) -> torch.Size:
    """[out, in] as a torch.Size: a sequence of two ints (a float, a bool or None is refused, never truncated)."""
    if isinstance(shape, (str, bytes, torch.Tensor)) or not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple of two ints [out, in], got {type(shape).__name__} ({shape!r})")
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, bool):
            raise TypeError(f"shape[{i}] must be an int, got bool ({d!r}) in shape {tuple(shape)!r}")
        try:
            dims.append(operator.index(d))  # int and integer scalars; 96.0 has no __index__
        except TypeError:
            raise TypeError(f"shape[{i}] must be an int, got {type(d).__name__} ({d!r}) in shape "
                            f"{tuple(shape)!r}") from None
    shape = torch.Size(dims)
    if len(shape) != 2:
        raise ValueError(f"shape must be 2-D [out, in], got {tuple(shape)}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"shape must have no zero dimension, got {tuple(shape)}")
    return shape


def _check_tensor(name: str, t, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements ({what}), got {t.numel()} (shape {tuple(t.shape)})")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad, but a QuantizedWeight is frozen (nothing can flow back into its "
                         f"state); pass {name}.detach()")
    return t.reshape(-1)


def _check_values(name: str, t: torch.Tensor, *, nonnegative: bool) -> None:
    """Finite (and >= 0 for a block scale) in every element; a meta tensor has no values to check."""
    if t.device.type == "meta":
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, but it holds {'nan' if bool(t.isnan().any()) else 'inf'}")
    if nonnegative and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0 (a block's max |w|), but it holds {t.min().item()}")


def _check_table(name: str, t: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if t.device.type != "meta" and not torch.equal(t.cpu(), want):
        raise ValueError(f"{name} must be {what} {want.tolist()[:16]}{' ...' if want.numel() > 16 else ''}, got "
                         f"{t.tolist()[:16]}{' ...' if t.numel() > 16 else ''}")


def _parse_to(args, kwargs):
    """(device or None, dtype or None, non_blocking, copy) from Tensor.to's forms: to(device), to(dtype),
    to(device, dtype), to(tensor) (its device and dtype), and the keywords device=, dtype=, non_blocking=, copy=."""
    unknown = set(kwargs) - {"device", "dtype", "non_blocking", "copy"}
    if unknown:
        raise TypeError(f"to() got unexpected keyword argument(s) {sorted(unknown)}")
    if len(args) > 2:
        raise TypeError(f"to() takes at most 2 positional arguments (device, dtype), got {len(args)}")
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            if dtype is not None:
                raise TypeError("to() got two dtypes")
            dtype = a
        elif isinstance(a, torch.Tensor):
            if device is not None or dtype is not None:
                raise TypeError("to(tensor) takes the tensor's device and dtype: give no other device or dtype")
            device, dtype = a.device, a.dtype
        elif isinstance(a, (str, int, torch.device)) and not isinstance(a, bool):
            if device is not None:
                raise TypeError("to() got two devices")
            device = a
        else:
            raise TypeError(f"to() takes a device, a dtype or a tensor, got {type(a).__name__} ({a!r})")
    if device is not None:
        if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
            raise TypeError(f"device must be a torch.device, str or int, got {type(device).__name__}")
        device = torch.device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    for flag in ("non_blocking", "copy"):
        if not isinstance(kwargs.get(flag, False), bool):
            raise TypeError(f"{flag} must be a bool, got {type(kwargs[flag]).__name__}")
    return device, dtype, kwargs.get("non_blocking", False), kwargs.get("copy", False)


# bitsandbytes' QuantState.as_dict(packed=True) entries, the names a Linear4bit's state dict holds under "weight."
_STATE_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE_VALUES = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_STATE_BLOB = "quant_state.bitsandbytes__"
_NESTED = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") names the current CUDA device: it is the same as cuda:<current>."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    All tensors must be on one device (RuntimeError). Shapes and values raise ValueError, dtypes and argument types
    TypeError: shape must be two ints (not floats or None); absmax (float32), absmax2 and offset must be finite and
    absmax, absmax2 >= 0; code and code2 must be bitsandbytes' tables; no tensor may require grad (the weight is
    frozen). Tensors on the meta device are accepted (shape inference, deferred loading): their values are not
    checked and dequantize() gives a meta tensor.
    """

    def __init__(self, packed, absmax, *, shape, quant_type, blocksize, dtype, code=None, offset=None,
                 absmax2=None, code2=None):
        shape = _check_shape(shape)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _check_blocksize(blocksize)
        if not isinstance(dtype, torch.dtype) or dtype not in DENSE_DTYPES:
            raise TypeError(f"dtype must be one of {DENSE_DTYPES}, got {dtype}")
        n = shape.numel()
        nblocks = -(-n // blocksize)
        nested = {"offset": offset, "absmax2": absmax2, "code2": code2}
        given = [k for k, v in nested.items() if v is not None]
        missing = [k for k, v in nested.items() if v is None]
        if given and missing:
            raise ValueError(f"double quantization is incomplete: offset, absmax2 and code2 describe a "
                             f"double-quantized absmax and go together, but {'/'.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing (got {'/'.join(given)})")
        if not given and isinstance(absmax, torch.Tensor) and absmax.dtype == torch.uint8:
            raise ValueError("double quantization is incomplete: absmax is uint8 (codes of a double-quantized "
                             "absmax) but offset/absmax2/code2 are missing; give all three, or a float32 absmax")
        double_quant = bool(given)
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
                if not math.isfinite(offset):
                    raise ValueError(f"offset must be finite, got {offset}")
                offset = torch.tensor(float(offset), dtype=torch.float32, device=device)
            else:
                raise TypeError(f"offset must be a float or a float32 tensor, got {type(offset).__name__}")
            tensors.update(absmax2=absmax2, code2=code2, offset=offset)
        for name, t in tensors.items():
            if t.device != device:
                raise RuntimeError(f"{name} is on {t.device} but packed is on {device}; all of a "
                                   "QuantizedWeight's tensors must be on one device")
        _check_table("code", code, _code_cpu(quant_type), f"bitsandbytes' {quant_type} table")
        if double_quant:
            _check_table("code2", code2, _dynamic_map_cpu(), "bitsandbytes' 8-bit dynamic map (create_dynamic_map)")
            _check_values("absmax2", absmax2, nonnegative=True)
            _check_values("offset", offset, nonnegative=False)
        else:
            _check_values("absmax", absmax, nonnegative=True)
        self.shape, self.quant_type, self.blocksize, self.dtype = shape, quant_type, blocksize, dtype
        self.packed, self.absmax, self.code = packed, absmax, code
        self.double_quant = double_quant
        self.offset, self.absmax2, self.code2 = offset, absmax2, code2
        self.blocksize2 = BLOCKSIZE2 if double_quant else None

    def _with(self, tensors: dict, dtype: torch.dtype) -> "QuantizedWeight":
        """A copy of this (already validated) weight over other tensors with the same values (moved or cloned) and
        the dense dtype `dtype`: no check is repeated (it would read every value back to the host)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(tensors)
        new.dtype = dtype
        return new

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
        CPU-specific layout bitsandbytes repacks a Linear4bit into on AVX512-BF16 CPUs (see below).

        Also takes what a Params4bit becomes after `pickle` or `torch.save`/`torch.load` (of it, or of a model
        holding it): torch's Parameter pickling drops the subclass, so it comes back as a plain nn.Parameter that
        still carries the packed bytes and the bitsandbytes `quant_state` (bitsandbytes' own forward keeps working
        on it, reading that quant_state)."""
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TypeError("param must be a bitsandbytes Params4bit, but bitsandbytes is not installed") from e
        module = None
        if isinstance(param, torch.nn.Module):
            module, param = param, getattr(param, "weight", None)
        unpickled = (isinstance(param, torch.Tensor) and not isinstance(param, bnb.nn.Params4bit)
                     and isinstance(param.__dict__.get("quant_state"), bnb.functional.QuantState))
        if not isinstance(param, bnb.nn.Params4bit) and not unpickled:
            raise TypeError(f"param must be a bitsandbytes Params4bit (or a Linear4bit, or a Parameter carrying a "
                            f"bitsandbytes quant_state, as a Params4bit comes back from pickle), got "
                            f"{type(param).__name__}")
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
        from .fourbit import resolve_absmax  # the one definition, shared with the ops
        return resolve_absmax(self.absmax, self.absmax2, self.code2, self.offset, b0, b1)

    def absmax_float(self) -> torch.Tensor:
        """float32 [nblocks]: the per-block absmax, double quantization resolved."""
        return self._absmax_blocks(0, self.nblocks)

    def _dequantize_elements(self, e0: int, e1: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat elements [e0, e1) of the dense weight: code[q] · absmax in float32, then cast. Only the blocks
        holding them are unpacked; every element is computed the same way whatever range it is asked in."""
        from .fourbit import dequantize_span  # the one definition of the product, shared with the ops
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

    def to(self, *args, **kwargs) -> "QuantizedWeight":
        """As Tensor.to: `to(device)`, `to(dtype)`, `to(device, dtype)`, `to(tensor)` (its device and dtype), keywords
        device=, dtype=, non_blocking=, copy=. The device moves every tensor; the dtype is the *dense* dtype, what
        dequantize() returns and lora_linear rounds deq(W) to (the packed codes and block scales are bitsandbytes'
        format and never change: casting them would destroy the weight). Returns self when nothing changes (and
        copy is False), else a new QuantizedWeight; self is never modified.

        Raises TypeError for a dtype other than float16/bfloat16/float32/float64 or a malformed argument, and
        NotImplementedError (a RuntimeError) when moving off the meta device: a meta weight holds no values
        (build it on a real device, or load it from a checkpoint)."""
        device, dtype, non_blocking, copy = _parse_to(args, kwargs)
        if dtype is not None and dtype not in DENSE_DTYPES:
            raise TypeError(f"dtype must be one of {DENSE_DTYPES} (the dense dtype dequantize() returns; the 4-bit "
                            f"codes themselves keep bitsandbytes' format), got {dtype}")
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        if self.device.type == "meta" and device.type != "meta":
            raise NotImplementedError(f"this QuantizedWeight is on the meta device and holds no data, so it cannot "
                                      f"be moved to {device}; build it on a real device (quantize, from_bnb) or "
                                      "load its tensors from a checkpoint")
        if _same_device(self.device, device) and dtype == self.dtype and not copy:
            return self
        moved = {k: v.to(device, non_blocking=non_blocking, copy=copy) for k, v in self._tensors().items()}
        return self._with(moved, dtype)

    # ---------------------------------------------------------------- state dict (bitsandbytes' names)
    def quant_state_dict(self) -> dict:
        """The quantization state beside the packed bytes, under the names bitsandbytes' Linear4bit writes after
        "weight." in its state dict (QuantState.as_dict(packed=True)): `absmax`, `quant_map` (code) and, when
        double-quantized, `nested_absmax` (absmax2) and `nested_quant_map` (code2), plus one uint8 tensor
        `quant_state.bitsandbytes__<quant_type>` holding the rest as JSON (quant_type, blocksize, dtype, shape and
        nested_blocksize, nested_dtype, nested_offset). All tensors (safetensors can save them); the tables are
        copies, never this weight's own."""
        state = {"absmax": self.absmax, "quant_map": self.code.clone()}
        values = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                  "shape": list(self.shape)}
        if self.double_quant:
            state.update(nested_absmax=self.absmax2, nested_quant_map=self.code2.clone())
            offset = float("nan") if self.offset.device.type == "meta" else self.offset.item()
            values.update(nested_blocksize=BLOCKSIZE2, nested_dtype="float32", nested_offset=offset)
        blob = torch.tensor(list(json.dumps(values).encode("utf-8")), dtype=torch.uint8)
        state[_STATE_BLOB + self.quant_type] = blob
        return state

    @classmethod
    def from_quant_state_dict(cls, packed: torch.Tensor, state: dict) -> "QuantizedWeight":
        """The inverse of quant_state_dict(): a QuantizedWeight over `packed` (a state dict's "weight": uint8, or
        bitsandbytes' other quant_storage dtypes holding the same bytes) and `state` (its "weight.*" entries with
        the prefix removed; bitsandbytes' unpacked form, plain values instead of the JSON tensor, is read too).
        The tensors are used as given (not copied). Raises ValueError naming the entry when one is missing,
        unknown, contradictory or malformed (e.g. "double quantization is incomplete"), and the constructor's
        errors for the tensors themselves."""
        if not isinstance(packed, torch.Tensor):
            raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
        if isinstance(packed, torch.nn.Parameter):  # state_dict(keep_vars=True): the Params4bit itself
            packed = packed.data
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of the quantization state's entries, got {type(state).__name__}")
        entries = dict(state)
        blobs = [k for k in entries if k.startswith("quant_state.")]
        unknown = [k for k in entries if k not in _STATE_TENSORS + _STATE_VALUES and k not in blobs]
        if unknown:
            raise ValueError(f"unknown quantization state entries {sorted(unknown)}; bitsandbytes' names are "
                             f"{list(_STATE_TENSORS + _STATE_VALUES)} and {_STATE_BLOB}<quant_type>")
        if len(blobs) > 1:
            raise ValueError(f"the quantization state holds {len(blobs)} quant_state entries {sorted(blobs)}; "
                             "bitsandbytes writes exactly one")
        if blobs:
            key = blobs[0]
            blob_type = key.removeprefix(_STATE_BLOB) if key.startswith(_STATE_BLOB) else None
            if blob_type not in QUANT_TYPES:
                raise ValueError(f"{key!r} is not one of bitsandbytes' quant_state entries "
                                 f"({', '.join(_STATE_BLOB + q for q in QUANT_TYPES)})")
            blob = entries.pop(key)
            if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
                raise ValueError(f"{key!r} must be a 1-D uint8 tensor (JSON bytes), got "
                                 f"{getattr(blob, 'dtype', type(blob).__name__)}")
            try:
                values = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{key!r} does not hold bitsandbytes' JSON quantization state: {e}") from None
            if not isinstance(values, dict):
                raise ValueError(f"{key!r} must hold a JSON object, got {type(values).__name__}")
            unknown = [k for k in values if k not in _STATE_VALUES]
            if unknown:
                raise ValueError(f"{key!r} holds unknown entries {sorted(unknown)}")
            clash = [k for k in values if k in entries
                     and (isinstance(entries[k], torch.Tensor) or entries[k] != values[k])]
            if clash:
                raise ValueError(f"{key!r} contradicts the state's own entries {sorted(clash)}")
            entries.update(values)
            if entries.get("quant_type") != blob_type:
                raise ValueError(f"{key!r} names quant_type {blob_type!r} but holds quant_type "
                                 f"{entries.get('quant_type')!r}")
        missing = [k for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape") if k not in entries]
        if missing:
            raise ValueError(f"the quantization state is missing {missing} (bitsandbytes' Linear4bit writes them "
                             f"beside the packed weight as weight.absmax, weight.quant_map and "
                             f"weight.{_STATE_BLOB}<quant_type>)")
        nested = [k for k in _NESTED if k in entries]
        if nested and len(nested) != len(_NESTED):
            raise ValueError(f"double quantization is incomplete: the state has {nested} but not "
                             f"{[k for k in _NESTED if k not in entries]}")
        dtype = getattr(torch, entries["dtype"], None) if isinstance(entries["dtype"], str) else None
        if dtype not in DENSE_DTYPES:
            names = [_dtype_name(d) for d in DENSE_DTYPES]
            raise ValueError(f"dtype must name one of {names}, got {entries['dtype']!r}")
        shape = entries["shape"]
        if not isinstance(shape, (list, tuple)):
            raise ValueError(f"shape must be a list of two ints, got {shape!r}")
        kwargs = dict(shape=shape, quant_type=entries["quant_type"], blocksize=entries["blocksize"], dtype=dtype,
                      code=entries["quant_map"])
        if nested:
            if entries["nested_blocksize"] != BLOCKSIZE2 or isinstance(entries["nested_blocksize"], bool):
                raise ValueError(f"nested_blocksize must be {BLOCKSIZE2}, got {entries['nested_blocksize']!r}")
            if entries["nested_dtype"] != "float32":
                raise ValueError(f"nested_dtype must be 'float32', got {entries['nested_dtype']!r}")
            offset = entries["nested_offset"]
            if isinstance(offset, bool) or not isinstance(offset, (int, float, torch.Tensor)):
                raise ValueError(f"nested_offset must be a float, got {type(offset).__name__}")
            kwargs.update(offset=offset, absmax2=entries["nested_absmax"], code2=entries["nested_quant_map"])
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage other than uint8: the same bytes, viewed
            packed = packed.reshape(-1).view(torch.uint8)
        return cls(packed, entries["absmax"], **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, absmax and (double-quantized) offset, absmax2 and code2, plus the 16-entry code."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={tuple(self.shape)}, quant_type={self.quant_type!r}, blocksize="
                f"{self.blocksize}, double_quant={self.double_quant}, dtype={self.dtype}, device={self.device})")

