"""peftkern.bottleneck_adapter: the two custom ops (forward, backward) with their fakes, and the public function.

peftkern::bottleneck_adapter_fwd returns (out, pre) where pre = h·W_downᵀ + b_down ([M, k], fp32) is the one
activation kept for backward; peftkern::bottleneck_adapter_bwd turns dout into the gradients of h, the adapter
weights and biases.
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..core import checks as _checks, dispatch, rules
from ..core.opdef import Op, grad_slot, wire_autograd

FAMILY = "bottleneck_adapter"


def _key(a) -> tuple:
    """What decides whether the fused or the composite variant is faster (core/dispatch.py)."""
    present = tuple(getattr(a, n, None) is not None for n in ("b_down", "b_up", "residual"))
    flags = tuple(getattr(a, n) for n in a._fields if n.startswith("need_") or n == "residual_is_h")
    return (dispatch.token_bucket(a.h.shape[0]), *a.w_down.shape, a.h.dtype, a.w_down.dtype, a.activation,
            dispatch.layout(a.h, a.w_down, a.w_up), *present, *flags)


def _prepare(a):
    return a._replace(dout=a.dout.contiguous()) if "dout" in a._fields else a


_WEIGHTS = "Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up"

forward_op = Op(f"bottleneck_adapter_fwd({_WEIGHTS}, Tensor? residual, str activation, float scaling) "
                "-> (Tensor out, Tensor pre)",
                family=FAMILY, key=_key, device_arg="h", autocast_keep=(),
                fake=lambda a: (a.h.new_empty(a.h.shape),
                                a.h.new_empty((a.h.shape[0], a.w_down.shape[0]), dtype=rules.acc_dtype(a.h.dtype))))

backward_op = Op("bottleneck_adapter_bwd(Tensor dout, Tensor h, Tensor w_down, Tensor w_up, Tensor pre, "
                 "str activation, float scaling, bool residual_is_h, bool need_h, bool need_w_down, bool need_b_down, "
                 "bool need_w_up, bool need_b_up, str backend) "
                 "-> (Tensor dh, Tensor dw_down, Tensor db_down, Tensor dw_up, Tensor db_up)",
                 family=FAMILY, phase="backward", key=_key, prepare=_prepare, device_arg="h",
                 fake=lambda a: (grad_slot(a.need_h, a.h, a.h.shape, a.h),
                                 grad_slot(a.need_w_down, a.w_down, a.w_down.shape, a.h),
                                 grad_slot(a.need_b_down, a.w_down, (a.w_down.shape[0],), a.h),
                                 grad_slot(a.need_w_up, a.w_up, a.w_up.shape, a.h),
                                 grad_slot(a.need_b_up, a.w_up, (a.w_up.shape[0],), a.h)))
# pre = h·W_downᵀ + b_down is the one activation kept for backward; without a residual, h is the residual (its
# gradient then includes dout); the residual's own gradient is dout itself, handed to autograd without a copy
wire_autograd(forward_op, backward_op, derived={"residual_is_h": lambda a: a.residual is None},
              passthrough={"residual": "out"})


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
    if not isinstance(activation, str) or activation not in rules.ACTIVATION_CODES:
        names = ", ".join(repr(n) for n in rules.ACTIVATION_NAMES)
        raise ValueError(f"activation must be one of {names}; got {activation!r}")
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
    out, _ = forward_op(h=h2, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, residual=res2,
                        activation=activation, scaling=float(scaling))
    return out.view(*lead, d)
