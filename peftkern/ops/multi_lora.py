"""peftkern.multi_lora_linear (SPEC section 9): input checks -> custom ops (forward, backward) -> fakes -> autograd.

Many LoRA adapters over one frozen base in one call: row t of x uses adapter row_ids[t] (−1: none). The ops take
the adapters as lists (Tensor[] in the schema), so no copy or concatenation of them is made per call, and
return one gradient per adapter. The forward also returns S = dropout(x)·A_iᵀ per row ([M, max rank], fp32,
zero beyond a row's own rank), the activation backward needs, as lora_linear keeps. The ids are checked inside
the forward op, where they are used (IndexError): that read of their minimum and maximum is the call's one host
synchronisation, and being inside the op keeps torch.compile's graph whole.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch, rules
from ..quant import QuantizedWeight
from . import multi_qlora
from ._autocast import register_autocast

FAMILY = "multi_lora_linear"
ID_DTYPES = (torch.int32, torch.int64)


def _key(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], bias: Optional[Tensor], dropout_p: float,
         *flags) -> tuple:
    """What decides which variant is faster (peftkern.core.dispatch)."""
    return (dispatch.token_bucket(x.shape[0]), *weight.shape, len(lora_a), max(a.shape[0] for a in lora_a),
            x.dtype, lora_a[0].dtype, bias is not None, dropout_p > 0.0, dispatch.layout(x, weight), *flags)


@torch.library.custom_op("peftkern::multi_lora_linear_fwd", mutates_args=())
def multi_lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], row_ids: Tensor,
                          bias: Optional[Tensor], scalings: list[float], dropout_p: float,
                          seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed)


def _forward(x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed):
    """The forward op's body (also run directly by _plain_eager_inference)."""
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select(FAMILY, x.device, x.dtype)
    return dispatch.call(FAMILY, "forward", backend, lambda: _key(x, weight, lora_a, bias, dropout_p),
                         x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed_v)


@multi_lora_linear_fwd.register_fake
def _(x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], max(a.shape[0] for a in lora_a)), dtype=rules.acc_dtype(x.dtype)))


@torch.library.custom_op("peftkern::multi_lora_linear_bwd", mutates_args=())
def multi_lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_a: list[Tensor], lora_b: list[Tensor],
                          row_ids: Tensor, s_down: Tensor, scalings: list[float], dropout_p: float,
                          seed: Optional[Tensor], need_x: bool, need_weight: bool, need_a: list[bool],
                          need_b: list[bool], need_bias: bool, backend: str
                          ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], Tensor]:
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    return dispatch.call(FAMILY, "backward", backend,
                         lambda: _key(x, weight, lora_a, None, dropout_p, need_x, need_weight, any(need_a),
                                      any(need_b), need_bias),
                         dy, x, weight, lora_a, lora_b, row_ids, s_down, scalings, dropout_p, seed_v,
                         need_x, need_weight, list(need_a), list(need_b), need_bias)


@multi_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, row_ids, s_down, scalings, dropout_p, seed, need_x, need_weight, need_a,
      need_b, need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            x.new_empty(weight.shape if need_weight else (0,)),
            [a.new_empty(a.shape if need else (0,)) for a, need in zip(lora_a, need_a)],
            [b.new_empty(b.shape if need else (0,)) for b, need in zip(lora_b, need_b)],
            x.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed = inputs
    ctx.n = len(lora_a)
    ctx.save_for_backward(x, weight, row_ids, output[1], seed, *lora_a, *lora_b)
    ctx.mark_non_differentiable(output[1])
    ctx.scalings, ctx.dropout_p = list(scalings), dropout_p
    ctx.backend = _backend.select(FAMILY, x.device, x.dtype)  # the forward's backend runs the backward


def _backward(ctx, dy, _ds):
    x, weight, row_ids, s_down, seed, *adapters = ctx.saved_tensors
    lora_a, lora_b = adapters[:ctx.n], adapters[ctx.n:]
    need = ctx.needs_input_grad
    need_a, need_b = [bool(v) for v in need[2]], [bool(v) for v in need[3]]
    dx, dw, da, db, dbias = torch.ops.peftkern.multi_lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, row_ids, s_down, ctx.scalings, ctx.dropout_p, seed, need[0], need[1],
        need_a, need_b, need[5], ctx.backend)
    return (dx if need[0] else None, dw if need[1] else None,
            [g if k else None for g, k in zip(da, need_a)], [g if k else None for g, k in zip(db, need_b)],
            None, dbias if need[5] else None, None, None, None)


multi_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("multi_lora_linear_fwd", torch.ops.peftkern.multi_lora_linear_fwd.default)


# ---- the public function --------------------------------------------------------------------------

def _adapter_list(name: str, value) -> list:
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors (one per adapter), got {type(value).__name__}")
    return list(value)


