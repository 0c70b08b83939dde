"""peftkern as a drop-in backend for Hugging Face PEFT models.

    from peftkern.integrations.peft import patch, unpatch
    n = patch(peft_model)     # every LoRA/DoRA Linear that can run fused now does; returns how many
    unpatch(peft_model)       # back to PEFT's own forward

What patch() does
    A LoRA layer is patched by changing its class from PEFT's `peft.tuners.lora.layer.Linear` to
    `FusedLoraLinear`, a subclass defined in this module whose only change is `forward`: the base layer
    and the first active adapter run as one `peftkern.lora_linear` call (dropout, bias, PEFT's `scaling`
    including rsLoRA), or as one `peftkern.dora_linear` call when that adapter uses DoRA (below).
    Several active plain-LoRA adapters (`set_adapter([...])`) with no dropout in effect run as one lora_linear
    call over the adapters concatenated along the rank (each adapter's B pre-scaled by its scaling, built with
    differentiable ops, so each gets its own gradient); with dropout in effect PEFT draws an independent mask
    per adapter, which one call cannot reproduce, so, as with DoRA among them, further active adapters run
    PEFT's own eager math (a further DoRA adapter through PEFT's own `DoraLinearVariant.forward`, on the
    running result exactly as PEFT hands it over).
    A mixed batch (`adapter_names=[...]` in `forward` or `generate`, beam search included: one adapter per sample,
    "__base__" or a name the layer does not hold for the base model) runs as one `peftkern.multi_lora_linear` call
    instead of PEFT's `_mixed_batch_forward` loop (over a Linear4bit base too: the op takes the QuantizedWeight),
    where PEFT would not raise (length mismatch, merged adapters, DoRA among the names: PEFT's forward runs and
    raises its own error) and the adapters it uses are plain LoRA of one dtype whose dropouts in effect are equal
    (multi_lora_linear takes one dropout_p; each row only ever sees its own adapter's mask), under the per-call
    conditions below. Each mixed-batch call left on PEFT's path logs why at DEBUG (it is decided per call and per
    layer, so INFO would flood a generate loop). No parameter, buffer or
    config is added, so state dicts, `save_pretrained` output, `repr`, adapter switching (`set_adapter`,
    `disable_adapter`, merging) behave exactly as before.

DoRA (use_dora=True, PEFT's `DoraLinearVariant`)
    The first active adapter runs as `dora_linear(x, W, lora_A.weight, lora_B.weight,
    lora_magnitude_vector[name].weight, ...)`, PEFT's DoRA Linear math: the row norm of W + scaling·B·A comes
    from the current adapters and is a constant in backward; dropout hits the adapter branch only while the LoRA
    layer is in training mode (PEFT's rule for DoRA; for plain LoRA it is the dropout module's mode). In eval
    mode dora_linear caches that norm, keyed so that any change of lora_A/lora_B (even through `.data`), of the
    scaling, or an in-place change of the base weight is seen; a write into the *base weight* through `.data` is
    the one change it cannot see (`peftkern.dora.clear_norm_cache()` after such a write). PEFT's own cache
    (`peft.tuners.lora.dora.ENABLE_DORA_CACHING = True`) is keyed by adapter name only and serves a stale norm
    after such changes; while it is on, eval-mode calls run on PEFT's forward, so patched and unpatched models
    compute the same thing with it on and off. DoRA on Embedding and Conv layers stays on PEFT's path (those
    classes have no fused path at all).

Why a class swap (and not a bound method stored on each instance)
    A class defined at module level pickles by reference (`peftkern.integrations.peft.FusedLoraLinear`), so
    a patched model round-trips through `pickle`, `torch.save`/`torch.load` (whole model) and
    `copy.deepcopy` and comes back patched; a bound method in the instance `__dict__` does not unpickle.
    A bitsandbytes `Linear4bit` base comes back from pickle with a plain `nn.Parameter` weight (torch's Parameter
    pickling drops the `Params4bit` subclass) that still carries its bitsandbytes `quant_state`;
    `QuantizedWeight.from_bnb` reads that form too, so such a layer runs fused again after the round trip.
    Module hooks on the patched layer itself keep working because `nn.Module.__call__` runs them around
    whichever `forward` the class has. (torch's own parametrize and FSDP2 patch modules the same way.)

Which layers, and when they fall back
    Decided once per layer in patch(): only a PEFT LoRA `Linear` (exactly that class) whose *direct*
    `base_layer` is a plain `nn.Linear`, transformers' `Conv1D` or a bitsandbytes `Linear4bit`, and PEFT's
    bitsandbytes 4-bit LoRA class over a `Linear4bit` (patched to `FusedLoraLinear4bit`), are patched.
    Anything else stays on PEFT's forward: LoRA stacked on another adapter (LoHa/LoKr/AdaLoRA in a
    `PeftMixedModel`, whose base layer is that adapter's layer), other quantized or wrapped base layers,
    Embedding/Conv LoRA and DoRA layers, adapters that are a LoRA variant other than DoRA (aLoRA, VeLoRA, ...).
    patch() logs each one
    (logger `peftkern.integrations.peft`, INFO) and emits one `LayersNotPatchedWarning` per call that lists
    them, grouped by reason; it is silent when every LoRA layer was patched.
    Checked per call (things that can change after patch()), falling back to PEFT's forward for that call:
    extra forward arguments other than `adapter_names`, merged or disabled adapters, an active
    adapter that is a LoRA variant other than DoRA or has `lora_bias` (e.g. added later by `add_adapter`),
    dropout other than `nn.Dropout`/`nn.Identity`, dtypes or devices the fused op does not take (or
    `disable_input_dtype_casting` with adapters in another dtype than the input, where PEFT raises), PEFT's
    DoRA cache switched on in eval mode (above), and
    any forward (pre-)hook, backward hook, instance-level `forward` override or accelerate `_hf_hook` on
    the base layer, lora_A, lora_B, the dropout module or the DoRA magnitude layer (e.g. `accelerate.cpu_offload`,
    `device_map` offloading, a user's hook), or a global module hook: the fused path would skip them.

Layers added after patch()
    patch() marks the model; PEFT's `BaseTuner.inject_adapter` (behind `get_peft_model`, `add_adapter`,
    `load_adapter`, `inject_adapter_in_model`) is wrapped once, at import of this module, so that after it
    injects into a marked model the new LoRA layers are patched too (and any it cannot patch are
    reported). On unmarked models the wrapper only calls PEFT's method. unpatch() removes the mark.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections import defaultdict

import torch
from peft.tuners.lora import dora as _peft_dora
from peft.tuners.lora.layer import Linear as _PeftLoraLinear, LoraLayer
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...core import checks as _checks

# the fused forwards below call lora_linear, dora_linear and multi_lora_linear through this module's globals, so
# replacing them here (a test's spy, PEFT's suite plugin counting fused calls) reaches every patched layer
from ...dora import dora_linear
from ...lora import lora_linear
from ...multi_lora import multi_lora_linear
from .base_weight import _fusable_base
from .eligibility import (
    _adapter_reason,
    _effective_dropout,
    _is_conv1d,
    _is_dora,
    _is_linear4bit,
    _peft_bnb_lora_class,
)

__all__ = ["patch", "unpatch", "unsupported_reason", "FusedLoraLinear", "LayersNotPatchedWarning"]

log = logging.getLogger(__name__)
# a plain bool attribute on the model (and its PEFT tuner objects): new LoRA layers injected into a model
# carrying it are patched as they appear; being in the instance __dict__, it survives pickling and deepcopy
_MARK = "_peftkern_patch_new_layers"


class LayersNotPatchedWarning(UserWarning):
    """patch() left some LoRA layers on PEFT's own forward; the message lists them and why."""


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the PEFT LoRA layer `module` cannot be patched at all, or None if patch() can patch it.

    Decided from what cannot change after patch(): the layer's class and its direct base layer, plus the
    adapters it holds now (an adapter added later is checked per call instead).
    """
    # the *direct* base layer: get_base_layer() would unwrap a LoHa/LoKr/AdaLoRA layer underneath and the
    # fused op would silently drop that adapter
    base = getattr(module, "base_layer", None)
    if type(module) in (_PeftLoraLinear, FusedLoraLinear):
        if type(base) is not nn.Linear and not _is_conv1d(base) and not _is_linear4bit(base):
            return (f"base layer is {type(base).__module__}.{type(base).__name__}, not a plain nn.Linear, "
                    "transformers Conv1D or bitsandbytes Linear4bit (another adapter underneath, or wrapped)")
    elif type(module) in (_peft_bnb_lora_class(), _fused_4bit_class()):
        if not _is_linear4bit(base):
            return f"base layer is {type(base).__module__}.{type(base).__name__}, not a bitsandbytes Linear4bit"
    else:
        # Embedding/Conv LoRA and DoRA layers, and every other adapter type's layers
        return (f"{type(module).__module__}.{type(module).__name__} layers have no fused path (only LoRA and DoRA "
                "on Linear layers run fused)")
    for name in module.lora_A.keys():
        reason = _adapter_reason(module, name)
        if reason is not None:
            return reason
    return None


class FusedLoraLinear(_PeftLoraLinear):
    """PEFT's LoRA `Linear` whose forward runs on `peftkern.lora_linear` (or `peftkern.dora_linear` for a DoRA
    adapter) where it can (see the module doc).

    Never constructed directly: patch() switches eligible layers' class to it, unpatch() switches back.
    """

    def _get_name(self) -> str:
        return _PeftLoraLinear.__name__  # print(model) stays exactly PEFT's ("lora.Linear(...)")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _fused_forward(self, super().forward, x, *args, **kwargs)


def _fused_forward(self, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The forward of the patched classes: the base layer and the active adapter(s) in one lora_linear (or, for a
    DoRA adapter, dora_linear) call, a mixed batch (`adapter_names`) in one multi_lora_linear call, where every
    per-call condition holds (module doc); PEFT's own `peft_forward` otherwise."""
    if kwargs.keys() == {"adapter_names"} and not args and kwargs["adapter_names"] is not None:
        return _mixed_batch_forward(self, peft_forward, x, kwargs["adapter_names"])
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(x, *args, **kwargs)
    lora_keys = self.lora_A.keys()
    active = [a for a in self.active_adapters if a in lora_keys]
    if not active or any(_adapter_reason(self, a) is not None for a in active):
        return peft_forward(x, *args, **kwargs)
    if len(active) > 1 and not any(_is_dora(self, a) for a in active):
        return _several_adapters_forward(self, peft_forward, x, active)
    first = active[0]
    lora_A, lora_B, dropout = self.lora_A[first], self.lora_B[first], self.lora_dropout[first]
    dora = _is_dora(self, first)
    magnitude_layer = self.lora_magnitude_vector[first] if dora else None
    if dora and _peft_dora.ENABLE_DORA_CACHING and not magnitude_layer.training:
        return peft_forward(x, *args, **kwargs)  # PEFT's own norm cache decides what this call computes
    fusable = _fusable_base(self, [first], x, dora=dora)
    if fusable is None:
        return peft_forward(x, *args, **kwargs)
    weight, bias = fusable
    lora_a, lora_b = lora_A.weight, lora_B.weight
    magnitude = magnitude_layer.weight if dora else None
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if dora and not autocast:
        adapter_dtypes = (x.dtype,) if not getattr(self, "cast_input_dtype_enabled", True) \
            else _checks.adapter_dtypes(x.dtype)
        if magnitude.dtype not in adapter_dtypes or lora_b.dtype != lora_a.dtype:
            return peft_forward(x, *args, **kwargs)  # PEFT computes (or raises) in dtypes dora_linear does not take
    if dora and magnitude.device != x.device:
        return peft_forward(x, *args, **kwargs)
    scaling = float(self.scaling[first])
    if dora:
        # PEFT's DoRA applies dropout only while the LoRA layer trains (an nn.Identity or eval mode: none), and its
        # cache decorator empties the DoRA layer's cache on every call it does not cache (this one)
        magnitude_layer._cache_clear()
        drop = self.training and isinstance(dropout, nn.Dropout) and dropout.training
        result = dora_linear(x, weight, lora_a, lora_b, magnitude, scaling=scaling, bias=bias,
                             dropout_p=float(dropout.p) if drop else 0.0, training=self.training)
    else:
        p = _effective_dropout(self, first)
        result = lora_linear(x, weight, lora_a, lora_b, scaling=scaling, bias=bias, dropout_p=p, training=p > 0.0)
    if len(active) == 1:
        return result
    return _further_adapters(self, active[1:], x, result, lora_a.dtype)


