"""multi_lora_linear in plain torch, written to be read: the oracle the tests compare every backend with (on float64
inputs), and the "reference" backend (any device and dtype; multi_lora/__init__.py registers it: an oracle imports
nothing from peftkern but the core rules and the dropout mask).

Row t of x [M, K] uses adapter i = row_ids[t] (-1: none):

    S_t  = dropout(x)_t·A_iᵀ                     (lora_linear's mask for the same x and seed: by the row's position)
    y_t  = x_t·Wᵀ + bias + s_i·S_t·B_iᵀ
    dS_t = s_i·dy_t·B_i      dB_i = s_i·Σ_t dy_tᵀ·S_t      dA_i = Σ_t dS_tᵀ·dropout(x)_t     (t over adapter i's rows)
    dx_t = dy_t·W + mask_t ⊙ (dS_t·A_i)/(1-p)      dW = dyᵀ·x      dbias = Σ dy

S comes back as one [M, R] tensor (R = the largest rank; row t's first r_i columns hold its S, the rest zero). An
adapter no row uses gets zero gradients. The rank-r branch runs in the adapters' dtype when that is wider than x's
(float32 adapters beside a half x): it meets the base result in one add rounded once to x's dtype. A 4-bit base is
dequantized whole here, which an oracle may do and the other backends never do.
"""
from __future__ import annotations

import torch

from ..core import rules
from ..core.dropout import plain_multiplier as dropout_multiplier


def check_ids(row_ids: torch.Tensor, n: int) -> None:
    """IndexError unless every id is in [-1, n)."""
    if row_ids.numel() and not bool(((row_ids >= -1) & (row_ids < n)).all()):
        bad = int(row_ids[(row_ids < -1) | (row_ids >= n)][0])
        raise IndexError(f"adapter_ids holds {bad}, outside [-1, {n}) for {n} adapter(s) (-1 selects no adapter)")


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense tensor in `dtype` (x's)."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)



def _dtypes(a):
    return rules.acc_dtype(a.x.dtype), rules.rank_dtype(a.x.dtype, a.lora_a[0], a.lora_b[0])


def forward(a):
    x = a.x
    check_ids(a.row_ids, len(a.lora_a))
    acc, rank = _dtypes(a)
    xd = x.to(rank) * dropout_multiplier(x, a.seed, a.dropout_p, rank)
    s_down = x.new_zeros((x.shape[0], max(t.shape[0] for t in a.lora_a)), dtype=acc)
    y = torch.nn.functional.linear(x, dense_weight(a.weight, x.dtype), a.bias).to(rank)
    for i, (lora_a, lora_b) in enumerate(zip(a.lora_a, a.lora_b)):
        rows = a.row_ids == i  # the rows adapter i serves
        s = (xd[rows] @ lora_a.to(rank).t()).to(acc)
        s_down[rows, :lora_a.shape[0]] = s
        y[rows] += a.scalings[i] * (s.to(rank) @ lora_b.to(rank).t())
    return y.to(x.dtype), s_down


def backward(a):
    x, dy = a.x, a.dy
    acc, rank = _dtypes(a)
    mult = dropout_multiplier(x, a.seed, a.dropout_p, rank)
    dx, dweight, dbias = (x.new_empty(0) for _ in range(3))
    dlora_a = [t.new_empty(0) for t in a.lora_a]
    dlora_b = [t.new_empty(0) for t in a.lora_b]
    low = torch.zeros(x.shape, dtype=rank, device=x.device)  # each row's mask ⊙ dS·A_i
    for i, (lora_a, lora_b) in enumerate(zip(a.lora_a, a.lora_b)):
        rows, r = a.row_ids == i, lora_a.shape[0]
        ds = (a.scalings[i] * (dy[rows].to(rank) @ lora_b.to(rank))).to(acc)
        if a.need_lora_b[i]:
            dlora_b[i] = (a.scalings[i] * (dy[rows].to(acc).t() @ a.s_down[rows, :r])).to(lora_b.dtype)
        if a.need_lora_a[i]:
            dlora_a[i] = (ds.t() @ (x[rows].to(rank) * mult[rows]).to(acc)).to(lora_a.dtype)
        low[rows] = mult[rows] * (ds.to(rank) @ lora_a.to(rank))
    if a.need_x:
        dx = ((dy @ dense_weight(a.weight, x.dtype)).to(rank) + low).to(x.dtype)
    if a.need_weight and isinstance(a.weight, torch.Tensor):
        dweight = dy.t() @ x
    if a.need_bias:
        dbias = dy.sum(dim=0, dtype=acc).to(x.dtype)
    return dx, dweight, dlora_a, dlora_b, dbias
