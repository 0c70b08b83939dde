"""Thin nn.Modules over the functional ops; they hold parameters and call the ops, no math of their own."""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from .core import checks as _checks
from .lora import lora_linear
from .multi_lora import multi_lora_linear
from .ops.adapter import bottleneck_adapter
from .ops.dora import dora_linear, row_norms
from .ops.sparse_diff import sparse_diff_linear
from .reference.activations import CODES as _ACTIVATIONS, NAMES as _ACTIVATION_NAMES
from .reference.dora import column_scale as _dora_column_scale


def _is_linear4bit(module) -> bool:
    """A bitsandbytes Linear4bit, recognised without importing bitsandbytes (it is optional)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_linear8bit(module) -> bool:
    """A bitsandbytes 8-bit linear (LLM.int8's Linear8bitLt), recognised without importing bitsandbytes."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, getattr(bnb.nn, "Linear8bitLt", ()))


def _check_dense_linear(cls_name: str, linear, takes_4bit: bool) -> None:
    """The refusals every from_linear shares, before anything is built: not an nn.Linear, a bitsandbytes 8-bit
    layer (an nn.Linear subclass whose int8 weight and matmul peftkern does not reproduce), or any other nn.Linear
    subclass whose weight is not floating. `takes_4bit`: whether the class also takes a Linear4bit (the message
    then offers it)."""
    accepted = "a torch.nn.Linear or a bitsandbytes Linear4bit" if takes_4bit else "a torch.nn.Linear"
    if _is_linear8bit(linear):
        instead = ("load the base in 4-bit (bitsandbytes Linear4bit, BitsAndBytesConfig(load_in_4bit=True)) or "
                   "unquantized" if takes_4bit else "load the base unquantized (or in 4-bit and call "
                   "peftkern.multi_lora_linear over peftkern.QuantizedWeight.from_bnb(layer))")
        raise TypeError(f"{cls_name}.from_linear: linear is a bitsandbytes {type(linear).__name__} (8-bit, LLM.int8), "
                        f"and 8-bit bases are not supported (their int8 weight and outlier matmul have no peftkern "
                        f"path); linear must be {accepted}: {instead}")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be {accepted}, got {type(linear).__name__}")
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{cls_name}.from_linear: linear ({type(linear).__name__}) has a weight of dtype "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}, not a floating dtype (a quantized or "
                        f"packed layer peftkern cannot read); linear must be {accepted} with a floating weight")


