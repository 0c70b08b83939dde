"""peftkern.dora_linear (SPEC section 8): input checks -> custom ops (forward, backward) -> fakes -> autograd.

DoRA scales each output column j of a LoRA linear by c_j = magnitude_j / n_j, n_j = ‖W_j + s·(B·A)_j‖₂, with n a
constant in backward (PEFT's DoRA Linear, the DoRA paper's section 4.3). The forward op returns, beside y:
z (the pre-scale product the magnitude's gradient needs, [M, N], kept only when the magnitude requires grad),
S = dropout(x)·Aᵀ ([M, r], as lora_linear keeps) and n ([N]). The dropout mask is lora_linear's, regenerated
from the seed. A 4-bit base (QuantizedWeight) runs through the twin ops peftkern::qdora_linear_fwd/bwd.

In eval mode (training=False) n is cached per (weight, lora_a, lora_b, scaling, dtype): see _NormCache for what
invalidates an entry.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ..core import backend as _backend, checks as _checks, dispatch, rules
from ..lora.op import check_tensors
from ..quant import QuantizedWeight
from . import _autograd, qdora
from ._autocast import register_autocast

FAMILY = "dora_linear"


def _key(x: Tensor, weight: Tensor, lora_a: Tensor, bias: Optional[Tensor], dropout_p: float, *flags) -> tuple:
    """What decides which variant is faster (peftkern.core.dispatch)."""
    return (dispatch.token_bucket(x.shape[0]), *weight.shape, lora_a.shape[0], x.dtype, lora_a.dtype,
            bias is not None, dropout_p > 0.0, dispatch.layout(x, weight), *flags)


@torch.library.custom_op("peftkern::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
                    bias: Optional[Tensor], weight_norm: Optional[Tensor], scaling: float, dropout_p: float,
                    seed: Optional[Tensor], keep_z: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seed_v = int(seed.item()) if seed is not None else 0
    backend = _backend.select(FAMILY, x.device, x.dtype)
    return dispatch.call(FAMILY, "forward", backend,
                         lambda: _key(x, weight, lora_a, bias, dropout_p, keep_z, weight_norm is None),
                         x, weight, lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed_v, keep_z)


def fake_outputs(x, out_features: int, lora_a, keep_z: bool):
    """(y, z, S, n) as the forward ops return them (shared with ops/qdora.py's fake)."""
    acc = rules.acc_dtype(x.dtype)
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], out_features) if keep_z else (0,)),
            x.new_empty((x.shape[0], lora_a.shape[0]), dtype=acc),
            x.new_empty((out_features,), dtype=acc))


@dora_linear_fwd.register_fake
def _(x, weight, lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z):
    return fake_outputs(x, weight.shape[0], lora_a, keep_z)


@torch.library.custom_op("peftkern::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
                    weight_norm: Tensor, s_down: Tensor, z: Tensor, scaling: float, dropout_p: float,
                    seed: Optional[Tensor], need_x: bool, need_weight: bool, need_a: bool, need_b: bool,
                    need_magnitude: bool, need_bias: bool, backend: str
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    seed_v = int(seed.item()) if seed is not None else 0
    dy = dy.contiguous()
    needs = (need_x, need_weight, need_a, need_b, need_magnitude, need_bias)
    return dispatch.call(FAMILY, "backward", backend, lambda: _key(x, weight, lora_a, None, dropout_p, *needs),
                         dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s_down, z, scaling, dropout_p,
                         seed_v, *needs)


def fake_grads(x, weight_shape, lora_a, lora_b, magnitude, need_x, need_weight, need_a, need_b, need_magnitude,
               need_bias):
    return (x.new_empty(x.shape if need_x else (0,)),
            x.new_empty(weight_shape if need_weight else (0,)),
            lora_a.new_empty(lora_a.shape if need_a else (0,)),
            lora_b.new_empty(lora_b.shape if need_b else (0,)),
            magnitude.new_empty(magnitude.shape if need_magnitude else (0,)),
            x.new_empty((lora_b.shape[0],) if need_bias else (0,)))


@dora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, magnitude, weight_norm, s_down, z, scaling, dropout_p, seed, need_x,
      need_weight, need_a, need_b, need_magnitude, need_bias, backend):
    return fake_grads(x, weight.shape, lora_a, lora_b, magnitude, need_x, need_weight, need_a, need_b,
                      need_magnitude, need_bias)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, bias, weight_norm, scaling, dropout_p, seed, keep_z = inputs
    _y, z, s_down, n = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, n, s_down, z, seed)
    ctx.mark_non_differentiable(z, s_down, n)  # n is a constant (DoRA section 4.3); z and S are saved state
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.backend = _backend.select(FAMILY, x.device, x.dtype)  # the forward's backend runs the backward


