"""multi_lora_linear over a 4-bit base (SPEC sections 7 and 9): custom ops (forward, backward) -> fakes -> autograd.

`peftkern.multi_lora_linear(x, qw, ...)` with a `peftkern.QuantizedWeight` lands here (ops/multi_lora.py checks the
arguments and routes). As ops/qlora.py, the ops take the weight as its raw parts, check their sizes where they are
used (fourbit.check_storage), and never build the dense [out, in] weight. The weight is frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, dispatch, rules
from ..quant import fourbit
from ._autocast import register_autocast

FAMILY = "multi_qlora_linear"


def _key(x, out_features, lora_a, bias, dropout_p, *flags) -> tuple:
    return (dispatch.token_bucket(x.shape[0]), out_features, x.shape[1], len(lora_a),
            max(a.shape[0] for a in lora_a), x.dtype, lora_a[0].dtype, bias is not None, dropout_p > 0.0, *flags)


@torch.library.custom_op("peftkern::multi_qlora_linear_fwd", mutates_args=())
def multi_qlora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
                           code2: Optional[Tensor], offset: Optional[Tensor], out_features: int, blocksize: int,
                           weight_dtype: torch.dtype, lora_a: list[Tensor], lora_b: list[Tensor], row_ids: Tensor,
                           bias: Optional[Tensor], scalings: list[float], dropout_p: float,
                           seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    fourbit.check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select(FAMILY, x.device, x.dtype)
    return dispatch.call(FAMILY, "forward", backend, lambda: _key(x, out_features, lora_a, bias, dropout_p),
                         x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype,
                         lora_a, lora_b, row_ids, bias, scalings, dropout_p, seed_v)


@multi_qlora_linear_fwd.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
      row_ids, bias, scalings, dropout_p, seed):
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], max(a.shape[0] for a in lora_a)), dtype=rules.acc_dtype(x.dtype)))


@torch.library.custom_op("peftkern::multi_qlora_linear_bwd", mutates_args=())
def multi_qlora_linear_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor,
                           absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
                           out_features: int, blocksize: int, weight_dtype: torch.dtype, lora_a: list[Tensor],
                           lora_b: list[Tensor], row_ids: Tensor, s_down: Tensor, scalings: list[float],
                           dropout_p: float, seed: Optional[Tensor], need_x: bool, need_a: list[bool],
                           need_b: list[bool], need_bias: bool, backend: str
                           ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    fourbit.check_storage(packed, absmax, code, absmax2, code2, offset, out_features, x.shape[1], blocksize)
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    return dispatch.call(FAMILY, "backward", backend,
                         lambda: _key(x, out_features, lora_a, None, dropout_p, need_x, any(need_a), any(need_b),
                                      need_bias),
                         dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype,
                         lora_a, lora_b, row_ids, s_down, scalings, dropout_p, seed_v, need_x, list(need_a),
                         list(need_b), need_bias)


@multi_qlora_linear_bwd.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b,
      row_ids, s_down, scalings, dropout_p, seed, need_x, need_a, need_b, need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            [a.new_empty(a.shape if need else (0,)) for a, need in zip(lora_a, need_a)],
            [b.new_empty(b.shape if need else (0,)) for b, need in zip(lora_b, need_b)],
            x.new_empty((out_features,) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, out_features, blocksize, weight_dtype, lora_a, lora_b, row_ids,
     bias, scalings, dropout_p, seed) = inputs
    ctx.n = len(lora_a)
    ctx.save_for_backward(x, packed, absmax, code, absmax2, code2, offset, row_ids, output[1], seed, *lora_a,
                          *lora_b)
    ctx.mark_non_differentiable(output[1])
    ctx.out_features, ctx.blocksize, ctx.weight_dtype = out_features, blocksize, weight_dtype
    ctx.scalings, ctx.dropout_p = list(scalings), dropout_p
    ctx.backend = _backend.select(FAMILY, x.device, x.dtype)  # the forward's backend runs the backward


# forward inputs by position that can take a gradient
_X, _A, _B, _BIAS = 0, 10, 11, 13


def _backward(ctx, dy, _ds):
    x, packed, absmax, code, absmax2, code2, offset, row_ids, s_down, seed, *adapters = ctx.saved_tensors
    lora_a, lora_b = adapters[:ctx.n], adapters[ctx.n:]
    need = ctx.needs_input_grad
    need_a, need_b = [bool(v) for v in need[_A]], [bool(v) for v in need[_B]]
    dx, da, db, dbias = torch.ops.peftkern.multi_qlora_linear_bwd(
        dy, x, packed, absmax, code, absmax2, code2, offset, ctx.out_features, ctx.blocksize, ctx.weight_dtype,
        lora_a, lora_b, row_ids, s_down, ctx.scalings, ctx.dropout_p, seed, need[_X], need_a, need_b, need[_BIAS],
        ctx.backend)
    grads = [None] * len(need)
    grads[_X] = dx if need[_X] else None
    grads[_A] = [g if k else None for g, k in zip(da, need_a)]
    grads[_B] = [g if k else None for g, k in zip(db, need_b)]
    grads[_BIAS] = dbias if need[_BIAS] else None
    return tuple(grads)


multi_qlora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
# packed, absmax and code are the weight's storage, not values to cast
register_autocast("multi_qlora_linear_fwd", torch.ops.peftkern.multi_qlora_linear_fwd.default,
                  keep=(1, 2, 3, 4, 5, 6))


def forward(x2: Tensor, weight, lora_a, lora_b, row_ids: Tensor, bias: Optional[Tensor], scalings, dropout_p: float,
            seed: Optional[Tensor]) -> Tensor:
    """y [M, out] for x2 [M, in] over the QuantizedWeight `weight` (arguments already checked)."""
    state = (weight.absmax2, weight.code2, weight.offset) if weight.double_quant else (None, None, None)
    y, _ = torch.ops.peftkern.multi_qlora_linear_fwd(x2, weight.packed, weight.absmax, weight.code, *state,
                                                     weight.shape[0], weight.blocksize, weight.dtype, lora_a, lora_b,
                                                     row_ids, bias, scalings, dropout_p, seed)
    return y
