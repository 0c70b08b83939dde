"""Representative arguments of the dora_linear ops, named as the ops name them: the one source the op tests
(opcheck) draw their inputs from."""
from __future__ import annotations

from typing import Optional

import torch

from ..quant import QuantizedWeight, fourbit


def forward_args(*, m: int = 10, k: int = 12, n: int = 9, r: int = 3, bias: bool = True, dropout_p: float = 0.0,
                 quantized: bool = False, weight_norm: bool = False, keep_z: bool = True, device="cpu",
                 dtype: torch.dtype = torch.float32, adapter_dtype: Optional[torch.dtype] = None,
                 requires_grad: bool = True) -> dict:
    """Keyword arguments of dora_linear_fwd: random x [m, k], a dense (or NF4, double-quantized) [n, k] weight,
    rank-r adapters, a trainable magnitude near the rows' norms, an optional bias, a precomputed norm (what the
    eval cache passes) when weight_norm, and a seed when dropout_p > 0."""
    adapter_dtype = adapter_dtype or dtype
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    magnitude = weight.float().norm(dim=1).to(adapter_dtype) * (torch.rand(n, device=device, dtype=adapter_dtype) + 0.5)
    if quantized:
        weight = QuantizedWeight.quantize(weight, quant_type="nf4", blocksize=64, double_quant=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(x=torch.randn(m, k, device=device, dtype=dtype, requires_grad=requires_grad),
                **fourbit.op_args(weight),
                lora_a=torch.randn(r, k, device=device, dtype=adapter_dtype, requires_grad=requires_grad),
                lora_b=torch.randn(n, r, device=device, dtype=adapter_dtype, requires_grad=requires_grad),
                magnitude=magnitude.requires_grad_(requires_grad and keep_z),  # frozen: no z kept
                bias=torch.randn(n, device=device, dtype=dtype) if bias else None,
                weight_norm=torch.rand(n, device=device, dtype=acc) + 0.5 if weight_norm else None,
                scaling=0.5, dropout_p=dropout_p, seed=torch.tensor(42) if dropout_p > 0 else None, keep_z=keep_z)


def backward_args(fwd: dict, outputs, backend: str, *, dy: Optional[torch.Tensor] = None) -> dict:
    """Keyword arguments of dora_linear_bwd after dora_linear_fwd(**fwd) returned outputs = (y, z, s_down, n), every
    gradient asked for that the inputs allow (the magnitude's only where z was kept)."""
    _y, z, s_down, n = outputs
    x = fwd["x"].detach()
    if dy is None:
        dy = torch.randn(x.shape[0], fwd["out_features"], device=x.device, dtype=x.dtype)
    dense = not fwd["quant"]
    base = {k: fwd[k] for k in ("weight", "quant", "out_features", "blocksize", "weight_dtype")}
    return dict(dy=dy, x=x, **base, lora_a=fwd["lora_a"].detach(), lora_b=fwd["lora_b"].detach(),
                magnitude=fwd["magnitude"].detach(), n=n.detach(), s_down=s_down.detach(), z=z.detach(),
                scaling=fwd["scaling"], dropout_p=fwd["dropout_p"], seed=fwd["seed"], need_x=True,
                need_weight=dense, need_lora_a=True, need_lora_b=True, need_magnitude=fwd["keep_z"],
                need_bias=fwd["bias"] is not None, backend=backend)


def cases(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Named forward-argument sets covering the variants' branches: bias or not, dropout or not, dense or 4-bit, a
    trainable magnitude (z kept) or a frozen one, the norm computed or given."""
    return {
        "dense_bias": forward_args(device=device, dtype=dtype),
        "dense_dropout": forward_args(bias=False, dropout_p=0.3, device=device, dtype=dtype),
        "dense_cached_norm_frozen_magnitude": forward_args(weight_norm=True, keep_z=False, device=device,
                                                           dtype=dtype),
        "4bit_bias": forward_args(k=64, quantized=True, device=device, dtype=dtype),
        "4bit_dropout": forward_args(k=64, bias=False, dropout_p=0.3, quantized=True, device=device, dtype=dtype),
    }
