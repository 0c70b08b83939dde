"""Which PEFT LoRA layers and adapters the fused path can run, decided from their classes, adapters and hooks (the
patch-time part of eligibility lives beside patch() in peftkern.integrations.peft: unsupported_reason)."""
from __future__ import annotations

import sys

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn
from torch.nn.modules import module as _torch_module


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")


def _bnb():
    """bitsandbytes when the process has imported it (a Linear4bit can only exist then), else None."""
    return sys.modules.get("bitsandbytes")


def _is_linear4bit(layer: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and type(layer) is bnb.nn.Linear4bit


def _peft_bnb_lora_class():
    """PEFT's LoRA class for bitsandbytes 4-bit bases (PEFT picks it on GPU), or None when not importable."""
    if _bnb() is None:
        return None
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _is_dora(module, name: str) -> bool:
    """True when adapter `name` of `module` is PEFT's DoRA on a Linear layer (exactly PEFT's classes: a subclass
    could change the math that dora_linear reproduces)."""
    return type(getattr(module, "lora_variant", {}).get(name)) is DoraLinearVariant


def _adapter_reason(module, name: str) -> str | None:
    variant = getattr(module, "lora_variant", {}).get(name)
    if variant is not None and not _is_dora(module, name):
        return (f"adapter {name!r} is a LoRA variant other than DoRA ({type(variant).__name__}), which has no "
                "fused path")
    if _is_dora(module, name):
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        layer = magnitudes[name] if magnitudes is not None and name in magnitudes else None
        if type(layer) is not DoraLinearLayer or not isinstance(getattr(layer, "weight", None), torch.Tensor):
            return f"adapter {name!r} uses DoRA with a magnitude layer other than PEFT's DoraLinearLayer"
        # PEFT transposes the base weight inside its DoRA math iff fan_in_fan_out: only right for a Conv1D base
        if bool(layer.fan_in_fan_out) != _is_conv1d(module.base_layer):
            return (f"adapter {name!r} uses DoRA with fan_in_fan_out={layer.fan_in_fan_out} over a "
                    f"{type(module.base_layer).__name__} base layer")
    elif getattr(module, "use_dora", {}).get(name):
        return f"adapter {name!r} uses DoRA without PEFT's DoraLinearVariant"
    if getattr(module, "lora_bias", {}).get(name):
        return f"adapter {name!r} has lora_bias"
    if type(module.lora_A[name]) is not nn.Linear or type(module.lora_B[name]) is not nn.Linear:
        return f"adapter {name!r} has lora_A/lora_B modules other than nn.Linear"
    if type(module.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"adapter {name!r} has dropout {type(module.lora_dropout[name]).__name__}"
    return None


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _hooked(m: nn.Module) -> bool:
    """True if calling `m` would run anything besides its class's forward: the fused path never calls it."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or hasattr(m, "_hf_hook"))


def _effective_dropout(self, name: str) -> float:
    """The dropout PEFT applies to plain-LoRA adapter `name` in this call (its module's own mode decides)."""
    dropout = self.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
