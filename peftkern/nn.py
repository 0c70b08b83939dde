"""Thin nn.Modules over the functional ops; they hold parameters and call the ops, no math of their own."""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops.adapter import bottleneck_adapter
from .ops.lora import lora_linear
from .ops.sparse_diff import sparse_diff_linear
from .reference.activations import CODES as _ACTIVATIONS, NAMES as _ACTIVATION_NAMES


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update:  y = x·Wᵀ + b + (alpha/r)·B·A·dropout(x).

    `weight` and `bias` are frozen; `lora_a` [r, in] is Kaiming-uniform and `lora_b` [out, r] zero at
    start (PEFT's default), so a new layer computes exactly its base linear. `merge_()` folds
    scaling·B·A into `weight` for inference and `unmerge_()` restores the original weight bit for bit.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = float(dropout)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, **factory))
        self._merged_backup: torch.Tensor | None = None
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation, for layers built from scratch
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's default LoRA init: A Kaiming-uniform (a=sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing nn.Linear; its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                    bias=linear.bias is not None, device="meta", dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_a = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_b = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    @property
    def merged(self) -> bool:
        return self._merged_backup is not None

    @torch.no_grad()
    def merge_(self) -> "LoRALinear":
        """Fold scaling·B·A into `weight` (kept frozen); the original weight is kept to unmerge exactly."""
        if not self.merged:
            self._merged_backup = self.weight.detach().clone()
            delta = (self.lora_b.to(torch.float32) @ self.lora_a.to(torch.float32)) * self.scaling
            self.weight.copy_((self.weight.to(torch.float32) + delta).to(self.weight.dtype))
        return self

    @torch.no_grad()
    def unmerge_(self) -> "LoRALinear":
        """Restore the exact pre-merge weight (a saved copy, not a subtraction that would round)."""
        if self.merged:
            self.weight.copy_(self._merged_backup)
            self._merged_backup = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_a, self.lora_b, scaling=self.scaling, bias=self.bias,
                           dropout_p=self.dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, merged={self.merged}")


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter (Houlsby / Pfeiffer):  out = residual + scaling·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up).

    `forward(h, residual=None)`: without `residual`, h itself is the residual. Initialisation follows
    AdapterHub's `init_weights` options: "bert" (default there and here: weights ~ N(0, 0.02²), biases 0)
    or "mam_adapter" (W_down Kaiming-uniform a=sqrt(5), W_up and biases 0, so a new adapter is the identity).
    """

    INIT_WEIGHTS = ("bert", "mam_adapter")

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scaling: float = 1.0,
                 bias: bool = True, device=None, dtype=None, init_weights: str = "bert"):
        super().__init__()
        if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 1:
            raise ValueError(f"bottleneck must be an int >= 1, got {bottleneck!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(repr(n) for n in _ACTIVATION_NAMES)}; "
                             f"got {activation!r}")
        if init_weights not in self.INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {self.INIT_WEIGHTS}, got {init_weights!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scaling, self.init_weights = activation, float(scaling), init_weights
        self.w_down = nn.Parameter(torch.empty(bottleneck, d_model, **factory))
        self.b_down = nn.Parameter(torch.empty(bottleneck, **factory)) if bias else None
        self.w_up = nn.Parameter(torch.empty(d_model, bottleneck, **factory))
        self.b_up = nn.Parameter(torch.empty(d_model, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init_weights == "bert":
            nn.init.normal_(self.w_down, std=0.02)
            nn.init.normal_(self.w_up, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
            nn.init.zeros_(self.w_up)
        for b in (self.b_down, self.b_up):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return bottleneck_adapter(h, self.w_down, self.b_down, self.w_up, self.b_up, activation=self.activation,
                                  scaling=self.scaling, residual=residual)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling}, bias={self.b_down is not None}, init_weights={self.init_weights!r}")


class SparseDiffLinear(nn.Module):
    """A frozen linear layer plus a trainable sparse diff at fixed positions: y = x·(W + Δ)ᵀ + b.

    `indices` (flat row-major positions in the weight) is a buffer; `values` is the trainable
    parameter, zeros at start (so a new layer equals its source linear), in the weight's dtype unless
    `values_dtype` says otherwise (float32 beside a half-precision weight is allowed). The dense W + Δ
    and a dense weight gradient never exist (see peftkern.sparse_diff_linear).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor, values_dtype=None):
        super().__init__()
        from .reference.sparse_diff import validate

        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
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
        return sparse_diff_linear(x, self.weight, self.indices, self.values, self.bias)

    def to_sparse_diff(self):
        """The trained diff, ready to save or to apply to another copy of the base weight."""
        from .sparse_diff import SparseDiff

        return SparseDiff(self.indices.clone(), self.values.detach().clone(), self.weight.shape)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, nnz={self.indices.numel()}, bias={self.bias is not None}"
