"""LoRA in plain torch:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ, forward and backward.

This is the CPU path and the oracle of the tests (run it on float64 inputs). It writes no
[M, N] temporary beyond y itself (the rank-r update is an in-place addmm_) and keeps no copy of
dropout(x): the mask is regenerated from the seed in backward. On CPU the dropout multiply runs in
the C++ extension when it is built (same mask, one pass), else in peftkern.reference.dropout.
"""
from __future__ import annotations

import torch

from .. import _backend
from . import dropout as _dropout


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_mul(src: torch.Tensor, seed: int, p: float, *, inplace: bool = False) -> torch.Tensor:
    """src ⊙ keep(seed) / (1 - p) for a 2-D src; in place when asked."""
    ext = _backend.extension()
    if ext is not None and src.device.type == "cpu" and src.dtype in (torch.float32, torch.float64):
        src_c = src.contiguous()
        out = src_c if (inplace and src_c.data_ptr() == src.data_ptr()) else torch.empty_like(src_c)
        ext.dropout_mul(src_c, out, seed, _dropout.keep_threshold(p), 1.0 / (1.0 - p))
        if inplace and out.data_ptr() != src.data_ptr():
            src.copy_(out)
            return src
        return out
    return _dropout.dropout_mul(src, seed, p, out=src if inplace else None)


def lora_fwd(x, weight, lora_a, lora_b, bias, scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r] in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    xd = dropout_mul(x, seed, dropout_p) if dropout_p > 0.0 else x
    if xd.dtype == lora_a.dtype:
        s_down = torch.mm(xd, lora_a.t()).to(acc)
    else:  # float32 adapter beside a half-precision input: the rank-r product in fp32, like PEFT
        s_down = torch.mm(xd.to(acc), lora_a.to(acc).t())
    del xd
    if bias is not None:
        y = torch.addmm(bias, x, weight.t())
    else:
        y = torch.mm(x, weight.t())
    y.addmm_(s_down.to(x.dtype), lora_b.t().to(x.dtype), alpha=scaling)
    return y, s_down


def lora_bwd(dy, x, weight, lora_a, lora_b, s_down, scaling: float, dropout_p: float, seed: int,
             need_x: bool, need_weight: bool, need_a: bool, need_b: bool, need_bias: bool):
    """Gradients (dx, dweight, dA, dB, dbias); entries not needed are empty tensors."""
    acc = acc_dtype(x.dtype)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    # dS = s · dy·B, the gradient reaching S = dropout(x)·Aᵀ
    ds = torch.mm(dy.to(acc), lora_b.to(acc)) if dy.dtype != lora_b.dtype else torch.mm(dy, lora_b).to(acc)
    ds.mul_(scaling)
    if need_b:
        db = (torch.mm(dy.t().to(acc), s_down) * scaling).to(lora_b.dtype)
    if need_a:
        xd = dropout_mul(x, seed, dropout_p) if dropout_p > 0.0 else x
        da = torch.mm(ds.t(), xd.to(acc)).to(lora_a.dtype)
        del xd
    if need_x:
        dx = torch.mm(dy, weight)
        if dropout_p > 0.0:
            low = torch.mm(ds.to(x.dtype), lora_a.to(x.dtype))
            dx.add_(dropout_mul(low, seed, dropout_p, inplace=True))
        else:
            dx.addmm_(ds.to(x.dtype), lora_a.to(x.dtype))
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dw, da, db, dbias
