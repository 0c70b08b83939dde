"""lora_linear's fast torch path (the "cpu" backend; the GPU composite of a 4-bit base runs it too).

It keeps no copy of dropout(x): the mask is regenerated from the seed in backward. With dropout, x is walked in
blocks of rows (core/cpu.py): each block's dropout multiplier is made (C++ when built), used, and dropped, and
backward makes each block's mask once for both dA and dx. A 4-bit base is dequantized a block of output rows at a
time (fourbit.PackedWeight), never whole.

The rank-r branch runs in the adapters' dtype when that is wider than x's (float32 adapters beside a
float16/bfloat16 x, PEFT's default): dropout(x), S, S·Bᵀ and dS·A are float32 and meet the base result only in
the one final add, whose sum is rounded once to x's dtype, as PEFT computes it. When every input has one dtype
the update is an in-place addmm_ into y (and dx): no [M, N] temporary beyond y itself.

lora_forward / lora_backward take the base weight as a dense tensor or a PackedWeight; dora_linear's fast path
calls them too.
"""
from __future__ import annotations

import torch

from ..core import cpu, dispatch, rules


def lora_forward(x, weight, lora_a, lora_b, bias, scaling: float, dropout_p: float, seed: int):
    """x [M, K] -> (y [M, N] in x's dtype, S = dropout(x)·Aᵀ [M, r] in the accumulation dtype)."""
    acc = rules.acc_dtype(x.dtype)
    rank = rules.rank_dtype(x.dtype, lora_a, lora_b)
    if dropout_p > 0.0:
        s_down = torch.empty((x.shape[0], lora_a.shape[0]), device=x.device, dtype=acc)
        for r0, r1 in cpu.row_blocks(x):
            xd = cpu.mask(x, r0, r1, seed, dropout_p, rank).mul_(x[r0:r1])  # in place: one block-sized temporary
            s_down[r0:r1] = cpu.mm(xd, lora_a.t(), rank)
    else:
        s_down = cpu.mm(x, lora_a.t(), rank).to(acc)
    y = cpu.base_linear(x, weight, bias)
    if rank == x.dtype:
        y.addmm_(s_down.to(x.dtype), lora_b.t().to(x.dtype), alpha=scaling)
    else:
        cpu.add_wide_product_(y, s_down.to(rank), lora_b.t().to(rank), scaling)
    return y, s_down


def lora_backward(dy, x, weight, lora_a, lora_b, s_down, scaling: float, dropout_p: float, seed: int,
             need_x: bool, need_weight: bool, need_a: bool, need_b: bool, need_bias: bool):
    """Gradients (dx, dweight, dA, dB, dbias); entries not needed are empty tensors."""
    acc = rules.acc_dtype(x.dtype)
    rank = rules.rank_dtype(x.dtype, lora_a, lora_b)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dx, dw, da, db, dbias = (x.new_empty(0) for _ in range(5))
    # dS = s·dy·B: the gradient reaching S = dropout(x)·Aᵀ
    ds = cpu.mm(dy, lora_b, rank).to(acc)
    ds.mul_(scaling)
    if need_b:
        db = (cpu.mm(dy.t(), s_down, acc) * scaling).to(lora_b.dtype)
    if need_x:
        dx = cpu.base_grad_input(dy, weight)
    if dropout_p > 0.0 and (need_a or need_x):
        da_acc = torch.zeros(lora_a.shape, device=x.device, dtype=acc) if need_a else None
        for r0, r1 in cpu.row_blocks(x):
            mask = cpu.mask(x, r0, r1, seed, dropout_p, rank)  # made once, used for dx and then for dA
            if need_x:
                if rank == x.dtype:
                    dx[r0:r1].addcmul_(cpu.mm(ds[r0:r1], lora_a, x.dtype), mask)
                else:  # the float32 rank-r term meets dy·W in one rounded add, as in the forward
                    low = cpu.mm(ds[r0:r1], lora_a, rank).mul_(mask)
                    dx[r0:r1].copy_(low.add_(dx[r0:r1]))
            if need_a:  # last use of the mask: it becomes dropout(x) in place
                da_acc.addmm_(ds[r0:r1].t(), mask.mul_(x[r0:r1]).to(acc))
        if need_a:
            da = da_acc.to(lora_a.dtype)
    else:
        if need_a:
            da = cpu.mm(ds.t(), x, acc).to(lora_a.dtype)
        if need_x:
            if rank == x.dtype:
                dx.addmm_(ds.to(x.dtype), lora_a.to(x.dtype))
            else:
                cpu.add_wide_product_(dx, ds.to(rank), lora_a.to(rank))
    if need_weight:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dw, da, db, dbias


def _base(a):
    """The weight lora_forward / lora_backward take: the dense tensor, or the 4-bit one's blocked products."""
    return a.weight if isinstance(a.weight, torch.Tensor) else a.weight.packed_weight(a.x.dtype)


def forward(a):
    return lora_forward(a.x, _base(a), a.lora_a, a.lora_b, a.bias, a.scaling, a.dropout_p, a.seed)


def backward(a):
    need_weight = a.need_weight and isinstance(a.weight, torch.Tensor)  # a 4-bit base is frozen
    return lora_backward(a.dy, a.x, _base(a), a.lora_a, a.lora_b, a.s_down, a.scaling, a.dropout_p, a.seed,
                         a.need_x, need_weight, a.need_lora_a, a.need_lora_b, a.need_bias)


dispatch.register("lora_linear", "cpu", forward=forward, backward=backward)
