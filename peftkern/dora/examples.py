"""Representative arguments of the dora_linear ops, named as the ops name them: the one source the op tests
(opcheck) and the ahead-of-time kernel check draw their inputs from. aot_calls / run_aot_call are the
ahead-of-time check's calls (scripts/aot/driver.py finds them here)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import use_backend
from ..quant import QuantizedWeight, fourbit
from .op import dora_linear


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


# ---- the ahead-of-time compile check's calls ------------------------------------------------------------------
# The worst case (bias, dropout: the two-accumulator GEMMs, rank 64) and the no-dropout GEMM at a rank off 16 (its
# padded rank factors) in every setting; in PEFT's default setting the common case (no dropout, rank 16, an odd M)
# and a frozen magnitude (no z written).
_AOT_MAX = dict(M=256, r=64, bias=True, p=0.1)
_AOT_RANK8 = dict(M=250, r=8, bias=True, p=0.0)
_AOT_COMMON = dict(M=250, r=16, bias=False, p=0.0)
_AOT_FROZEN_MAGNITUDE = dict(M=256, r=16, bias=True, p=0.0, train_magnitude=False)


def aot_calls(setting: dict, *, full: bool, peft_default: bool) -> list[dict]:
    """The ahead-of-time check's dora_linear calls in one dtype setting (setting: act_dtype, param_dtype, tf32,
    index): run_aot_call's arguments. full: every bias x dropout x rank (8, 16, 64) x trainable magnitude."""
    if full:
        return [dict(M=250 if r == 8 else 256, r=r, bias=bias, p=p, train_magnitude=train_magnitude)
                for bias in (False, True) for p in (0.0, 0.1) for r in (8, 16, 64) for train_magnitude in (False, True)]
    calls = [dict(_AOT_MAX), dict(_AOT_RANK8)]
    if peft_default:
        calls += [dict(_AOT_COMMON), dict(_AOT_FROZEN_MAGNITUDE)]
    return calls


def _rnd(*shape, dtype, grad=False):
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def run_aot_call(call: dict, act_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One aot_calls() call, forward and backward through dora_linear on the Triton backend (x [M, 256], a dense
    [384, 256] base)."""
    M, r, bias, p, K, N = call["M"], call["r"], call["bias"], call["p"], 256, 384
    x, w = _rnd(M, K, dtype=act_dtype, grad=True), _rnd(N, K, dtype=act_dtype)
    a, b = _rnd(r, K, dtype=param_dtype, grad=True), _rnd(N, r, dtype=param_dtype, grad=True)
    magnitude = (_rnd(N, dtype=param_dtype).abs() + 1.0).requires_grad_(call.get("train_magnitude", True))
    bb = _rnd(N, dtype=act_dtype) if bias else None
    with use_backend("triton"):
        y = dora_linear(x, w, a, b, magnitude, scaling=0.5, bias=bb, dropout_p=p, seed=3)
        y.float().sum().backward()