def _several_adapters_forward(self, peft_forward, x: torch.Tensor, active) -> torch.Tensor:
    """Several plain-LoRA adapters active at once (`set_adapter([...])`): PEFT adds each adapter's branch to the base
    result; with no dropout in effect their sum is one LoRA of the concatenated rank,
    Σ_i s_i·(x·A_iᵀ)·B_iᵀ = (x·[A_1; A_2; ...]ᵀ)·[s_1·B_1, s_2·B_2, ...]ᵀ, so one lora_linear call runs them all (the
    concatenation is built with differentiable ops: every adapter gets its own gradient). With dropout in effect
    PEFT draws an independent mask per adapter, which one call's single mask cannot reproduce: the first adapter
    runs fused and the others on PEFT's eager math (_further_adapters)."""
    fusable = _fusable_base(self, active, x)
    if fusable is None:
        return peft_forward(x)
    weight, bias = fusable
    lora_as = [self.lora_A[a].weight for a in active]
    lora_bs = [self.lora_B[a].weight for a in active]
    first = active[0]
    if any(_effective_dropout(self, a) > 0.0 for a in active) or len({t.dtype for t in (*lora_as, *lora_bs)}) > 1:
        p = _effective_dropout(self, first)
        result = lora_linear(x, weight, lora_as[0], lora_bs[0], scaling=float(self.scaling[first]), bias=bias,
                             dropout_p=p, training=p > 0.0)
        return _further_adapters(self, active[1:], x, result, lora_as[0].dtype)
    lora_a = torch.cat(lora_as, dim=0)
    lora_b = torch.cat([b * float(self.scaling[a]) for a, b in zip(active, lora_bs)], dim=1)
    return lora_linear(x, weight, lora_a, lora_b, scaling=1.0, bias=bias, training=False)


