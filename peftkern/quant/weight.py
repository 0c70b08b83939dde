"""QuantizedWeight: a frozen [out, in] weight in bitsandbytes' 4-bit format, its checks, dequantization and moves."""
import math

import torch

from . import bnb as _bnb
from .checks import (
    _as_int,
    _check_blocksize,
    _check_shape,
    _check_table,
    _check_tensor,
    _check_values,
    _is_real,
    _parse_to,
    _same_device,
)
from .format import BLOCKSIZE2, DENSE_DTYPES, QUANT_TYPES, _code_cpu, _dynamic_map_cpu, _quantize_4bit, _quantize_absmax


class QuantizedWeight:
    """A frozen [out, in] weight in bitsandbytes' 4-bit format (see peftkern.quant's docstring).

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
        return _bnb.from_bnb(cls, param)

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
        return _bnb.quant_state_dict(self)

    @classmethod
    def from_quant_state_dict(cls, packed: torch.Tensor, state: dict) -> "QuantizedWeight":
        """The inverse of quant_state_dict(): a QuantizedWeight over `packed` (a state dict's "weight": uint8, or
        bitsandbytes' other quant_storage dtypes holding the same bytes) and `state` (its "weight.*" entries with
        the prefix removed; bitsandbytes' unpacked form, plain values instead of the JSON tensor, is read too).
        The tensors are used as given (not copied). Raises ValueError naming the entry when one is missing,
        unknown, contradictory or malformed (e.g. "double quantization is incomplete"), and the constructor's
        errors for the tensors themselves."""
        return _bnb.from_quant_state_dict(cls, packed, state)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, absmax and (double-quantized) offset, absmax2 and code2, plus the 16-entry code."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __repr__(self) -> str:
        return (f"QuantizedWeight(shape={tuple(self.shape)}, quant_type={self.quant_type!r}, blocksize="
                f"{self.blocksize}, double_quant={self.double_quant}, dtype={self.dtype}, device={self.device})")
