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

from .. import _backend
from ..reference import activations as act
from ..reference import adapter as ref
from ..reference.lora import acc_dtype
from . import _checks
from ._autocast import register_autocast


def _code(activation: str) -> int:
    return act.CODES[activation]


def _triton_fits(k: int) -> bool:
    from peftkern.kernels.adapter import MAX_K
    return k <= MAX_K


def _impl(h: Tensor, k: int) -> str:
    """"triton" or "reference" for this call. The forward's choice is also its backward's (setup_context
    records it), so a `use_backend` block around the forward alone still decides both."""
    backend = _backend.select("bottleneck_adapter", h.device, h.dtype)
    if backend == "triton" and not _triton_fits(k):
        if _backend.requested_backend() == "triton":
            from peftkern.kernels.adapter import MAX_K
            raise RuntimeError(f"backend 'triton' supports bottleneck widths up to {MAX_K}, got w_down with "
                               f"{k} rows; use backend 'auto' or 'reference'")
        return "reference"  # auto: the composite path serves wide bottlenecks
    return backend


@torch.library.custom_op("peftkern::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd(h: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                           residual: Optional[Tensor], activation: str, scaling: float) -> tuple[Tensor, Tensor]:
    if _impl(h, w_down.shape[0]) == "triton":
        return _backend.kernels("adapter").adapter_fwd(h, w_down, b_down, w_up, b_up, residual, _code(activation),
                                                       scaling)
    return ref.adapter_fwd(h, w_down, b_down, w_up, b_up, residual, _code(activation), scaling)


@bottleneck_adapter_fwd.register_fake
def _(h, w_down, b_down, w_up, b_up, residual, activation, scaling):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], w_down.shape[0]), dtype=acc_dtype(h.dtype))


@torch.library.custom_op("peftkern::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd(dy: Tensor, h: Tensor, w_down: Tensor, w_up: Tensor, pre: Tensor, activation: str,
                           scaling: float, residual_is_h: bool, need_h: bool, need_wd: bool, need_bd: bool,
                           need_wu: bool, need_bu: bool, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dy = dy.contiguous()
    code = _code(activation)
    if impl != "triton":
        return ref.adapter_bwd(dy, h, w_down, w_up, pre, code, scaling, residual_is_h,
                               need_h, need_wd, need_bd, need_wu, need_bu)
    k, rank = _backend.kernels("adapter"), _backend.kernels("rank")
    dh, dpre, z = k.adapter_bwd_rows(dy, pre, w_up, w_down, code, scaling, need_dh=need_h, add_dy=residual_is_h,
                                     store_z=need_wu)
    # outputs must not alias one another (custom-op rule), so each unused one is its own empty tensor
    empties = [h.new_empty(0) for _ in range(5)]
    dh = dh if need_h else empties[0]
    dwd = (rank.rank_grad(dpre, h, scale=1.0, exact=w_down.dtype == torch.float32).to(w_down.dtype)
           if need_wd else empties[1])
    dbd = dpre.sum(dim=0).to(w_down.dtype) if need_bd else empties[2]
    dwu = (rank.rank_grad(z, dy, scale=scaling, exact=w_up.dtype == torch.float32).t().contiguous().to(w_up.dtype)
           if need_wu else empties[3])
    dbu = (dy.sum(dim=0, dtype=torch.float32) * scaling).to(w_up.dtype) if need_bu else empties[4]
    return dh, dwd, dbd, dwu, dbu


@bottleneck_adapter_bwd.register_fake
def _(dy, h, w_down, w_up, pre, activation, scaling, residual_is_h, need_h, need_wd, need_bd, need_wu, need_bu,
      impl):
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
    ctx.impl = _impl(h, w_down.shape[0])


def _backward(ctx, dy, _d_pre):
    h, w_down, w_up, pre = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, dwd, dbd, dwu, dbu = torch.ops.peftkern.bottleneck_adapter_bwd(
        dy, h, w_down, w_up, pre, ctx.activation, ctx.scaling, ctx.residual_is_h,
        need[0], need[1], need[2], need[3], need[4], ctx.impl)
    return (dh if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
            dwu if need[3] else None, dbu if need[4] else None, dy if need[5] else None, None, None)


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