def _mixed_batch_forward(self, peft_forward, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """PEFT's mixed batch (`adapter_names=[...]`, one name per sample, "__base__" or a name this layer does not have:
    the base layer alone) as one multi_lora_linear call, where PEFT's own forward would run `_mixed_batch_forward`
    (its Python loop that gathers and scatters each adapter's sub-batch). Falls back to PEFT's forward (the reason
    logged at DEBUG: this is decided per call, per layer) for everything PEFT's `_check_forward_args` raises on (a
    length mismatch, merged adapters, DoRA), so its errors stay its own, and whatever multi_lora_linear does not
    reproduce: other LoRA variants, adapters whose dropouts differ in effect (it takes one dropout_p; each row sees
    only its own adapter's mask), adapter tensors of more than one dtype, and the per-call conditions of lora_linear
    (hooks, dtypes, devices, autocast over a 4-bit base)."""
    plan = _mixed_batch_plan(self, x, adapter_names)
    if isinstance(plan, str):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("peftkern: a mixed batch (adapter_names) runs on PEFT's forward: %s", plan)
        return peft_forward(x, adapter_names=adapter_names)
    weight, bias, used, p = plan
    index = {a: i for i, a in enumerate(used)}
    ids = torch.tensor([index.get(a, -1) for a in adapter_names], dtype=torch.int64, device=x.device)
    return multi_lora_linear(x, weight, [self.lora_A[a].weight for a in used], [self.lora_B[a].weight for a in used],
                             ids, scalings=[float(self.scaling[a]) for a in used], bias=bias, dropout_p=p,
                             training=p > 0.0)


def _mixed_batch_plan(self, x: torch.Tensor, adapter_names):
    """(weight, bias, adapters used in first-appearance order, dropout_p) for one multi_lora_linear call over this
    mixed batch, or the reason (a str) it runs on PEFT's forward."""
    if self.disable_adapters:
        return "adapters are disabled"  # PEFT runs the base layer alone (after its argument checks)
    if self.merged:
        return "merged adapters (PEFT raises)"
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(a, str) for a in adapter_names):
        return f"adapter_names is not a list of str ({type(adapter_names).__name__})"
    if x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return f"{len(adapter_names)} adapter_names for an input of shape {tuple(x.shape)} (PEFT raises)"
    unique = dict.fromkeys(adapter_names)  # first-appearance order
    dora = [a for a in unique if a != "__base__" and self.use_dora.get(a, False)]  # PEFT's own test, on every name
    if dora:
        return f"adapter {dora[0]!r} uses DoRA (PEFT raises)"
    lora_keys = self.lora_A.keys()
    # names this layer does not hold and "__base__" select the base layer alone (id -1), as in PEFT
    used = [a for a in unique if a != "__base__" and a in lora_keys]
    if not used:
        return "no adapter of this layer in the batch (the base layer alone)"
    for a in used:
        reason = _adapter_reason(self, a)
        if reason is not None:
            return reason
    # multi_lora_linear takes one dropout_p (each row then sees only its own adapter's mask, as in PEFT's
    # sub-batches): adapters whose dropouts differ in effect (training) cannot share it
    dropouts = {a: _effective_dropout(self, a) for a in used}
    if len(set(dropouts.values())) > 1:
        return f"adapters with different dropout in effect ({dropouts})"
    dtypes = {t.dtype for a in used for t in (self.lora_A[a].weight, self.lora_B[a].weight)}
    if len(dtypes) > 1:
        return f"adapter tensors of more than one dtype ({sorted(map(str, dtypes))})"
    why = []
    fusable = _fusable_base(self, used, x, why=why)
    if fusable is None:
        return why[0]
    return (*fusable, used, dropouts[used[0]])


