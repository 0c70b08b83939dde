"""The multi_lora family's bench op `multi_lora`: many LoRA adapters over one base, serving a mixed batch.

What each row times, the forward alone (eval mode, no grad):
- eager:    Hugging Face PEFT's own LoRA `Linear` holding every adapter, called with `adapter_names=[...]` (its
            `_mixed_batch_forward`), else its exact eager loop (gather each adapter's rows, its branch, add back)
- peftkern: peftkern.multi_lora_linear over the same weight, adapters and ids
- peftkern_single: peftkern.lora_linear with one adapter on every row: what one adapter costs
- floor:    the bare frozen base F.linear, forward

Not imported by the family's __init__: only the bench reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..bench.declare import BenchOp, Case, dtype_name
from ..bench.providers import peft_available


@dataclasses.dataclass(frozen=True)
class MultiLoraCase(Case):
    """Many adapters over one base, forward in eval mode (serving a mixed batch): `batch` sequences of `seq` tokens,
    `adapters` adapters of rank r, ids one per sequence (prefill: adapter i for sequence i; decode: drawn at random
    from a fixed generator, so each adapter serves about batch / adapters rows)."""
    kind: str  # "prefill" or "decode"
    batch: int
    seq: int
    k: int
    n: int
    r: int
    adapters: int
    dtype: torch.dtype
    family = "multi_lora_linear"

    @property
    def m(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return (f"{self.kind} M={self.m} ({self.batch}x{self.seq}) K={self.k} N={self.n} r={self.r} "
                f"{self.adapters} adapters {dtype_name(self.dtype)}")


def multi_lora_cases(device: torch.device, quick: bool = False) -> list[MultiLoraCase]:
    """The serving shapes: prefill (4096 rows = 8 sequences of 512 tokens, 8 adapters) and decode (64 sequences of one
    token, 32 adapters), rank 16; K=N=1024 float32 on CPU, K=N=4096 bf16 on GPU."""
    if device.type == "cuda":
        h, dtype = 4096, torch.bfloat16
    else:
        h, dtype = 1024, torch.float32
    if quick:
        return [MultiLoraCase("prefill", 4, 64, 256, 256, 16, 4, dtype),
                MultiLoraCase("decode", 16, 1, 256, 256, 16, 8, dtype)]
    return [MultiLoraCase("prefill", 8, 512, h, h, 16, 8, dtype), MultiLoraCase("decode", 64, 1, h, h, 16, 32, dtype)]


class _EagerMixedBatch(torch.nn.Module):
    """PEFT 0.21's `_mixed_batch_forward` for plain LoRA, op for op (when peft is not installed)."""

    def __init__(self, base, lora_a, lora_b, scalings):
        super().__init__()
        self.base, self.lora_a, self.lora_b, self.scalings = base, lora_a, lora_b, scalings

    def forward(self, x, adapter_names):
        result = self.base(x)
        for name in set(adapter_names):
            if name == "__base__":
                continue
            i = int(name[1:])
            rows = [j for j, item in enumerate(adapter_names) if item == name]
            sub = x[rows].to(self.lora_a[i].dtype)
            out = F.linear(F.linear(sub, self.lora_a[i]), self.lora_b[i]) * self.scalings[i]
            result[rows] += out.to(result.dtype)
        return result