# the quantization state bitsandbytes' Linear4bit writes beside its packed "weight" (QuantState.as_dict(packed=True)):
# "weight.absmax", "weight.quant_map", "weight.nested_*", "weight.quant_state.bitsandbytes__<quant_type>"
_QUANT_STATE_PREFIX = "weight."


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-r update (LoRA):

        y = x·weightᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ,   scaling = alpha / r

    Build one around an existing layer with `LoRALinear.from_linear(linear, r, alpha, dropout)`, or
    from scratch with `LoRALinear(in_features, out_features, ...)` (the frozen weight and bias then get
    nn.Linear's initialisation).

    Args:
        in_features: int >= 0, the width of x's last dim (0 is allowed, as in nn.Linear: y is the bias).
        out_features: int >= 0, the width of y's last dim.
        r: int >= 1, the rank of the update.
        alpha: finite real number; the update is scaled by alpha / r (PEFT's `lora_alpha`).
        dropout: real number in [0, 1): dropout on the LoRA branch only (the base path never sees it),
            active in training mode; kept elements are scaled by 1/(1 - dropout).
        bias: whether the frozen base layer has a bias.
        device, dtype: where and in which floating dtype the four parameters are made.

    Parameters: `weight` [out_features, in_features] and `bias` [out_features] (or None), both frozen
    (requires_grad False); `lora_a` [r, in_features] Kaiming-uniform and `lora_b` [out_features, r] zeros,
    PEFT's default initialisation, so a new layer computes exactly its base linear.

    Raises (in the constructor, naming the argument): TypeError when in_features, out_features or r is
    not an int, or alpha or dropout is not a real number; ValueError when one is out of range or not finite.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        in_features = _checks.integer("in_features", in_features, low=0)  # numpy integers become ints
        out_features = _checks.integer("out_features", out_features, low=0)
        r = _checks.integer("r", r, low=1)
        alpha = _checks.real_number("alpha", alpha)
        dropout = _checks.real_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = dropout
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, **factory))
        self._merged_backup: torch.Tensor | None = None
        self.quantized_weight = None  # a peftkern.QuantizedWeight when built over a bitsandbytes Linear4bit
        self.compute_dtype = None
        self._compute_dtype_set = False
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation, for layers built from scratch
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """Re-initialise the adapter as PEFT does by default: `lora_a` Kaiming-uniform (a=sqrt(5)), `lora_b`
        zeros, so the layer computes its base linear again. The frozen weight and bias are not touched."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> "LoRALinear":
        """A LoRALinear over an existing nn.Linear, or over a bitsandbytes 4-bit `Linear4bit` (QLoRA).

        The linear's `weight` and `bias` are shared, not copied, and frozen (their requires_grad is set to
        False, also as seen from `linear`). `lora_a` [r, in_features] and `lora_b` [out_features, r] are new,
        on the linear's device and in its dtype, with PEFT's default initialisation, so the result computes
        exactly what `linear` computes until `lora_b` is trained. r, alpha and dropout are as in the
        constructor. Raises TypeError when `linear` is not an nn.Linear, is a bitsandbytes 8-bit Linear8bitLt
        (not supported) or has a non-floating weight, and the constructor's errors for r, alpha and dropout.

        A `Linear4bit` keeps its packed 4-bit weight (`weight` is its Params4bit; `quantized_weight` is a
        peftkern.QuantizedWeight sharing that storage): the base product is dequantized a block at a time
        inside lora_linear, in the layer's compute dtype as bitsandbytes computes it (x is cast to
        `compute_dtype` when the Linear4bit has one, and the result back to x's dtype). The adapters are
        float32 (PEFT's choice for 4-bit bases). `merge_()` refuses such a layer. Its state dict holds the
        whole quantization state beside the packed `weight`, under bitsandbytes' names (`weight.absmax`,
        `weight.quant_map`, `weight.nested_*`, `weight.quant_state.bitsandbytes__<quant_type>`), and
        `load_state_dict` reads it back (a Linear4bit's own state dict too), refusing packed bytes without it.
        """
        if _is_linear4bit(linear):
            return cls._from_linear4bit(linear, r, alpha, dropout)
        _check_dense_linear(cls.__name__, linear, takes_4bit=True)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                    bias=linear.bias is not None, device="meta", dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_a = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_b = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    @classmethod
    def _from_linear4bit(cls, linear, r: int, alpha: float, dropout: float) -> "LoRALinear":
        from .quant import QuantizedWeight
        qw = QuantizedWeight.from_bnb(linear.weight)
        out_features, in_features = qw.shape
        device = qw.device
        layer = cls(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=linear.bias is not None,
                    device="meta", dtype=torch.float32)
        layer.weight = linear.weight  # the Params4bit itself: state_dict and the bitsandbytes layer stay as they were
        layer.weight.requires_grad_(False)
        layer.quantized_weight = qw
        layer.compute_dtype = getattr(linear, "compute_dtype", None)
        layer._compute_dtype_set = bool(getattr(linear, "compute_type_is_set", False))
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        layer.lora_b = nn.Parameter(torch.empty(out_features, r, device=device, dtype=torch.float32))
        layer.reset_lora_parameters()
        return layer

    # ------------------------------------------------------------------ state dict of a 4-bit base
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A 4-bit base saves its whole quantization state beside the packed `weight`, under the names bitsandbytes'
        Linear4bit uses ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__<quant_type>"): the packed bytes alone cannot be dequantized."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qw = self.quantized_weight
        if qw is None:
            return
        if self.weight.data_ptr() != qw.packed.data_ptr():
            # the shared Linear4bit has rewritten its Params4bit since (bitsandbytes' CPU-repacked layout): this layer
            # computes with the bytes it took, so those are what it saves
            destination[prefix + "weight"] = qw.packed.view(-1, 1) if keep_vars else qw.packed.detach().view(-1, 1)
        for key, value in qw.quant_state_dict().items():
            destination[prefix + _QUANT_STATE_PREFIX + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A 4-bit base loads the packed `weight` together with its quantization state (bitsandbytes' names, as
        saved above or by a Linear4bit), all checked before anything changes: packed bytes without that state, state
        without the bytes, an inconsistent state (lengths, tables, non-finite scales, ...) or another [out, in]
        shape are reported as load errors (load_state_dict raises RuntimeError listing them) and leave this layer
        (weight, bias, adapters) as it was. A loaded weight is copied onto this layer's device (assign=True keeps
        the given tensors) and
        replaces the bytes and quant_state of the Params4bit this layer shares with its Linear4bit, so both compute
        with it."""
        if self.quantized_weight is None:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        key = prefix + "weight"
        state_prefix = key + "."
        quant = {k[len(state_prefix):]: v for k, v in state_dict.items() if k.startswith(state_prefix)}
        packed = state_dict.get(key)
        rest = {k: v for k, v in state_dict.items() if k != key and not k.startswith(state_prefix)}
        loaded = None
        if packed is not None or quant:
            try:
                loaded = self._check_quantized_state(packed, quant)
            except (TypeError, ValueError, RuntimeError) as err:
                error_msgs.append(f"While loading the 4-bit weight {key!r} (this layer's stands for a "
                                  f"{tuple(self.quantized_weight.shape)} weight): {err}")
                return  # load_state_dict raises; none of this layer's parameters is touched
        missing_before = len(missing_keys)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if packed is not None or quant:  # handled here (loaded or reported), not missing
            missing_keys[missing_before:] = [k for k in missing_keys[missing_before:] if k != key]
        if loaded is not None:
            self._set_quantized(loaded, assign=bool(local_metadata.get("assign_to_params_buffers", False)))

    def _check_quantized_state(self, packed, quant: dict):
        from .quant import QuantizedWeight
        if packed is None:
            raise ValueError(f"the state dict holds its quantization state ({', '.join(sorted(quant))}) but not the "
                             "packed weight itself")
        if not quant:
            raise ValueError("the state dict holds the packed 4-bit weight but none of its quantization state "
                             "(weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__<quant_type>, as "
                             "bitsandbytes' Linear4bit and peftkern save it): the bytes cannot be dequantized without "
                             "it (a dense weight, or a checkpoint saved without it?)")
        loaded = QuantizedWeight.from_quant_state_dict(packed, quant)
        if loaded.shape != self.quantized_weight.shape:
            raise ValueError(f"size mismatch: the checkpoint's 4-bit weight stands for a {tuple(loaded.shape)} "
                             f"weight, this layer's for {tuple(self.quantized_weight.shape)}")
        return loaded

    @torch.no_grad()
    def _set_quantized(self, loaded, assign: bool) -> None:
        """Make `loaded` this layer's 4-bit weight: its bytes and a bitsandbytes QuantState of its tensors go into
        the Params4bit (shared with the source Linear4bit, which then computes with them too), and
        `quantized_weight` is rebuilt over that storage."""
        from .quant import QuantizedWeight
        param = self.weight
        loaded = loaded.to(self.quantized_weight.device, copy=not assign)
        bnb = sys.modules["bitsandbytes"]
        old_state = param.__dict__.get("quant_state")
        state_cls = type(old_state) if old_state is not None else bnb.functional.QuantState
        state2 = (state_cls(absmax=loaded.absmax2, blocksize=loaded.blocksize2, code=loaded.code2, dtype=torch.float32)
                  if loaded.double_quant else None)
        state = state_cls(absmax=loaded.absmax, shape=loaded.shape, code=loaded.code, blocksize=loaded.blocksize,
                          quant_type=loaded.quant_type, dtype=loaded.dtype, offset=loaded.offset, state2=state2)
        packed = loaded.packed.view(-1, 1)
        storage = param.dtype
        if storage != torch.uint8 and packed.numel() % storage.itemsize == 0:  # bitsandbytes' quant_storage
            packed = packed.view(storage)
        param.data = packed
        param.quant_state = state
        for attr, value in (("blocksize", loaded.blocksize), ("quant_type", loaded.quant_type),
                            ("compress_statistics", loaded.double_quant)):
            if attr in param.__dict__:
                setattr(param, attr, value)
        module = param.__dict__.get("module")
        if module is not None and hasattr(module, "quant_state"):  # bitsandbytes' copy for its FSDP recovery
            module.quant_state = state
        self.quantized_weight = QuantizedWeight.from_bnb(param)

    @property
    def merged(self) -> bool:
        """True between `merge_()` and `unmerge_()`: `weight` then holds weight + scaling·lora_b·lora_a."""
        return self._merged_backup is not None

    @torch.no_grad()
    def merge_(self) -> "LoRALinear":
        """Fold scaling·lora_b·lora_a into `weight` for inference, in place; returns self.

        The sum is computed in float32 and rounded once to weight's dtype. A copy of the original weight is
        kept (one [out_features, in_features] tensor) so that `unmerge_()` restores it bit for bit. While
        merged, forward is a plain F.linear and the adapter receives no gradients: unmerge before training
        again. Merging a merged layer does nothing.
        """
        if self.quantized_weight is not None:
            raise RuntimeError("merge_() cannot fold the adapter into a 4-bit base weight: re-quantizing the sum "
                               "would change the base and could not be undone exactly; dequantize first "
                               "(layer.quantized_weight.dequantize()) and merge into a dense LoRALinear")
        if not self.merged:
            self._merged_backup = self.weight.detach().clone()
            delta = (self.lora_b.to(torch.float32) @ self.lora_a.to(torch.float32)) * self.scaling
            self.weight.copy_((self.weight.to(torch.float32) + delta).to(self.weight.dtype))
        return self

    @torch.no_grad()
    def unmerge_(self) -> "LoRALinear":
        """Restore the pre-merge weight bit for bit (from the copy merge_ saved, not by a subtraction that
        would round); returns self. Unmerging a layer that is not merged does nothing."""
        if self.merged:
            self.weight.copy_(self._merged_backup)
            self._merged_backup = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x·weightᵀ + bias + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ (peftkern.lora_linear).

        x: [..., in_features], any number of leading dims, any strides; returns [..., out_features] in x's
        dtype. Outside torch.autocast x has weight's dtype; lora_a and lora_b have it too, or are float32
        beside a float16/bfloat16 weight (then the update is computed in float32 and added before one
        rounding). Inside torch.autocast everything is cast to the autocast dtype, as F.linear's inputs are.
        Dropout runs in training mode only, with a fresh mask per call drawn from torch's generator
        (torch.manual_seed makes it reproducible); eval() turns it off. When `merged`, this is
        F.linear(x, weight, bias).

        Raises ValueError when x's last dim is not in_features, TypeError for a non-float or mismatched
        dtype, RuntimeError when x is on another device than the parameters.
        """
        if self.quantized_weight is not None:
            return self._forward_quantized(x)
        if self.merged:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return self._fused(x, self.weight, self.bias, self.lora_a, self.lora_b)

    def _fused(self, x, weight, bias, lora_a, lora_b, cast=None) -> torch.Tensor:
        """The functional op of this layer (DoRALinear overrides it). `cast`: a dtype the trainable parameters
        are cast to first (for a 4-bit base computing in a dtype the adapter rule does not pair with float32)."""
        if cast is not None:
            lora_a, lora_b = lora_a.to(cast), lora_b.to(cast)
        return lora_linear(x, weight, lora_a, lora_b, scaling=self.scaling, bias=bias, dropout_p=self.dropout,
                           training=self.training)

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """As bitsandbytes' Linear4bit: x in the compute dtype (when set), bias in x's, the result in x's
        original dtype. Float32 adapters beside a half-precision x are the allowed mix of lora_linear."""
        if not self._compute_dtype_set:  # bitsandbytes' set_compute_type: the first input's float32/bfloat16 wins
            if x.dtype in (torch.float32, torch.bfloat16):
                self.compute_dtype = x.dtype
            self._compute_dtype_set = True
        xc = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        bias = self.bias.to(xc.dtype) if self.bias is not None else None
        cast = xc.dtype if xc.dtype not in (torch.float16, torch.bfloat16, torch.float32) else None
        y = self._fused(xc, self.quantized_weight, bias, self.lora_a, self.lora_b, cast=cast)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, merged={self.merged}")


class DoRALinear(LoRALinear):
    """A frozen linear layer plus a weight-decomposed rank-r update (DoRA), with PEFT's semantics:

        n = ‖weight + scaling·lora_b·lora_a‖₂ per output row (a constant in backward), c = magnitude / n
        y = c ⊙ (x·weightᵀ + scaling·(x·lora_aᵀ)·lora_bᵀ) + bias        (no dropout; see peftkern.dora_linear)

    Everything LoRALinear has (constructor arguments, `from_linear` over an nn.Linear or a bitsandbytes
    Linear4bit, `weight`, `bias`, `lora_a`, `lora_b`, `scaling`, `merged`) plus a trainable `magnitude`
    [out_features], initialised to n of the initial weights, as PEFT does: with `lora_b` at zero, the row norms
    of `weight`, so a new layer computes exactly its base linear.

    Args: as LoRALinear (in_features, out_features, r, alpha, dropout, bias, device, dtype); the magnitude is
    made in the adapters' dtype. Raises (naming the argument) TypeError when in_features, out_features or r is
    not an int or alpha or dropout not a real number, ValueError when one is out of range.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, r=r, alpha=alpha, dropout=dropout, bias=bias, device=device,
                         dtype=dtype)
        self.magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.reset_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> "DoRALinear":
        """A DoRALinear over an existing nn.Linear or bitsandbytes Linear4bit (shared, frozen weight and bias, as
        LoRALinear.from_linear), with `magnitude` = the row norms of its weight. Raises TypeError when `linear` is
        neither, and TypeError/ValueError (naming the argument) for a bad r, alpha or dropout."""
        layer = super().from_linear(linear, r=r, alpha=alpha, dropout=dropout)
        layer.magnitude = nn.Parameter(torch.empty(layer.out_features, device=layer.lora_a.device,
                                                   dtype=layer.lora_a.dtype))
        layer.reset_magnitude()
        return layer

    def _base(self):
        return self.quantized_weight if self.quantized_weight is not None else self.weight

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Set `magnitude` to n, the row norms of weight + scaling·lora_b·lora_a now (PEFT's initialisation)."""
        if self.magnitude.device.type == "meta":
            return
        self.magnitude.copy_(row_norms(self._base(), self.lora_a, self.lora_b, self.scaling))

    @torch.no_grad()
    def merge_(self) -> "DoRALinear":
        """Fold the adapter into `weight` in place: weight ← (magnitude / n) ⊙ (weight + scaling·lora_b·lora_a),
        computed in float32 and rounded once (PEFT's DoRA merge); returns self. A copy of the original weight is
        kept so that `unmerge_()` restores it bit for bit. Raises RuntimeError on a 4-bit base, as LoRALinear."""
        if self.quantized_weight is not None:
            return super().merge_()  # raises, saying why
        if not self.merged:
            n = row_norms(self.weight, self.lora_a, self.lora_b, self.scaling).to(torch.float32)
            scale = _dora_column_scale(self.magnitude, n, torch.float32).unsqueeze(1)  # 0 on a zero row, not NaN
            self._merged_backup = self.weight.detach().clone()
            delta = (self.lora_b.to(torch.float32) @ self.lora_a.to(torch.float32)) * self.scaling
            self.weight.copy_(((self.weight.to(torch.float32) + delta) * scale).to(self.weight.dtype))
        return self

    def _fused(self, x, weight, bias, lora_a, lora_b, cast=None) -> torch.Tensor:
        magnitude = self.magnitude
        if cast is not None:
            lora_a, lora_b, magnitude = lora_a.to(cast), lora_b.to(cast), magnitude.to(cast)
        return dora_linear(x, weight, lora_a, lora_b, magnitude, scaling=self.scaling, bias=bias,
                           dropout_p=self.dropout, training=self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = c ⊙ (x·weightᵀ + scaling·(dropout(x)·lora_aᵀ)·lora_bᵀ) + bias with c = magnitude / n, in PEFT's DoRA
        form (peftkern.dora_linear: with dropout the base term sees the undropped x as well); F.linear(x, weight,
        bias) when `merged`.

        x: [..., in_features], any leading dims and strides; returns [..., out_features] in x's dtype. Outside
        torch.autocast x has weight's dtype; lora_a, lora_b and magnitude have it too, or are float32 beside a
        float16/bfloat16 weight. Inside torch.autocast the inputs are cast to the autocast dtype as F.linear's
        are, except the magnitude (a float32 column scale). Dropout runs in training mode only, with a fresh
        mask per call from torch's generator. In eval mode the weight norm n is cached until weight, lora_a or
        lora_b change.

        Raises ValueError when x's last dim is not in_features, TypeError for a non-float or mismatched dtype,
        RuntimeError when x is on another device than the parameters."""
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with several LoRA adapters, each row of the input taking its own (SPEC section 9):

        row t:  y_t = x_t·weightᵀ + bias + scalings[i]·(dropout(x_t)·lora_a[i]ᵀ)·lora_b[i]ᵀ,   i = adapter_ids[t]

    (−1: the base layer alone). One call serves a mixed batch (each sequence its own fine-tune) or trains several
    adapters in one batch; the adapters' ranks may differ. `scalings[i] = alphas[i] / ranks[i]`.

    Args:
        in_features, out_features: ints >= 0.
        ranks: a sequence of n ints >= 1, one rank per adapter.
        alphas: a sequence of n finite reals (PEFT's lora_alpha per adapter), or one real for all.
        dropout: real number in [0, 1), one dropout for every adapter's branch, active in training mode.
        bias, device, dtype: as in LoRALinear.

    Parameters: `weight`, `bias` frozen; `lora_a` and `lora_b` nn.ParameterLists (lora_a[i] [ranks[i], in_features]
    Kaiming-uniform, lora_b[i] [out_features, ranks[i]] zeros: PEFT's default, so a new layer equals its base).

    Raises (in the constructor, naming the argument) TypeError / ValueError as LoRALinear, and for ranks and alphas
    of different lengths or an empty ranks.
    """

    def __init__(self, in_features: int, out_features: int, ranks, alphas=16, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        in_features = _checks.integer("in_features", in_features, low=0)
        out_features = _checks.integer("out_features", out_features, low=0)
        ranks, alphas = self._check_adapters(ranks, alphas)
        dropout = _checks.real_number("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.ranks, self.alphas = ranks, alphas
        self.scalings = [a / r for a, r in zip(alphas, ranks)]
        self.dropout = dropout
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a = nn.ParameterList([nn.Parameter(torch.empty(r, in_features, **factory)) for r in ranks])
        self.lora_b = nn.ParameterList([nn.Parameter(torch.empty(out_features, r, **factory)) for r in ranks])
        LoRALinear._reset_base(self)
        self.reset_lora_parameters()

    @staticmethod
    def _check_adapters(ranks, alphas) -> tuple[list[int], list[float]]:
        if isinstance(ranks, (int, str, torch.Tensor)) or not isinstance(ranks, (list, tuple)):
            raise TypeError(f"ranks must be a list or tuple of ints (one per adapter), got {type(ranks).__name__}")
        if len(ranks) == 0:
            raise ValueError("ranks must hold at least one adapter's rank, got an empty sequence")
        ranks = [_checks.integer(f"ranks[{i}]", r, low=1) for i, r in enumerate(ranks)]
        if _checks.is_real(alphas):  # one alpha for every adapter (a numpy scalar too)
            alphas = [alphas] * len(ranks)
        if isinstance(alphas, (str, torch.Tensor)) or not isinstance(alphas, (list, tuple)):
            raise TypeError(f"alphas must be a real number or a list or tuple of them, got {type(alphas).__name__}")
        if len(alphas) != len(ranks):
            raise ValueError(f"alphas must hold one number per adapter ({len(ranks)}, as ranks), got {len(alphas)}")
        return ranks, [_checks.real_number(f"alphas[{i}]", a) for i, a in enumerate(alphas)]

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation of every adapter (lora_a Kaiming-uniform, lora_b zeros)."""
        for a, b in zip(self.lora_a, self.lora_b):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ranks, alphas=16, dropout: float = 0.0) -> "MultiLoRALinear":
        """A MultiLoRALinear over an existing nn.Linear: its weight and bias are shared (not copied) and frozen; the
        adapters are new, on its device and in its dtype, with PEFT's default initialisation. Raises TypeError when
        `linear` is not an nn.Linear or is a bitsandbytes Linear4bit / Linear8bitLt (for a 4-bit base call
        peftkern.multi_lora_linear over QuantizedWeight.from_bnb(linear)), and the constructor's errors for ranks,
        alphas and dropout."""
        if _is_linear4bit(linear):
            raise TypeError("MultiLoRALinear.from_linear: linear is a bitsandbytes Linear4bit (4-bit), which "
                            "MultiLoRALinear does not take: call peftkern.multi_lora_linear(x, "
                            "peftkern.QuantizedWeight.from_bnb(linear), ...) directly (the op runs over a 4-bit base), "
                            "or use LoRALinear.from_linear / DoRALinear.from_linear (4-bit aware) for one adapter")
        _check_dense_linear("MultiLoRALinear", linear, takes_4bit=False)
        ranks, alphas = cls._check_adapters(ranks, alphas)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, ranks, alphas, dropout=dropout,
                    bias=linear.bias is not None, device="meta", dtype=w.dtype)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_a = nn.ParameterList([nn.Parameter(torch.empty(r, linear.in_features, device=w.device,
                                                                  dtype=w.dtype)) for r in ranks])
        layer.lora_b = nn.ParameterList([nn.Parameter(torch.empty(linear.out_features, r, device=w.device,
                                                                  dtype=w.dtype)) for r in ranks])
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """peftkern.multi_lora_linear over this layer's parameters.

        x: [..., in_features]; adapter_ids: int32/int64 tensor on x's device whose shape is a leading part of
        x.shape[:-1] ([batch]: one adapter per sequence; x.shape[:-1]: one per token), −1 for the base alone.
        Dropout runs in training mode with a fresh mask per call from torch's generator. Raises IndexError for an
        id outside [−1, n), and multi_lora_linear's errors otherwise.
        """
        return multi_lora_linear(x, self.weight, list(self.lora_a), list(self.lora_b), adapter_ids,
                                 scalings=self.scalings, bias=self.bias, dropout_p=self.dropout,
                                 training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"alphas={self.alphas}, dropout={self.dropout}, bias={self.bias is not None}")


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter (Houlsby / Pfeiffer):

        out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up)

    Args:
        d_model: int >= 0, the width of h.
        bottleneck: int >= 1, the adapter's inner width k.
        activation: one of "relu", "gelu" (erf form), "gelu_tanh", "silu" (alias "swish"), "tanh", "identity".
        scaling: finite real number multiplying the adapter's output before the residual add.
        bias: whether `b_down` and `b_up` exist.
        device, dtype: where and in which floating dtype the parameters are made.
        init_weights: AdapterHub's `init_weights` option: "bert" (its default and this one's: weights
            ~ N(0, 0.02²), biases zero) or "mam_adapter" (`w_down` Kaiming-uniform a=sqrt(5), `w_up` and the
            biases zero, so a new adapter is the identity).

    Parameters (all trainable): `w_down` [bottleneck, d_model], `b_down` [bottleneck] or None,
    `w_up` [d_model, bottleneck], `b_up` [d_model] or None.

    Raises (in the constructor, naming the argument): TypeError when d_model or bottleneck is not an int
    or scaling not a real number; ValueError when one is out of range or not finite, or activation or
    init_weights is not one of the names above.
    """

    INIT_WEIGHTS = ("bert", "mam_adapter")

    def __init__(self, d_model: int, bottleneck: int, activation: str = "relu", scaling: float = 1.0,
                 bias: bool = True, device=None, dtype=None, init_weights: str = "bert"):
        super().__init__()
        d_model = _checks.integer("d_model", d_model, low=0)
        bottleneck = _checks.integer("bottleneck", bottleneck, low=1)
        scaling = _checks.real_number("scaling", scaling)
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(repr(n) for n in _ACTIVATION_NAMES)}; "
                             f"got {activation!r}")
        if init_weights not in self.INIT_WEIGHTS:
            raise ValueError(f"init_weights must be one of {self.INIT_WEIGHTS}, got {init_weights!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scaling, self.init_weights = activation, scaling, init_weights
        self.w_down = nn.Parameter(torch.empty(bottleneck, d_model, **factory))
        self.b_down = nn.Parameter(torch.empty(bottleneck, **factory)) if bias else None
        self.w_up = nn.Parameter(torch.empty(d_model, bottleneck, **factory))
        self.b_up = nn.Parameter(torch.empty(d_model, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise every parameter as `init_weights` says (see the class docstring)."""
        if self.init_weights == "bert":
            nn.init.normal_(self.w_down, std=0.02)
            nn.init.normal_(self.w_up, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))
            nn.init.zeros_(self.w_up)
        for b in (self.b_down, self.b_up):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """out = residual + scaling·(act(h·w_downᵀ + b_down)·w_upᵀ + b_up) (peftkern.bottleneck_adapter).

        h: [..., d_model], any number of leading dims, any strides. residual: h's shape and dtype, or None
        (then h itself is the residual, Houlsby-style; pass the sublayer's input for Pfeiffer-style).
        Returns h's shape and dtype. Outside torch.autocast the parameters have h's dtype, or are float32
        beside a float16/bfloat16 h; inside it everything is cast to the autocast dtype. Gradients reach h,
        residual and every parameter that requires grad.

        Raises ValueError when h's last dim is not d_model or residual's shape differs from h's, TypeError
        for a non-float or mismatched dtype, RuntimeError when the tensors are on different devices.
        """
        return bottleneck_adapter(h, self.w_down, self.b_down, self.w_up, self.b_up, activation=self.activation,
                                  scaling=self.scaling, residual=residual)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling}, bias={self.b_down is not None}, init_weights={self.init_weights!r}")


class SparseDiffLinear(nn.Module):
    """A frozen linear layer plus a trainable sparse diff at fixed positions: y = x·(W + Δ)ᵀ + b.

    Args:
        weight: [out_features, in_features], frozen (kept as a Parameter with requires_grad=False).
        bias: [out_features] or None, frozen.
        indices: 1-D int32/int64 flat row-major positions in `weight`, each in range and each at most once
            (IndexError / ValueError otherwise); stored as the buffer `indices`.
        values_dtype: dtype of the trainable `values` (default weight's; float32 beside a half-precision
            weight is allowed).

    `values` (one per index) is the only trainable parameter and starts at zero, so a new layer equals its
    source linear. `forward(x)` takes x [..., in_features] in weight's dtype and returns
    [..., out_features] through peftkern.sparse_diff_linear: neither W + Δ nor a dense weight gradient
    is ever built. `to_sparse_diff()` returns the trained diff as a SparseDiff.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor, values_dtype=None):
        super().__init__()
        from .reference.sparse_diff import validate

        if (not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64)
                or indices.dim() != 1):
            raise TypeError("indices must be a 1-D int32 or int64 tensor of flat positions in the weight")
        validate(indices, weight.numel())
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            self.bias.requires_grad_(False)
        else:
            self.bias = None
        self.register_buffer("indices", indices.to(weight.device))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=weight.device,
                                               dtype=values_dtype or weight.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, indices: torch.Tensor, values_dtype=None) -> "SparseDiffLinear":
        """Wrap an nn.Linear (weight and bias shared, frozen) with trainable values at `indices`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, indices, values_dtype=values_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> x·(W + Δ)ᵀ + b, [..., out_features] (errors as sparse_diff_linear)."""
        return sparse_diff_linear(x, self.weight, self.indices, self.values, self.bias)

    def to_sparse_diff(self):
        """The trained diff, ready to save or to apply to another copy of the base weight."""
        from .sparse_diff import SparseDiff

        return SparseDiff(self.indices.clone(), self.values.detach().clone(), self.weight.shape)

    def extra_repr(self) -> str:
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, nnz={self.indices.numel()}, bias={self.bias is not None}"
