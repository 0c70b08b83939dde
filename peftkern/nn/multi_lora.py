"""MultiLoRALinear: a frozen linear layer with several LoRA adapters, each input row taking its own."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core import checks as _checks
from ..multi_lora import multi_lora_linear
from ._common import check_dense_linear, is_linear4bit, reset_base


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with several LoRA adapters, each row of the input taking its own:

        row t:  y_t = x_t·weightᵀ + bias + scalings[i]·(dropout(x_t)·lora_a[i]ᵀ)·lora_b[i]ᵀ,   i = adapter_ids[t]

    (−1: the base layer alone). One call serves a mixed batch (each sequence its own fine-tune) or trains several
    adapters in one batch; the adapters' ranks may differ. `scalings[i] = alphas[i] / ranks[i]`.

    Args:
        in_features, out_features: ints >= 0.
        ranks: a sequence of n ints >= 1, one rank per adapter.
        alphas: a sequence of n finite reals (PEFT's lora_alpha per adapter), or one real for all.
        dropout: real number in [0, 1), one dropout for every adapter's branch, active in training mode.
        bias, device, dtype: as in LoRALinear.

    Parameters: `weight`, `bias` frozen; `lora_a` and `lora_b` nn.ParameterLists (lora_a[i] [ranks[i], in_features]
    Kaiming-uniform, lora_b[i] [out_features, ranks[i]] zeros: PEFT's default, so a new layer equals its base).

    Raises (in the constructor, naming the argument) TypeError / ValueError as LoRALinear, and for ranks and alphas
    of different lengths or an empty ranks.
    """

    def __init__(self, in_features: int, out_features: int, ranks, alphas=16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        in_features = _checks.integer("in_features", in_features, low=0)
        out_features = _checks.integer("out_features", out_features, low=0)
        ranks, alphas = self._check_adapters(ranks, alphas)
        dropout = _checks.real_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.ranks, self.alphas = ranks, alphas
        self.scalings = [a / r for a, r in zip(alphas, ranks)]
        self.dropout = dropout
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a = nn.ParameterList([nn.Parameter(torch.empty(r, in_features, **factory)) for r in ranks])
        self.lora_b = nn.ParameterList([nn.Parameter(torch.empty(out_features, r, **factory)) for r in ranks])
        reset_base(self.weight, self.bias, in_features)
        self.reset_lora_parameters()

    @staticmethod
    def _check_adapters(ranks, alphas) -> tuple[list[int], list[float]]:
        if isinstance(ranks, (int, str, torch.Tensor)) or not isinstance(ranks, (list, tuple)):
            raise TypeError(f"ranks must be a list or tuple of ints (one per adapter), got {type(ranks).__name__}")
        if len(ranks) == 0:
            raise ValueError("ranks must hold at least one adapter's rank, got an empty sequence")
        ranks = [_checks.integer(f"ranks[{i}]", r, low=1) for i, r in enumerate(ranks)]
        if _checks.is_real(alphas):  # one alpha for every adapter (a numpy scalar too)
            alphas = [alphas] * len(ranks)
        if isinstance(alphas, (str, torch.Tensor)) or not isinstance(alphas, (list, tuple)):
            raise TypeError(f"alphas must be a real number or a list or tuple of them, got {type(alphas).__name__}")
        if len(alphas) != len(ranks):
            raise ValueError(f"alphas must hold one number per adapter ({len(ranks)}, as ranks), got {len(alphas)}")
        return ranks, [_checks.real_number(f"alphas[{i}]", a) for i, a in enumerate(alphas)]

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation of every adapter (lora_a Kaiming-uniform, lora_b zeros)."""
        for a, b in zip(self.lora_a, self.lora_b):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks, alphas=16, dropout: float = 0.0) -> "MultiLoRALinear":
        """A MultiLoRALinear over an existing nn.Linear: its weight and bias are shared (not copied) and frozen; the
        adapters are new, on its device and in its dtype, with PEFT's default initialisation. Raises TypeError when
        `linear` is not an nn.Linear or is a bitsandbytes Linear4bit / Linear8bitLt (for a 4-bit base call
        peftkern.multi_lora_linear over QuantizedWeight.from_bnb(linear)), and the constructor's errors for ranks,
        alphas and dropout."""
        if is_linear4bit(linear):
            raise TypeError("MultiLoRALinear.from_linear: linear is a bitsandbytes Linear4bit (4-bit), which "
                            "MultiLoRALinear does not take: call peftkern.multi_lora_linear(x, "
                            "peftkern.QuantizedWeight.from_bnb(linear), ...) directly (the op runs over a 4-bit base), "
                            "or use LoRALinear.from_linear / DoRALinear.from_linear (4-bit aware) for one adapter")
        check_dense_linear("MultiLoRALinear", linear, takes_4bit=False)
        ranks, alphas = cls._check_adapters(ranks, alphas)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, ranks, alphas, dropout=dropout,
                    bias=linear.bias is not None, device="meta", dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_a = nn.ParameterList([nn.Parameter(torch.empty(r, linear.in_features, device=w.device,
                                                                  dtype=w.dtype)) for r in ranks])
        layer.lora_b = nn.ParameterList([nn.Parameter(torch.empty(linear.out_features, r, device=w.device,
                                                                  dtype=w.dtype)) for r in ranks])
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """peftkern.multi_lora_linear over this layer's parameters.

        x: [..., in_features]; adapter_ids: int32/int64 tensor on x's device whose shape is a leading part of
        x.shape[:-1] ([batch]: one adapter per sequence; x.shape[:-1]: one per token), −1 for the base alone.
        Dropout runs in training mode with a fresh mask per call from torch's generator. Raises IndexError for an
        id outside [−1, n), and multi_lora_linear's errors otherwise.
        """
        return multi_lora_linear(x, self.weight, list(self.lora_a), list(self.lora_b), adapter_ids,
                                 scalings=self.scalings, bias=self.bias, dropout_p=self.dropout,
                                 training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"alphas={self.alphas}, dropout={self.dropout}, bias={self.bias is not None}")
