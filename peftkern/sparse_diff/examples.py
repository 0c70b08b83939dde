"""Representative arguments of the sparse-diff ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from. aot_calls / run_aot_call are
the ahead-of-time check's calls of sparse_diff_linear (scripts/aot/driver.py finds them here)."""
from __future__ import annotations

import torch

from .. import use_backend
from .op import sparse_diff_linear


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


# ---- the ahead-of-time compile check's calls ------------------------------------------------------------------

def aot_calls(setting: dict, *, full: bool, peft_default: bool) -> list[dict]:
    """The ahead-of-time check's sparse_diff_linear calls in one dtype setting (setting: act_dtype, param_dtype,
    tf32, index): run_aot_call's arguments. Aligned sizes with a bias in every setting; in PEFT's default setting
    (and in every setting when full) also a token count off %16 with fewer values and no bias."""
    return [dict(M=M, nnz=333 if M % 16 else 1000, bias=M % 16 == 0)
            for M in ((256, 250) if full or peft_default else (256,))]


def _rnd(*shape, dtype, grad=False):
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def run_aot_call(call: dict, act_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One aot_calls() call, forward and backward through sparse_diff_linear on the Triton backend (x [M, 256], a
    [384, 256] weight, nnz values in param_dtype)."""
    M, nnz, K, N = call["M"], call["nnz"], 256, 384
    x, w = _rnd(M, K, dtype=act_dtype, grad=True), _rnd(N, K, dtype=act_dtype)
    idx = torch.randperm(N * K)[:nnz]
    vals = _rnd(nnz, dtype=param_dtype, grad=True)
    bias = _rnd(N, dtype=act_dtype) if call["bias"] else None
    with use_backend("triton"):
        sparse_diff_linear(x, w, idx, vals, bias).float().sum().backward()