def _further_adapters(self, names, x: torch.Tensor, result: torch.Tensor, first_dtype: torch.dtype) -> torch.Tensor:
    """Active adapters after the first: PEFT's own eager math, in its order of casts and accumulation (the
    bitsandbytes class casts each adapter's output back to the result dtype, the generic class only at the end). A
    DoRA adapter runs PEFT's own DoraLinearVariant.forward on the running result, as PEFT passes it."""
    result_dtype = result.dtype
    twin = _fused_4bit_class()
    per_adapter_cast = twin is not None and isinstance(self, twin)
    x = self._cast_input_dtype(x, first_dtype)
    for name in names:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        if name in self.lora_variant:  # DoRA: _adapter_reason let no other variant through
            result = self.lora_variant[name].forward(self, active_adapter=name, x=x, result=result)
            if per_adapter_cast:
                result = result.to(result_dtype)
        else:
            output = lora_B(lora_A(self.lora_dropout[name](x))) * self.scaling[name]
            if per_adapter_cast:
                output = output.to(result_dtype)
            result = result + output
    return result.to(result_dtype)


_FUSED_4BIT = []  # the 4-bit twin class, once made (at most one per process: pickles name it)


def _fused_4bit_class(import_bnb: bool = False):
    """FusedLoraLinear's twin for PEFT's bitsandbytes LoRA class (`peft.tuners.lora.bnb.Linear4bit`, which PEFT
    uses for 4-bit bases), made the first time it is asked for once bitsandbytes is imported (`import_bnb`:
    import it here); None while it is not. Made lazily because PEFT 0.22 no longer imports bitsandbytes itself:
    a process imports it only when it builds a 4-bit layer, which may be after this module was imported."""
    if _FUSED_4BIT:
        return _FUSED_4BIT[0]
    if import_bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return None
    base_cls = _peft_bnb_lora_class()
    if base_cls is None:
        return None

    class FusedLoraLinear4bit(base_cls):
        """PEFT's bitsandbytes 4-bit LoRA layer whose forward runs on `peftkern.lora_linear` (or
        `peftkern.dora_linear` for a DoRA adapter) where it can."""

        def _get_name(self) -> str:
            return base_cls.__name__

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return _fused_forward(self, super().forward, x, *args, **kwargs)

    FusedLoraLinear4bit.__qualname__ = FusedLoraLinear4bit.__name__  # pickles by reference, as FusedLoraLinear
    FusedLoraLinear4bit.__module__ = __name__
    _FUSED_4BIT.append(FusedLoraLinear4bit)
    return FusedLoraLinear4bit


