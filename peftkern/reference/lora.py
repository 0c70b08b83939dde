"""LoRA in plain torch:  y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ, forward and backward.

This is the CPU path and the oracle of the tests (run it on float64 inputs). It keeps no copy of
dropout(x): the mask is regenerated from the seed in backward. With dropout, x is walked in blocks
of rows (16 MiB of x each): each block's dropout multiplier is made (C++ when built), used, and
dropped, so no [M, K] mask or dropout(x) exists at any time, and backward makes each block's mask
once for both dA and dx.

The rank-r branch runs in the adapters' dtype when that is wider than x's (float32 adapters beside a
float16/bfloat16 x, PEFT's default): dropout(x), S, S·Bᵀ and dS·A are float32 and meet the base result
only in the one final add, whose sum is rounded once to x's dtype, as PEFT computes it. When every input
has one dtype the update is an in-place addmm_ into y (and dx): no [M, N] temporary beyond y itself. The
mixed case needs a float32 block for S·Bᵀ (dS·A in backward) before the add, because torch has no matmul
that adds a float32 product into a half-precision output without rounding the product first; it is made
and used one block of rows at a time (at most 16 MiB on CPU), never for all of [M, N] at once.
"""
from __future__ import annotations

import torch

from ..core.rules import acc_dtype, rank_dtype  # noqa: F401  (the other families import them from here)
from . import dropout as _dropout

# Rows per block: 16 MiB of x. Every block costs several parallel regions (mask, multiply, matmuls), and on
# a busy machine each region waits for its slowest thread, which may be descheduled for a whole time
# slice: many small blocks multiply that stall. Measured on the 2-core CI machine, LoRA fwd+bwd at
# M=2048 K=N=1024 r=16 fp32 p=0.1 with one busy background process: 1 MiB blocks 0.41x PEFT's eager
# speed, 4 MiB 0.92x, 16 MiB 1.13x; on the quiet machine peftkern's time was the same for all three
# (74 ms). The block's transient multiplier and dropout(x) stay bounded (2 x 16 MiB), however large M.
_BLOCK_BYTES = 1 << 24
# the float32 block of the mixed-dtype add on an accelerator: big enough for full-speed GEMMs, small
# beside the [M, N] output
_DEVICE_BLOCK_BYTES = 1 << 26


def _row_blocks(x: torch.Tensor):
    m, k = x.shape
    if x.device.type != "cpu":  # elementwise kernels on accelerators want one big launch, not a loop
        yield 0, m
        return
    step = max(1, _BLOCK_BYTES // max(1, k * x.element_size()))
    for r0 in range(0, m, step):
        yield r0, min(m, r0 + step)


def _mask(x: torch.Tensor, r0: int, r1: int, seed: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    return _dropout.multiplier(r1 - r0, x.shape[1], seed, p, dtype=dtype, device=x.device, row_offset=r0)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out=None) -> torch.Tensor:
    """a·b computed in `dtype` (a float32 adapter beside half-precision activations runs in fp32, as in PEFT)."""
    return torch.mm(a.to(dtype), b.to(dtype), out=out)


def _add_wide_product_(out: torch.Tensor, t: torch.Tensor, u: torch.Tensor, scale: float = 1.0,
                       mask_rows=None) -> None:
    """out += scale·(t·u) [⊙ mask], with t·u in t's (wider) dtype and the sum rounded once to out's dtype.

    out [M, N] (half precision), t [M, R] and u [R, N] float32. `mask_rows(r0, r1)` gives the dropout
    multiplier of rows r0:r1 in t's dtype, or None. Walks row blocks so the float32 temporary stays small."""
    m, n = out.shape
    budget = _BLOCK_BYTES if out.device.type == "cpu" else _DEVICE_BLOCK_BYTES
    step = max(1, budget // max(1, n * t.element_size()))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        low = torch.mm(t[r0:r1], u)
        if scale != 1.0:
            low.mul_(scale)
        if mask_rows is not None:
            low.mul_(mask_rows(r0, r1))
        out[r0:r1].copy_(low.add_(out[r0:r1]))


def _base_linear(x, weight, bias):
    """x·Wᵀ (+bias). `weight` is a dense tensor, or a frozen weight stored another way that computes its own
    products (reference/qlora.py's 4-bit weight, dequantized a block of rows at a time)."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    return weight.linear(x, bias)


def _base_grad_input(dy, weight):
    """dy·W, for either kind of weight (see _base_linear)."""
    return torch.mm(dy, weight) if isinstance(weight, torch.Tensor) else weight.grad_input(dy)


def lora_fwd(x, weight, lora_a, lora_b, bias, scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r] in the accumulation dtype)."""
    acc = acc_dtype(x.dtype)
    rank = rank_dtype(x.dtype, lora_a, lora_b)
    if dropout_p > 0.0:
        s_down = torch.empty((x.shape[0], lora_a.shape[0]), device=x.device, dtype=acc)
        for r0, r1 in _row_blocks(x):
            xd = _mask(x, r0, r1, seed, dropout_p, rank).mul_(x[r0:r1])  # in place: one block-sized temporary
            s_down[r0:r1] = _mm(xd, lora_a.t(), rank)
    else:
        s_down = _mm(x, lora_a.t(), rank).to(acc)
    y = _base_linear(x, weight, bias)
    if rank == x.dtype:
        y.addmm_(s_down.to(x.dtype), lora_b.t().to(x.dtype), alpha=scaling)
    else:
        _add_wide_product_(y, s_down.to(rank), lora_b.t().to(rank), scaling)
    return y, s_down


def lora_bwd(dy, x, weight, lora_a, lora_b, s_down, scaling: float, dropout_p: float, seed: int,
             need_x: bool, need_weight: bool, need_a: bool, need_b: bool, need_bias: bool):
    """Gradients (dx, dweight, dA, dB, dbias); entries not needed are empty tensors."""
    acc = acc_dtype(x.dtype)
    rank = rank_dtype(x.dtype, lora_a, lora_b)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    # dS = s·dy·B: the gradient reaching S = dropout(x)·Aᵀ
    ds = _mm(dy, lora_b, rank).to(acc)
    ds.mul_(scaling)
    if need_b:
        db = (_mm(dy.t(), s_down, acc) * scaling).to(lora_b.dtype)
    if need_x:
        dx = _base_grad_input(dy, weight)
    if dropout_p > 0.0 and (need_a or need_x):
        da_acc = torch.zeros(lora_a.shape, device=x.device, dtype=acc) if need_a else None
        for r0, r1 in _row_blocks(x):
            mask = _mask(x, r0, r1, seed, dropout_p, rank)  # made once, used for dx and then for dA
            if need_x:
                if rank == x.dtype:
                    dx[r0:r1].addcmul_(_mm(ds[r0:r1], lora_a, x.dtype), mask)
                else:  # the float32 rank-r term meets dy·W in one rounded add, as in the forward
                    low = _mm(ds[r0:r1], lora_a, rank).mul_(mask)
                    dx[r0:r1].copy_(low.add_(dx[r0:r1]))
            if need_a:  # last use of the mask: it becomes dropout(x) in place
                da_acc.addmm_(ds[r0:r1].t(), mask.mul_(x[r0:r1]).to(acc))
        if need_a:
            da = da_acc.to(lora_a.dtype)
    else:
        if need_a:
            da = _mm(ds.t(), x, acc).to(lora_a.dtype)
        if need_x:
            if rank == x.dtype:
                dx.addmm_(ds.to(x.dtype), lora_a.to(x.dtype))
            else:
                _add_wide_product_(dx, ds.to(rank), lora_a.to(rank))
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dw, da, db, dbias
