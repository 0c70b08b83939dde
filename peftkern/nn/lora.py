"""LoRALinear: a frozen linear layer (dense or a bitsandbytes 4-bit Linear4bit) plus a trainable rank-r update."""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..core import checks as _checks
from ..lora import lora_linear
from ._common import check_dense_linear, is_linear4bit, reset_base

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
        reset_base(self.weight, self.bias, self.in_features)

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
        if is_linear4bit(linear):
            return cls._from_linear4bit(linear, r, alpha, dropout)
        check_dense_linear(cls.__name__, linear, takes_4bit=True)
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
        from ..quant import QuantizedWeight
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
        from ..quant import QuantizedWeight
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
        from ..quant import QuantizedWeight
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
