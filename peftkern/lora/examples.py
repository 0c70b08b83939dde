"""Representative arguments of the lora_linear ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from. aot_calls / run_aot_call are
the ahead-of-time check's calls (scripts/aot/driver.py finds them here), over dense and 4-bit bases."""
from __future__ import annotations

from typing import Optional

import torch

from .. import use_backend
from ..quant import QuantizedWeight, fourbit
from .op import lora_linear


def forward_args(*, m: int = 10, k: int = 12, n: int = 9, r: int = 3, bias: bool = True, dropout_p: float = 0.0,
                 quantized: bool = False, device="cpu", dtype: torch.dtype = torch.float32,
                 adapter_dtype: Optional[torch.dtype] = None, requires_grad: bool = True) -> dict:
    """Keyword arguments of lora_linear_fwd: random x [m, k], a dense (or NF4, double-quantized) [n, k] weight,
    rank-r adapters, an optional bias, and a seed when dropout_p > 0."""
    adapter_dtype = adapter_dtype or dtype
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    if quantized:
        weight = QuantizedWeight.quantize(weight, quant_type="nf4", blocksize=64, double_quant=True)
    return dict(x=torch.randn(m, k, device=device, dtype=dtype, requires_grad=requires_grad),
                **fourbit.op_args(weight),
                lora_a=torch.randn(r, k, device=device, dtype=adapter_dtype, requires_grad=requires_grad),
                lora_b=torch.randn(n, r, device=device, dtype=adapter_dtype, requires_grad=requires_grad),
                bias=torch.randn(n, device=device, dtype=dtype) if bias else None,
                scaling=0.5, dropout_p=dropout_p, seed=torch.tensor(42) if dropout_p > 0 else None)


def backward_args(fwd: dict, s_down: torch.Tensor, backend: str, *, dy: Optional[torch.Tensor] = None) -> dict:
    """Keyword arguments of lora_linear_bwd after lora_linear_fwd(**fwd) returned (y, s_down), every gradient
    asked for that the inputs allow."""
    x = fwd["x"].detach()
    if dy is None:
        dy = torch.randn(x.shape[0], fwd["out_features"], device=x.device, dtype=x.dtype)
    dense = not fwd["quant"]
    base = {n: fwd[n] for n in ("weight", "quant", "out_features", "blocksize", "weight_dtype")}
    return dict(dy=dy, x=x, **base, lora_a=fwd["lora_a"].detach(), lora_b=fwd["lora_b"].detach(),
                s_down=s_down.detach(), scaling=fwd["scaling"], dropout_p=fwd["dropout_p"], seed=fwd["seed"],
                need_x=True, need_weight=dense, need_lora_a=True, need_lora_b=True, need_bias=fwd["bias"] is not None,
                backend=backend)


