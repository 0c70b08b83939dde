"""peftkern.multi_lora_linear: the two custom ops (forward, backward) with their fakes, and the public function.

Many LoRA adapters over one frozen base in one call: row t of x uses adapter row_ids[t] (-1: none). One op pair serves a
dense base weight and a 4-bit one (peftkern.QuantizedWeight): the base travels as the five arguments of
peftkern/quant/fourbit.py. The ops take the adapters as lists (Tensor[] in the schema), so no copy or concatenation of
them is made per call, and return one gradient per adapter. The forward also returns S = dropout(x)·A_iᵀ per row ([M,
max rank], fp32, zero beyond a row's own rank), the activation backward needs, as lora_linear keeps. The ids are checked
inside the forward op, where the implementations use them (IndexError on CPU; an asynchronous device-side assert on a
GPU, see triton.validate_ids): that read of their minimum and maximum is the call's one host synchronisation on CPU, and
being inside the op keeps torch.compile's graph whole.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..core import checks, dispatch, rules
from ..core.opdef import Op, grad_slot, wire_autograd
from ..quant import QuantizedWeight, fourbit

FAMILY = "multi_lora_linear"
ID_DTYPES = (torch.int32, torch.int64)

_BASE = fourbit.SCHEMA
_ADAPTERS = "Tensor[] lora_a, Tensor[] lora_b, Tensor row_ids"
_DROPOUT = "float[] scalings, float dropout_p, Tensor? seed"


def _key(a) -> tuple:
    """What decides which variant is faster (core/dispatch.py)."""
    flags = tuple(any(v) if isinstance(v, (list, tuple)) else v for n, v in zip(a._fields, a) if n.startswith("need_"))
    return (dispatch.token_bucket(a.x.shape[0]), a.out_features, a.x.shape[1], len(a.lora_a),
            max(t.shape[0] for t in a.lora_a), a.x.dtype, a.lora_a[0].dtype, getattr(a, "bias", None) is not None,
            a.dropout_p > 0.0, dispatch.layout(a.x, a.weight), a.blocksize, *flags)


def prepare(a):
    """The variants' view of the arguments: the base weight resolved (a tensor or a checked fourbit.FourBit), the
    seed as an int, dy contiguous. The ids are checked by each variant, where it uses them."""
    a = a._replace(weight=fourbit.resolve(a, a.x.shape[1]), seed=int(a.seed.item()) if a.seed is not None else 0)
    return a._replace(dy=a.dy.contiguous()) if "dy" in a._fields else a


def _adapter_grads(flags, tensors):
    return [grad_slot(k, t, t.shape, t) for k, t in zip(flags, tensors)]


forward_op = Op(f"multi_lora_linear_fwd(Tensor x, {_BASE}, {_ADAPTERS}, Tensor? bias, {_DROPOUT}) "
                "-> (Tensor y, Tensor s_down)",
                family=FAMILY, key=_key, prepare=prepare, autocast_keep=("quant",),
                fake=lambda a: (a.x.new_empty((a.x.shape[0], a.out_features)),
                                a.x.new_empty((a.x.shape[0], max(t.shape[0] for t in a.lora_a)),
                                              dtype=rules.acc_dtype(a.x.dtype))))

backward_op = Op(f"multi_lora_linear_bwd(Tensor dy, Tensor x, {_BASE}, {_ADAPTERS}, Tensor s_down, {_DROPOUT}, "
                 "bool need_x, bool need_weight, bool[] need_lora_a, bool[] need_lora_b, bool need_bias, str backend) "
                 "-> (Tensor dx, Tensor dweight, Tensor[] dlora_a, Tensor[] dlora_b, Tensor dbias)",
                 family=FAMILY, phase="backward", key=_key, prepare=prepare,
                 fake=lambda a: (grad_slot(a.need_x, a.x, a.x.shape, a.x),
                                 grad_slot(a.need_weight and not a.quant, a.x, a.weight.shape, a.x),
                                 _adapter_grads(a.need_lora_a, a.lora_a),
                                 _adapter_grads(a.need_lora_b, a.lora_b),
                                 grad_slot(a.need_bias, a.x, (a.out_features,), a.x)))
wire_autograd(forward_op, backward_op)


# ---- the public function --------------------------------------------------------------------------

def _adapter_list(name: str, value) -> list:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors (one per adapter), got {type(value).__name__}")
    return list(value)


def _check(x, weight, lora_a, lora_b, adapter_ids, bias, scalings):
    quantized = isinstance(weight, QuantizedWeight)
    if not quantized:
        checks.tensor("weight", weight, ndim=2)
    checks.tensor("x", x, min_ndim=1)
    if bias is not None:
        checks.tensor("bias", bias, ndim=1)
        checks.shape("bias", bias, (weight.shape[0],), "[out_features]")
    if x.shape[-1] != weight.shape[1]:
        what = "the QuantizedWeight stands for a [out, in] = " if quantized else "weight is [out, in] = "
        raise ValueError(f"x's last dim must equal weight's in_features {weight.shape[1]} ({what}"
                         f"{tuple(weight.shape)}), got x of shape {tuple(x.shape)}")
    if len(lora_a) == 0:
        raise ValueError("lora_a must hold at least one adapter, got an empty sequence")
    if len(lora_b) != len(lora_a):
        raise ValueError(f"lora_b must hold one tensor per adapter ({len(lora_a)}, as lora_a), got {len(lora_b)}")
    scalings = _adapter_scalings(scalings, len(lora_a))
    out_features, in_features = weight.shape
    first = lora_a[0]
    dtype, device = (first.dtype, first.device) if isinstance(first, Tensor) else (None, None)
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        # one cheap test per adapter (a decode step may pass dozens), the detailed checks only on failure; the
        # adapters' common device is compared with x's once, below
        try:
            sa, sb = a.shape, b.shape
            ok = (len(sa) == 2 and len(sb) == 2 and sa[1] == in_features and sb[0] == out_features
                  and sb[1] == sa[0] >= 1 and a.dtype is dtype and b.dtype is dtype
                  and a.device == device and b.device == device)
        except AttributeError:  # not a tensor
            ok = False
        if not ok:
            _explain_adapter(x, weight, lora_a, i, a, b)
    checks.tensor("lora_a[0]", first, ndim=2)  # a floating dtype, shared by every adapter (tested above)
    checks.same_device("x", x, **{"lora_a[0]": first})
    if quantized:
        if weight.device != x.device:
            raise RuntimeError(f"weight (a QuantizedWeight) is on {weight.device} but x is on {x.device}; "
                               f"move them to one device (QuantizedWeight.to(device))")
        checks.same_device("x", x, bias=bias)
    else:
        checks.same_device("x", x, weight=weight, bias=bias)
    # a 4-bit weight is dequantized into x's dtype: only the bias must match x
    checks.input_dtypes("x", x, frozen=dict(bias=bias) if quantized else dict(weight=weight, bias=bias),
                         adapters={"lora_a[0]": lora_a[0], "lora_b[0]": lora_b[0]})
    _check_ids(x, adapter_ids)
    return scalings


def _explain_adapter(x, weight, lora_a, i, a, b) -> None:
    """Raise the error that says what is wrong with adapter i (lora_linear's checks, naming lora_a[i] / lora_b[i])."""
    for name, t in ((f"lora_a[{i}]", a), (f"lora_b[{i}]", b)):
        checks.tensor(name, t, ndim=2)
    r = a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a[{i}] must have rank r >= 1 rows, got shape {tuple(a.shape)}")
    checks.shape(f"lora_a[{i}]", a, (r, weight.shape[1]), "[r, in_features]")
    checks.shape(f"lora_b[{i}]", b, (weight.shape[0], r), f"[out_features, r] with lora_a[{i}]'s r")
    checks.same_device("x", x, **{f"lora_a[{i}]": a, f"lora_b[{i}]": b})
    checks.same_device("lora_a[0]", lora_a[0], **{f"lora_a[{i}]": a, f"lora_b[{i}]": b})
    raise TypeError(f"every adapter tensor must have one dtype (lora_a[0]'s, {lora_a[0].dtype}); "
                    f"lora_a[{i}] is {a.dtype}, lora_b[{i}] is {b.dtype}")


def _adapter_scalings(scalings, n: int) -> list[float]:
    if isinstance(scalings, (Tensor, str)) or not isinstance(scalings, (list, tuple)):
        raise TypeError(f"scalings must be a list or tuple of {n} real numbers, got {type(scalings).__name__}")
    if len(scalings) != n:
        raise ValueError(f"scalings must hold one number per adapter ({n}), got {len(scalings)}")
    if all(type(v) is float and math.isfinite(v) for v in scalings):
        return list(scalings)
    return [checks.real_number(f"scalings[{i}]", v) for i, v in enumerate(scalings)]


def _check_ids(x: Tensor, adapter_ids) -> None:
    if not isinstance(adapter_ids, Tensor):
        raise TypeError(f"adapter_ids must be an int32 or int64 torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in ID_DTYPES:
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.device != x.device:
        raise RuntimeError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}; move them to one device")
    lead = tuple(x.shape[:-1])
    if adapter_ids.dim() > len(lead) or tuple(adapter_ids.shape) != lead[:adapter_ids.dim()]:
        raise ValueError(f"adapter_ids must have a leading part of x.shape[:-1] = {lead} as its shape (e.g. "
                         f"{lead[:1]} for one adapter per sequence, {lead} for one per token), got "
                         f"{tuple(adapter_ids.shape)}")


def multi_lora_linear(x: Tensor, weight, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], adapter_ids: Tensor,
                      *, scalings: Sequence[float], bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                      training: bool = True, seed: Optional[int] = None) -> Tensor:
    """Many LoRA adapters over one base in one call: each row of x gets its own adapter.

    Row t of the result is  x_t·weightᵀ + bias + scalings[i]·(dropout(x_t)·lora_a[i]ᵀ)·lora_b[i]ᵀ  with i its
    adapter id (no adapter term for −1). Equal, row by row, to lora_linear with that row's adapter (same seed,
    the same dropout mask).

    Args:
        x: [..., in_features], any leading dims, any strides.
        weight: [out_features, in_features], the frozen base weight, or a peftkern.QuantizedWeight.
        lora_a: a list/tuple of n tensors, lora_a[i] [r_i, in_features]; ranks may differ.
        lora_b: n tensors, lora_b[i] [out_features, r_i]. All adapter tensors share one dtype (x's, or float32
            beside a float16/bfloat16 x, as lora_linear's rule).
        adapter_ids: int32/int64 tensor on x's device whose shape is a leading part of x.shape[:-1]: [batch] gives
            one adapter per sequence (PEFT's adapter_names), x.shape[:-1] one per token, a 0-d tensor one for all.
            −1 selects no adapter.
        scalings: n real numbers (PEFT's alpha / r of each adapter).
        bias, dropout_p, training, seed: as in lora_linear.

    Returns [..., out_features] in x's dtype. Gradients reach every lora_a[i] / lora_b[i] that requires grad (zeros
    for an adapter no row uses), x, and weight and bias when they require it.

    Raises (before any work): IndexError for an id outside [−1, n); ValueError / TypeError / RuntimeError for
    shapes, dtypes and devices, naming the argument (lora_a[2], scalings[0], ...).
    """
    lora_a, lora_b = _adapter_list("lora_a", lora_a), _adapter_list("lora_b", lora_b)
    scalings = _check(x, weight, lora_a, lora_b, adapter_ids, bias, scalings)
    _, dropout_p, seed = checks.scalars(1.0, dropout_p, training, seed)
    p, seed_t = checks.dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    # one id per row of the 2-D view: [batch] ids repeat over each sequence's tokens
    ids = adapter_ids.reshape(tuple(adapter_ids.shape) + (1,) * (len(lead) - adapter_ids.dim()))
    row_ids = ids.expand(lead).reshape(rows)
    x2 = x.reshape(rows, x.shape[-1])
    base = fourbit.op_args(weight)
    y, _ = forward_op(x=x2, **base, lora_a=lora_a, lora_b=lora_b, row_ids=row_ids, bias=bias, scalings=scalings,
                      dropout_p=p, seed=seed_t)
    return y.view(*lead, weight.shape[0])
