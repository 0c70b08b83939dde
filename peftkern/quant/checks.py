"""Argument checks of QuantizedWeight: shapes, block sizes, the tensors a checkpoint holds, Tensor.to's forms."""
import operator

import torch

from .format import BLOCKSIZES


def _is_real(value) -> bool:
    from ..core.checks import is_real  # numbers.Real but bool (numpy scalars too); imported late, as ops import us
    return is_real(value)


def _as_int(value):
    from ..core.checks import as_int  # operator.index but bool or tensor: ints and numpy integers, never 3.0
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



def _same_device(a: torch.device, b: torch.device) -> bool:
    """torch.device("cuda") names the current CUDA device: it is the same as cuda:<current>."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else None
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index