def cases(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Named forward-argument sets covering the variants' branches: bias or not, dropout or not, dense or 4-bit."""
    return {
        "dense_bias": forward_args(device=device, dtype=dtype),
        "dense_dropout": forward_args(bias=False, dropout_p=0.3, device=device, dtype=dtype),
        "4bit_bias": forward_args(k=64, quantized=True, device=device, dtype=dtype),
        "4bit_dropout": forward_args(k=64, bias=False, dropout_p=0.3, quantized=True, device=device, dtype=dtype),
    }


# ---- the ahead-of-time compile check's calls ------------------------------------------------------------------
# Dense base: the worst case (bias, dropout, rank 64: the largest rank tiles, aligned sizes), PEFT's common case (no
# bias, no dropout, rank 8, a token count and B's row stride off Triton's %16 specialization), and rank 32
# (rank_down's middle tile).
_AOT_MAX = dict(M=256, r=64, bias=True, p=0.1)
_AOT_COMMON = dict(M=250, r=8, bias=False, p=0.0)
_AOT_MID = dict(M=256, r=32, bias=True, p=0.1)
# 4-bit base (`wq` is the weight's dtype before quantization, BLOCKSIZE a constexpr of the kernel): the worst case
# (bias, dropout, double-quantized absmax resolved on chip) with the weight in the activations' dtype, and in PEFT's
# default setting the common case (no bias, no dropout, a token count off %16, block 128, a float32 absmax) over an
# fp32 weight as well.
_AOT_4BIT_MAX = dict(M=256, r=16, bias=True, p=0.1)
_AOT_4BIT_COMMON = dict(M=250, r=16, bias=False, p=0.0, blocksize=128, dq=False)


def aot_calls(setting: dict, *, full: bool, peft_default: bool) -> list[dict]:
    """The ahead-of-time check's lora_linear calls in one dtype setting (setting: act_dtype, param_dtype, tf32,
    index): run_aot_call's arguments, a 4-bit base where `wq` is given. full: every bias x dropout x rank over a
    dense base, and bias x dropout x (block 64 double-quantized, block 128 not) over 4-bit weights quantized from
    the activations' dtype and from fp32."""
    act = setting["act_dtype"]
    if full:
        calls = [dict(M=250 if r == 8 else 256, r=r, bias=bias, p=p)
                 for bias in (False, True) for p in (0.0, 0.1) for r in (8, 16, 32, 64)]
        return calls + [dict(wq=wq, M=256, r=16, bias=bias, p=p, blocksize=blocksize, dq=dq)
                        for wq in sorted({act, "float32"}) for bias, p in ((False, 0.0), (True, 0.1))
                        for blocksize, dq in ((64, True), (128, False))]
    calls = [dict(_AOT_MAX), dict(wq=act, **_AOT_4BIT_MAX)]
    if peft_default:
        calls += [dict(wq=act, **_AOT_4BIT_COMMON), dict(wq="float32", **_AOT_4BIT_COMMON), dict(_AOT_COMMON),
                  dict(_AOT_MID)]
    return calls


def _rnd(*shape, dtype, grad=False):
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def run_aot_call(call: dict, act_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One aot_calls() call, forward and backward through lora_linear on the Triton backend (x [M, 256], a
    [384, 256] base; float16 activations also launch the Hopper persistent kernel directly)."""
    M, r, bias, p, K, N = call["M"], call["r"], call["bias"], call["p"], 256, 384
    x = _rnd(M, K, dtype=act_dtype, grad=True)
    if "wq" in call:
        w = QuantizedWeight.quantize(_rnd(N, K, dtype=getattr(torch, call["wq"])),
                                     blocksize=call.get("blocksize", 64), double_quant=call.get("dq", True))
    else:
        w = _rnd(N, K, dtype=act_dtype)
    a, b = _rnd(r, K, dtype=param_dtype, grad=True), _rnd(N, r, dtype=param_dtype, grad=True)
    bb = _rnd(N, dtype=act_dtype) if bias else None
    if "wq" not in call and act_dtype != torch.float32:
        _launch_persistent(x, w, a, b, bb, p, M)
    with use_backend("triton"):
        lora_linear(x, w, a, b, scaling=0.5, bias=bb, dropout_p=p, seed=3).float().sum().backward()


def _launch_persistent(x, w, a, b, bb, p, M):
    """The Hopper kernel's launches (its forward and dx GEMMs), with the launch configuration's SM count: on CPU
    tensors dispatch never picks it, so the check launches it itself."""
    from ..kernels import _launch, lora_persistent as lp
    N, K = w.shape
    s, ds = _rnd(M, a.shape[0], dtype=torch.float32), _rnd(M, a.shape[0], dtype=torch.float32)
    y, dx = torch.empty(M, N, dtype=x.dtype), torch.empty(M, K, dtype=x.dtype)
    sms = _launch.num_sms(x.device)
    lp.launch(x.detach(), w.t(), s, b.detach().t(), bb, y, lora_scale=0.5, seed=3, dropout_p=0.0,
              num_sms=sms)  # forward: B = Wᵀ (a transposed view)
    lp.launch(y, w, ds, a.detach(), None, dx, lora_scale=1.0, seed=3, dropout_p=p, num_sms=sms)  # dx
