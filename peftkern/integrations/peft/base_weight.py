"""The base layer's weight as the fused ops take it (a plain Linear's, a Conv1D's [out, in] view, a Linear4bit's
QuantizedWeight, the same object across calls), and the per-call check that a call can run fused at all."""
from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ...core import checks as _checks
from ...quant import QuantizedWeight
from .eligibility import _global_hooks, _hooked, _is_conv1d

# the integration's one logger: users and tests configure it by this name
log = logging.getLogger("peftkern.integrations.peft")

# base layer -> the weight object last handed to the fused ops for it (a Conv1D's [out, in] view, a Linear4bit's
# QuantizedWeight). Handing the same object each call is what lets dora_linear's eval-mode norm cache hit (it is
# keyed by the weight tensors' identity); a fresh view or QuantizedWeight per call would miss every time and leave
# a dead entry behind. Weak keys: an entry goes with its layer; values hold the parameter, never the layer.
_STABLE_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _conv1d_weight(base: nn.Module) -> torch.Tensor:
    """A Conv1D's weight ([in, out]) as the [out, in] view the fused ops take, the same view object while the
    parameter and its storage stay the same."""
    param = base.weight
    if param.requires_grad:
        return param.t()  # a view that carries autograd history is made per call
    entry = _STABLE_WEIGHTS.get(base)
    if entry is not None:
        held, view = entry
        if (held is param and view.data_ptr() == param.data_ptr() and view.dtype == param.dtype
                and view.device == param.device and view.shape == param.shape[::-1]
                and view.stride() == param.stride()[::-1]):
            return view
    with torch.no_grad():
        view = param.t()
    _STABLE_WEIGHTS[base] = (param, view)
    return view


def _quantized_weight(base: nn.Module) -> QuantizedWeight:
    """A Linear4bit's weight as a peftkern.QuantizedWeight over bitsandbytes' own storage, the same object while
    the Params4bit (object, storage, version counter), its quant_state and absmax's storage stay the same (bitsandbytes
    replaces the Params4bit when the layer moves, and its CPU repacking rewrites the quant_state: both make a new
    one). The version is checked here because QuantizedWeight.packed is a `.data` alias, whose own counter does
    not see in-place writes to the parameter."""
    param = base.weight
    state = getattr(param, "quant_state", None)
    entry = _STABLE_WEIGHTS.get(base)
    if entry is not None:
        held, held_state, version, qweight = entry
        if (held is param and held_state is state and state is not None and version == param._version
                and not getattr(state, "packing_format_for_cpu", False)
                and qweight.packed.data_ptr() == param.data_ptr()
                and qweight.absmax.data_ptr() == state.absmax.data_ptr()):
            return qweight
    qweight = QuantizedWeight.from_bnb(param)
    _STABLE_WEIGHTS[base] = (param, state, param._version, qweight)
    return qweight


def _base_weight(base: nn.Module, x: torch.Tensor):
    """(weight for lora_linear/dora_linear, bias) of the base layer for this input, or None when the call must run
    on PEFT's path. A bitsandbytes Linear4bit gives a peftkern.QuantizedWeight over its packed storage."""
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if _is_conv1d(base):
        return _conv1d_weight(base), base.bias
    # Linear4bit: its compute dtype is settled on the first call exactly as bitsandbytes' forward settles it
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    if base.compute_dtype is not None and base.compute_dtype != x.dtype:
        return None  # PEFT's LoRA branch sees x uncast while the base sees it cast: keep PEFT's two inputs
    if base.bias is not None and base.bias.dtype != x.dtype:
        return None  # bitsandbytes recasts the bias in place on its own path
    try:
        return _quantized_weight(base), base.bias
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. bitsandbytes' CPU-repacked layout
        log.info("peftkern: a Linear4bit runs on PEFT's forward: %s", err)
        return None


def _fusable_base(self, names, x: torch.Tensor, dora: bool = False, why: list | None = None):
    """(weight, bias) of the base layer for one fused call over adapters `names`, or None where the call must run on
    PEFT's forward: a hook on any module the fused path would skip, a base weight the ops do not take, dtypes or
    devices outside the ops' rule (all of `names`' adapter tensors are checked). When it gives None and `why` is a
    list, the reason is appended to it (for the log)."""
    def refuse(reason: str):
        if why is not None:
            why.append(reason)
        return None

    base = self.base_layer
    modules = [base] + [m for a in names for m in (self.lora_A[a], self.lora_B[a], self.lora_dropout[a])]
    if dora:
        modules += [self.lora_magnitude_vector[a] for a in names]
    if any(_hooked(m) for m in modules) or _global_hooks():
        # PEFT's forward calls those modules, hooks and all
        return refuse("a hook or forward override on the base layer or an adapter's modules, or a global module hook")
    base_weight = _base_weight(base, x)
    if base_weight is None:
        return refuse(f"the {type(base).__name__} base layer cannot run fused on this input (its compute or bias "
                      "dtype, or a storage layout the ops do not read)")
    weight, bias = base_weight
    quantized = isinstance(weight, QuantizedWeight)
    adapters = [t for a in names for t in (self.lora_A[a].weight, self.lora_B[a].weight)]
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if not autocast:
        # a 4-bit weight is dequantized into x's dtype: only the bias must match
        same_dtype = (quantized or x.dtype == weight.dtype) and (bias is None or bias.dtype == x.dtype)
        adapter_dtypes = (x.dtype,) if not getattr(self, "cast_input_dtype_enabled", True) \
            else _checks.adapter_dtypes(x.dtype)  # casting disabled: PEFT itself raises on a dtype mismatch
        if not same_dtype or any(t.dtype not in adapter_dtypes for t in adapters):
            return refuse(f"dtypes outside the fused op's rule (input {x.dtype}, base {weight.dtype}, adapters "
                          f"{sorted({str(t.dtype) for t in adapters})})")
    elif quantized:
        return refuse("autocast over a 4-bit base (bitsandbytes' autocast handling is its own)")
    if weight.device != x.device or any(t.device != x.device for t in adapters):
        return refuse("the base weight or an adapter is on another device than the input")  # PEFT (or its error)
    return weight, bias