def _check(x, weight, lora_a, lora_b, adapter_ids, bias, scalings):
    quantized = isinstance(weight, QuantizedWeight)
    if not quantized:
        _checks.tensor("weight", weight, ndim=2)
    _checks.tensor("x", x, min_ndim=1)
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (weight.shape[0],), "[out_features]")
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
    _checks.tensor("lora_a[0]", first, ndim=2)  # a floating dtype, shared by every adapter (tested above)
    _checks.same_device("x", x, **{"lora_a[0]": first})
    if quantized:
        if weight.device != x.device:
            raise RuntimeError(f"weight (a QuantizedWeight) is on {weight.device} but x is on {x.device}; "
                               f"move them to one device (QuantizedWeight.to(device))")
        _checks.same_device("x", x, bias=bias)
    else:
        _checks.same_device("x", x, weight=weight, bias=bias)
    # a 4-bit weight is dequantized into x's dtype: only the bias must match x
    _checks.input_dtypes("x", x, frozen=dict(bias=bias) if quantized else dict(weight=weight, bias=bias),
                         adapters={"lora_a[0]": lora_a[0], "lora_b[0]": lora_b[0]})
    _check_ids(x, adapter_ids)
    return scalings


def _explain_adapter(x, weight, lora_a, i, a, b) -> None:
    """Raise the error that says what is wrong with adapter i (lora_linear's checks, naming lora_a[i] / lora_b[i])."""
    for name, t in ((f"lora_a[{i}]", a), (f"lora_b[{i}]", b)):
        _checks.tensor(name, t, ndim=2)
    r = a.shape[0]
    if r < 1:
        raise ValueError(f"lora_a[{i}] must have rank r >= 1 rows, got shape {tuple(a.shape)}")
    _checks.shape(f"lora_a[{i}]", a, (r, weight.shape[1]), "[r, in_features]")
    _checks.shape(f"lora_b[{i}]", b, (weight.shape[0], r), f"[out_features, r] with lora_a[{i}]'s r")
    _checks.same_device("x", x, **{f"lora_a[{i}]": a, f"lora_b[{i}]": b})
    _checks.same_device("lora_a[0]", lora_a[0], **{f"lora_a[{i}]": a, f"lora_b[{i}]": b})
    raise TypeError(f"every adapter tensor must have one dtype (lora_a[0]'s, {lora_a[0].dtype}); "
                    f"lora_a[{i}] is {a.dtype}, lora_b[{i}] is {b.dtype}")


def _adapter_scalings(scalings, n: int) -> list[float]:
    if isinstance(scalings, (Tensor, str)) or not isinstance(scalings, (list, tuple)):
        raise TypeError(f"scalings must be a list or tuple of {n} real numbers, got {type(scalings).__name__}")
    if len(scalings) != n:
        raise ValueError(f"scalings must hold one number per adapter ({n}), got {len(scalings)}")
    if all(type(v) is float and math.isfinite(v) for v in scalings):
        return list(scalings)
    return [_checks.real_number(f"scalings[{i}]", v) for i, v in enumerate(scalings)]


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


def _plain_eager_inference(x, weight, bias, lora_a, lora_b, row_ids) -> bool:
    """True when the forward op's body may run without going through the dispatcher: no gradient can be asked for
    (grad mode off, or no input requires it), nothing traces or intercepts the call (torch.compile, a
    TorchFunctionMode or TorchDispatchMode, a tensor subclass such as FakeTensor) and autocast is off (the op's
    autocast rule would cast). The result is the op's, bit for bit: the same body runs. Why: serving a decode step
    passes dozens of adapter tensors, and the custom-op machinery's per-call work on a Tensor[] argument
    (~90 µs at 32 adapters, measured) is a sizeable share of a step whose base product takes ~1 ms on a CPU."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or _checks.autocast_active(x.device):
        return False
    plain = (torch.Tensor, torch.nn.Parameter)
    tensors = (x, weight, row_ids, *lora_a, *lora_b) if bias is None else (x, weight, bias, row_ids, *lora_a, *lora_b)
    if not all(type(t) in plain for t in tensors):
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


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
    quantized = isinstance(weight, QuantizedWeight)
    lora_a, lora_b = _adapter_list("lora_a", lora_a), _adapter_list("lora_b", lora_b)
    scalings = _check(x, weight, lora_a, lora_b, adapter_ids, bias, scalings)
    _, dropout_p, seed = _checks.scalars(1.0, dropout_p, training, seed)
    p, seed_t = _checks.dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    # one id per row of the 2-D view: [batch] ids repeat over each sequence's tokens
    ids = adapter_ids.reshape(tuple(adapter_ids.shape) + (1,) * (len(lead) - adapter_ids.dim()))
    row_ids = ids.expand(lead).reshape(rows)
    x2 = x.reshape(rows, x.shape[-1])
    if quantized:
        y = multi_qlora.forward(x2, weight, lora_a, lora_b, row_ids, bias, scalings, p, seed_t)
    elif _plain_eager_inference(x2, weight, bias, lora_a, lora_b, row_ids):
        y, _ = _forward(x2, weight, lora_a, lora_b, row_ids, bias, scalings, p, seed_t)
    else:
        y, _ = torch.ops.peftkern.multi_lora_linear_fwd(x2, weight, lora_a, lora_b, row_ids, bias, scalings, p,
                                                        seed_t)
    return y.view(*lead, weight.shape[0])
