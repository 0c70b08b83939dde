"""peftkern.lora_linear: input checks -> custom ops (forward, backward) -> fakes -> autograd -> kernels.

Forward and backward are separate custom ops (peftkern::lora_linear_fwd / lora_linear_bwd) wired
with register_autograd, so torch.library.opcheck and torch.compile(fullgraph=True) see them as
opaque, traceable ops. The forward also returns S = dropout(x)·Aᵀ ([M, r], fp32), the only
activation LoRA keeps beyond what the base linear keeps; the dropout mask is regenerated from the
seed (a CPU int64 tensor, so that a fresh seed per step does not recompile a compiled graph).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch
from ..core.rules import SEED_LIMIT
from ..quant import QuantizedWeight
from ..reference import lora as ref
from . import _autograd, qlora
from ._autocast import register_autocast

# ---- the two custom ops --------------------------------------------------------------------------

def _key(x: Tensor, weight: Tensor, lora_a: Tensor, bias: Optional[Tensor], dropout_p: float, *flags) -> tuple:
    """What decides whether the fused or the composite variant is faster (peftkern.core.dispatch)."""
    return (dispatch.token_bucket(x.shape[0]), *weight.shape, lora_a.shape[0], x.dtype, lora_a.dtype,
            bias is not None, dropout_p > 0.0, dispatch.layout(x, weight), *flags)


@torch.library.custom_op("peftkern::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                    scaling: float, dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select("lora_linear", x.device, x.dtype)
    return dispatch.call("lora_linear", "forward", backend, lambda: _key(x, weight, lora_a, bias, dropout_p),
                         x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed_v)


@lora_linear_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=ref.acc_dtype(x.dtype)))


@torch.library.custom_op("peftkern::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, s_down: Tensor,
                    scaling: float, dropout_p: float, seed: Optional[Tensor], need_x: bool, need_weight: bool,
                    need_a: bool, need_b: bool, need_bias: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    needs = (need_x, need_weight, need_a, need_b, need_bias)
    return dispatch.call("lora_linear", "backward", backend,
                         lambda: _key(x, weight, lora_a, None, dropout_p, *needs),
                         dy, x, weight, lora_a, lora_b, s_down, scaling, dropout_p, seed_v, *needs)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, s_down, scaling, dropout_p, seed, need_x, need_weight, need_a, need_b,
      need_bias, backend):
    return (x.new_empty(x.shape if need_x else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            lora_a.new_empty(lora_a.shape if need_a else (0,)),
            lora_b.new_empty(lora_b.shape if need_b else (0,)),
            x.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    # the backend that ran the forward runs the backward, so a use_backend block around the forward
    # alone decides both
    ctx.backend = _backend.select("lora_linear", x.device, x.dtype)


def _backward(ctx, dy, _d_s_down):
    x, weight, lora_a, lora_b, s_down, seed = ctx.saved_tensors
    grads = torch.ops.peftkern.lora_linear_bwd(dy, x, weight, lora_a, lora_b, s_down, ctx.scaling, ctx.dropout_p,
                                               seed, *ctx.needs_input_grad[:5], ctx.backend)
    return _autograd.grads_or_none(ctx, grads)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("lora_linear_fwd", torch.ops.peftkern.lora_linear_fwd.default)


# ---- the public function --------------------------------------------------------------------------

def _check(x, weight, lora_a, lora_b, bias):
    _checks.tensor("weight", weight, ndim=2)
    _checks.lora_tensors(x, weight.shape, f"weight is {tuple(weight.shape)} = [out, in]", lora_a, lora_b, bias)
    _checks.same_device("x", x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    _checks.input_dtypes("x", x, frozen=dict(weight=weight, bias=bias), adapters=dict(lora_a=lora_a, lora_b=lora_b))


def _check_scalars(scaling, dropout_p, training, seed) -> tuple[float, float, Optional[int]]:
    """(scaling, dropout_p, seed) as Python numbers: numpy scalars are taken as the numbers they are."""
    scaling = _checks.real_number("scaling", scaling)
    dropout_p = _checks.real_number("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if seed is not None:
        seed_int = _checks.as_int(seed)
        if seed_int is None:
            raise TypeError(f"seed must be an int (or a numpy integer) or None, got {type(seed).__name__}")
        if not 0 <= seed_int < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed_int}")
        seed = seed_int
    return scaling, dropout_p, seed


def dropout_and_seed(dropout_p: float, training: bool, seed: Optional[int]) -> tuple[float, Optional[Tensor]]:
    """(the dropout p in effect, the seed the ops take): p is 0 unless training; the seed is None without dropout,
    else a CPU int64 tensor, drawn from torch's default generator when `seed` is None (so torch.manual_seed makes
    runs reproducible; a tensor, so that a fresh seed per step does not recompile a compiled graph)."""
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        return p, None
    if seed is None:
        return p, torch.randint(0, SEED_LIMIT // 2, (), dtype=torch.int64)
    return p, torch.tensor(seed, dtype=torch.int64)


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
    quantized = isinstance(weight, QuantizedWeight)
    if quantized:
        qlora.check(x, weight, lora_a, lora_b, bias)
    else:
        _check(x, weight, lora_a, lora_b, bias)
    scaling, dropout_p, seed = _check_scalars(scaling, dropout_p, training, seed)
    p, seed_t = dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    # an explicit row count: reshape(-1, 0) is ambiguous when in_features is 0 (which F.linear allows)
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if quantized:
        y = qlora.forward(x2, weight, lora_a, lora_b, bias, float(scaling), p, seed_t)
    else:
        y, _ = torch.ops.peftkern.lora_linear_fwd(x2, weight, lora_a, lora_b, bias, float(scaling), p, seed_t)
    return y.view(*lead, weight.shape[0])
