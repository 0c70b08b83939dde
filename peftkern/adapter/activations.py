"""The bottleneck adapter's activations and their backward, in plain torch (kernels/activations.py is the
Triton spelling of the same functions). Each has a small integer code shared with the kernels."""
from __future__ import annotations

import torch

from ..core.rules import ACTIVATION_CODES as CODES, ACTIVATION_NAMES as NAMES  # noqa: F401


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


def backward(grad: torch.Tensor, pre: torch.Tensor, code: int) -> torch.Tensor:
    """grad · act'(pre), elementwise, with PyTorch's own backward kernels: one pass each (tanh: two),
    the same arithmetic as eager autograd, so the CPU path's error is PyTorch's own. (The Triton kernels
    use the sigmoid identities of kernels/activations.py instead, which avoid forming 1 ± tanh.)"""
    if code == 0:
        return grad
    if code == 1:
        return torch.ops.aten.threshold_backward(grad, pre, 0.0)
    if code in (2, 3):
        return torch.ops.aten.gelu_backward(grad, pre, approximate="none" if code == 2 else "tanh")
    if code == 4:
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.tanh_backward(grad, torch.tanh(pre))
