"""Sparse diff vectors in plain torch, written to be read: the oracle the tests compare every backend with, and
the "reference" backend (any device and dtype).

    apply:    w[i] = round(acc(w[i]) + alpha·acc(v[i]))  at row-major positions i, returning the old w[i]
    restore:  w[i] = backup[i]
    linear:   y = x·(W + Δ)ᵀ + bias        dx = dy·(W + Δ)      dvalues[j] = (dyᵀ·x)[row_j, col_j]
              dW = dyᵀ·x                  dbias = Σ dy

acc is float32 (float64 for a float64 weight). The oracle builds the dense Δ and the dense dyᵀ·x, which an oracle
may do and the other backends never do. Indices address the weight's logical row-major order, whatever its
strides; each is range-checked here too (torch's indexing would wrap a negative index).
"""
from __future__ import annotations

import torch

from ..core import rules


def _coordinates(weight: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    numel = weight.numel()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        bad = int(((indices < 0) | (indices >= numel)).nonzero()[0, 0])
        raise IndexError(f"indices[{bad}] = {int(indices[bad])} is out of range for a weight of {numel} elements "
                         f"(valid: 0 <= index < {numel})")
    return torch.unravel_index(indices.to(torch.int64), weight.shape)


def apply_(a):
    at = _coordinates(a.weight, a.indices)
    backup = a.weight[at]
    acc = rules.acc_dtype(a.weight.dtype)
    a.weight[at] = (backup.to(acc) + a.alpha * a.values.to(acc)).to(a.weight.dtype)
    return backup


def restore_(a):
    a.weight[_coordinates(a.weight, a.indices)] = a.backup


def _delta(weight, indices, values, dtype) -> torch.Tensor:
    delta = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    delta[_coordinates(weight, indices)] = values.to(dtype)
    return delta


def linear_forward(a):
    acc = rules.acc_dtype(a.x.dtype)
    w = a.weight.to(acc) + _delta(a.weight, a.indices, a.values, acc)
    y = a.x.to(acc) @ w.t()
    return (y if a.bias is None else y + a.bias.to(acc)).to(a.x.dtype)


def linear_backward(a):
    acc = rules.acc_dtype(a.x.dtype)
    dy, x = a.dy.to(acc), a.x.to(acc)
    empty = [a.x.new_empty(0) for _ in range(4)]
    dx = (dy @ (a.weight.to(acc) + _delta(a.weight, a.indices, a.values, acc))).to(a.x.dtype) if a.need_x else empty[0]
    outer = dy.t() @ x  # [out, in]
    dw = outer.to(a.x.dtype) if a.need_weight else empty[1]
    dv = outer[_coordinates(a.weight, a.indices)].to(a.values.dtype) if a.need_values else empty[2]
    db = dy.sum(dim=0).to(a.x.dtype) if a.need_bias else empty[3]
    return dx, dw, dv, db
