"""bitsandbytes interop of QuantizedWeight: reading a Params4bit (or what pickle leaves of one), and the quantization
state under the names bitsandbytes' Linear4bit writes in its state dict (QuantState.as_dict(packed=True)).
bitsandbytes itself is imported only inside from_bnb: peftkern.quant works without it."""
import json

import torch

from .format import BLOCKSIZE2, DENSE_DTYPES, QUANT_TYPES

# bitsandbytes' QuantState.as_dict(packed=True) entries, the names a Linear4bit's state dict holds under "weight."
_STATE_TENSORS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_STATE_VALUES = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_STATE_BLOB = "quant_state.bitsandbytes__"
_NESTED = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def from_bnb(cls, param):
    """QuantizedWeight.from_bnb (its docstring says what is taken and refused): a `cls` over bitsandbytes' own
    tensors."""
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


def quant_state_dict(qw) -> dict:
    """QuantizedWeight.quant_state_dict (see there): `qw`'s state under bitsandbytes' names."""
    state = {"absmax": qw.absmax, "quant_map": qw.code.clone()}
    values = {"quant_type": qw.quant_type, "blocksize": qw.blocksize, "dtype": _dtype_name(qw.dtype),
              "shape": list(qw.shape)}
    if qw.double_quant:
        state.update(nested_absmax=qw.absmax2, nested_quant_map=qw.code2.clone())
        offset = float("nan") if qw.offset.device.type == "meta" else qw.offset.item()
        values.update(nested_blocksize=BLOCKSIZE2, nested_dtype="float32", nested_offset=offset)
    blob = torch.tensor(list(json.dumps(values).encode("utf-8")), dtype=torch.uint8)
    state[_STATE_BLOB + qw.quant_type] = blob
    return state


def from_quant_state_dict(cls, packed: torch.Tensor, state: dict):
    """QuantizedWeight.from_quant_state_dict (see there): a `cls` over `packed` and the entries of `state`."""
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
