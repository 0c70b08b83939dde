"""Argument checks shared by every op family. They run before any kernel, and raise:
ValueError for shapes and values, TypeError for dtypes, RuntimeError for device mismatch,
always naming the argument and the expected versus the received value."""
from __future__ import annotations

import numbers
import operator
import sys

import torch

from .rules import SEED_LIMIT

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dim(s), got shape {tuple(value.shape)}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")


def same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise RuntimeError(f"{name} is on {value.device} but {reference_name} is on {reference.device}; "
                               f"move them to one device")


# ---- the dtype rule of every op -------------------------------------------------------------------
# Outside torch.autocast, an op's input (x, h, a sparse diff's weight), its frozen weight, bias and
# residual share one dtype. Its trainable adapter tensors (lora_a, lora_b, w_down, b_down, w_up, b_up,
# sparse values) have that dtype too, with one exception: float32 beside a float16/bfloat16 input,
# which is how PEFT keeps adapters by default. float32 adapters beside a float64 input are refused like
# any other mismatch (as F.linear refuses a float32 weight beside a float64 input): float64 is the
# dtype of gradient checks, where a float32 parameter is a mistake, not a choice.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtypes(x_dtype: torch.dtype) -> tuple:
    """The dtypes a trainable adapter tensor may have beside an input of dtype `x_dtype`."""
    return (x_dtype, torch.float32) if x_dtype in HALF_DTYPES else (x_dtype,)


def same_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}; "
                            f"outside torch.autocast they must match")


def adapter_dtype(name: str, value: torch.Tensor, x_name: str, x: torch.Tensor) -> None:
    """A trainable adapter tensor has x's dtype, or float32 beside a float16/bfloat16 x (PEFT's default)."""
    if value.dtype in adapter_dtypes(x.dtype):
        return
    if x.dtype in HALF_DTYPES:
        raise TypeError(f"{name} must have {x_name}'s dtype ({x.dtype}) or float32, got {value.dtype}")
    raise TypeError(f"{name} must have {x_name}'s dtype ({x.dtype}), got {value.dtype} (float32 adapter "
                    f"parameters are accepted beside a float16/bfloat16 {x_name} only; outside torch.autocast "
                    f"cast one of them, e.g. {name}.to({x.dtype}))")


def input_dtypes(x_name: str, x: torch.Tensor, *, frozen: dict, adapters: dict) -> None:
    """The dtype rule above for one call: `frozen` tensors must have x's dtype, `adapters` may also be
    float32 beside a half-precision x. Skipped under torch.autocast, which casts every input itself."""
    if autocast_active(x.device):
        return
    same_dtype(x_name, x, **frozen)
    for name, value in adapters.items():
        if value is not None:
            adapter_dtype(name, value, x_name, x)


def is_bool(value) -> bool:
    """Python's bool or numpy's bool_: never taken as a number here (bool is an int subclass, np.bool_ has no
    numbers.Real registration but converts with float())."""
    if isinstance(value, bool):
        return True
    np = sys.modules.get("numpy")  # a numpy scalar exists only once numpy is imported
    return np is not None and isinstance(value, np.bool_)


def is_real(value) -> bool:
    """A real number as Python's numeric tower says: int, float, fractions.Fraction and numpy's integer and
    floating scalars (np.float32(2), np.int64(3)); not a bool, not a tensor, not a string."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def as_int(value):
    """value as a Python int when it is an integer (int, numpy integer scalars: anything with __index__ but a
    bool or a tensor), else None. 3.0 and np.float32(3) are not integers here: they are never truncated."""
    if is_bool(value) or isinstance(value, torch.Tensor):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def real_number(name: str, value, *, low=None, high=None, high_inclusive=True) -> float:
    """A finite real number (int, float or a numpy scalar; see is_real), returned as a Python float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number (an int, a float or a numpy scalar), got "
                        f"{type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value > high if high_inclusive else value >= high):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def integer(name: str, value, *, low: int) -> int:
    """An integer >= low (int or a numpy integer scalar; see as_int), returned as a Python int."""
    result = as_int(value)
    if result is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if result < low:
        raise ValueError(f"{name} must be >= {low}, got {result}")
    return result


