"""Representative arguments of the sparse-diff ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from."""
from __future__ import annotations

import torch


def linear_forward_args(*, m: int = 6, k: int = 10, n: int = 7, nnz: int = 20, bias: bool = True,
                        index_dtype: torch.dtype = torch.int64, device="cpu", dtype: torch.dtype = torch.float32,
                        requires_grad: bool = True) -> dict:
    """Keyword arguments of sparse_diff_linear_fwd: x [m, k], a [n, k] weight and nnz unique positions in it, in
    no particular order."""
    return dict(x=torch.randn(m, k, device=device, dtype=dtype, requires_grad=requires_grad),
                weight=torch.randn(n, k, device=device, dtype=dtype),
                indices=torch.randperm(n * k, device=device)[:nnz].to(index_dtype),
                values=torch.randn(nnz, device=device, dtype=dtype, requires_grad=requires_grad),
                bias=torch.randn(n, device=device, dtype=dtype, requires_grad=requires_grad) if bias else None)


def linear_backward_args(fwd: dict, backend: str) -> dict:
    """Keyword arguments of sparse_diff_linear_bwd for the call linear_fwd(**fwd), every gradient asked for."""
    x = fwd["x"].detach()
    dy = torch.randn(x.shape[0], fwd["weight"].shape[0], device=x.device, dtype=x.dtype)
    return dict(dy=dy, x=x, weight=fwd["weight"], indices=fwd["indices"], values=fwd["values"].detach(),
                need_x=True, need_weight=True, need_values=True, need_bias=fwd["bias"] is not None, backend=backend)


def apply_args(*, shape=(7, 10), nnz: int = 20, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Keyword arguments of sparse_diff_apply_."""
    numel = shape[0] * shape[1]
    return dict(weight=torch.randn(*shape, device=device, dtype=dtype),
                indices=torch.randperm(numel, device=device)[:nnz], values=torch.randn(nnz, device=device),
                alpha=0.5)


def cases(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Named sparse_diff_linear forward-argument sets: with and without bias, int32 and int64 indices, an empty
    diff."""
    return {
        "bias_int64": linear_forward_args(device=device, dtype=dtype),
        "int32": linear_forward_args(bias=False, index_dtype=torch.int32, device=device, dtype=dtype),
        "empty_diff": linear_forward_args(nnz=0, device=device, dtype=dtype),
    }
