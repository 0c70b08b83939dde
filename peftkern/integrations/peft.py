"""peftkern as a drop-in backend for Hugging Face PEFT models.

    from peftkern.integrations.peft import patch, unpatch
    n = patch(peft_model)     # every LoRA Linear that can run fused now does; returns how many
    unpatch(peft_model)       # back to PEFT's own forward

patch() replaces the `forward` of each eligible `peft.tuners.lora.layer.Linear` instance with one that
computes the base layer and the first active adapter in one `peftkern.lora_linear` call (dropout,
bias, PEFT's `scaling` including rsLoRA), and any further active adapters with PEFT's own eager math.
Nothing else changes: no parameter, buffer or config is added, so state dicts, `save_pretrained`
output and adapter switching (`set_adapter`, `disable_adapter`, merging) behave exactly as before.
Per call, whatever the fused path does not cover (merged or disabled adapters, mixed-batch
`adapter_names`, extra forward arguments, mismatched dtypes) goes to PEFT's own forward.
Layers it cannot run at all (DoRA and other LoRA variants, lora_bias, a base layer that is not
nn.Linear or transformers' Conv1D, quantized layers, Conv, Embedding) stay on PEFT's path, and patch()
logs each one with the reason.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

from ..ops.lora import lora_linear

log = logging.getLogger(__name__)
_ATTR = "_peftkern_patched"


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _base_weight(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as [out, in], bias) of the base layer, or None if it is not a plain linear."""
    base = module.get_base_layer()
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if type(base).__name__ == "Conv1D" and type(base).__module__.startswith("transformers"):
        return base.weight.t(), base.bias  # GPT-2 style [in, out] weight: a strided view, no copy
    return None


def unsupported_reason(module) -> str | None:
    """Why this PEFT LoRA layer cannot use the fused path at all, or None if it can."""
    if type(module) is not _lora_linear_class():
        return f"{type(module).__module__}.{type(module).__name__} is not PEFT's LoRA Linear"
    if _base_weight(module) is None:
        return f"base layer {type(module.get_base_layer()).__name__} is not nn.Linear or Conv1D (quantized?)"
    for name in module.lora_A.keys():
        if name in getattr(module, "lora_variant", {}):
            return f"adapter {name!r} is a LoRA variant ({type(module.lora_variant[name]).__name__}, e.g. DoRA)"
        if getattr(module, "use_dora", {}).get(name):
            return f"adapter {name!r} uses DoRA"
        if getattr(module, "lora_bias", {}).get(name):
            return f"adapter {name!r} has lora_bias"
    return None


def _dropout_p(dropout: nn.Module) -> tuple[float, bool]:
    if isinstance(dropout, nn.Dropout):
        return float(dropout.p), dropout.training
    return 0.0, False  # nn.Identity


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    original = getattr(self, _ATTR)
    active = [a for a in self.active_adapters if a in self.lora_A.keys()]
    if args or kwargs or self.disable_adapters or self.merged or not active or unsupported_reason(self):
        return original(x, *args, **kwargs)
    weight, bias = _base_weight(self)
    lora_a, lora_b = self.lora_A[active[0]].weight, self.lora_B[active[0]].weight
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    dtypes_ok = x.dtype == weight.dtype and all(t.dtype in (x.dtype, torch.float32) for t in (lora_a, lora_b))
    if not (autocast or dtypes_ok) or (bias is not None and bias.dtype != weight.dtype and not autocast):
        return original(x, *args, **kwargs)
    p, training = _dropout_p(self.lora_dropout[active[0]])
    result = lora_linear(x, weight, lora_a, lora_b, scaling=float(self.scaling[active[0]]), bias=bias,
                         dropout_p=p, training=training)
    for name in active[1:]:  # further active adapters: PEFT's own eager math
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x_l = self._cast_input_dtype(x, lora_A.weight.dtype)
        result = result + (lora_B(lora_A(self.lora_dropout[name](x_l))) * self.scaling[name]).to(result.dtype)
    return result


def patch(model: nn.Module) -> int:
    """Run every eligible LoRA Linear of a PEFT model on peftkern; returns how many layers were patched."""
    linear_cls = _lora_linear_class()
    from peft.tuners.lora.layer import LoraLayer

    patched = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, _ATTR, None) is not None:
            continue
        reason = unsupported_reason(module) if isinstance(module, linear_cls) else \
            f"{type(module).__name__} layers have no fused path"
        if reason is not None:
            log.info("peftkern: %s stays on PEFT's own forward: %s", name, reason)
            continue
        setattr(module, _ATTR, module.forward)  # PEFT's bound forward, kept for fallbacks and unpatch
        module.forward = types.MethodType(_fused_forward, module)
        patched += 1
    return patched


def unpatch(model: nn.Module) -> int:
    """Undo patch(): every patched layer gets PEFT's own forward back. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, _ATTR, None) is not None:
            del module.forward  # the instance attribute; the class's forward shows through again
            delattr(module, _ATTR)
            restored += 1
    return restored
