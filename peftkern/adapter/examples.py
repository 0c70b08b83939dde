"""Representative arguments of the bottleneck_adapter ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from."""
from __future__ import annotations

from typing import Optional

import torch


def forward_args(*, m: int = 10, d: int = 12, k: int = 3, biases: bool = True, residual: bool = True,
                 activation: str = "gelu", scaling: float = 0.5, device="cpu", dtype: torch.dtype = torch.float32,
                 adapter_dtype: Optional[torch.dtype] = None, requires_grad: bool = True) -> dict:
    """Keyword arguments of bottleneck_adapter_fwd: random h [m, d], a k-wide bottleneck, optional biases and
    residual."""
    adapter_dtype = adapter_dtype or dtype

    def param(*shape):
        return (torch.randn(*shape, device=device, dtype=adapter_dtype) / shape[-1] ** 0.5).requires_grad_(
            requires_grad)

    return dict(h=torch.randn(m, d, device=device, dtype=dtype, requires_grad=requires_grad),
                w_down=param(k, d), b_down=param(k) if biases else None, w_up=param(d, k),
                b_up=param(d) if biases else None,
                residual=torch.randn(m, d, device=device, dtype=dtype) if residual else None,
                activation=activation, scaling=scaling)


def backward_args(fwd: dict, pre: torch.Tensor, backend: str, *, dout: Optional[torch.Tensor] = None) -> dict:
    """Keyword arguments of bottleneck_adapter_bwd after bottleneck_adapter_fwd(**fwd) returned (out, pre), every
    gradient asked for."""
    h = fwd["h"].detach()
    return dict(dout=torch.randn_like(h) if dout is None else dout, h=h, w_down=fwd["w_down"].detach(),
                w_up=fwd["w_up"].detach(), pre=pre.detach(), activation=fwd["activation"], scaling=fwd["scaling"],
                residual_is_h=fwd["residual"] is None, need_h=True, need_w_down=True,
                need_b_down=fwd["b_down"] is not None, need_w_up=True, need_b_up=fwd["b_up"] is not None,
                backend=backend)


def cases(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Named forward-argument sets covering the variants' branches: biases and residual or not, each activation
    kind (piecewise, erf, tanh-based)."""
    return {
        "biases_residual_gelu": forward_args(device=device, dtype=dtype),
        "bare_relu": forward_args(biases=False, residual=False, activation="relu", scaling=2.0, device=device,
                                  dtype=dtype),
        "residual_silu": forward_args(biases=False, activation="silu", device=device, dtype=dtype),
        "biases_tanh": forward_args(residual=False, activation="tanh", device=device, dtype=dtype),
    }