def __getattr__(name: str):
    """`FusedLoraLinear4bit` is made on first access (see _fused_4bit_class), importing bitsandbytes if it can:
    unpickling a patched 4-bit model looks the class up by this name. None without bitsandbytes."""
    if name == "FusedLoraLinear4bit":
        return _fused_4bit_class(import_bnb=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_twin(cls):
    """The patched class for PEFT's LoRA class `cls`."""
    return FusedLoraLinear if cls is _PeftLoraLinear else _fused_4bit_class()


def _peft_class(cls):
    """PEFT's class for a patched class `cls`, or None when `cls` is no patched class."""
    if cls is FusedLoraLinear:
        return _PeftLoraLinear
    twin = _FUSED_4BIT[0] if _FUSED_4BIT else None
    return _peft_bnb_lora_class() if twin is not None and cls is twin else None


def _check_model(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}(model): `model` must be a torch.nn.Module (a PEFT model or a model with PEFT "
                        f"LoRA layers), got {type(model).__name__}")


def _patch_layers(model: nn.Module, skip: set[int] = frozenset()) -> tuple[int, int, list[tuple[str, str]]]:
    """Patch every eligible LoRA layer of `model` not in `skip` (ids). Returns (patched now, LoRA layers
    seen, [(name, reason)] of those left on PEFT's path)."""
    patched, seen, skipped = 0, 0, []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or id(module) in skip:
            continue
        seen += 1
        if _peft_class(type(module)) is not None:
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            log.info("peftkern: %s stays on PEFT's own forward: %s", name, reason)
            skipped.append((name or type(model).__name__, reason))
            continue
        module.__class__ = _fused_twin(type(module))
        patched += 1
    return patched, seen, skipped


def _warn_skipped(seen: int, skipped: list[tuple[str, str]], stacklevel: int) -> None:
    if not skipped:
        return
    by_reason = defaultdict(list)
    for name, reason in skipped:
        by_reason[reason].append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{len(names)} x {reason} ({shown})")
    warnings.warn(f"peftkern patch(): {len(skipped)} of {seen} LoRA layers stay on PEFT's own forward: "
                  + "; ".join(parts), LayersNotPatchedWarning, stacklevel=stacklevel + 1)


def _set_mark(model: nn.Module, value: bool) -> None:
    # mark the model and every PEFT tuner inside it (and the model each tuner wraps): inject_adapter is
    # called on the tuner with the wrapped model, or on PeftMixedModel's tuner with PeftMixedModel itself
    targets = [model] + [m for m in model.modules() if isinstance(m, BaseTuner)]
    targets += [t.model for t in targets if isinstance(t, BaseTuner) and isinstance(t.model, nn.Module)]
    for t in targets:
        if value:
            t.__dict__[_MARK] = True
        else:
            t.__dict__.pop(_MARK, None)


def patch(model: nn.Module) -> int:
    """Run every eligible LoRA (and DoRA) Linear of a Hugging Face PEFT model on `peftkern.lora_linear`
    (`peftkern.dora_linear`).

    Args:
        model: a `PeftModel`, `PeftMixedModel`, PEFT tuner (`LoraModel`) or any `nn.Module` holding PEFT LoRA
            layers (e.g. after `inject_adapter_in_model`). Patched in place; calling it again is harmless.
    Returns:
        the number of layers patched by this call.
    Raises:
        TypeError: `model` is not an `nn.Module`.
    Warns:
        LayersNotPatchedWarning: once per call if some LoRA layers stay on PEFT's own forward (or there are
            none), listing them grouped by reason. Silent when every LoRA layer was patched.

    Outputs and gradients match PEFT's forward within dtype tolerance; the state dict and saved adapters are
    unchanged. Layers that PEFT injects into this model later (`add_adapter`, `load_adapter`, ...) are
    patched as they appear. The patched model pickles, `torch.save`s and deep-copies as a patched model.
    """
    _check_model(model, "patch")
    patched, seen, skipped = _patch_layers(model)
    _set_mark(model, True)
    if seen == 0:
        warnings.warn(f"peftkern patch(): found no PEFT LoRA layers in this {type(model).__name__}; nothing "
                      "was patched", LayersNotPatchedWarning, stacklevel=2)
    _warn_skipped(seen, skipped, stacklevel=2)
    return patched


def unpatch(model: nn.Module) -> int:
    """Undo patch(): every patched layer runs PEFT's own forward again and layers injected later are no
    longer patched. Returns how many layers were restored. Raises TypeError if `model` is not an nn.Module."""
    _check_model(model, "unpatch")
    restored = 0
    for module in model.modules():
        peft_cls = _peft_class(type(module))
        if peft_cls is not None:
            module.__class__ = peft_cls
            restored += 1
    _set_mark(model, False)
    return restored


def _marked(obj) -> bool:
    return isinstance(obj, nn.Module) and obj.__dict__.get(_MARK, False)


def _install_inject_hook() -> None:
    """Wrap `BaseTuner.inject_adapter` once so that injection into a patched model patches the new layers."""
    original = BaseTuner.inject_adapter
    if getattr(original, "_peftkern_wrapped", False):  # importlib.reload of this module
        return

    @functools.wraps(original)
    def inject_adapter(self, model, *args, **kwargs):
        if not (_marked(self) or _marked(model)):
            return original(self, model, *args, **kwargs)
        before = {id(m) for m in model.modules() if isinstance(m, LoraLayer)}
        result = original(self, model, *args, **kwargs)
        _, seen, skipped = _patch_layers(model, skip=before)
        _warn_skipped(seen, skipped, stacklevel=2)
        return result

    inject_adapter._peftkern_wrapped = True
    BaseTuner.inject_adapter = inject_adapter


_install_inject_hook()
