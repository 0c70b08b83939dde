"""Sparse diff vectors: sparse_diff_apply_ / sparse_diff_restore_ (in place, bit-exact round trip) and
sparse_diff_linear (x·(W + Δ)ᵀ with a sampled gradient for Δ's values), as peftkern:: custom ops.

Memory safety: every kernel that reads or writes through the user's indices checks each index against
the weight's size itself, on every call (the C++/CUDA apply and restore before any write, the reference
path and the layout of sparse_diff_linear before indexing), and raises IndexError with nothing written.
No cached result stands between an index and a memory access: indices can change without PyTorch
noticing (writes through .numpy() or .data do not bump Tensor._version).
The one thing remembered per indices tensor (until it is modified in place) is that it holds no
duplicates: a stale answer there can only give a wrong sum, never an out-of-bounds access, and checking
it costs a sort (on GPU, a host sync) that re-applying the same diff should not pay again.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch
from ..reference import sparse_diff as ref
from . import _autograd
from ._autocast import register_autocast

INT32_LIMIT = 2**31 - 1
MAX_STRIDED_DIMS = 8  # csrc/strided_index.h: a non-contiguous weight's dims the compiled kernels map


# ---- the duplicate check, remembered per indices tensor ------------------------------------------

def _ensure_unique(indices: Tensor, numel: int) -> None:
    """ValueError if an index repeats (IndexError if one is out of range: checked here the first time,
    and again by every kernel on every call). Remembered until `indices` is modified in place."""
    if getattr(indices, "_peftkern_unique_for", None) == (indices._version, numel):
        return
    ext = _backend.extension()
    if ext is not None and indices.device.type == "cpu":
        code, pos = ext.sparse_diff_validate(indices.contiguous(), numel)
        if code == 1:
            raise ref.out_of_range_error(indices, pos, numel)
        if code == 2:
            raise ref.duplicate_error(indices, pos)
    else:
        ref.validate(indices, numel)
    indices._peftkern_unique_for = (indices._version, numel)


# ---- apply / restore ------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::sparse_diff_apply_", mutates_args=("weight",))
def _apply_op(weight: Tensor, indices: Tensor, values: Tensor, alpha: float) -> Tensor:
    _ensure_unique(indices, weight.numel())
    backend = _backend.select("sparse_diff_apply", weight.device, weight.dtype)
    return dispatch.call("sparse_diff_apply", "forward", backend, tuple, weight, indices, values, alpha)


@_apply_op.register_fake
def _(weight, indices, values, alpha):
    return weight.new_empty(indices.shape)


@torch.library.custom_op("peftkern::sparse_diff_restore_", mutates_args=("weight",))
def _restore_op(weight: Tensor, indices: Tensor, backup: Tensor) -> None:
    _ensure_unique(indices, weight.numel())
    backend = _backend.select("sparse_diff_apply", weight.device, weight.dtype)
    dispatch.call("sparse_diff_apply", "backward", backend, tuple, weight, indices, backup)


@_restore_op.register_fake
def _(weight, indices, backup):
    return None


def write_problem(weight: Tensor) -> Optional[str]:
    """Why a diff cannot be applied to `weight` in place, or None."""
    if _checks.has_internal_overlap(weight):
        return "weight has overlapping memory (an expanded view); apply the diff to a real tensor"
    if not weight.is_contiguous() and weight.dim() > MAX_STRIDED_DIMS:
        return (f"weight is a non-contiguous view with {weight.dim()} dims; the kernels map at most "
                f"{MAX_STRIDED_DIMS} (apply the diff to a contiguous tensor)")
    return None


def _check_writable(weight: Tensor) -> None:
    problem = write_problem(weight)
    if problem is not None:
        raise ValueError(problem)


def _check_diff(weight_name: str, weight, indices, values_name: str, values, *, values_dtype_rule: str) -> None:
    _checks.tensor(weight_name, weight)
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (flat row-major positions), got shape {tuple(indices.shape)}")
    if indices.dtype == torch.int32 and weight.numel() > INT32_LIMIT:
        raise TypeError(f"indices must be int64 for a weight of {weight.numel()} elements (more than 2**31 - 1), "
                        f"got int32")
    _checks.tensor(values_name, values, ndim=1)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"{values_name} must have one entry per index: expected shape ({indices.shape[0]},), "
                         f"got {tuple(values.shape)}")
    _checks.same_device(weight_name, weight, indices=indices, **{values_name: values})
    if values_dtype_rule == "same":
        _checks.same_dtype(weight_name, weight, **{values_name: values})
    elif values_dtype_rule == "diff":
        # an in-place edit of a weight, not a product: a diff kept in float32 applies to a weight of any
        # dtype (each entry is computed in float32, or float64 for a float64 weight, and rounded once)
        if values.dtype not in (weight.dtype, torch.float32):
            raise TypeError(f"{values_name} must have {weight_name}'s dtype ({weight.dtype}) or float32, "
                            f"got {values.dtype}")
    else:
        _checks.adapter_dtype(values_name, values, weight_name, weight)


def sparse_diff_apply_(weight: Tensor, indices: Tensor, values: Tensor, *, alpha: float = 1.0) -> Tensor:
    """Add `alpha`·values into `weight` at flat positions `indices`, in place; return the previous values.

    Args:
        weight: the tensor to change (any shape and strides, float16/bfloat16/float32/float64, CPU or CUDA;
            not an expanded view). `indices` address its elements in row-major order, as in
            `weight.reshape(-1)`, also when it is a non-contiguous view (at most 8 dims then).
        indices: 1-D int32 or int64 tensor on weight's device, each in [0, weight.numel()) and each at
            most once, in any order (int64 required above 2**31 - 1 elements).
        values: 1-D tensor, one entry per index, in weight's dtype or float32.
        alpha: a finite real number scaling the values.

    Each entry becomes round(acc(w) + alpha·acc(v)) with acc = float32 (float64 for a float64 weight),
    so `sparse_diff_restore_(weight, indices, backup)` gives back the original bit for bit.
    Returns the backup: 1-D, weight's dtype, one entry per index.

    Raises (the weight is then unchanged): IndexError for an index out of range or negative, ValueError
    for a repeated index, a length mismatch, a non-finite alpha or an expanded weight, TypeError for
    wrong dtypes, RuntimeError for tensors on different devices. Every index is bounds-checked by the
    kernel itself on every call; the duplicate check is remembered on `indices` until it is modified
    in place (see the README's memory-safety note).
    """
    _check_diff("weight", weight, indices, "values", values, values_dtype_rule="diff")
    alpha = _checks.real_number("alpha", alpha)
    _check_writable(weight)
    with torch.no_grad():
        return torch.ops.peftkern.sparse_diff_apply_(weight, indices, values, alpha)


def sparse_diff_restore_(weight: Tensor, indices: Tensor, backup: Tensor) -> None:
    """Write `backup` (as returned by sparse_diff_apply_) back into `weight` at `indices`, in place.

    Same arguments and errors as sparse_diff_apply_, with `backup` (1-D, weight's dtype, one entry per
    index) in place of values; every index is bounds-checked before anything is written.
    """
    _check_diff("weight", weight, indices, "backup", backup, values_dtype_rule="same")
    _check_writable(weight)
    with torch.no_grad():
        torch.ops.peftkern.sparse_diff_restore_(weight, indices, backup)


# ---- sparse_diff_linear -----------------------------------------------------------------------------

def _key(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor, bias: Optional[Tensor], *flags) -> tuple:
    """What decides whether the fused or the composite variant is faster (peftkern.core.dispatch)."""
    return (dispatch.token_bucket(x.shape[0]), *weight.shape, dispatch.token_bucket(indices.numel()), x.dtype,
            values.dtype, bias is not None, dispatch.layout(x, weight), *flags)


@torch.library.custom_op("peftkern::sparse_diff_linear_fwd", mutates_args=())
def sparse_diff_linear_fwd(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                           bias: Optional[Tensor]) -> Tensor:
    _ensure_unique(indices, weight.numel())
    backend = _backend.select("sparse_diff_linear", x.device, x.dtype)
    return dispatch.call("sparse_diff_linear", "forward", backend, lambda: _key(x, weight, indices, values, bias),
                         x, weight, indices, values, bias)


@sparse_diff_linear_fwd.register_fake
def _(x, weight, indices, values, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("peftkern::sparse_diff_linear_bwd", mutates_args=())
def sparse_diff_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, indices: Tensor, values: Tensor, need_x: bool,
                           need_weight: bool, need_values: bool, need_bias: bool, backend: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy = dy.contiguous()
    _ensure_unique(indices, weight.numel())
    needs = (need_x, need_weight, need_values, need_bias)
    return dispatch.call("sparse_diff_linear", "backward", backend,
                         lambda: _key(x, weight, indices, values, None, *needs),
                         dy, x, weight, indices, values, *needs)


@sparse_diff_linear_bwd.register_fake
def _(dy, x, weight, indices, values, need_x, need_weight, need_values, need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_weight else (0,)),
            values.new_empty(values.shape if need_values else (0,)),
            x.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, indices, values, bias = inputs
    ctx.save_for_backward(x, weight, indices, values)
    ctx.backend = _backend.select("sparse_diff_linear", x.device, x.dtype)


def _backward(ctx, dy):
    x, weight, indices, values = ctx.saved_tensors
    need_x, need_weight, _, need_values, need_bias = ctx.needs_input_grad
    dx, dw, dv, db = torch.ops.peftkern.sparse_diff_linear_bwd(dy, x, weight, indices, values, need_x, need_weight,
                                                                need_values, need_bias, ctx.backend)
    return _autograd.grads_or_none(ctx, (dx, dw, None, dv, db))


sparse_diff_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("sparse_diff_linear_fwd", torch.ops.peftkern.sparse_diff_linear_fwd.default)


def sparse_diff_linear(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor, bias: Optional[Tensor] = None
                       ) -> Tensor:
    """y = F.linear(x, weight + Δ, bias) where Δ holds `values` at flat positions `indices`, never dense.

    Args:
        x: [..., in_features], float16/bfloat16/float32/float64.
        weight: the frozen [out_features, in_features] base weight, x's dtype.
        indices: 1-D int32/int64 row-major positions in weight (index i is row i // in_features, column
            i % in_features), each in [0, out_features·in_features) and each at most once.
        values: 1-D, one entry per index; x's dtype, or float32 beside a float16/bfloat16 x.
        bias: optional [out_features], x's dtype.

    Returns [..., out_features] in x's dtype. Gradients reach x, values and bias (and weight, densely,
    only if it requires grad); the gradient of `values` is the sampled product
    g[i] = Σ_t dy[t, row_i]·x[t, col_i], computed only at the diff's positions, so neither W + Δ nor a
    dense [out, in] gradient is ever allocated. Under torch.autocast the inputs are cast like F.linear's.

    Raises ValueError for shapes (naming the argument) or repeated indices, IndexError for an index out
    of range (checked on every call, forward and backward), TypeError for dtypes, RuntimeError for
    devices or an unavailable backend.
    """
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must equal weight's in_features {weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)} = [out, in]), got x of shape {tuple(x.shape)}")
    _check_diff("weight", weight, indices, "values", values, values_dtype_rule="adapter")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (weight.shape[0],), "[out_features]")
    _checks.same_device("x", x, weight=weight, bias=bias)
    if not _checks.autocast_active(x.device):
        _checks.same_dtype("x", x, weight=weight, bias=bias)
    lead = x.shape[:-1]
    y = torch.ops.peftkern.sparse_diff_linear_fwd(x.reshape(-1, x.shape[-1]), weight, indices, values, bias)
    return y.view(*lead, weight.shape[0])
