"""dora_linear in plain torch, written to be read: the oracle the tests compare every backend with (on float64
inputs), and the "reference" backend (any device and dtype; dora/__init__.py registers it: an oracle imports
nothing from peftkern but the core rules and the dropout mask).

PEFT's DoRA Linear, with d = dropout(x) (d = x without dropout), s = scaling:

    n  = ‖W + s·B·A‖₂ per output row (a constant in backward)      c = magnitude / n, and c_j = 0 where n_j = 0
    S  = d·Aᵀ          R = s·S·Bᵀ          z = d·Wᵀ + R
    y  = x·Wᵀ + bias + (c − 1) ⊙ (d·Wᵀ) + c ⊙ R          (= c ⊙ z + bias without dropout)

A row with n_j = 0 (W_j + s·(B·A)_j is zero, as every row is when in_features = 0) has no direction: its DoRA row
m_j·V_j/‖V_j‖ is taken as zero, F.normalize's convention, so c_j = 0 there (not 0/0) and that output column is the
base linear's. The backward, with gc = dy ⊙ c and the dropout multiplier `mult` (keep / (1 − p)):

    dmag = Σ_m dy ⊙ z / n (0 where n = 0)      dbias = Σ_m dy
    dS = s·gc·B        dB = s·gcᵀ·S        dA = dSᵀ·d
    dx = dy·W + mult ⊙ ((gc − dy)·W + dS·A)            dW = dyᵀ·x + (dy ⊙ (c − 1))ᵀ·d

Everything is computed in the accumulation dtype (float32 for half inputs, float64 for float64) and rounded once to
its result's dtype: y, z, dx, dW in x's; S and n in the accumulation dtype; the adapters' and the magnitude's
gradients in their own. The norm is formed from the dense sum W + s·B·A, as PEFT computes it. A 4-bit base is
dequantized whole here (FourBit.dequantize: code·absmax in float32, the weight's dtype, then x's), which an oracle
may do and the other backends never do.
"""
from __future__ import annotations

import torch

from ..core import rules
from ..core.dropout import plain_multiplier as dropout_multiplier


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense tensor in `dtype` (x's)."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)



def column_scale(magnitude: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """c = magnitude / n, 0 where n is 0 (a NaN or infinite magnitude still gives NaN there: m·0)."""
    m = magnitude.to(n.dtype)
    return torch.where(n == 0, m * 0, m / n)


def _operands(a):
    """(acc dtype, W, A, B, mult) in the accumulation dtype."""
    acc = rules.acc_dtype(a.x.dtype)
    w = dense_weight(a.weight, a.x.dtype).to(acc)
    return acc, w, a.lora_a.to(acc), a.lora_b.to(acc), dropout_multiplier(a.x, a.seed, a.dropout_p, acc)


def forward(a):
    acc, w, lora_a, lora_b, mult = _operands(a)
    x = a.x.to(acc)
    if a.weight_norm is not None:
        n = a.weight_norm.to(acc, copy=True)
    else:
        n = torch.linalg.vector_norm(w + a.scaling * (lora_b @ lora_a), dim=1)
    c = column_scale(a.magnitude, n)
    d = x * mult
    s_down = d @ lora_a.t()
    low = a.scaling * (s_down @ lora_b.t())
    dw = d @ w.t()
    z = dw + low
    if a.dropout_p == 0.0:
        y = c * z
    else:
        y = x @ w.t() + (c - 1) * dw + c * low
    if a.bias is not None:
        y = y + a.bias.to(acc)
    z = z.to(a.x.dtype) if a.keep_z else a.x.new_empty(0)
    return y.to(a.x.dtype), z, s_down, n


def backward(a):
    acc, w, lora_a, lora_b, mult = _operands(a)
    x, dy, n = a.x.to(acc), a.dy.to(acc), a.n.to(acc)
    c = column_scale(a.magnitude, n)
    grads = {g: a.x.new_empty(0) for g in ("dx", "dweight", "dlora_a", "dlora_b", "dmagnitude", "dbias")}
    if a.need_magnitude:
        colsum = (dy * a.z.to(acc)).sum(dim=0)
        grads["dmagnitude"] = torch.where(n == 0, colsum * 0, colsum / n).to(a.magnitude.dtype)
    if a.need_bias:
        grads["dbias"] = dy.sum(dim=0).to(a.x.dtype)
    gc = dy * c
    d = x * mult
    ds = a.scaling * (gc @ lora_b)
    if a.need_lora_b:
        grads["dlora_b"] = (a.scaling * (gc.t() @ a.s_down.to(acc))).to(a.lora_b.dtype)
    if a.need_lora_a:
        grads["dlora_a"] = (ds.t() @ d).to(a.lora_a.dtype)
    if a.need_x:
        grads["dx"] = (dy @ w + mult * ((gc - dy) @ w + ds @ lora_a)).to(a.x.dtype)
    if a.need_weight and isinstance(a.weight, torch.Tensor):
        grads["dweight"] = (dy.t() @ x + (dy * (c - 1)).t() @ d).to(a.x.dtype)
    return tuple(grads.values())
