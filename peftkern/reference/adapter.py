"""Bottleneck adapter in plain torch:  out = residual + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up).

The CPU path and the tests' oracle (float64). The forward keeps pre = h·W_downᵀ + b_down ([M, k],
accumulation dtype) for backward, from which act and act' are recomputed; the up-projection result
is scaled and gets the residual added in place, so the forward allocates one [M, d] tensor: out.
"""
from __future__ import annotations

import torch

from . import activations as act
from .lora import acc_dtype


def _linear(x, weight, bias, dtype):
    """x·weightᵀ + bias computed in `dtype` (float32 adapter weights beside half-precision activations run in fp32)."""
    x, weight = x.to(dtype), weight.to(dtype)
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias.to(dtype), x, weight.t())


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, code: int, scaling: float):
    """h [M, d] -> (out [M, d] in h's dtype, pre [M, k] in the accumulation dtype)."""
    acc = acc_dtype(h.dtype)
    pre = _linear(h, w_down, b_down, torch.promote_types(h.dtype, w_down.dtype)).to(acc)
    z = act.activate(pre, code)
    up = _linear(z, w_up, b_up, torch.promote_types(h.dtype, w_up.dtype)).to(h.dtype)
    out = up.mul_(scaling).add_(h if residual is None else residual)
    return out, pre


def adapter_bwd(dy, h, w_down, w_up, pre, code: int, scaling: float, residual_is_h: bool,
                need_h: bool, need_wd: bool, need_bd: bool, need_wu: bool, need_bu: bool):
    """Gradients (dh, dw_down, db_down, dw_up, db_up); entries not needed are empty tensors.
    The residual's own gradient is dy itself and is handed out by the autograd formula, not here."""
    acc = acc_dtype(h.dtype)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dh, dwd, dbd, dwu, dbu = (h.new_empty(0) for _ in range(5))
    dz = torch.mm(dy.to(acc), w_up.to(acc)) if dy.dtype != w_up.dtype else torch.mm(dy, w_up).to(acc)
    dpre = dz.mul_(scaling).mul_(act.derivative(pre, code))
    if need_h:
        dh = torch.mm(dpre.to(h.dtype), w_down.to(h.dtype))
        if residual_is_h:
            dh.add_(dy)
    if need_wu:
        dwu = (torch.mm(dy.t().to(acc), act.activate(pre, code)) * scaling).to(w_up.dtype)
    if need_bu:
        dbu = (dy.sum(dim=0, dtype=acc) * scaling).to(w_up.dtype)
    if need_wd:
        dwd = torch.mm(dpre.t(), h.to(acc)).to(w_down.dtype)
    if need_bd:
        dbd = dpre.sum(dim=0).to(w_down.dtype)
    return dh, dwd, dbd, dwu, dbu
