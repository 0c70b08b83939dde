"""Sparse diff vectors in plain torch: index validation, apply/restore, and the linear layer.

A diff is (indices, values): flat row-major positions in weight.view(-1) and the values added there.
apply computes w = round(acc(w) + alpha * acc(v)) with acc = fp32 (fp64 for fp64 weights), the same
arithmetic as the C++/CUDA kernels, and returns the previous values so restore is bit-exact.
sparse_diff_linear never forms W + Δ or a dense [out, in] gradient: x·Δᵀ and dy·Δ are sparse
products (torch.sparse CSR), and the gradient of the values is the sampled product
g[i] = Σ_t dy[t, row_i]·x[t, col_i] (torch.sparse.sampled_addmm).
"""
from __future__ import annotations

import warnings

import torch

from .lora import acc_dtype


def out_of_range_error(indices: torch.Tensor, pos: int, numel: int) -> IndexError:
    return IndexError(f"indices[{pos}] = {int(indices[pos])} is out of range for a weight of {numel} elements "
                      f"(valid: 0 <= index < {numel})")


def duplicate_error(indices: torch.Tensor, pos: int) -> ValueError:
    return ValueError(f"indices[{pos}] = {int(indices[pos])} repeats an earlier index; a sparse diff holds each "
                      f"position once (sum the values of duplicates first)")


def check_range(indices: torch.Tensor, numel: int) -> None:
    """IndexError naming the first index outside [0, numel). Run where the indices are used, every time:
    torch's own indexing would wrap a negative index instead of refusing it."""
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= numel)
    if bool(bad.any()):
        raise out_of_range_error(indices, int(bad.nonzero()[0, 0]), numel)


def validate(indices: torch.Tensor, numel: int) -> None:
    """IndexError for an index outside [0, numel), ValueError for a repeated index; both name the position."""
    check_range(indices, numel)
    if indices.numel() == 0:
        return
    sorted_idx, order = torch.sort(indices.to(torch.int64), stable=True)
    repeat = sorted_idx[1:] == sorted_idx[:-1]
    if bool(repeat.any()):
        raise duplicate_error(indices, int(order[1:][repeat].min()))


