"""The lora family's bench ops: `lora` (lora_linear over a dense base) and `qlora` (lora_linear over a 4-bit base).

What each row times, one training step (forward + backward) of one layer:
LoRA
- eager:    Hugging Face PEFT's own LoRA `Linear` when peft is importable, else its exact eager
            computation  base(x) + lora_B(lora_A(dropout(x))) * scaling
- peftkern: peftkern.lora_linear on the backend `auto` picks
- floor:    the bare frozen base F.linear, forward and backward (what LoRA cannot go under)
QLoRA (LoRA over a 4-bit NF4 base)
- eager:    PEFT's LoRA layer over a bitsandbytes Linear4bit when both are importable, else the same math in
            eager torch: dequantize the whole weight, F.linear, plus the LoRA branch
- peftkern: peftkern.lora_linear over a peftkern.QuantizedWeight of the same bytes
- floor:    the bare dense F.linear (the unquantized weight in the compute dtype), forward and backward
On CUDA both also time peftkern_fused and peftkern_composite (bench/providers.py's with_variants).

Not imported by the family's __init__: only the bench reads it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
import torch.nn.functional as F

from ..bench.declare import BenchOp, Case, dtype_name
from ..bench.providers import _EagerLora, bnb_available, peft_available, with_variants


@dataclasses.dataclass(frozen=True)
class LoraCase(Case):
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dtype: torch.dtype
    dropout: float
    bias: bool = False
    family = "lora_linear"  # the op family whose backend `auto` chooses

    @property
    def label(self) -> str:
        return f"M={self.m} K={self.k} N={self.n} r={self.r} {dtype_name(self.dtype)} p={self.dropout}"


def lora_cases(device: torch.device, quick: bool = False) -> list[LoraCase]:
    """GPU: the headline shapes (tokens 2048-16384, hidden 4096 and 8192, ranks 8-64, bf16). CPU: one mid-size
    shape, float32."""
    if device.type == "cuda":
        if quick:
            return [LoraCase(8192, 4096, 4096, 16, torch.bfloat16, p) for p in (0.0, 0.1)]
        return [LoraCase(m, h, h, r, torch.bfloat16, p)
                for m, h, r, p in itertools.product((2048, 8192, 16384), (4096, 8192), (8, 16, 64), (0.0, 0.1))]
    if quick:
        return [LoraCase(256, 256, 256, 16, torch.float32, p) for p in (0.0, 0.1)]
    return [LoraCase(2048, 1024, 1024, 16, torch.float32, p) for p in (0.0, 0.1)]


@dataclasses.dataclass(frozen=True)
class QLoraCase(Case):
    """LoRA over a 4-bit base (bitsandbytes' format, double-quantized absmax by default)."""
    m: int  # tokens
    k: int  # in_features
    n: int  # out_features
    r: int
    dtype: torch.dtype  # compute dtype of x, the adapters and deq(W)
    dropout: float
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    family = "lora_linear"

    @property
    def label(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"M={self.m} K={self.k} N={self.n} r={self.r} {self.quant_type}{dq} "
                f"{dtype_name(self.dtype)} p={self.dropout}")


def qlora_cases(device: torch.device, quick: bool = False) -> list[QLoraCase]:
    """GPU: the headline QLoRA shape (M=8192, K=N=4096, r=16, NF4 double-quantized, bf16). CPU: float32,
    smaller (bitsandbytes' CPU 4-bit matmul is slow)."""
    if device.type == "cuda":
        return [QLoraCase(8192, 4096, 4096, 16, torch.bfloat16, p) for p in ((0.0,) if quick else (0.0, 0.1))]
    if quick:
        return [QLoraCase(128, 256, 256, 16, torch.float32, 0.0)]
    return [QLoraCase(512, 1024, 1024, 16, torch.float32, p) for p in (0.0, 0.1)]


def lora_providers(case: LoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager, peftkern and floor over the same weights; plus the eager provider's name."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    base = torch.nn.Linear(case.k, case.n, bias=case.bias, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        layer = PeftLinear(base, "default", config=LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout),
                           r=case.r, lora_alpha=alpha)
        layer.base_layer.requires_grad_(False)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        eager_name = f"peft {__import__('peft').__version__}"
    else:
        layer = _EagerLora(base, case.r, alpha, case.dropout)
        lora_a, lora_b = layer.lora_A.weight, layer.lora_B.weight
        eager_name = "eager (peft not installed)"
    layer.to(device).train()
    with torch.no_grad():  # a trained adapter, not PEFT's zero-init B
        lora_b.copy_(torch.randn(lora_b.shape, generator=gen).to(lora_b) * 0.01)

    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)

    def eager():
        layer(x).backward(dy)
        x.grad = None

    def fused():
        peftkern.lora_linear(x, base.weight, lora_a, lora_b, scaling=alpha / case.r, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        x.grad = None

    def floor():
        F.linear(x, base.weight, base.bias).backward(dy)
        x.grad = None

    def zero_adapter_grads():
        lora_a.grad = None
        lora_b.grad = None

    def with_reset(fn):
        def step():
            fn()
            zero_adapter_grads()
        return step

    return with_variants({"eager": with_reset(eager), "peftkern": with_reset(fused), "floor": floor},
                         device), eager_name


def _peft_qlora_layer(case: QLoraCase, device: torch.device, dense: torch.Tensor, lora_a, lora_b):
    """PEFT's LoRA layer over a bitsandbytes Linear4bit of `dense`, its adapters copied from lora_a / lora_b;
    returns (layer, its adapter parameters, the eager provider's name)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    alpha = 2 * case.r
    base = bnb.nn.Linear4bit(case.k, case.n, bias=False, compute_dtype=case.dtype, quant_type=case.quant_type,
                             compress_statistics=case.double_quant, device="meta")
    base.weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type=case.quant_type,
                                    blocksize=case.blocksize, compress_statistics=case.double_quant)
    base = base.to(device)
    layer = PeftLinear(base, "default", config=LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout),
                       r=case.r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    layer.to(device).train()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return layer, params, f"peft {__import__('peft').__version__} + bitsandbytes {bnb.__version__}"


def qlora_providers(case: QLoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager (PEFT + bitsandbytes), peftkern and the dense floor over the same 4-bit bytes."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    dense = (torch.randn(case.n, case.k, generator=gen) / case.k ** 0.5).to(device=device, dtype=case.dtype)
    qw = peftkern.QuantizedWeight.quantize(dense, quant_type=case.quant_type, blocksize=case.blocksize,
                                           double_quant=case.double_quant)
    floor_w = qw.dequantize()
    # float32 adapters, as PEFT keeps them over a 4-bit base
    lora_a = (torch.randn(case.r, case.k, generator=gen) / case.k ** 0.5).to(device=device)
    lora_b = (torch.randn(case.n, case.r, generator=gen) * 0.01).to(device=device)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)
    scaling = alpha / case.r

    if peft_available() and bnb_available():
        layer, eager_params, eager_name = _peft_qlora_layer(case, device, dense, lora_a, lora_b)

        def eager_step():
            layer(x).backward(dy)
    else:
        drop = torch.nn.Dropout(case.dropout)
        eager_params = [lora_a, lora_b]
        eager_name = "eager (dequantize + F.linear; peft or bitsandbytes not installed)"

        def eager_step():
            low = F.linear(F.linear(drop(x).float(), lora_a), lora_b) * scaling
            y = (F.linear(x, qw.dequantize().to(case.dtype)) + low).to(case.dtype)
            y.backward(dy)

    def zero():
        x.grad = None
        for p in eager_params + [lora_a, lora_b]:
            p.grad = None

    def eager():
        eager_step()
        zero()

    def fused():
        peftkern.lora_linear(x, qw, lora_a, lora_b, scaling=scaling, dropout_p=case.dropout,
                             training=True).backward(dy)
        zero()

    def floor():
        F.linear(x, floor_w).backward(dy)
        x.grad = None

    return with_variants({"eager": eager, "peftkern": fused, "floor": floor}, device), eager_name


OPS = [
    BenchOp("lora", 10, LoraCase, lora_cases, lora_providers, help="lora_linear",
            floor="bare F.linear of the frozen base, fwd+bwd"),
    BenchOp("qlora", 20, QLoraCase, qlora_cases, qlora_providers,
            help="lora_linear over a 4-bit QuantizedWeight (vs PEFT + bitsandbytes)",
            floor="bare dense F.linear of the dequantized base in the compute dtype, fwd+bwd"),
]
