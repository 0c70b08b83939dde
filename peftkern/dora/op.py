"""peftkern.dora_linear: the two custom ops (forward, backward) with their fakes, the eval-mode norm cache, and the
public function.

DoRA scales each output column j of a LoRA linear by c_j = magnitude_j / n_j, n_j = ‖W_j + s·(B·A)_j‖₂, with n a
constant in backward (PEFT's DoRA Linear, the DoRA paper's section 4.3). One op pair serves a dense base weight and
a 4-bit one (peftkern.QuantizedWeight): the base travels as the five arguments of peftkern/quant/fourbit.py. The forward
op returns, beside y: z (the pre-scale product the magnitude's gradient needs, [M, N], kept only when the
magnitude requires grad), S = dropout(x)·Aᵀ ([M, r], as lora_linear keeps) and n ([N]). The dropout mask is
lora_linear's, regenerated from the seed.

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

from ..core import checks, dispatch, rules
from ..core.opdef import Op, grad_slot, wire_autograd
from ..lora.op import check_tensors, prepare as _lora_prepare
from ..quant import QuantizedWeight, fourbit

FAMILY = "dora_linear"

_BASE = fourbit.SCHEMA
_ADAPTER = "Tensor lora_a, Tensor lora_b, Tensor magnitude"
_DROPOUT = "float scaling, float dropout_p, Tensor? seed"


def _key(a) -> tuple:
    """What decides which variant is faster (core/dispatch.py)."""
    flags = tuple(getattr(a, n) for n in a._fields if n.startswith("need_"))
    if "keep_z" in a._fields:
        flags = (a.keep_z, a.weight_norm is None) + flags
    dense = a.weight if isinstance(a.weight, Tensor) else None
    return (dispatch.token_bucket(a.x.shape[0]), a.out_features, a.x.shape[1], a.lora_a.shape[0], a.x.dtype,
            a.lora_a.dtype, getattr(a, "bias", None) is not None, a.dropout_p > 0.0, dispatch.layout(a.x, dense),
            a.blocksize, *flags)


def prepare(a):
    """The variants' view of the arguments (lora_linear's: the base weight resolved to a tensor or a checked
    fourbit.FourBit, the seed as an int, dy contiguous); a backward asked for the magnitude's gradient without the z
    the forward keeps for it is refused here, whichever backend runs."""
    a = _lora_prepare(a)
    if "need_magnitude" in a._fields and a.need_magnitude and a.z.numel() != a.dy.numel():
        raise RuntimeError("dora_linear_bwd: the magnitude's gradient needs z, which the forward did not keep "
                           "(keep_z=False)")
    return a


def _fake_forward(a):
    acc = rules.acc_dtype(a.x.dtype)
    m, n = a.x.shape[0], a.out_features
    return (a.x.new_empty((m, n)), a.x.new_empty((m, n) if a.keep_z else (0,)),
            a.x.new_empty((m, a.lora_a.shape[0]), dtype=acc), a.x.new_empty((n,), dtype=acc))


def _fake_backward(a):
    return (grad_slot(a.need_x, a.x, a.x.shape, a.x),
            grad_slot(a.need_weight and not a.quant, a.x, a.weight.shape, a.x),
            grad_slot(a.need_lora_a, a.lora_a, a.lora_a.shape, a.x),
            grad_slot(a.need_lora_b, a.lora_b, a.lora_b.shape, a.x),
            grad_slot(a.need_magnitude, a.magnitude, a.magnitude.shape, a.x),
            grad_slot(a.need_bias, a.x, (a.out_features,), a.x))


# the 4-bit storage, the magnitude and the norm are not values to cast: the magnitude and the norm are column
# scales applied in float32 (as PEFT keeps them)
forward_op = Op(f"dora_linear_fwd(Tensor x, {_BASE}, {_ADAPTER}, Tensor? bias, Tensor? weight_norm, {_DROPOUT}, "
                "bool keep_z) -> (Tensor y, Tensor z, Tensor s_down, Tensor n)",
                family=FAMILY, key=_key, prepare=prepare, autocast_keep=("quant", "magnitude", "weight_norm"),
                fake=_fake_forward)

backward_op = Op(f"dora_linear_bwd(Tensor dy, Tensor x, {_BASE}, {_ADAPTER}, Tensor n, Tensor s_down, Tensor z, "
                 f"{_DROPOUT}, bool need_x, bool need_weight, bool need_lora_a, bool need_lora_b, "
                 "bool need_magnitude, bool need_bias, str backend) -> (Tensor dx, Tensor dweight, Tensor dlora_a, "
                 "Tensor dlora_b, Tensor dmagnitude, Tensor dbias)",
                 family=FAMILY, phase="backward", key=_key, prepare=prepare, fake=_fake_backward)
# n is a constant (DoRA section 4.3); z and S are saved state
wire_autograd(forward_op, backward_op, constants=("z", "s_down", "n"))


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
    *base weight* itself is the one change this cannot see; peftkern.dora.clear_norm_cache() drops every
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
    from .cpu import weight_norm
    with torch.no_grad():
        acc = rules.acc_dtype(weight.dtype)
        if isinstance(weight, QuantizedWeight):
            state = (weight.absmax2, weight.code2, weight.offset) if weight.double_quant else (None, None, None)
            weight = fourbit.packed_weight(weight.packed, weight.absmax, weight.code, *state, weight.shape[0],
                                           weight.shape[1], weight.blocksize, weight.dtype, weight.dtype)
        return weight_norm(weight, lora_a.detach(), lora_b.detach(), float(scaling), acc, lora_a.device)


# ---- the public function --------------------------------------------------------------------------

def _check(x, weight, lora_a, lora_b, magnitude, bias) -> None:
    # lora_linear's own checks of x, weight, adapters and bias; then the magnitude
    check_tensors(x, weight, lora_a, lora_b, bias)
    checks.tensor("magnitude", magnitude, ndim=1)
    checks.shape("magnitude", magnitude, (weight.shape[0],), "[out_features]")
    checks.same_device("x", x, magnitude=magnitude)
    checks.input_dtypes("x", x, frozen={}, adapters=dict(magnitude=magnitude))


def _autocast_dtype(device: torch.device):
    return torch.get_autocast_dtype(device.type) if checks.autocast_active(device) else None


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
    training=False n is cached (see _NormCache in peftkern/dora/op.py for exactly what invalidates it).

    Dtypes: as lora_linear; magnitude follows the adapter rule (x's dtype, or float32 beside float16/bfloat16 x).
    Inside torch.autocast the magnitude stays in its own dtype (a column scale applied in float32), everything
    else is cast as F.linear's inputs are.

    Raises (before any work): ValueError for a shape that does not match (naming the argument), r = 0, a
    non-finite scaling, dropout_p outside [0, 1), a seed outside [0, 2**63); TypeError for a non-tensor, a
    non-floating tensor, a dtype outside the rule; RuntimeError for tensors on different devices or a backend
    that cannot run the call.
    """
    _check(x, weight, lora_a, lora_b, magnitude, bias)
    scaling, dropout_p, seed = checks.scalars(scaling, dropout_p, training, seed)
    p, seed_t = checks.dropout_and_seed(dropout_p, training, seed)
    lead = x.shape[:-1]
    # an explicit row count: reshape(-1, 0) is ambiguous when in_features is 0 (which F.linear allows)
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    keep_z = torch.is_grad_enabled() and magnitude.requires_grad
    cached = None
    use_cache = not training and not torch.compiler.is_compiling()
    if use_cache:
        cache_args = (weight, lora_a, lora_b, float(scaling), x.dtype, _autocast_dtype(x.device))
        cached = _norm_cache.get(*cache_args)
    y, _, _, n = forward_op(x=x2, **fourbit.op_args(weight), lora_a=lora_a, lora_b=lora_b, magnitude=magnitude,
                            bias=bias, weight_norm=cached, scaling=float(scaling), dropout_p=p, seed=seed_t,
                            keep_z=keep_z)
    if use_cache and cached is None:
        _norm_cache.put(*cache_args, n)
    return y.view(*lead, weight.shape[0])
