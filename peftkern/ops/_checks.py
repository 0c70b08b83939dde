"""Argument checks shared by every op family. They run before any kernel, and raise:
ValueError for shapes and values, TypeError for dtypes, RuntimeError for device mismatch,
always naming the argument and the expected versus the received value."""
from __future__ import annotations

import torch

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


def same_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}; "
                            f"outside torch.autocast they must match")


def adapter_dtype(name: str, value: torch.Tensor, x_name: str, x: torch.Tensor) -> None:
    """Trainable adapter parameters may be float32 next to a float16/bfloat16 input (PEFT's default)."""
    if value.dtype != x.dtype and value.dtype != torch.float32:
        raise TypeError(f"{name} must have {x_name}'s dtype ({x.dtype}) or float32, got {value.dtype}")


def real_number(name: str, value, *, low=None, high=None, high_inclusive=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value > high if high_inclusive else value >= high):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def autocast_active(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) if device.type in ("cpu", "cuda") else False


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when elements of t share memory (an expanded view): in-place writes there are ill-defined."""
    return any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride()))
