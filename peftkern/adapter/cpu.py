"""Bottleneck adapter, the fast torch path:  out = residual + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up).

The "cpu" backend, and the composite GPU variant (also the fallback for bottlenecks too wide for the Triton
kernel). Every product runs in the accumulation dtype (fp32, or fp64 for fp64 inputs): on
CPU, where inputs are fp32/fp64, that costs nothing; for fp16/bf16 inputs it keeps small reductions
such as a bias gradient from being rounded to 16 bits midway. The forward keeps
pre = h·W_downᵀ + b_down ([M, k]) for backward, from which act and act' are recomputed; the
residual is the up-projection GEMM's addend and the scaling its alpha, so no pass over [M, d] is spent
on either.
"""
from __future__ import annotations

import torch

from ..core import dispatch, rules
from ..core.rules import acc_dtype
from . import activations as act


def _linear(x, weight, bias, dtype):
    """x·weightᵀ + bias computed in `dtype` (float32 adapter weights beside half-precision activations run in fp32)."""
    x, weight = x.to(dtype), weight.to(dtype)
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias.to(dtype), x, weight.t())


def _scaled_mm(a, b, scaling: float):
    """scaling·(a·b) with the scaling applied inside the GEMM (beta=0: the 0-dim input is never read),
    not as a separate pass over the product. Every elementwise pass over an [M, ·] tensor is a parallel
    region, and on a busy CPU each region waits a scheduler time slice for its slowest thread."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=scaling)


def adapter_fwd(h, w_down, b_down, w_up, b_up, residual, code: int, scaling: float):
    """h [M, d] -> (out [M, d] in h's dtype, pre [M, k] in the accumulation dtype)."""
    acc = acc_dtype(h.dtype)
    pre = _linear(h, w_down, b_down, acc)
    base = (h if residual is None else residual).to(acc)
    # residual + s·(act·W_upᵀ) in one GEMM, then + s·b_up
    out = torch.addmm(base, act.activate(pre, code), w_up.to(acc).t(), alpha=scaling)
    if b_up is not None:
        out.add_(b_up.to(acc), alpha=scaling)
    return out.to(h.dtype), pre


def adapter_bwd(dy, h, w_down, w_up, pre, code: int, scaling: float, residual_is_h: bool,
                need_h: bool, need_wd: bool, need_bd: bool, need_wu: bool, need_bu: bool):
    """Gradients (dh, dw_down, db_down, dw_up, db_up); entries not needed are empty tensors.
    The residual's own gradient is dy itself and is handed out by the autograd formula, not here."""
    acc = acc_dtype(h.dtype)
    dy_acc = dy.to(acc)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    dh, dwd, dbd, dwu, dbu = (h.new_empty(0) for _ in range(5))
    dpre = act.backward(_scaled_mm(dy_acc, w_up.to(acc), scaling), pre, code)
    if need_h:
        w_down_acc = w_down.to(acc)
        # h is also the residual: dh = dy + dpre·W_down in one GEMM
        dh = torch.addmm(dy_acc, dpre, w_down_acc) if residual_is_h else torch.mm(dpre, w_down_acc)
        dh = dh.to(h.dtype)
    if need_wu:
        dwu = _scaled_mm(dy_acc.t(), act.activate(pre, code), scaling).to(w_up.dtype)
    if need_bu:
        dbu = (dy.sum(dim=0, dtype=acc) * scaling).to(w_up.dtype)
    if need_wd:
        dwd = torch.mm(dpre.t(), h.to(acc)).to(w_down.dtype)
    if need_bd:
        dbd = dpre.sum(dim=0).to(w_down.dtype)
    return dh, dwd, dbd, dwu, dbu


def forward(a):
    return adapter_fwd(a.h, a.w_down, a.b_down, a.w_up, a.b_up, a.residual, rules.ACTIVATION_CODES[a.activation],
                       a.scaling)


def backward(a):
    return adapter_bwd(a.dout, a.h, a.w_down, a.w_up, a.pre, rules.ACTIVATION_CODES[a.activation], a.scaling,
                       a.residual_is_h, a.need_h, a.need_w_down, a.need_b_down, a.need_w_up, a.need_b_up)


dispatch.register("bottleneck_adapter", "cpu", forward=forward, backward=backward)
