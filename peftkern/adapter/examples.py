"""Representative arguments of the bottleneck_adapter ops, named as the ops name them: the one source the op tests
(opcheck), the benchmarks and the ahead-of-time kernel check draw their inputs from. aot_calls / run_aot_call are
the ahead-of-time check's calls (scripts/aot/driver.py finds them here)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import use_backend
from . import activations
from .op import bottleneck_adapter


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


# ---- the ahead-of-time compile check's calls ------------------------------------------------------------------
# Activation, bottleneck k (its BLOCK_K and the launcher's tile shape), token count (aligned or not), and the flags
# that change a kernel: biases, an explicit residual, which inputs need grad. The first is the worst case (the
# heaviest activation at the largest 64-row tile, every flag adding work); the others rotate over the settings.
_AOT_VARIANTS = [
    dict(act="gelu", k=64, M=256),
    dict(act="gelu_tanh", k=256, M=250),
    dict(act="silu", k=128, M=256, biases=False, residual=True),
    dict(act="tanh", k=24, M=250, need_h=False),
    dict(act="relu", k=16, M=256, need_wu=False),
    dict(act="identity", k=32, M=250, residual=True),
]


def aot_activations() -> list[str]:
    """Each activation the kernels tell apart, once (an alias such as swish shares silu's code), in code order."""
    first = {}
    for name, code in activations.CODES.items():
        first.setdefault(code, name)
    return [first[code] for code in sorted(first)]


def aot_calls(setting: dict, *, full: bool, peft_default: bool) -> list[dict]:
    """The ahead-of-time check's bottleneck_adapter calls in one dtype setting (setting: act_dtype, param_dtype,
    tf32, index): run_aot_call's arguments, the worst case and one more variant (rotating with the setting's index,
    so that every activation, width and flag value is launched). full: every activation at every bottleneck width,
    and every variant."""
    if full:
        calls = [dict(act=act, k=k, M=256) for act in aot_activations() for k in (16, 24, 64, 128, 256)]
        return calls + [dict(v) for v in _AOT_VARIANTS]
    return [dict(_AOT_VARIANTS[0]), dict(_AOT_VARIANTS[1 + setting["index"] % (len(_AOT_VARIANTS) - 1)])]


def _rnd(*shape, dtype, grad=False):
    return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)


def run_aot_call(call: dict, act_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    """One aot_calls() call, forward and backward through bottleneck_adapter on the Triton backend (h [M, 256])."""
    M, k, d = call["M"], call["k"], 256
    need_wu = call.get("need_wu", True)
    h = _rnd(M, d, dtype=act_dtype, grad=call.get("need_h", True))
    wd, wu = _rnd(k, d, dtype=param_dtype, grad=True), _rnd(d, k, dtype=param_dtype, grad=need_wu)
    biases = call.get("biases", True)
    bd = _rnd(k, dtype=param_dtype, grad=True) if biases else None
    bu = _rnd(d, dtype=param_dtype, grad=need_wu) if biases else None
    res = _rnd(M, d, dtype=act_dtype, grad=True) if call.get("residual", False) else None
    with use_backend("triton"):
        out = bottleneck_adapter(h, wd, bd, wu, bu, activation=call["act"], scaling=0.5, residual=res)
        out.float().sum().backward()
