"""lora_linear over a 4-bit base (SPEC section 7): custom ops (forward, backward) -> fakes -> autograd.

`peftkern.lora_linear(x, qw, ...)` with a `peftkern.QuantizedWeight` lands here (ops/lora.py checks the
arguments and routes). The ops take the weight as its raw parts: the packed codes (uint8), the absmax of each
block (float32, or uint8 codes when double-quantized, with absmax2, code2 and offset, resolved where the
weight is dequantized: on chip in the Triton kernel) and the 16-entry code table. The weight is frozen: gradients
reach x, lora_a, lora_b and bias.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch
from ..reference import lora as ref, qlora as ref_qlora
from . import _autograd
from ._autocast import register_autocast

FAMILY = "qlora_linear"


def _key(x, out_features, lora_a, bias, dropout_p, *flags) -> tuple:
    return (dispatch.token_bucket(x.shape[0]), out_features, x.shape[1], lora_a.shape[0], x.dtype, lora_a.dtype,
            bias is not None, dropout_p > 0.0, *flags)


def _check_storage(packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
                   offset: Optional[Tensor], out_features: int, in_features: int, blocksize: int) -> None:
    """The ops can be called directly (torch.ops.peftkern.*), not only through a validated QuantizedWeight: the
    kernels index packed, absmax, code and the double quantization's code2 and absmax2 by the weight's shape and
    by absmax's uint8 codes, so their sizes and dtypes are checked here, at the use."""
    n = out_features * in_features
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    nblocks = -(-n // blocksize)
    double_quant = absmax.dtype == torch.uint8
    expected = [("packed", packed, torch.uint8, -(-n // 2)),
                ("absmax", absmax, torch.uint8 if double_quant else torch.float32, nblocks),
                ("code", code, torch.float32, 16)]
    if double_quant:  # uint8 codes index code2's 256 entries: always in range once code2 has 256
        expected += [("absmax2", absmax2, torch.float32, -(-nblocks // ref_qlora.NESTED_BLOCKSIZE)),
                     ("code2", code2, torch.float32, 256), ("offset", offset, torch.float32, 1)]
    elif (absmax2, code2, offset) != (None, None, None):
        raise ValueError("absmax2, code2 and offset belong to a double-quantized (uint8) absmax; absmax is float32")
    for name, t, dtype, size in expected:
        if t is None:
            raise ValueError(f"{name} is required with a double-quantized (uint8) absmax")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.numel() != size:
            raise ValueError(f"{name} must have {size} elements for a [{out_features}, {in_features}] weight at "
                             f"blocksize {blocksize}, got {t.numel()}")


@torch.library.custom_op("peftkern::qlora_linear_fwd", mutates_args=())
def qlora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                     code2: Optional[Tensor], offset: Optional[Tensor], out_features: int, blocksize: int,
                     weight_dtype: torch.dtype, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                     scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select(FAMILY, x.device, x.dtype)
    return dispatch.call(FAMILY, "forward", backend, lambda: _key(x, out_features, lora_a, bias, dropout_p),
                         x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype,
                         lora_a, lora_b, bias, scaling, dropout_p, seed_v)


@qlora_linear_fwd.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b, bias,
      scaling, dropout_p, seed):
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=ref.acc_dtype(x.dtype)))


@torch.library.custom_op("peftkern::qlora_linear_bwd", mutates_args=())
def qlora_linear_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                     code2: Optional[Tensor], offset: Optional[Tensor], out_features: int,
                     blocksize: int, weight_dtype: torch.dtype, lora_a: Tensor, lora_b: Tensor, s_down: Tensor,
                     scaling: float,
                     dropout_p: float, seed: Optional[Tensor], need_x: bool, need_a: bool, need_b: bool,
                     need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    needs = (need_x, need_a, need_b, need_bias)
    return dispatch.call(FAMILY, "backward", backend,
                         lambda: _key(x, out_features, lora_a, None, dropout_p, *needs),
                         dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize,
                         weight_dtype, lora_a, lora_b, s_down, scaling, dropout_p, seed_v, *needs)


@qlora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
      s_down, scaling, dropout_p, seed, need_x, need_a, need_b, need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            lora_a.new_empty(lora_a.shape if need_a else (0,)),
            lora_b.new_empty(lora_b.shape if need_b else (0,)),
            x.new_empty((out_features,) if need_bias else (0,)))


# forward inputs by position: the ones that can take a gradient, and their places in the backward's outputs
_X, _A, _B, _BIAS = 0, 10, 11, 12


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b, bias,
     scaling, dropout_p, seed) = inputs
    ctx.save_for_backward(x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, output[1], seed)
    ctx.out_features, ctx.blocksize, ctx.weight_dtype = out_features, blocksize, weight_dtype
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.backend = _backend.select(FAMILY, x.device, x.dtype)  # the forward's backend runs the backward


def _backward(ctx, dy, _d_s_down):
    x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, s_down, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db, dbias = torch.ops.peftkern.qlora_linear_bwd(
        dy, x, packed, absmax, code, absmax2, code2, offset, ctx.out_features, ctx.blocksize, ctx.weight_dtype,
        lora_a, lora_b, s_down,
        ctx.scaling, ctx.dropout_p, seed, need[_X], need[_A], need[_B], need[_BIAS], ctx.backend)
    grads = [None] * len(need)
    grads[_X], grads[_A], grads[_B], grads[_BIAS] = dx, da, db, dbias
    return _autograd.grads_or_none(ctx, grads)


qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
# packed, absmax and code are the weight's storage, not values to cast: autocast leaves them as they are
register_autocast("qlora_linear_fwd", torch.ops.peftkern.qlora_linear_fwd.default, keep=(1, 2, 3, 4, 5, 6))


def check(x, weight, lora_a, lora_b, bias) -> None:
    """The checks of lora_linear's tensors when `weight` is a QuantizedWeight (ops/lora.py checks the rest).
    deq(W) takes x's dtype, so the weight's own dtype is free; bias follows x, adapters the adapter rule."""
    _checks.lora_tensors(x, weight.shape, f"the QuantizedWeight stands for a [out, in] = {tuple(weight.shape)} "
                         "weight", lora_a, lora_b, bias)
    if weight.device != x.device:
        raise RuntimeError(f"weight (a QuantizedWeight) is on {weight.device} but x is on {x.device}; "
                           f"move them to one device (QuantizedWeight.to(device))")
    _checks.same_device("x", x, lora_a=lora_a, lora_b=lora_b, bias=bias)
    _checks.input_dtypes("x", x, frozen=dict(bias=bias), adapters=dict(lora_a=lora_a, lora_b=lora_b))


def forward(x2: Tensor, weight, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor], scaling: float,
            dropout_p: float, seed: Optional[Tensor]) -> Tensor:
    """y [M, out] for x2 [M, in] over the QuantizedWeight `weight` (arguments already checked). deq(W) is made as
    bitsandbytes' matmul_4bit makes it: code·absmax in float32, rounded to the weight's dtype, then to x's."""
    state = (weight.absmax2, weight.code2, weight.offset) if weight.double_quant else (None, None, None)
    y, _ = torch.ops.peftkern.qlora_linear_fwd(x2, weight.packed, weight.absmax, weight.code, *state,
                                               weight.shape[0], weight.blocksize, weight.dtype, lora_a, lora_b,
                                               bias, scaling, dropout_p, seed)
    return y
