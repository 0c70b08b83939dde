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
from ..core.opdef import Op, grad_slot, wire_autograd

INT32_LIMIT = 2**31 - 1
MAX_STRIDED_DIMS = 8  # csrc/strided_index.h: a non-contiguous weight's dims the compiled kernels map


# ---- the duplicate check, remembered per indices tensor ------------------------------------------

def ensure_unique(indices: Tensor, numel: int) -> None:
    """ValueError if an index repeats (IndexError if one is out of range: checked here the first time,
    and again by every kernel on every call). Remembered until `indices` is modified in place."""
    if getattr(indices, "_peftkern_unique_for", None) == (indices._version, numel):
        return
    ext = _backend.extension()
    if ext is not None and indices.device.type == "cpu":
        code, pos = ext.sparse_diff_validate(indices.contiguous(), numel)
        if code == 1:
            raise _checks.out_of_range_error(indices, pos, numel)
        if code == 2:
            raise _checks.duplicate_error(indices, pos)
    else:
        _checks.unique_indices(indices, numel)
    indices._peftkern_unique_for = (indices._version, numel)


def _unique(a):
    ensure_unique(a.indices, a.weight.numel())
    return a._replace(dy=a.dy.contiguous()) if "dy" in a._fields else a


# ---- apply / restore: "forward" applies (returns the backup), "backward" restores ---------------------
apply_op = Op("sparse_diff_apply_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha) -> Tensor backup",
              family="sparse_diff_apply", prepare=_unique, device_arg="weight", mutates=("weight",),
              fake=lambda a: a.weight.new_empty(a.indices.shape))
restore_op = Op("sparse_diff_restore_(Tensor(a!) weight, Tensor indices, Tensor backup) -> ()",
                family="sparse_diff_apply", phase="backward", prepare=_unique, device_arg="weight",
                mutates=("weight",), fake=lambda a: None)


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
    in place (docs/sparse_diff.md, memory safety).
    """
    _check_diff("weight", weight, indices, "values", values, values_dtype_rule="diff")
    alpha = _checks.real_number("alpha", alpha)
    _check_writable(weight)
    with torch.no_grad():
        return apply_op(weight=weight, indices=indices, values=values, alpha=alpha)


def sparse_diff_restore_(weight: Tensor, indices: Tensor, backup: Tensor) -> None:
    """Write `backup` (as returned by sparse_diff_apply_) back into `weight` at `indices`, in place.

    Same arguments and errors as sparse_diff_apply_, with `backup` (1-D, weight's dtype, one entry per
    index) in place of values; every index is bounds-checked before anything is written.
    """
    _check_diff("weight", weight, indices, "backup", backup, values_dtype_rule="same")
    _check_writable(weight)
    with torch.no_grad():
        restore_op(weight=weight, indices=indices, backup=backup)


# ---- sparse_diff_linear -----------------------------------------------------------------------------

def _key(a) -> tuple:
    """What decides whether the fused or the composite variant is faster (core/dispatch.py)."""
    flags = tuple(getattr(a, n) for n in a._fields if n.startswith("need_"))
    return (dispatch.token_bucket(a.x.shape[0]), *a.weight.shape, dispatch.token_bucket(a.indices.numel()),
            a.x.dtype, a.values.dtype, getattr(a, "bias", None) is not None, dispatch.layout(a.x, a.weight), *flags)


_DIFF = "Tensor x, Tensor weight, Tensor indices, Tensor values"
linear_forward_op = Op(f"sparse_diff_linear_fwd({_DIFF}, Tensor? bias) -> Tensor y", family="sparse_diff_linear",
                       key=_key, prepare=_unique, autocast_keep=(),
                       fake=lambda a: a.x.new_empty((a.x.shape[0], a.weight.shape[0])))
linear_backward_op = Op(f"sparse_diff_linear_bwd(Tensor dy, {_DIFF}, bool need_x, bool need_weight, "
                        "bool need_values, bool need_bias, str backend) "
                        "-> (Tensor dx, Tensor dweight, Tensor dvalues, Tensor dbias)",
                        family="sparse_diff_linear", phase="backward", key=_key, prepare=_unique,
                        fake=lambda a: (grad_slot(a.need_x, a.x, a.x.shape, a.x),
                                        grad_slot(a.need_weight, a.x, a.weight.shape, a.x),
                                        grad_slot(a.need_values, a.values, a.values.shape, a.x),
                                        grad_slot(a.need_bias, a.x, (a.weight.shape[0],), a.x)))
wire_autograd(linear_forward_op, linear_backward_op)


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
    y = linear_forward_op(x=x.reshape(-1, x.shape[-1]), weight=weight, indices=indices, values=values, bias=bias)
    return y.view(*lead, weight.shape[0])