def flat_and_offsets(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D alias of the weight's memory and the storage offsets of `indices` (range-checked) in it."""
    check_range(indices, weight.numel())
    if weight.is_contiguous():
        return weight.view(-1), indices
    # strided weight: logical row-major index -> storage offset through the strides
    coords = torch.unravel_index(indices.to(torch.int64), weight.shape)
    offsets = sum(c * s for c, s in zip(coords, weight.stride()))
    span = 1 + sum((n - 1) * s for n, s in zip(weight.shape, weight.stride()))
    return weight.as_strided((span,), (1,)), offsets


def apply_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> torch.Tensor:
    """weight[indices] = round(acc(weight[indices]) + alpha·acc(values)) (row-major positions, any strides);
    returns the previous values. IndexError, with nothing written, for an index out of range."""
    flat, offsets = flat_and_offsets(weight, indices)
    backup = flat[offsets]
    acc = acc_dtype(flat.dtype)
    flat[offsets] = (backup.to(acc) + alpha * values.to(acc)).to(flat.dtype)
    return backup


def restore_(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    flat, offsets = flat_and_offsets(weight, indices)
    flat[offsets] = backup


# ---- the linear layer ------------------------------------------------------------------------------

def _sorting_permutation(keys: torch.Tensor, indices: torch.Tensor, hint_name: str) -> torch.Tensor:
    """argsort(keys) for keys derived from `indices` (unique when the indices are).

    Sorting is most of this path's cost beside the GEMMs (and on a busy CPU torch's sort slows down far
    more than the GEMMs do), while a diff's positions rarely change between steps. So the permutation
    found last time is kept on the indices tensor as a hint, and reused only after checking, on every
    call, that it still sorts the current keys strictly (one gather and one compare): a hint made stale by
    indices changed behind PyTorch's back fails the check and is recomputed, never trusted."""
    hint = getattr(indices, hint_name, None)
    if hint is not None and hint.numel() == keys.numel() and hint.device == keys.device:
        ordered = keys[hint]
        if ordered.numel() < 2 or bool((ordered[1:] > ordered[:-1]).all()):
            return hint
    order = torch.argsort(keys)
    setattr(indices, hint_name, order)
    return order


def _compressed(major, minor, order, n_major: int, n_minor: int, values, dtype) -> torch.Tensor:
    """A sparse CSR [n_major, n_minor] tensor from (major, minor) coordinates sorted by `order`."""
    crow = torch.zeros(n_major + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.cumsum(torch.bincount(major, minlength=n_major), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and fine for these ops
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, minor[order], values[order].to(dtype), (n_major, n_minor))


def csr(indices: torch.Tensor, values: torch.Tensor, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ as a sparse CSR [out, in] tensor in `dtype`, the permutation from the diff's order to CSR order)."""
    n_out, n_in = shape
    check_range(indices, n_out * n_in)  # every call: the indices may have changed since they were validated
    idx = indices.to(torch.int64)
    order = _sorting_permutation(idx, indices, "_peftkern_csr_hint")
    return _compressed(idx // n_in, idx % n_in, order, n_out, n_in, values, dtype), order


def csr_transposed(indices: torch.Tensor, values: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Δᵀ as a sparse CSR [in, out] tensor (Δ's CSC layout), built directly rather than by converting Δ."""
    n_out, n_in = shape
    check_range(indices, n_out * n_in)
    idx = indices.to(torch.int64)
    rows, cols = idx // n_in, idx % n_in
    order = _sorting_permutation(cols * n_out + rows, indices, "_peftkern_csc_hint")
    return _compressed(cols, rows, order, n_in, n_out, values, dtype)


def linear_fwd(x, weight, indices, values, bias):
    """y = x·Wᵀ + bias + x·Δᵀ for x [M, in]."""
    y = torch.nn.functional.linear(x, weight, bias)
    if indices.numel():
        acc = acc_dtype(x.dtype)
        delta, _ = csr(indices, values, weight.shape, acc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y += torch.sparse.mm(delta, x.t().to(acc)).t().to(y.dtype)
    return y


def linear_bwd(dy, x, weight, indices, values, need_x, need_weight, need_values, need_bias):
    """(dx, dweight, dvalues, dbias); entries not needed are empty tensors."""
    acc = acc_dtype(x.dtype)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, dv, db = (x.new_empty(0) for _ in range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta, order = csr(indices, values, weight.shape, acc) if indices.numel() else (None, None)
        if need_x:
            dx = torch.mm(dy, weight)
            if delta is not None:
                delta_t = csr_transposed(indices, values, weight.shape, acc)
                dx += torch.sparse.mm(delta_t, dy.t().to(acc)).t().to(dx.dtype)
        if need_values:
            if delta is not None:
                # g[i] = Σ_t dy[t, row_i]·x[t, col_i], only at the diff's positions, then mapped back from
                # CSR order to the diff's order. The pattern reuses Δ's structure with finite values:
                # sampled_addmm with beta=0 still propagates a NaN or inf held in its input.
                pattern = torch.sparse_csr_tensor(delta.crow_indices(), delta.col_indices(),
                                                  torch.zeros_like(delta.values()), delta.shape)
                sampled = torch.sparse.sampled_addmm(pattern, dy.t().to(acc), x.to(acc), beta=0.0, alpha=1.0)
                dv = torch.empty(values.shape, dtype=acc, device=values.device)
                dv[order] = sampled.values()
                dv = dv.to(values.dtype)
            else:
                dv = values.new_empty(values.shape)
        if need_weight:
            dw = torch.mm(dy.t(), x)
        if need_bias:
            db = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dw, dv, db
