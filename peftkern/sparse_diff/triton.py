"""sparse_diff_linear on the Triton backend, two variants:

  fused      y = x·Wᵀ + bias by the library GEMM, then y += x·Δᵀ by kernels/sparse_diff.py's sparse
             product; backward dx = dy·W + dy·Δ likewise, and the values' gradient as a sampled product
             (sddmm) at the diff's positions only. W + Δ is never formed.
  composite  Δ applied to the weight in place, one library GEMM with W + Δ, and the weight restored bit
             for bit (sparse_diff_apply_ / restore_); backward the same around dy·(W + Δ), and the same
             sampled product for the values. It wins when the diff is dense enough that the sparse
             product costs more than a pass over the weight (kernels.sparse_diff explains the estimate);
             core/dispatch.py measures which is faster.

The composite variant writes into the frozen weight for the duration of the GEMM, on the current
stream, and preserves its version counter (the round trip is bit-exact, so autograd's saved-tensor
checks have nothing to object to). It cannot run on a weight with overlapping memory, and nothing
else may read that weight concurrently from another stream while it runs.
"""
import contextlib
from typing import Optional

import torch

from ..core import backend as _backend, checks, dispatch
from .op import INT32_LIMIT, apply_op, restore_op, write_problem


def layout(indices: torch.Tensor, shape: tuple[int, int]) -> dict:
    """CSR (by output row) and CSC (by input column) views of the diff's positions, int32 where they fit.

    Built on every call from the indices as they are now (range-checked first): a layout remembered
    across calls would silently keep using positions the user has since changed."""
    n_out, n_in = shape
    checks.index_range(indices, n_out * n_in)
    idx = indices.to(torch.int64)
    rows, cols = idx // n_in, idx % n_in
    small = torch.int32 if max(n_out, n_in, idx.numel()) <= INT32_LIMIT else torch.int64

    def segments(keys, length):
        seg = torch.zeros(length + 1, dtype=torch.int64, device=idx.device)
        seg[1:] = torch.cumsum(torch.bincount(keys, minlength=length), 0)
        return seg.to(small)

    csr = torch.argsort(idx)
    csc = torch.argsort(cols * n_out + rows)
    return {"rows": rows.to(small), "cols": cols.to(small),
            "csr_perm": csr, "csr_seg": segments(rows, n_out), "csr_cols": cols[csr].to(small),
            "csc_perm": csc, "csc_seg": segments(cols, n_in), "csc_rows": rows[csc].to(small)}


def _kernels():
    return _backend.kernels("sparse_diff")


def forward_fused(a):
    x, weight, indices, values, bias = a.x, a.weight, a.indices, a.values, a.bias
    lay = layout(indices, tuple(weight.shape))
    y = torch.nn.functional.linear(x, weight, bias)
    _kernels().spmm_add_(y, x, lay["csr_seg"], lay["csr_cols"], values[lay["csr_perm"]])
    return y


def _values_grad(dy, x, weight, indices, values, lay=None):
    """g[i] = Σ_t dy[t, row_i]·x[t, col_i], computed in CSR order (neighbouring nonzeros share dyᵀ rows in
    L1, about half the L2 traffic of the diff's own order) and mapped back to the diff's order."""
    lay = lay if lay is not None else layout(indices, tuple(weight.shape))
    perm = lay["csr_perm"]
    g_csr = _kernels().sddmm(dy, x, lay["rows"][perm], lay["csr_cols"])
    g = torch.empty_like(g_csr)
    g[perm] = g_csr
    return g.to(values.dtype)


def backward_fused(a):
    dy, x, weight, indices, values = a.dy, a.x, a.weight, a.indices, a.values
    need_x, need_weight, need_values, need_bias = a.need_x, a.need_weight, a.need_values, a.need_bias
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, dv, db = (x.new_empty(0) for _ in range(4))
    lay = layout(indices, tuple(weight.shape)) if (need_x or need_values) else None
    # dy laid out tokens-contiguous once: both sparse kernels read it that way (kernels/sparse_diff.py)
    dy_t = dy.t().contiguous().t() if (need_x or need_values) and dy.shape[0] > 1 else dy
    if need_x:
        dx = torch.mm(dy, weight)
        _kernels().spmm_add_(dx, dy_t, lay["csc_seg"], lay["csc_rows"], values[lay["csc_perm"]])
    if need_values:
        dv = _values_grad(dy_t, x, weight, indices, values, lay)
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        db = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
    return dx, dw, dv, db


class _Applied:
    """`with _Applied(weight, indices, values):` weight holds W + Δ inside the block, W again after it
    (bit for bit, also when the block raises); the version counter is left as it was."""

    def __init__(self, weight, indices, values):
        self.weight, self.indices, self.values = weight, indices, values
        self.apply_backend = _backend.auto_choice("sparse_diff_apply", weight.device, weight.dtype)

    def __enter__(self):
        # inference tensors have no version counter to preserve
        self._preserve = (contextlib.nullcontext() if self.weight.is_inference()
                          else torch.autograd._unsafe_preserve_version_counter(self.weight))
        self._preserve.__enter__()
        try:
            args = apply_op.Args(weight=self.weight, indices=self.indices, values=self.values, alpha=1.0)
            self.backup = dispatch.call("sparse_diff_apply", "forward", self.apply_backend, tuple, args)
        except BaseException:
            self._preserve.__exit__(None, None, None)
            raise
        return self.weight

    def __exit__(self, *exc):
        try:
            args = restore_op.Args(weight=self.weight, indices=self.indices, backup=self.backup)
            dispatch.call("sparse_diff_apply", "backward", self.apply_backend, tuple, args)
        finally:
            self._preserve.__exit__(None, None, None)
        return False


def forward_composite(a):
    with _Applied(a.weight, a.indices, a.values) as w_plus_delta:
        return torch.nn.functional.linear(a.x, w_plus_delta, a.bias)


def backward_composite(a):
    dy, x, weight, indices, values = a.dy, a.x, a.weight, a.indices, a.values
    need_x, need_weight, need_values, need_bias = a.need_x, a.need_weight, a.need_values, a.need_bias
    dx, dw, dv, db = (x.new_empty(0) for _ in range(4))
    if need_x:
        with _Applied(weight, indices, values) as w_plus_delta:
            dx = torch.mm(dy, w_plus_delta)
    if need_values:
        dv = _values_grad(dy, x, weight, indices, values)
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        db = dy.sum(dim=0, dtype=torch.float32).to(x.dtype)
    return dx, dw, dv, db


def _weight_not_writable(phase: str, a) -> Optional[str]:
    weight = a.weight
    if weight.is_inference() and not torch.is_inference_mode_enabled():
        return "the weight is an inference tensor, which cannot be written outside torch.inference_mode"
    return write_problem(weight)


dispatch.register("sparse_diff_linear", "triton", "fused", forward=forward_fused, backward=backward_fused)
dispatch.register("sparse_diff_linear", "triton", "composite", forward=forward_composite,
                  backward=backward_composite, unsupported=_weight_not_writable)
