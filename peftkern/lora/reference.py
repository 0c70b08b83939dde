"""lora_linear in plain torch, written to be read: the oracle the tests compare every backend with (on float64
inputs), and the "reference" backend (any device and dtype; lora/__init__.py registers it: an oracle imports
nothing from peftkern but the core rules and the dropout mask).

    S  = dropout(x)·Aᵀ                      (the mask of core/dropout.py, scaled by 1/(1-p))
    y  = x·Wᵀ + bias + s·S·Bᵀ
    dS = s·dy·B          dB = s·dyᵀ·S        dA = dSᵀ·dropout(x)
    dx = dy·W + mask ⊙ (dS·A)/(1-p)          dW = dyᵀ·x          dbias = Σ dy

The rank-r branch runs in the adapters' dtype when that is wider than x's (float32 adapters beside a half x):
its result meets the base result x·Wᵀ (+bias) in one add rounded once to x's dtype. A 4-bit base is dequantized
whole here (fourbit.FourBit.dequantize: code·absmax in float32, the weight's dtype, then x's), which an oracle may
do and the other backends never do.
"""
from __future__ import annotations

import torch

from ..core import rules
from ..core.dropout import plain_multiplier as dropout_multiplier


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense tensor in `dtype` (x's)."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)



def forward(a):
    x = a.x
    acc, rank = rules.acc_dtype(x.dtype), rules.rank_dtype(x.dtype, a.lora_a, a.lora_b)
    w = dense_weight(a.weight, x.dtype)
    xd = x.to(rank) * dropout_multiplier(x, a.seed, a.dropout_p, rank)
    s_down = (xd @ a.lora_a.to(rank).t()).to(acc)
    base = torch.nn.functional.linear(x, w, a.bias)
    low = a.scaling * (s_down.to(rank) @ a.lora_b.to(rank).t())
    return (base.to(rank) + low).to(x.dtype), s_down


def backward(a):
    x, dy = a.x, a.dy
    acc, rank = rules.acc_dtype(x.dtype), rules.rank_dtype(x.dtype, a.lora_a, a.lora_b)
    mult = dropout_multiplier(x, a.seed, a.dropout_p, rank)
    grads = {n: x.new_empty(0) for n in ("dx", "dweight", "dlora_a", "dlora_b", "dbias")}
    ds = (a.scaling * (dy.to(rank) @ a.lora_b.to(rank))).to(acc)
    if a.need_lora_b:
        grads["dlora_b"] = (a.scaling * (dy.to(acc).t() @ a.s_down)).to(a.lora_b.dtype)
    if a.need_lora_a:
        grads["dlora_a"] = (ds.t() @ (x.to(rank) * mult).to(acc)).to(a.lora_a.dtype)
    if a.need_x:
        base = dy @ dense_weight(a.weight, x.dtype)
        grads["dx"] = (base.to(rank) + mult * (ds.to(rank) @ a.lora_a.to(rank))).to(x.dtype)
    if a.need_weight and isinstance(a.weight, torch.Tensor):
        grads["dweight"] = dy.t() @ x
    if a.need_bias:
        grads["dbias"] = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return tuple(grads.values())