def _backward(ctx, dy, _dz, _ds, _dn):
    x, weight, lora_a, lora_b, magnitude, n, s_down, z, seed = ctx.saved_tensors
    grads = torch.ops.peftkern.dora_linear_bwd(dy, x, weight, lora_a, lora_b, magnitude, n, s_down, z, ctx.scaling,
                                               ctx.dropout_p, seed, *ctx.needs_input_grad[:6], ctx.backend)
    return _autograd.grads_or_none(ctx, grads)


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
# the magnitude and the norm are column scales applied in fp32 (as PEFT keeps them): autocast leaves them alone
register_autocast("dora_linear_fwd", torch.ops.peftkern.dora_linear_fwd.default, keep=(4, 6))


# ---- the eval-mode norm cache ---------------------------------------------------------------------

class _NormCache:
    """n per (weight, lora_a, lora_b, scaling, dtype, autocast dtype), for eval-mode calls.

    An entry is used only if (1) the base weight is the same tensor object (held by a weak reference: a new
    tensor at a recycled address never matches), with the same data pointer and the same version counter (any
    in-place change through autograd-visible ops: optimizer steps, copy_ under no_grad, load_state_dict), and
    (2) lora_a and lora_b are equal, element for element, to the copies stored with the entry: the adapters are
    what users change, and comparing them also catches writes through `.data`, which bypass the version counter
    (they are small: r·(in + out) elements, against the out·in·r work of the norm). The magnitude is not part of
    the key: n does not depend on it, and it is read afresh at every call. A write through `.data` into the
    *base weight* itself is the one change this cannot see; peftkern.ops.dora.clear_norm_cache() drops every
    entry. An entry is dropped as soon as its weight or an adapter is garbage-collected, and the least recently
    used entries go beyond MAX_ENTRIES.
    """

    MAX_ENTRIES = 4096

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.RLock()  # a weakref callback may drop an entry while this thread holds it

    @staticmethod
    def _weight_parts(weight) -> tuple:
        if isinstance(weight, QuantizedWeight):
            return tuple(t for t in (weight.packed, weight.absmax, weight.code, weight.absmax2, weight.code2,
                                     weight.offset) if t is not None)
        return (weight,)

    def _key(self, weight, lora_a, lora_b, scaling, dtype, autocast_dtype) -> tuple:
        return (tuple(id(t) for t in self._weight_parts(weight)), id(lora_a), id(lora_b), float(scaling), dtype,
                autocast_dtype)

    @staticmethod
    def _state(parts) -> tuple:
        return tuple((t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device) for t in parts)

    def get(self, weight, lora_a, lora_b, scaling, dtype, autocast_dtype) -> Optional[Tensor]:
        key = self._key(weight, lora_a, lora_b, scaling, dtype, autocast_dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
        refs, state, a_copy, b_copy, n, a_ref, b_ref = entry
        parts = self._weight_parts(weight)
        if any(r() is not t for r, t in zip(refs, parts)) or state != self._state(parts):
            return None
        if a_ref() is not lora_a or b_ref() is not lora_b:
            return None
        if not (_same(a_copy, lora_a) and _same(b_copy, lora_b)):
            return None
        return n

    def put(self, weight, lora_a, lora_b, scaling, dtype, autocast_dtype, n: Tensor) -> None:
        parts = self._weight_parts(weight)
        key = self._key(weight, lora_a, lora_b, scaling, dtype, autocast_dtype)
        # an entry goes as soon as its weight or an adapter is garbage-collected (it could never match again)
        drop = functools.partial(_drop_entry, weakref.ref(self), key)
        refs = tuple(weakref.ref(t, drop) for t in parts)
        entry = (refs, self._state(parts), lora_a.detach().clone(), lora_b.detach().clone(), n.detach(),
                 weakref.ref(lora_a, drop), weakref.ref(lora_b, drop))
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _drop_entry(cache_ref, key, _dead_ref) -> None:
    cache = cache_ref()
    if cache is not None:
        with cache._lock:
            cache._entries.pop(key, None)


def _same(copy: Tensor, t: Tensor) -> bool:
    return copy.shape == t.shape and copy.dtype == t.dtype and copy.device == t.device and torch.equal(copy, t)


_norm_cache = _NormCache()


def clear_norm_cache() -> None:
    """Forget every cached eval-mode weight norm (after writing into a base weight through `.data`)."""
    _norm_cache.clear()


def row_norms(weight, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """‖weight + scaling·lora_b·lora_a‖₂ per output row, in float32 (float64 for a float64 weight), without the
    dense sum: what DoRA's magnitude is initialised to (peftkern.nn.DoRALinear, as PEFT does). `weight` a tensor
    or a QuantizedWeight (dequantized a block of rows at a time in its own dtype). No gradient."""
    from ..quant import fourbit
    from ..reference import dora as ref_dora
    with torch.no_grad():
        if isinstance(weight, QuantizedWeight):
            state = (weight.absmax2, weight.code2, weight.offset) if weight.double_quant else (None, None, None)
            dense_dtype = weight.dtype
            weight = fourbit.packed_weight(weight.packed, weight.absmax, weight.code, *state, weight.shape[0],
                                              weight.shape[1], weight.blocksize, weight.dtype, weight.dtype)
        else:
            dense_dtype = weight.dtype
        acc = rules.acc_dtype(dense_dtype)
        return ref_dora.weight_norm(weight, lora_a.detach(), lora_b.detach(), float(scaling), acc, lora_a.device)


# ---- the public function --------------------------------------------------------------------------

def _check(x, weight, lora_a, lora_b, magnitude, bias) -> None:
    # lora_linear's own checks of x, weight, adapters and bias; then the magnitude
    if isinstance(weight, QuantizedWeight):
        check_tensors(x, weight, lora_a, lora_b, bias)
    else:
        check_tensors(x, weight, lora_a, lora_b, bias)
    _checks.tensor("magnitude", magnitude, ndim=1)
    _checks.shape("magnitude", magnitude, (weight.shape[0],), "[out_features]")
    _checks.same_device("x", x, magnitude=magnitude)
    _checks.input_dtypes("x", x, frozen={}, adapters=dict(magnitude=magnitude))


def _autocast_dtype(device: torch.device):
    return torch.get_autocast_dtype(device.type) if _checks.autocast_active(device) else None


def dora_linear(x: Tensor, weight, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, *, scaling: float = 1.0,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, training: bool = True,
                seed: Optional[int] = None) -> Tensor:
    """DoRA linear layer (weight-decomposed LoRA), fused, with PEFT's semantics:

        n = ‖weight + scaling·lora_b·lora_a‖₂ per output row (a constant in backward), c = magnitude / n
        y = x·weightᵀ + bias + (c − 1) ⊙ (d·weightᵀ) + c ⊙ scaling·(d·lora_aᵀ)·lora_bᵀ,   d = dropout(x)

    which without dropout (or with training=False) is c ⊙ (x·weightᵀ + scaling·(x·lora_aᵀ)·lora_bᵀ) + bias.

    Args:
        x: [..., in_features], any number of leading dims, any strides.
        weight: [out_features, in_features], the frozen base weight, or a peftkern.QuantizedWeight (4-bit).
        lora_a: [r, in_features]; lora_b: [out_features, r] (PEFT's lora_A.weight / lora_B.weight).
        magnitude: [out_features] (PEFT's lora_magnitude_vector[name].weight), trainable.
        scaling, bias, dropout_p, training, seed: as in peftkern.lora_linear; the dropout mask is the one
            lora_linear draws for the same x and seed.

    Returns [..., out_features] in x's dtype. Gradients reach x, lora_a, lora_b, magnitude, and weight and bias when
    they require grad (a QuantizedWeight is frozen). n is computed in float32 (float64 for float64 x) from the
    current adapters a block of rows at a time: no [out, in] tensor (W + ΔW or ΔW) is ever made. With
    training=False n is cached (see _NormCache in this module for exactly what invalidates it).

    Dtypes: as lora_linear; magnitude follows the adapter rule (x's dtype, or float32 beside float16/bfloat16 x).
    Inside torch.autocast the magnitude stays in its own dtype (a column scale applied in float32), everything
    else is cast as F.linear's inputs are.

    Raises (before any work): ValueError for a shape that does not match (naming the argument), r = 0, a
    non-finite scaling, dropout_p outside [0, 1), a seed outside [0, 2**63); TypeError for a non-tensor, a
    non-floating tensor, a dtype outside the rule; RuntimeError for tensors on different devices or a backend
    that cannot run the call.
    """
    _check(x, weight, lora_a, lora_b, magnitude, bias)
    scaling, dropout_p, seed = _checks.scalars(scaling, dropout_p, training, seed)
    p, seed_t = _checks.dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    keep_z = torch.is_grad_enabled() and magnitude.requires_grad
    cached = None
    use_cache = not training and not torch.compiler.is_compiling()
    if use_cache:
        cache_args = (weight, lora_a, lora_b, float(scaling), x.dtype, _autocast_dtype(x.device))
        cached = _norm_cache.get(*cache_args)
    if isinstance(weight, QuantizedWeight):
        y, n = qdora.forward(x2, weight, lora_a, lora_b, magnitude, bias, cached, float(scaling), p, seed_t, keep_z)
    else:
        y, _, _, n = torch.ops.peftkern.dora_linear_fwd(x2, weight, lora_a, lora_b, magnitude, bias, cached,
                                                        float(scaling), p, seed_t, keep_z)
    if use_cache and cached is None:
        _norm_cache.put(*cache_args, n)
    return y.view(*lead, weight.shape[0])
