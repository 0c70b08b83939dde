"""BottleneckAdapter: a Houlsby / Pfeiffer bottleneck adapter with a residual."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..adapter import bottleneck_adapter
from ..core import checks as _checks
from ..core.rules import ACTIVATION_CODES as _ACTIVATIONS, ACTIVATION_NAMES as _ACTIVATION_NAMES


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter (Houlsby / Pfeiffer):

        out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)

    Args:
        d_model: int >= 0, the width of h.
        bottleneck: int >= 1, the adapter's inner width k.
        activation: one of "relu", "gelu" (erf form), "gelu_tanh", "silu" (alias "swish"), "tanh", "identity".
        scaling: finite real number multiplying the adapter's output before the residual add.
        bias: whether `b_down` and `b_up` exist.
        device, dtype: where and in which floating dtype the parameters are made.
        init_weights: AdapterHub's `init_weights` option: "bert" (its default and this one's: weights
            ~ N(0, 0.02²), biases zero) or "mam_adapter" (`w_down` Kaiming-uniform a=sqrt(5), `w_up` and the
            biases zero, so a new adapter is the identity).

    Parameters (all trainable): `w_down` [bottleneck, d_model], `b_down` [bottleneck] or None,
    `w_up` [d_model, bottleneck], `b_up` [d_model] or None.

    Raises (in the constructor, naming the argument): TypeError when d_model or bottleneck is not an int
    or scaling not a real number; ValueError when one is out of range or not finite, or activation or
    init_weights is not one of the names above.
    """

    INIT_WEIGHTS = ("bert", "mam_adapter")

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scaling: float = 1.0,
                 bias: bool = True, device=None, dtype=None, init_weights: str = "bert"):
        super().__init__()
        d_model = _checks.integer("d_model", d_model, low=0)
        bottleneck = _checks.integer("bottleneck", bottleneck, low=1)
        scaling = _checks.real_number("scaling", scaling)
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(repr(n) for n in _ACTIVATION_NAMES)}; "
                             f"got {activation!r}")
        if init_weights not in self.INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {self.INIT_WEIGHTS}, got {init_weights!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scaling, self.init_weights = activation, scaling, init_weights
        self.w_down = nn.Parameter(torch.empty(bottleneck, d_model, **factory))
        self.b_down = nn.Parameter(torch.empty(bottleneck, **factory)) if bias else None
        self.w_up = nn.Parameter(torch.empty(d_model, bottleneck, **factory))
        self.b_up = nn.Parameter(torch.empty(d_model, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter as `init_weights` says (see the class docstring)."""
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
        """out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up) (peftkern.bottleneck_adapter).

        h: [..., d_model], any number of leading dims, any strides. residual: h's shape and dtype, or None
        (then h itself is the residual, Houlsby-style; pass the sublayer's input for Pfeiffer-style).
        Returns h's shape and dtype. Outside torch.autocast the parameters have h's dtype, or are float32
        beside a float16/bfloat16 h; inside it everything is cast to the autocast dtype. Gradients reach h,
        residual and every parameter that requires grad.

        Raises ValueError when h's last dim is not d_model or residual's shape differs from h's, TypeError
        for a non-float or mismatched dtype, RuntimeError when the tensors are on different devices.
        """
        return bottleneck_adapter(h, self.w_down, self.b_down, self.w_up, self.b_up, activation=self.activation,
                                  scaling=self.scaling, residual=residual)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling}, bias={self.b_down is not None}, init_weights={self.init_weights!r}")
