"""DoRALinear: LoRALinear with PEFT's weight-decomposed update (a trainable per-row magnitude)."""
from __future__ import annotations

import torch
from torch import nn

from ..dora import dora_linear, row_norms
from ..dora.cpu import column_scale as _dora_column_scale
from .lora import LoRALinear


class DoRALinear(LoRALinear):
    """A frozen linear layer plus a weight-decomposed rank-r update (DoRA), with PEFT's semantics:

        n = ‖weight + scaling·lora_b·lora_a‖₂ per output row (a constant in backward), c = magnitude / n
        y = c ⊙ (x·weightᵀ + scaling·(x·lora_aᵀ)·lora_bᵀ) + bias        (no dropout; see peftkern.dora_linear)

    Everything LoRALinear has (constructor arguments, `from_linear` over an nn.Linear or a bitsandbytes
    Linear4bit, `weight`, `bias`, `lora_a`, `lora_b`, `scaling`, `merged`) plus a trainable `magnitude`
    [out_features], initialised to n of the initial weights, as PEFT does: with `lora_b` at zero, the row norms
    of `weight`, so a new layer computes exactly its base linear.

    Args: as LoRALinear (in_features, out_features, r, alpha, dropout, bias, device, dtype); the magnitude is
    made in the adapters' dtype. Raises (naming the argument) TypeError when in_features, out_features or r is
    not an int or alpha or dropout not a real number, ValueError when one is out of range.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=bias, device=device,
                         dtype=dtype)
        self.magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> "DoRALinear":
        """A DoRALinear over an existing nn.Linear or bitsandbytes Linear4bit (shared, frozen weight and bias, as
        LoRALinear.from_linear), with `magnitude` = the row norms of its weight. Raises TypeError when `linear` is
        neither, and TypeError/ValueError (naming the argument) for a bad r, alpha or dropout."""
        layer = super().from_linear(linear, r=r, alpha=alpha, dropout=dropout)
        layer.magnitude = nn.Parameter(torch.empty(layer.out_features, device=layer.lora_a.device,
                                                   dtype=layer.lora_a.dtype))
        layer.reset_magnitude()
        return layer

    def _base(self):
        return self.quantized_weight if self.quantized_weight is not None else self.weight

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Set `magnitude` to n, the row norms of weight + scaling·lora_b·lora_a now (PEFT's initialisation)."""
        if self.magnitude.device.type == "meta":
            return
        self.magnitude.copy_(row_norms(self._base(), self.lora_a, self.lora_b, self.scaling))

    @torch.no_grad()
    def merge_(self) -> "DoRALinear":
        """Fold the adapter into `weight` in place: weight ← (magnitude / n) ⊙ (weight + scaling·lora_b·lora_a),
        computed in float32 and rounded once (PEFT's DoRA merge); returns self. A copy of the original weight is
        kept so that `unmerge_()` restores it bit for bit. Raises RuntimeError on a 4-bit base, as LoRALinear."""
        if self.quantized_weight is not None:
            return super().merge_()  # raises, saying why
        if not self.merged:
            n = row_norms(self.weight, self.lora_a, self.lora_b, self.scaling).to(torch.float32)
            scale = _dora_column_scale(self.magnitude, n, torch.float32).unsqueeze(1)  # 0 on a zero row, not NaN
            self._merged_backup = self.weight.detach().clone()
            delta = (self.lora_b.to(torch.float32) @ self.lora_a.to(torch.float32)) * self.scaling
            self.weight.copy_(((self.weight.to(torch.float32) + delta) * scale).to(self.weight.dtype))
        return self

    def _fused(self, x, weight, bias, lora_a, lora_b, cast=None) -> torch.Tensor:
        magnitude = self.magnitude
        if cast is not None:
            lora_a, lora_b, magnitude = lora_a.to(cast), lora_b.to(cast), magnitude.to(cast)
        return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling=self.scaling, bias=bias,
                           dropout_p=self.dropout, training=self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = c ⊙ (x·weightᵀ + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ) + bias with c = magnitude / n, in PEFT's DoRA
        form (peftkern.dora_linear: with dropout the base term sees the undropped x as well); F.linear(x, weight,
        bias) when `merged`.

        x: [..., in_features], any leading dims and strides; returns [..., out_features] in x's dtype. Outside
        torch.autocast x has weight's dtype; lora_a, lora_b and magnitude have it too, or are float32 beside a
        float16/bfloat16 weight. Inside torch.autocast the inputs are cast to the autocast dtype as F.linear's
        are, except the magnitude (a float32 column scale). Dropout runs in training mode only, with a fresh
        mask per call from torch's generator. In eval mode the weight norm n is cached until weight, lora_a or
        lora_b change.

        Raises ValueError when x's last dim is not in_features, TypeError for a non-float or mismatched dtype,
        RuntimeError when x is on another device than the parameters."""
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
