"""The bottleneck adapter's activations and their derivatives, in plain torch (kernels/activations.py
is the Triton spelling of the same formulas). Each has a small integer code shared with the kernels."""
from __future__ import annotations

import math

import torch

# public name -> kernel code; "swish" is an alias of "silu"
CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swish": 4, "tanh": 5}
NAMES = ("relu", "gelu", "gelu_tanh", "silu", "swish", "tanh", "identity")

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)


def activate(pre: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return pre.clone()
    if code == 1:
        return torch.relu(pre)
    if code == 2:
        return torch.nn.functional.gelu(pre)
    if code == 3:
        return torch.nn.functional.gelu(pre, approximate="tanh")
    if code == 4:
        return torch.nn.functional.silu(pre)
    return torch.tanh(pre)


def derivative(pre: torch.Tensor, code: int) -> torch.Tensor:
    """d act / d pre, elementwise. tanh-based ones use 1 + t = 2σ(2u), 1 − t = 2σ(−2u) instead of forming
    1 ± t from a rounded t = tanh(u), which loses digits where |t| nears 1 (kernels/activations.py explains)."""
    if code == 0:
        return torch.ones_like(pre)
    if code == 1:
        return (pre > 0).to(pre.dtype)
    if code == 2:
        cdf = 0.5 * (1.0 + torch.erf(pre * _SQRT_HALF))
        return cdf + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    if code == 3:
        two_u = 2.0 * _TANH_C * (pre + 0.044715 * pre**3)
        s = torch.sigmoid(two_u)
        return s + 2.0 * pre * s * torch.sigmoid(-two_u) * _TANH_C * (1.0 + 3 * 0.044715 * pre * pre)
    if code == 4:
        sig = torch.sigmoid(pre)
        return sig * (1.0 + pre * (1.0 - sig))
    return 4.0 * torch.sigmoid(2.0 * pre) * torch.sigmoid(-2.0 * pre)
