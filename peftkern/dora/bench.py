"""The dora family's bench op `dora`: dora_linear on LoRA's shapes.

What each row times, one training step (forward + backward) of one layer:
- eager:    Hugging Face PEFT's own LoRA `Linear` with use_dora=True when peft is importable, else its exact
            eager computation (PEFT 0.21's DoraLinearLayer op for op: the norm of W + scaling·(B·A), with B·A
            made as PEFT makes it, through lora_B(lora_A(eye)); detached; base result reused without dropout,
            recomputed from dropout(x) with it)
- peftkern: peftkern.dora_linear on the backend `auto` picks, over the same parameters
- peftkern_lora: peftkern.lora_linear over the same x, weight and adapters: what DoRA costs on top of
            peftkern's own LoRA (the target is at most 1.10x)
- floor:    the bare frozen base F.linear, forward and backward
On CUDA, where dora_linear's backend has both variants, also peftkern_fused and peftkern_composite.

Not imported by the family's __init__: only the bench reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..bench.declare import BenchOp
from ..bench.providers import _EagerLora, peft_available, with_variants
from ..lora.bench import LoraCase, lora_cases


@dataclasses.dataclass(frozen=True)
class DoraCase(LoraCase):
    """DoRA (weight-decomposed LoRA): LoRA's shapes plus a trainable magnitude vector [N]."""
    family = "dora_linear"


def dora_cases(device: torch.device, quick: bool = False) -> list[DoraCase]:
    """The LoRA cases (headline shapes in bf16 on GPU, M=8192 K=N=4096 r=16 among them; on CPU the
    acceptance shape, float32), as DoRA layers."""
    return [DoraCase(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}) for c in lora_cases(device, quick)]


class _EagerDora(_EagerLora):
    """PEFT 0.21's DoRA Linear computation (DoraLinearVariant.forward + DoraLinearLayer.forward), op for op,
    for machines without peft."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base, r, alpha, dropout)
        with torch.no_grad():  # PEFT's init: the row norms of W + scaling·B·A
            norm = torch.linalg.norm(base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)
        self.magnitude = torch.nn.Parameter(norm.to(base.weight.dtype))

    def forward(self, x):
        result = self.base_layer(x)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
            base_result = None
        else:
            base_result = result
        eye = torch.eye(self.lora_A.in_features, device=x.device, dtype=self.lora_A.weight.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)
        weight = self.base_layer.weight.to(x.dtype)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).to(weight.dtype)
        scale = (self.magnitude / weight_norm.detach()).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight)
        elif self.base_layer.bias is not None:
            base_result = base_result - self.base_layer.bias
        return result + (scale - 1) * base_result + scale * lora_result * self.scaling


def dora_providers(case: DoraCase, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Step functions for eager (PEFT's DoRA layer), peftkern (dora_linear), peftkern_lora (lora_linear on the
    same adapters) and the floor; plus the eager provider's name."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    scaling = alpha / case.r
    base = torch.nn.Linear(case.k, case.n, bias=case.bias, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        config = LoraConfig(r=case.r, lora_alpha=alpha, lora_dropout=case.dropout, use_dora=True)
        layer = PeftLinear(base, "default", config=config, r=case.r, lora_alpha=alpha)
        layer.base_layer.requires_grad_(False)
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        magnitude = layer.lora_magnitude_vector["default"].weight
        eager_name = f"peft {__import__('peft').__version__} (use_dora=True)"
    else:
        layer = _EagerDora(base, case.r, alpha, case.dropout)
        lora_a, lora_b, magnitude = layer.lora_A.weight, layer.lora_B.weight, layer.magnitude
        eager_name = "eager DoRA (peft not installed)"
    layer.to(device).train()
    with torch.no_grad():  # a trained adapter: PEFT's zero-init B made nonzero, magnitude / norm away from 1
        lora_b.copy_(torch.randn(lora_b.shape, generator=gen).to(lora_b) * 0.01)
        magnitude.mul_(torch.rand(magnitude.shape, generator=gen).to(magnitude) + 0.5)

    x = torch.randn(case.m, case.k, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.n, generator=gen).to(device=device, dtype=case.dtype)

    def zero():
        x.grad = None
        for p in (lora_a, lora_b, magnitude):
            p.grad = None

    def eager():
        layer(x).backward(dy)
        zero()

    def fused():
        peftkern.dora_linear(x, base.weight, lora_a, lora_b, magnitude, scaling=scaling, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        zero()

    def fused_lora():
        peftkern.lora_linear(x, base.weight, lora_a, lora_b, scaling=scaling, bias=base.bias,
                             dropout_p=case.dropout, training=True).backward(dy)
        zero()

    def floor():
        F.linear(x, base.weight, base.bias).backward(dy)
        x.grad = None

    return with_variants({"eager": eager, "peftkern": fused, "peftkern_lora": fused_lora, "floor": floor},
                         device, case), eager_name


# a DoRA step (dora_linear) costs at most this many times peftkern's own LoRA step (lora_linear) on the same shapes,
# dropout and adapters; every row times both ("peftkern" and "peftkern_lora")
DORA_VS_LORA_TARGET = 1.10


def dora_vs_lora(row: dict) -> float | None:
    """peftkern's DoRA step time over peftkern's LoRA step time on the same case; None for rows without it."""
    r = row["results"]
    if "peftkern_lora" not in r:
        return None
    return r["peftkern"]["median_ms"] / r["peftkern_lora"]["median_ms"]


def notes(row: dict, device_type: str) -> list[str]:
    """The row's ratio to peftkern's own LoRA (against its target) and that step's time and peak memory. The
    table's columns stay those of every op; this is printed under it."""
    ratio = dora_vs_lora(row)
    if ratio is None:
        return []
    lora = row["results"]["peftkern_lora"]
    mem = "" if lora.get("peak_mem_mb") is None else f", peak {lora['peak_mem_mb']:.0f} MB"
    verdict = "within" if ratio <= DORA_VS_LORA_TARGET else "above"
    return [f"dora {row['label']}: peftkern DoRA / peftkern LoRA = {ratio:.2f}x "
            f"({row['results']['peftkern']['median_ms']:.3f} / {lora['median_ms']:.3f} ms{mem}; "
            f"{verdict} the {DORA_VS_LORA_TARGET:.2f}x target)"]


def bars(row: dict) -> list[tuple[str, float]]:
    ratio = dora_vs_lora(row)
    return [] if ratio is None else [("peftkern LoRA time / peftkern DoRA time", 1.0 / ratio)]


OPS = [
    BenchOp("dora", 30, DoraCase, dora_cases, dora_providers,
            help="dora_linear (vs PEFT's LoRA layer with use_dora=True, and against peftkern's own lora_linear on "
                 "the same shapes)",
            floor="bare F.linear of the frozen base, fwd+bwd",
            notes=notes, notes_heading="DoRA against peftkern's own `lora_linear` on the same shapes and adapters:",
            bars=bars),
]