def autocast_active(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) if device.type in ("cpu", "cuda") else False


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when elements of t share memory (an expanded view): in-place writes there are ill-defined."""
    return any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))


def lora_tensors(x, weight_shape, weight_desc: str, lora_a, lora_b, bias) -> None:
    """lora_linear's tensor checks that do not depend on how the base weight is stored: x, lora_a, lora_b and
    bias are floating tensors whose shapes chain with the [out, in] `weight_shape` (`weight_desc` says what
    the weight is, for the message)."""
    tensor("x", x, min_ndim=1)
    tensor("lora_a", lora_a, ndim=2)
    tensor("lora_b", lora_b, ndim=2)
    if bias is not None:
        tensor("bias", bias, ndim=1)
    out_features, in_features = weight_shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must equal weight's in_features {in_features} ({weight_desc}), got x of "
                         f"shape {tuple(x.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a must have rank r >= 1 rows, got shape {tuple(lora_a.shape)}")
    shape("lora_a", lora_a, (r, in_features), "[r, in_features]")
    shape("lora_b", lora_b, (out_features, r), "[out_features, r]")
    if bias is not None:
        shape("bias", bias, (out_features,), "[out_features]")


# ---- scaling, dropout and seed: the arguments every LoRA-like family takes ------------------------------

def scalars(scaling, dropout_p, training, seed) -> tuple[float, float, int | None]:
    """(scaling, dropout_p, seed) as Python numbers: numpy scalars are taken as the numbers they are."""
    scaling = real_number("scaling", scaling)
    dropout_p = real_number("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None:
        seed_int = as_int(seed)
        if seed_int is None:
            raise TypeError(f"seed must be an int (or a numpy integer) or None, got {type(seed).__name__}")
        if not 0 <= seed_int < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed_int}")
        seed = seed_int
    return scaling, dropout_p, seed


def dropout_and_seed(dropout_p: float, training: bool, seed: int | None) -> tuple[float, torch.Tensor | None]:
    """(the dropout p in effect, the seed the ops take): p is 0 unless training; the seed is None without dropout,
    else a CPU int64 tensor, drawn from torch's default generator when `seed` is None (so torch.manual_seed makes
    runs reproducible; a tensor, so that a fresh seed per step does not recompile a compiled graph)."""
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        return p, None
    if seed is None:
        return p, torch.randint(0, SEED_LIMIT // 2, (), dtype=torch.int64)
    return p, torch.tensor(seed, dtype=torch.int64)


# ---- user-supplied indices: checked where they are used, every time ---------------------------------------

def out_of_range_error(indices: torch.Tensor, pos: int, numel: int) -> IndexError:
    return IndexError(f"indices[{pos}] = {int(indices[pos])} is out of range for a weight of {numel} elements "
                      f"(valid: 0 <= index < {numel})")


def duplicate_error(indices: torch.Tensor, pos: int) -> ValueError:
    return ValueError(f"indices[{pos}] = {int(indices[pos])} repeats an earlier index; a sparse diff holds each "
                      f"position once (sum the values of duplicates first)")


def index_range(indices: torch.Tensor, numel: int) -> None:
    """IndexError naming the first index outside [0, numel). Run where the indices are used, every time:
    torch's own indexing would wrap a negative index instead of refusing it. One pass (aminmax) when all
    are in range: on a busy CPU every extra pass over a large index tensor costs a scheduler time slice."""
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    if int(lo) >= 0 and int(hi) < numel:
        return
    bad = (indices < 0) | (indices >= numel)
    raise out_of_range_error(indices, int(bad.nonzero()[0, 0]), numel)


def unique_indices(indices: torch.Tensor, numel: int) -> None:
    """IndexError for an index outside [0, numel), ValueError for a repeated index; both name the position."""
    index_range(indices, numel)
    if indices.numel() == 0:
        return
    sorted_idx, order = torch.sort(indices.to(torch.int64), stable=True)
    repeat = sorted_idx[1:] == sorted_idx[:-1]
    if bool(repeat.any()):
        raise duplicate_error(indices, int(order[1:][repeat].min()))
