"""peftkern.bottleneck_adapter: input checks -> custom ops (forward, backward) -> fakes -> autograd -> kernels.

peftkern::bottleneck_adapter_fwd returns (out, pre) where pre = h·W_downᵀ + b_down ([M, k], fp32) is
the one activation kept for backward; peftkern::bottleneck_adapter_bwd turns dy into the gradients of
h, the adapter weights and biases. The residual's gradient is dy itself, handed out by the autograd
formula without a copy.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch
from ..core.rules import acc_dtype
from ..reference import activations as act
from . import _autograd
from ._autocast import register_autocast


def _code(activation: str) -> int:
    return act.CODES[activation]


def _key(h: Tensor, w_down: Tensor, w_up: Tensor, code: int, *flags) -> tuple:
    """What decides whether the fused or the composite variant is faster (peftkern.core.dispatch)."""
    return (dispatch.token_bucket(h.shape[0]), *w_down.shape, h.dtype, w_down.dtype, code,
            dispatch.layout(h, w_down, w_up), *flags)


@torch.library.custom_op("peftkern::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                           residual: Optional[Tensor], activation: str, scaling: float) -> tuple[Tensor, Tensor]:
    backend = _backend.select("bottleneck_adapter", h.device, h.dtype)
    code = _code(activation)
    return dispatch.call("bottleneck_adapter", "forward", backend,
                         lambda: _key(h, w_down, w_up, code, b_down is not None, b_up is not None,
                                      residual is not None),
                         h, w_down, b_down, w_up, b_up, residual, code, scaling)


@bottleneck_adapter_fwd.register_fake
def _(h, w_down, b_down, w_up, b_up, residual, activation, scaling):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], w_down.shape[0]), dtype=acc_dtype(h.dtype))


@torch.library.custom_op("peftkern::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd(dy: Tensor, h: Tensor, w_down: Tensor, w_up: Tensor, pre: Tensor, activation: str,
                           scaling: float, residual_is_h: bool, need_h: bool, need_wd: bool, need_bd: bool,
                           need_wu: bool, need_bu: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dy = dy.contiguous()
    code = _code(activation)
    needs = (need_h, need_wd, need_bd, need_wu, need_bu)
    return dispatch.call("bottleneck_adapter", "backward", backend,
                         lambda: _key(h, w_down, w_up, code, residual_is_h, *needs),
                         dy, h, w_down, w_up, pre, code, scaling, residual_is_h, *needs)


@bottleneck_adapter_bwd.register_fake
def _(dy, h, w_down, w_up, pre, activation, scaling, residual_is_h, need_h, need_wd, need_bd, need_wu, need_bu,
      backend):
    return (h.new_empty(h.shape if need_h else (0,)),
            w_down.new_empty(w_down.shape if need_wd else (0,)),
            w_down.new_empty((w_down.shape[0],) if need_bd else (0,)),
            w_up.new_empty(w_up.shape if need_wu else (0,)),
            w_up.new_empty((w_up.shape[0],) if need_bu else (0,)))


def _setup_context(ctx, inputs, output):
    h, w_down, b_down, w_up, b_up, residual, activation, scaling = inputs
    ctx.save_for_backward(h, w_down, w_up, output[1])
    ctx.activation, ctx.scaling = activation, scaling
    ctx.residual_is_h = residual is None
    # the backend that ran the forward runs the backward (see peftkern/ops/lora.py)
    ctx.backend = _backend.select("bottleneck_adapter", h.device, h.dtype)


def _backward(ctx, dy, _d_pre):
    h, w_down, w_up, pre = ctx.saved_tensors
    dh, dwd, dbd, dwu, dbu = torch.ops.peftkern.bottleneck_adapter_bwd(
        dy, h, w_down, w_up, pre, ctx.activation, ctx.scaling, ctx.residual_is_h, *ctx.needs_input_grad[:5],
        ctx.backend)
    # the residual's gradient is dy itself
    return _autograd.grads_or_none(ctx, (dh, dwd, dbd, dwu, dbu, dy))


bottleneck_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("bottleneck_adapter_fwd", torch.ops.peftkern.bottleneck_adapter_fwd.default)


def _check(h, w_down, b_down, w_up, b_up, activation, scaling, residual):
    _checks.tensor("h", h, min_ndim=1)
    _checks.tensor("w_down", w_down, ndim=2)
    _checks.tensor("w_up", w_up, ndim=2)
    d = h.shape[-1]
    k = w_down.shape[0]
    if w_down.shape[1] != d:
        # h and the two weights each carry d; blame the one that disagrees with the other two
        if w_up.shape[0] == w_down.shape[1]:
            raise ValueError(f"h's last dim must equal the adapter's width d={w_down.shape[1]} (w_down is "
                             f"{tuple(w_down.shape)} = [k, d], w_up is {tuple(w_up.shape)} = [d, k]), got h of "
                             f"shape {tuple(h.shape)}")
        raise ValueError(f"w_down must have shape (k, {d}) = [bottleneck, h's last dim], got {tuple(w_down.shape)}")
    if k < 1:
        raise ValueError(f"w_down must have at least one row (bottleneck k >= 1), got {tuple(w_down.shape)}")
    _checks.shape("w_up", w_up, (d, k), "[d, k]: h's last dim by w_down's rows")
    if b_down is not None:
        _checks.tensor("b_down", b_down, ndim=1)
        _checks.shape("b_down", b_down, (k,), "[k]")
    if b_up is not None:
        _checks.tensor("b_up", b_up, ndim=1)
        _checks.shape("b_up", b_up, (d,), "[d]")
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, tuple(h.shape), "h's shape")
    _checks.same_device("h", h, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=residual)
    _checks.input_dtypes("h", h, frozen=dict(residual=residual), adapters=dict(w_down=w_down, w_up=w_up))
    if not _checks.autocast_active(h.device):  # each bias has its weight's dtype
        _checks.same_dtype("w_down", w_down, b_down=b_down)
        _checks.same_dtype("w_up", w_up, b_up=b_up)
    if not isinstance(activation, str) or activation not in act.CODES:
        raise ValueError(f"activation must be one of {', '.join(repr(n) for n in act.NAMES)}; got {activation!r}")
    _checks.real_number("scaling", scaling)


def bottleneck_adapter(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor], *,
                       activation: str = "relu", scaling: float = 1.0, residual: Optional[Tensor] = None) -> Tensor:
    """Bottleneck adapter, fused:  out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up).

    Args:
        h: [..., d], any number of leading dims (the result keeps them), any strides.
        w_down: [k, d], the down-projection (k >= 1, the bottleneck width).
        b_down: [k] or None.
        w_up: [d, k], the up-projection.
        b_up: [d] or None.
        activation: "relu", "gelu" (erf form), "gelu_tanh", "silu" (alias "swish"), "tanh" or "identity".
        scaling: finite real number multiplying the adapter's output.
        residual: h's shape and dtype, or None (then h itself is the residual).

    Returns:
        h's shape, in h's dtype. Gradients reach h, residual, the weights and the biases that require grad.

    Dtypes: float32, float16, bfloat16 on GPU; float32 and float64 on CPU. Outside torch.autocast, h and
    residual share one dtype; the weights have it too, or are float32 beside a float16/bfloat16 h (then the
    products run in float32 and their gradients come back in float32); each bias has its weight's dtype.
    Inside torch.autocast every floating input is cast to the autocast dtype, and so is the result.

    Raises (before any work; nothing is modified):
        ValueError: a shape that does not match (naming the argument, the expected and the received shape:
            h when its last dim disagrees with two consistent weights), k = 0, an unknown activation (listing
            the choices), a non-finite scaling.
        TypeError: a non-tensor or non-floating tensor, a dtype outside the rule above, a non-real scaling.
        RuntimeError: tensors on different devices, or a backend that cannot run this call (for example
            "triton" with a bottleneck wider than its kernel supports).
    """
    _check(h, w_down, b_down, w_up, b_up, activation, scaling, residual)
    lead, d = h.shape[:-1], h.shape[-1]
    # an explicit row count: reshape(-1, 0) is ambiguous when d is 0
    h2 = h.reshape(math.prod(lead), d)
    res2 = residual.reshape(math.prod(lead), d) if residual is not None else None
    out, _ = torch.ops.peftkern.bottleneck_adapter_fwd(h2, w_down, b_down, w_up, b_up, res2, activation,
                                                       float(scaling))
    return out.view(*lead, d)
