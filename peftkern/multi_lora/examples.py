"""Representative arguments of the multi_lora_linear ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..quant import QuantizedWeight, fourbit


def forward_args(*, m: int = 10, k: int = 12, n: int = 9, ranks: Sequence[int] = (3, 1, 5), bias: bool = True,
                 dropout_p: float = 0.0, quantized: bool = False, device="cpu", dtype: torch.dtype = torch.float32,
                 adapter_dtype: Optional[torch.dtype] = None, requires_grad: bool = True) -> dict:
    """Keyword arguments of multi_lora_linear_fwd: random x [m, k], a dense (or NF4, double-quantized) [n, k] weight,
    one adapter per rank in `ranks`, row ids cycling over every adapter and -1 (rows with no adapter), an optional
    bias, a scaling per adapter, and a seed when dropout_p > 0."""
    adapter_dtype = adapter_dtype or dtype
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    if quantized:
        weight = QuantizedWeight.quantize(weight, quant_type="nf4", blocksize=64, double_quant=True)

    def adapter(*shape):
        return torch.randn(*shape, device=device, dtype=adapter_dtype).requires_grad_(requires_grad)

    row_ids = torch.arange(m, device=device) % (len(ranks) + 1) - 1  # -1, 0, 1, ..., n - 1, -1, 0, ...
    return dict(x=torch.randn(m, k, device=device, dtype=dtype, requires_grad=requires_grad),
                **fourbit.op_args(weight),
                lora_a=[adapter(r, k) for r in ranks], lora_b=[adapter(n, r) for r in ranks], row_ids=row_ids,
                bias=torch.randn(n, device=device, dtype=dtype) if bias else None,
                scalings=[0.5 + i for i in range(len(ranks))], dropout_p=dropout_p,
                seed=torch.tensor(42) if dropout_p > 0 else None)


def backward_args(fwd: dict, s_down: torch.Tensor, backend: str, *, dy: Optional[torch.Tensor] = None,
                  need_lora_a: Optional[list] = None, need_lora_b: Optional[list] = None) -> dict:
    """Keyword arguments of multi_lora_linear_bwd after multi_lora_linear_fwd(**fwd) returned (y, s_down): every
    gradient asked for that the inputs allow, unless need_lora_a / need_lora_b say per adapter."""
    x = fwd["x"].detach()
    if dy is None:
        dy = torch.randn(x.shape[0], fwd["out_features"], device=x.device, dtype=x.dtype)
    n = len(fwd["lora_a"])
    base = {name: fwd[name] for name in ("weight", "quant", "out_features", "blocksize", "weight_dtype")}
    return dict(dy=dy, x=x, **base, lora_a=[t.detach() for t in fwd["lora_a"]],
                lora_b=[t.detach() for t in fwd["lora_b"]], row_ids=fwd["row_ids"], s_down=s_down.detach(),
                scalings=fwd["scalings"], dropout_p=fwd["dropout_p"], seed=fwd["seed"], need_x=True,
                need_weight=not fwd["quant"], need_lora_a=need_lora_a or [True] * n,
                need_lora_b=need_lora_b or [True] * n, need_bias=fwd["bias"] is not None, backend=backend)


def cases(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Named forward-argument sets covering the variants' branches: dense or 4-bit, bias or not, dropout or not,
    ranks that differ, rows with no adapter, an adapter no row uses."""
    return {
        "dense_bias": forward_args(device=device, dtype=dtype),
        "dense_dropout": forward_args(bias=False, dropout_p=0.3, device=device, dtype=dtype),
        "dense_unused_adapter": forward_args(m=3, ranks=(2, 4, 3), device=device, dtype=dtype),  # ids -1, 0, 1
        "4bit_bias": forward_args(k=64, quantized=True, device=device, dtype=dtype),
        "4bit_dropout": forward_args(k=64, bias=False, dropout_p=0.3, quantized=True, device=device, dtype=dtype),
    }
