"""SparseDiffLinear: a frozen linear layer plus a trainable sparse diff at fixed positions."""
from __future__ import annotations

import torch
from torch import nn

from ..sparse_diff.op import sparse_diff_linear


class SparseDiffLinear(nn.Module):
    """A frozen linear layer plus a trainable sparse diff at fixed positions: y = x·(W + Δ)ᵀ + b.

    Args:
        weight: [out_features, in_features], frozen (kept as a Parameter with requires_grad=False).
        bias: [out_features] or None, frozen.
        indices: 1-D int32/int64 flat row-major positions in `weight`, each in range and each at most once
            (IndexError / ValueError otherwise); stored as the buffer `indices`.
        values_dtype: dtype of the trainable `values` (default weight's; float32 beside a half-precision
            weight is allowed).

    `values` (one per index) is the only trainable parameter and starts at zero, so a new layer equals its
    source linear. `forward(x)` takes x [..., in_features] in weight's dtype and returns
    [..., out_features] through peftkern.sparse_diff_linear: neither W + Δ nor a dense weight gradient
    is ever built. `to_sparse_diff()` returns the trained diff as a SparseDiff.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor, values_dtype=None):
        super().__init__()
        from ..core.checks import unique_indices as validate

        if (not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64)
                or indices.dim() != 1):
            raise TypeError("indices must be a 1-D int32 or int64 tensor of flat positions in the weight")
        validate(indices, weight.numel())
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            self.bias.requires_grad_(False)
        else:
            self.bias = None
        self.register_buffer("indices", indices.to(weight.device))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=weight.device,
                                               dtype=values_dtype or weight.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor, values_dtype=None) -> "SparseDiffLinear":
        """Wrap an nn.Linear (weight and bias shared, frozen) with trainable values at `indices`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, indices, values_dtype=values_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> x·(W + Δ)ᵀ + b, [..., out_features] (errors as sparse_diff_linear)."""
        return sparse_diff_linear(x, self.weight, self.indices, self.values, self.bias)

    def to_sparse_diff(self):
        """The trained diff, ready to save or to apply to another copy of the base weight."""
        from ..sparse_diff import SparseDiff

        return SparseDiff(self.indices.clone(), self.values.detach().clone(), self.weight.shape)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, nnz={self.indices.numel()}, bias={self.bias is not None}"
