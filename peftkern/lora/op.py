"""peftkern.lora_linear: the two custom ops (forward, backward) with their fakes, and the public function.

One op pair serves a dense base weight and a 4-bit one (peftkern.QuantizedWeight): the base travels as the five
arguments of peftkern/quant/fourbit.py. The forward also returns S = dropout(x)·Aᵀ ([M, r], fp32), the only activation
LoRA keeps beyond what the base linear keeps; the dropout mask is regenerated from the seed (a CPU int64 tensor, so
that a fresh seed per step does not recompile a compiled graph).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..core import checks, dispatch, rules
from ..core.opdef import Op, grad_slot, wire_autograd
from ..quant import QuantizedWeight, fourbit

FAMILY = "lora_linear"

_BASE = fourbit.SCHEMA
_ADAPTER = "Tensor lora_a, Tensor lora_b"
_DROPOUT = "float scaling, float dropout_p, Tensor? seed"


def _key(a) -> tuple:
    """What decides which variant is faster (core/dispatch.py)."""
    flags = tuple(getattr(a, n) for n in a._fields if n.startswith("need_"))
    return (dispatch.token_bucket(a.x.shape[0]), a.out_features, a.x.shape[1], a.lora_a.shape[0], a.x.dtype,
            a.lora_a.dtype, getattr(a, "bias", None) is not None, a.dropout_p > 0.0,
            dispatch.layout(a.x, a.weight if isinstance(a.weight, Tensor) else None), a.blocksize, *flags)


def prepare(a):
    """The variants' view of the arguments: the base weight resolved (a tensor or a checked fourbit.FourBit), the
    seed as an int, dy contiguous."""
    a = a._replace(weight=fourbit.resolve(a, a.x.shape[1]), seed=int(a.seed.item()) if a.seed is not None else 0)
    return a._replace(dy=a.dy.contiguous()) if "dy" in a._fields else a


forward_op = Op(f"lora_linear_fwd(Tensor x, {_BASE}, {_ADAPTER}, Tensor? bias, {_DROPOUT}) "
                "-> (Tensor y, Tensor s_down)",
                family=FAMILY, key=_key, prepare=prepare, autocast_keep=("quant",),
                fake=lambda a: (a.x.new_empty((a.x.shape[0], a.out_features)),
                                a.x.new_empty((a.x.shape[0], a.lora_a.shape[0]), dtype=rules.acc_dtype(a.x.dtype))))

backward_op = Op(f"lora_linear_bwd(Tensor dy, Tensor x, {_BASE}, {_ADAPTER}, Tensor s_down, {_DROPOUT}, bool need_x, "
                 "bool need_weight, bool need_lora_a, bool need_lora_b, bool need_bias, str backend) -> "
                 "(Tensor dx, Tensor dweight, Tensor dlora_a, Tensor dlora_b, Tensor dbias)",
                 family=FAMILY, phase="backward", key=_key, prepare=prepare,
                 fake=lambda a: (grad_slot(a.need_x, a.x, a.x.shape, a.x),
                                 grad_slot(a.need_weight and not a.quant, a.x, a.weight.shape, a.x),
                                 grad_slot(a.need_lora_a, a.lora_a, a.lora_a.shape, a.x),
                                 grad_slot(a.need_lora_b, a.lora_b, a.lora_b.shape, a.x),
                                 grad_slot(a.need_bias, a.x, (a.out_features,), a.x)))
wire_autograd(forward_op, backward_op)


# ---- the public function --------------------------------------------------------------------------

def check_tensors(x, weight, lora_a, lora_b, bias) -> None:
    """lora_linear's tensor checks, for a dense weight or a QuantizedWeight (whose dequantized weight takes x's
    dtype, so its own dtype is free; bias follows x, adapters the adapter rule)."""
    if isinstance(weight, QuantizedWeight):
        checks.lora_tensors(x, weight.shape, f"the QuantizedWeight stands for a [out, in] = {tuple(weight.shape)} "
                            "weight", lora_a, lora_b, bias)
        if weight.device != x.device:
            raise RuntimeError(f"weight (a QuantizedWeight) is on {weight.device} but x is on {x.device}; "
                               f"move them to one device (QuantizedWeight.to(device))")
        checks.same_device("x", x, lora_a=lora_a, lora_b=lora_b, bias=bias)
        checks.input_dtypes("x", x, frozen=dict(bias=bias), adapters=dict(lora_a=lora_a, lora_b=lora_b))
        return
    checks.tensor("weight", weight, ndim=2)
    checks.lora_tensors(x, weight.shape, f"weight is {tuple(weight.shape)} = [out, in]", lora_a, lora_b, bias)
    checks.same_device("x", x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    checks.input_dtypes("x", x, frozen=dict(weight=weight, bias=bias), adapters=dict(lora_a=lora_a, lora_b=lora_b))


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, *, scaling: float = 1.0,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                seed: Optional[int] = None) -> Tensor:
    """LoRA linear layer, fused:  y = x·weightᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ.

    Args:
        x: [..., in_features], any number of leading dims (the result keeps them), any strides.
        weight: [out_features, in_features], the frozen base weight (PyTorch's layout, as in F.linear), or a
            peftkern.QuantizedWeight standing for one (QLoRA: bitsandbytes' 4-bit format, dequantized in x's
            dtype a block at a time, never whole; it gets no gradient).
        lora_a: [r, in_features] (PEFT's lora_A.weight), r >= 1, any r.
        lora_b: [out_features, r] (PEFT's lora_B.weight).
        scaling: finite real number multiplying the rank-r term (PEFT's alpha / r).
        bias: [out_features] or None.
        dropout_p: real number in [0, 1). Dropout applies to the LoRA branch only, and only when
            `training` is True and dropout_p > 0; kept elements are scaled by 1 / (1 - dropout_p).
        training: bool; False turns dropout off.
        seed: int in [0, 2**63), or None to draw one from torch's default generator (so torch.manual_seed
            makes runs reproducible). The mask is a function of the seed and of x's shape only: the same
            seed and inputs give the same result bit for bit, on every backend. The mask is regenerated in
            backward, never stored.

    Returns:
        [..., out_features] in x's dtype. Gradients reach every input that requires grad (usually lora_a and
        lora_b; x, weight and bias too when they require it); backward uses no atomics, so repeated runs
        give identical gradients.

    Dtypes: float32, float16, bfloat16 on GPU; float32 and float64 on CPU (float16 and bfloat16 run there too
    on the reference backend). Outside torch.autocast, x, weight and bias share one dtype; lora_a and lora_b
    have it too, or are float32 beside a float16/bfloat16 x (PEFT's default): the rank-r term is then
    computed in float32 and added to the base result before one rounding to x's dtype, and their gradients
    come back in float32. Inside torch.autocast every floating input is cast to the autocast dtype, as
    F.linear's are, and so is the result.

    Raises (before any work; nothing is modified):
        ValueError: a shape that does not match (naming the argument, the expected and the received shape),
            r = 0, a non-finite scaling, dropout_p outside [0, 1), seed outside [0, 2**63).
        TypeError: a non-tensor or non-floating tensor, a dtype outside the rule above, a non-real scaling
            or dropout_p, a non-bool training, a non-int seed.
        RuntimeError: tensors on different devices, or a backend (peftkern.use_backend / PEFTKERN_BACKEND)
            that cannot run this call (saying why).
    """
    check_tensors(x, weight, lora_a, lora_b, bias)
    scaling, dropout_p, seed = checks.scalars(scaling, dropout_p, training, seed)
    p, seed_t = checks.dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    # an explicit row count: reshape(-1, 0) is ambiguous when in_features is 0 (which F.linear allows)
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    y, _ = forward_op(x=x2, **fourbit.op_args(weight), lora_a=lora_a, lora_b=lora_b, bias=bias,
                      scaling=float(scaling), dropout_p=p, seed=seed_t)
    return y.view(*lead, weight.shape[0])