def multi_lora_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    """Forward-only step functions (eval, no grad) for eager (PEFT's mixed-batch forward), peftkern
    (multi_lora_linear), peftkern_single (lora_linear, one adapter on all rows) and the floor (F.linear). Checks once,
    untimed, that eager and peftkern agree."""
    import peftkern

    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2 * case.r
    base = torch.nn.Linear(case.k, case.n, bias=True, device=device, dtype=case.dtype)
    base.requires_grad_(False)
    names = [f"a{i}" for i in range(case.adapters)]
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        layer = PeftLinear(base, names[0], config=LoraConfig(r=case.r, lora_alpha=alpha), r=case.r, lora_alpha=alpha)
        for name in names[1:]:
            layer.update_layer(name, r=case.r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                               use_rslora=False, config=LoraConfig(r=case.r, lora_alpha=alpha))
        lora_a = [layer.lora_A[name].weight for name in names]
        lora_b = [layer.lora_B[name].weight for name in names]
        scalings = [float(layer.scaling[name]) for name in names]
        eager_name = f"peft {__import__('peft').__version__} (mixed batch, adapter_names)"
    else:
        lora_a = [torch.nn.Parameter(torch.empty(case.r, case.k, device=device, dtype=case.dtype)) for _ in names]
        lora_b = [torch.nn.Parameter(torch.empty(case.n, case.r, device=device, dtype=case.dtype)) for _ in names]
        scalings = [alpha / case.r] * case.adapters
        layer = _EagerMixedBatch(base, lora_a, lora_b, scalings)
        eager_name = "eager mixed batch (peft not installed)"
    layer.to(device).eval()
    with torch.no_grad():  # trained adapters: every A and B random (PEFT's zero-init B would hide the work)
        for a, b in zip(lora_a, lora_b):
            a.copy_((torch.randn(a.shape, generator=gen) / case.k ** 0.5).to(a))
            b.copy_((torch.randn(b.shape, generator=gen) * 0.01).to(b))
    if case.kind == "prefill":
        seq_ids = [i % case.adapters for i in range(case.batch)]
    else:
        seq_ids = torch.randint(0, case.adapters, (case.batch,), generator=gen).tolist()
    adapter_names = [names[i] for i in seq_ids]
    ids = torch.tensor(seq_ids, device=device)
    x = torch.randn(case.batch, case.seq, case.k, generator=gen).to(device=device, dtype=case.dtype)

    def eager():
        with torch.no_grad():
            return layer(x, adapter_names=adapter_names)

    def fused():
        with torch.no_grad():
            return peftkern.multi_lora_linear(x, base.weight, lora_a, lora_b, ids, scalings=scalings, bias=base.bias,
                                              training=False)

    def single():
        with torch.no_grad():
            return peftkern.lora_linear(x, base.weight, lora_a[0], lora_b[0], scaling=scalings[0], bias=base.bias,
                                        training=False)

    def floor():
        with torch.no_grad():
            return F.linear(x, base.weight, base.bias)

    want, got = eager().double(), fused().double()
    err = ((got - want).norm() / want.norm()).item()
    bound = 1e-5 if case.dtype == torch.float32 else 1e-2
    if not err <= bound:
        raise AssertionError(f"multi_lora bench {case.label}: peftkern and {eager_name} disagree (relative error "
                             f"{err:.3g} > {bound:g}); refusing to time them")
    return {"eager": eager, "peftkern": fused, "peftkern_single": single, "floor": floor}, eager_name


def checks(row: dict, device_type: str) -> list[tuple[str, float, float, str]]:
    """The row's targets: [(what, ratio, bound, "<=" or ">=")], an infinite bound for a ratio only reported."""
    r = row["results"]
    if "peftkern_single" not in r:
        return []
    ms = {name: v["median_ms"] for name, v in r.items()}
    speedup, floor_ratio = ms["eager"] / ms["peftkern"], ms["peftkern"] / ms["floor"]
    single_ratio = ms["peftkern"] / ms["peftkern_single"]
    kind = row["case"]["kind"]
    if device_type == "cuda":
        if kind == "decode":
            return [("speedup vs PEFT", speedup, 3.0, ">="), ("vs one adapter", single_ratio, float("inf"), "<=")]
        return [("vs one adapter", single_ratio, 1.15, "<="), ("speedup vs PEFT", speedup, 1.0, ">=")]
    if kind == "decode":
        return [("speedup vs PEFT", speedup, 2.0, ">="), ("vs one adapter", single_ratio, float("inf"), "<=")]
    return [("speedup vs PEFT", speedup, 1.0, ">="), ("vs floor", floor_ratio, 1.10, "<="),
            ("vs one adapter", single_ratio, float("inf"), "<=")]


def notes(row: dict, device_type: str) -> list[str]:
    """Speedup over PEFT's mixed-batch forward, time over the floor and over one adapter on all rows, each against
    its target where there is one."""
    parts = []
    for what, value, bound, sense in checks(row, device_type):
        if bound == float("inf"):
            parts.append(f"{what} {value:.2f}x")
            continue
        ok = value >= bound if sense == ">=" else value <= bound
        parts.append(f"{what} {value:.2f}x ({'meets' if ok else 'misses'} {sense} {bound:.2f}x)")
    return [f"multi_lora {row['label']}: " + "; ".join(parts)] if parts else []


OPS = [
    BenchOp("multi_lora", 40, MultiLoraCase, multi_lora_cases, multi_lora_providers,
            help="multi_lora_linear serving a mixed batch (vs PEFT's adapter_names forward; prefill and decode)",
            floor="bare F.linear of the frozen base, forward only (eval, no grad)", timed="forward (eval)",
            notes=notes, notes_heading="Many adapters (`multi_lora_linear`, forward, eval) against their targets:"),
]
