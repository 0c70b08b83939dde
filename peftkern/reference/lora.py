"""LoRA in plain torch:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ, forward and backward.

This is the CPU path and the oracle of the tests (run it on float64 inputs). It writes no
[M, N] temporary beyond y itself (the rank-r update is an in-place addmm_) and keeps no copy of
dropout(x): the mask is regenerated from the seed in backward. With dropout, x is walked in blocks
of rows that fit in cache: each block's dropout multiplier is made (C++ when built), used, and
dropped, so no [M, K] mask or dropout(x) exists at any time, and backward makes each block's mask
once for both dA and dx.
"""
from __future__ import annotations

import torch

from . import dropout as _dropout

_BLOCK_BYTES = 1 << 20  # rows per block: about 1 MiB of x, so a block stays in L2 between its uses


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(x: torch.Tensor):
    m, k = x.shape
    if x.device.type != "cpu":  # elementwise kernels on accelerators want one big launch, not a loop
        yield 0, m
        return
    step = max(1, _BLOCK_BYTES // max(1, k * x.element_size()))
    for r0 in range(0, m, step):
        yield r0, min(m, r0 + step)


def _mask(x: torch.Tensor, r0: int, r1: int, seed: int, p: float) -> torch.Tensor:
    return _dropout.multiplier(r1 - r0, x.shape[1], seed, p, dtype=x.dtype, device=x.device, row_offset=r0)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out=None) -> torch.Tensor:
    """a·b computed in `dtype` (a float32 adapter beside half-precision activations runs in fp32, as in PEFT)."""
    return torch.mm(a.to(dtype), b.to(dtype), out=out)


def lora_fwd(x, weight, lora_a, lora_b, bias, scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r] in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    lora_dtype = torch.promote_types(x.dtype, lora_a.dtype)
    if dropout_p > 0.0:
        s_down = torch.empty((x.shape[0], lora_a.shape[0]), device=x.device, dtype=acc)
        for r0, r1 in _row_blocks(x):
            xd = x[r0:r1] * _mask(x, r0, r1, seed, dropout_p)
            s_down[r0:r1] = _mm(xd, lora_a.t(), lora_dtype)
    else:
        s_down = _mm(x, lora_a.t(), lora_dtype).to(acc)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    y.addmm_(s_down.to(x.dtype), lora_b.t().to(x.dtype), alpha=scaling)
    return y, s_down


def lora_bwd(dy, x, weight, lora_a, lora_b, s_down, scaling: float, dropout_p: float, seed: int,
             need_x: bool, need_weight: bool, need_a: bool, need_b: bool, need_bias: bool):
    """Gradients (dx, dweight, dA, dB, dbias); entries not needed are empty tensors."""
    acc = acc_dtype(x.dtype)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    # dS = s·dy·B: the gradient reaching S = dropout(x)·Aᵀ
    ds = _mm(dy, lora_b, torch.promote_types(dy.dtype, lora_b.dtype)).to(acc)
    ds.mul_(scaling)
    if need_b:
        db = (_mm(dy.t(), s_down, acc) * scaling).to(lora_b.dtype)
    if need_x:
        dx = torch.mm(dy, weight)
    if dropout_p > 0.0 and (need_a or need_x):
        da_acc = torch.zeros(lora_a.shape, device=x.device, dtype=acc) if need_a else None
        for r0, r1 in _row_blocks(x):
            mask = _mask(x, r0, r1, seed, dropout_p)  # made once, used for dA and for dx
            if need_a:
                da_acc.addmm_(ds[r0:r1].t(), (x[r0:r1] * mask).to(acc))
            if need_x:
                dx[r0:r1].addcmul_(_mm(ds[r0:r1], lora_a, x.dtype), mask)
        if need_a:
            da = da_acc.to(lora_a.dtype)
    else:
        if need_a:
            da = _mm(ds.t(), x, acc).to(lora_a.dtype)
        if need_x:
            dx.addmm_(ds.to(x.dtype), lora_a.to(x.dtype))
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dw, da, db, dbias
