"""Representative arguments of the multi_lora_linear ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from. aot_calls / run_aot_call are
the ahead-of-time check's calls (scripts/aot/driver.py finds them here)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import use_backend
from ..quant import QuantizedWeight, fourbit
from .op import multi_lora_linear


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


# ---- the ahead-of-time compile check's calls ------------------------------------------------------------------
# Ranks that differ (the largest sets the tiles; 8 and 4 are off 16) with bias and dropout at full tiles; a decode
# shape (few rows per adapter: the small row tiles); the 32-wide rank tiles of the shrink and grad kernels.
_AOT_MAX = dict(M=256, ranks=(64, 8, 16), bias=True, p=0.1)
_AOT_DECODE = dict(M=24, ranks=(16, 16, 4, 16), bias=False, p=0.0)
_AOT_MID = dict(M=256, ranks=(32, 4), bias=False, p=0.1)


def aot_calls(setting: dict, *, full: bool, peft_default: bool) -> list[dict]:
    """The ahead-of-time check's multi_lora_linear calls in one dtype setting (setting: act_dtype, param_dtype,
    tf32, index): run_aot_call's arguments, the same in every setting. full: three rank sets x (no bias, no
    dropout | bias, dropout), and the decode shape."""
    if full:
        calls = [dict(M=256, ranks=ranks, bias=bias, p=p) for ranks in ((64, 8, 16), (16, 16), (32, 4))
                 for bias, p in ((False, 0.0), (True, 0.1))]
        return calls + [dict(_AOT_DECODE)]
    return [dict(_AOT_MAX), dict(_AOT_DECODE), dict(_AOT_MID)]


def _rnd(*shape, dtype, grad=False):
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def run_aot_call(call: dict, act_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One aot_calls() call, forward and backward through multi_lora_linear on the Triton backend (x [M, 256], a
    dense [384, 256] base, one adapter per rank, row ids drawn over the adapters and -1)."""
    M, ranks, bias, p, K, N = call["M"], call["ranks"], call["bias"], call["p"], 256, 384
    x, w = _rnd(M, K, dtype=act_dtype, grad=True), _rnd(N, K, dtype=act_dtype)
    a = [_rnd(r, K, dtype=param_dtype, grad=True) for r in ranks]
    b = [_rnd(N, r, dtype=param_dtype, grad=True) for r in ranks]
    bb = _rnd(N, dtype=act_dtype) if bias else None
    ids = torch.randint(-1, len(ranks), (M,), generator=torch.Generator().manual_seed(M))
    with use_backend("triton"):
        y = multi_lora_linear(x, w, a, b, ids, scalings=[0.5] * len(ranks), bias=bb, dropout_p=p, seed=3)
        y.float().sum().backward()
