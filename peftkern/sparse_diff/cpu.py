"""Sparse diff vectors, the fast CPU path ("cpu" backend): apply/restore (the compiled C++ loops when built,
torch otherwise) and the linear layer.

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

from ..core import backend as _backend, checks, dispatch
from ..core.rules import acc_dtype
from . import cuda


def flat_and_offsets(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D alias of the weight's memory and the storage offsets of `indices` (range-checked) in it."""
    checks.index_range(indices, weight.numel())
    if weight.is_contiguous():
        return weight.view(-1), indices
    # strided weight: logical row-major index -> storage offset through the strides
    coords = torch.unravel_index(indices.to(torch.int64), weight.shape)
    offsets = sum(c * s for c, s in zip(coords, weight.stride()))
    span = 1 + sum((n - 1) * s for n, s in zip(weight.shape, weight.stride()))
    return weight.as_strided((span,), (1,)), offsets


def torch_apply_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float) -> torch.Tensor:
    """weight[indices] = round(acc(weight[indices]) + alpha·acc(values)) (row-major positions, any strides);
    returns the previous values. IndexError, with nothing written, for an index out of range."""
    flat, offsets = flat_and_offsets(weight, indices)
    backup = flat[offsets]
    acc = acc_dtype(flat.dtype)
    flat[offsets] = (backup.to(acc) + alpha * values.to(acc)).to(flat.dtype)
    return backup


def torch_restore_(weight: torch.Tensor, indices: torch.Tensor, backup: torch.Tensor) -> None:
    flat, offsets = flat_and_offsets(weight, indices)
    flat[offsets] = backup


# ---- the linear layer ------------------------------------------------------------------------------

def _sorting_permutation(keys: torch.Tensor, indices: torch.Tensor, hint_name: str,
                         often_sorted: bool) -> torch.Tensor | None:
    """argsort(keys) for keys derived from `indices` (unique when the indices are); None when
    `often_sorted` and the keys are already strictly increasing (CSR order: diffs are mostly stored sorted,
    so the permutation and its gathers are skipped).

    Sorting is most of this path's cost beside the GEMMs (and on a busy CPU torch's sort slows down far
    more than the GEMMs do), while a diff's positions rarely change between steps. So the permutation
    found last time is kept on the indices tensor as a hint, and reused only after checking, on every
    call, that it still sorts the current keys strictly (one gather and one compare): a hint made stale by
    indices changed behind PyTorch's back fails the check and is recomputed, never trusted."""
    if keys.numel() < 2 or (often_sorted and bool((keys[1:] > keys[:-1]).all())):
        return None
    hint = getattr(indices, hint_name, None)
    if hint is not None and hint.numel() == keys.numel() and hint.device == keys.device:
        ordered = keys[hint]
        if bool((ordered[1:] > ordered[:-1]).all()):
            return hint
    order = torch.argsort(keys)
    setattr(indices, hint_name, order)
    return order


def _compressed(major, minor, order, n_major: int, n_minor: int, values, dtype) -> torch.Tensor:
    """A sparse CSR [n_major, n_minor] tensor from (major, minor) coordinates sorted by `order`
    (None: already sorted). crow comes from a binary search over the sorted majors (n_major + 1 queries)
    rather than a bincount + cumsum over all nonzeros."""
    if order is not None:
        major, minor, values = major[order], minor[order], values[order]
    bounds = torch.arange(n_major + 1, dtype=major.dtype, device=major.device)
    crow = torch.searchsorted(major, bounds)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and fine for these ops
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, minor, values.to(dtype), (n_major, n_minor))


class Layout:
    """A diff's coordinates for one call: built from the indices as they are now, range-checked first
    (the indices may have changed since they were validated). csr() is Δ [out, in] and the permutation
    from the diff's order to CSR order (None: the same); csr_transposed() is Δᵀ [in, out] (Δ's CSC
    layout), built directly from the coordinates rather than by converting Δ. Backward builds both from
    one Layout, so the indices are checked and split into rows and columns once per call."""

    def __init__(self, indices: torch.Tensor, shape):
        self.n_out, self.n_in = shape
        checks.index_range(indices, self.n_out * self.n_in)
        self.indices = indices
        self.flat = indices.to(torch.int64)
        self.rows = torch.div(self.flat, self.n_in, rounding_mode="floor")
        self.cols = torch.remainder(self.flat, self.n_in)

    def csr(self, values: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        order = _sorting_permutation(self.flat, self.indices, "_peftkern_csr_hint", often_sorted=True)
        return _compressed(self.rows, self.cols, order, self.n_out, self.n_in, values, dtype), order

    def csr_transposed(self, values: torch.Tensor, dtype) -> torch.Tensor:
        keys = torch.add(self.rows, self.cols, alpha=self.n_out)  # column-major position
        order = _sorting_permutation(keys, self.indices, "_peftkern_csc_hint", often_sorted=False)
        return _compressed(self.cols, self.rows, order, self.n_in, self.n_out, values, dtype)


def linear_forward(a):
    return linear_fwd(a.x, a.weight, a.indices, a.values, a.bias)


def linear_backward(a):
    return linear_bwd(a.dy, a.x, a.weight, a.indices, a.values, a.need_x, a.need_weight, a.need_values,
                      a.need_bias)


def apply_(a):
    """The compiled C++ loop when peftkern._C is built (one pass, every index checked before any write), else
    torch's indexing."""
    if _backend.extension() is not None:
        return cuda.apply_(a)
    return torch_apply_(a.weight, a.indices, a.values, a.alpha)


def restore_(a):
    if _backend.extension() is not None:
        return cuda.restore_(a)
    return torch_restore_(a.weight, a.indices, a.backup)


def linear_fwd(x, weight, indices, values, bias):
    """y = x·Wᵀ + bias + x·Δᵀ for x [M, in]."""
    y = torch.nn.functional.linear(x, weight, bias)
    if indices.numel():
        acc = acc_dtype(x.dtype)
        delta, _ = Layout(indices, weight.shape).csr(values, acc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y += torch.sparse.mm(delta, x.t().to(acc)).t().to(y.dtype)
    return y


def linear_bwd(dy, x, weight, indices, values, need_x, need_weight, need_values, need_bias):
    """(dx, dweight, dvalues, dbias); entries not needed are empty tensors."""
    acc = acc_dtype(x.dtype)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, dv, db = (x.new_empty(0) for _ in range(4))
    layout = Layout(indices, weight.shape) if indices.numel() and (need_x or need_values) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if need_x:
            dx = torch.mm(dy, weight)
            if layout is not None:
                delta_t = layout.csr_transposed(values, acc)
                dx += torch.sparse.mm(delta_t, dy.t().to(acc)).t().to(dx.dtype)
        if need_values:
            if layout is not None:
                # g[i] = Σ_t dy[t, row_i]·x[t, col_i], only at the diff's positions, then mapped back from
                # CSR order to the diff's order. The pattern is Δ's structure with zero values:
                # sampled_addmm with beta=0 still propagates a NaN or inf held in its input.
                pattern, order = layout.csr(torch.zeros(values.shape, dtype=acc, device=values.device), acc)
                sampled = torch.sparse.sampled_addmm(pattern, dy.t().to(acc), x.to(acc), beta=0.0, alpha=1.0)
                if order is None:
                    dv = sampled.values().to(values.dtype)
                else:
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


dispatch.register("sparse_diff_apply", "cpu", forward=apply_, backward=restore_)
dispatch.register("sparse_diff_linear", "cpu", forward=linear_forward, backward=linear_backward)
