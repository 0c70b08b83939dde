"""dora_linear over a 4-bit base (SPEC sections 7 and 8): custom ops (forward, backward) -> fakes -> autograd.

`peftkern.dora_linear(x, qw, ...)` with a `peftkern.QuantizedWeight` lands here (ops/dora.py checks the arguments
and routes). As ops/qlora.py, the ops take the weight as its raw parts (packed codes, absmax as stored, the code
tables), check their sizes where they are used, and never build the dense [out, in] weight: the norm and the
products dequantize a block of rows at a time. The weight is frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, dispatch
from ..quant import fourbit
from . import _autograd
from ._autocast import register_autocast

FAMILY = "qdora_linear"


def _key(x, out_features, lora_a, bias, dropout_p, *flags) -> tuple:
    return (dispatch.token_bucket(x.shape[0]), out_features, x.shape[1], lora_a.shape[0], x.dtype, lora_a.dtype,
            bias is not None, dropout_p > 0.0, *flags)


@torch.library.custom_op("peftkern::qdora_linear_fwd", mutates_args=())
def qdora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                     code2: Optional[Tensor], offset: Optional[Tensor], out_features: int, blocksize: int,
                     weight_dtype: torch.dtype, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
                     bias: Optional[Tensor], weight_norm: Optional[Tensor], scaling: float, dropout_p: float,
                     seed: Optional[Tensor], keep_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fourbit.check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select(FAMILY, x.device, x.dtype)
    return dispatch.call(FAMILY, "forward", backend,
                         lambda: _key(x, out_features, lora_a, bias, dropout_p, keep_z, weight_norm is None),
                         x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype,
                         lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed_v, keep_z)


@qdora_linear_fwd.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
      magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z):
    from .dora import fake_outputs
    return fake_outputs(x, out_features, lora_a, keep_z)


@torch.library.custom_op("peftkern::qdora_linear_bwd", mutates_args=())
def qdora_linear_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                     code2: Optional[Tensor], offset: Optional[Tensor], out_features: int, blocksize: int,
                     weight_dtype: torch.dtype, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
                     weight_norm: Tensor, s_down: Tensor, z: Tensor, scaling: float, dropout_p: float,
                     seed: Optional[Tensor], need_x: bool, need_a: bool, need_b: bool, need_magnitude: bool,
                     need_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fourbit.check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    needs = (need_x, need_a, need_b, need_magnitude, need_bias)
    return dispatch.call(FAMILY, "backward", backend, lambda: _key(x, out_features, lora_a, None, dropout_p, *needs),
                         dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype,
                         lora_a, lora_b, magnitude, weight_norm, s_down, z, scaling, dropout_p, seed_v, *needs)


@qdora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
      magnitude, weight_norm, s_down, z, scaling, dropout_p, seed, need_x, need_a, need_b, need_magnitude, need_bias,
      backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            lora_a.new_empty(lora_a.shape if need_a else (0,)),
            lora_b.new_empty(lora_b.shape if need_b else (0,)),
            magnitude.new_empty(magnitude.shape if need_magnitude else (0,)),
            x.new_empty((out_features,) if need_bias else (0,)))


# forward inputs by position that can take a gradient, in the order the backward returns them
_X, _A, _B, _MAGNITUDE, _BIAS = 0, 10, 11, 12, 13


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
     magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z) = inputs
    _y, z, s_down, n = output
    ctx.save_for_backward(x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, magnitude, n, s_down, z,
                          seed)
    ctx.mark_non_differentiable(z, s_down, n)  # n is a constant (DoRA section 4.3); z and S are saved state
    ctx.out_features, ctx.blocksize, ctx.weight_dtype = out_features, blocksize, weight_dtype
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.backend = _backend.select(FAMILY, x.device, x.dtype)


def _backward(ctx, dy, _dz, _ds, _dn):
    x, packed, absmax, code, absmax2, code2, offset, lora_a, lora_b, magnitude, n, s_down, z, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.peftkern.qdora_linear_bwd(
        dy, x, packed, absmax, code, absmax2, code2, offset, ctx.out_features, ctx.blocksize, ctx.weight_dtype,
        lora_a, lora_b, magnitude, n, s_down, z, ctx.scaling, ctx.dropout_p, seed,
        need[_X], need[_A], need[_B], need[_MAGNITUDE], need[_BIAS], ctx.backend)
    full = [None] * len(need)
    for pos, grad in zip((_X, _A, _B, _MAGNITUDE, _BIAS), grads):
        full[pos] = grad
    return _autograd.grads_or_none(ctx, full)


qdora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
# the weight's storage, the magnitude and the norm are not values to cast (see ops/dora.py and ops/qlora.py)
register_autocast("qdora_linear_fwd", torch.ops.peftkern.qdora_linear_fwd.default, keep=(1, 2, 3, 4, 5, 6, 12, 14))


def forward(x2: Tensor, weight, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, bias: Optional[Tensor],
            weight_norm: Optional[Tensor], scaling: float, dropout_p: float, seed: Optional[Tensor], keep_z: bool):
    """(y [M, out], n [out]) for x2 [M, in] over the QuantizedWeight `weight` (arguments already checked)."""
    state = (weight.absmax2, weight.code2, weight.offset) if weight.double_quant else (None, None, None)
    y, _, _, n = torch.ops.peftkern.qdora_linear_fwd(x2, weight.packed, weight.absmax, weight.code, *state,
                                                     weight.shape[0], weight.blocksize, weight.dtype, lora_a, lora_b,
                                                     magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z)
    return y, n
