"""bottleneck_adapter in plain torch, written to be read: the oracle the tests compare every backend with (on
float64 inputs), and the "reference" backend (any device and dtype).

    pre = h·W_downᵀ + b_down        out = residual + s·(act(pre)·W_upᵀ + b_up)      (residual = h when absent)

Products run in the accumulation dtype (float32, float64 for float64 inputs) and the result is rounded once to
h's dtype. The backward is written out, the activations' derivatives included.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..core import rules

ACTIVATIONS = {"identity": lambda t: t, "relu": torch.relu, "gelu": F.gelu,
               "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "silu": F.silu, "swish": F.silu,
               "tanh": torch.tanh}
_C = math.sqrt(2.0 / math.pi)  # gelu_tanh's constant


def _gelu_tanh_derivative(x):
    t = torch.tanh(_C * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * 0.044715 * x * x)


# act'(x), written out (an implementation runs below autograd, so the oracle cannot ask torch.autograd)
DERIVATIVES = {"identity": torch.ones_like, "relu": lambda x: (x > 0).to(x.dtype),
               "gelu": lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(
                   2 * math.pi),
               "gelu_tanh": _gelu_tanh_derivative,
               "silu": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
               "swish": lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
               "tanh": lambda x: 1 - torch.tanh(x) ** 2}


def _adapter(h, w_down, b_down, w_up, b_up, residual, activation: str, scaling: float):
    """(out in the accumulation dtype, pre)."""
    acc = rules.acc_dtype(h.dtype)
    pre = F.linear(h.to(acc), w_down.to(acc), None if b_down is None else b_down.to(acc))
    up = F.linear(ACTIVATIONS[activation](pre), w_up.to(acc), None if b_up is None else b_up.to(acc))
    base = h if residual is None else residual
    return base.to(acc) + scaling * up, pre


def forward(a):
    out, pre = _adapter(a.h, a.w_down, a.b_down, a.w_up, a.b_up, a.residual, a.activation, a.scaling)
    return out.to(a.h.dtype), pre


def backward(a):
    """(dh, dw_down, db_down, dw_up, db_up) from pre, the activation kept by the forward:
        z = act(pre)    dz = s·dout·W_up    dpre = act'(pre) ⊙ dz
        dh = dpre·W_down (+ dout when h is the residual)    dW_down = dpreᵀ·h    db_down = Σ dpre
        dW_up = s·doutᵀ·z    db_up = s·Σ dout
    The residual's own gradient is dout itself, handed to autograd apart."""
    acc = rules.acc_dtype(a.h.dtype)
    dout, h, w_down, w_up = (t.to(acc) for t in (a.dout, a.h, a.w_down, a.w_up))
    pre = a.pre.to(acc)
    z = ACTIVATIONS[a.activation](pre)
    dpre = DERIVATIVES[a.activation](pre) * (a.scaling * (dout @ w_up))
    dh = dpre @ w_down + (dout if a.residual_is_h else 0)
    grads = (dh, dpre.t() @ h, dpre.sum(dim=0), a.scaling * (dout.t() @ z), a.scaling * dout.sum(dim=0))
    needs = (a.need_h, a.need_w_down, a.need_b_down, a.need_w_up, a.need_b_up)
    dtypes = (a.h.dtype, a.w_down.dtype, a.w_down.dtype, a.w_up.dtype, a.w_up.dtype)
    return tuple(g.to(dt) if need else a.h.new_empty(0) for g, need, dt in zip(grads, needs, dtypes))
