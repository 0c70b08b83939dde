"""The adapter family's bench op `adapter`: the bottleneck adapter.

What each row times, one training step (forward + backward) of one layer:
- eager:    AdapterHub's computation: down Linear, activation, up Linear, scale, add the residual
- peftkern: peftkern.bottleneck_adapter on the backend `auto` picks
- floor:    one elementwise pass over h forward and over dy backward (h·s): reading h and writing the
            output once, which any adapter must do
- peftkern_fwd: the forward alone under no_grad, for the share of the bandwidth roofline
On CUDA also peftkern_fused and peftkern_composite (bench/providers.py's with_variants).

Not imported by the family's __init__: only the bench reads it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch

from ..bench.declare import BenchOp, Case, dtype_name
from ..bench.providers import with_variants


@dataclasses.dataclass(frozen=True)
class AdapterCase(Case):
    m: int  # tokens
    d: int  # model width
    k: int  # bottleneck
    dtype: torch.dtype
    activation: str = "relu"
    family = "bottleneck_adapter"

    @property
    def label(self) -> str:
        return f"M={self.m} d={self.d} k={self.k} {dtype_name(self.dtype)} {self.activation}"


def adapter_cases(device: torch.device, quick: bool = False) -> list[AdapterCase]:
    """GPU: M=16384, d in {1024, 4096}, k in {16, 64, 256}, bf16. CPU: the acceptance shape, float32."""
    if device.type == "cuda":
        if quick:
            return [AdapterCase(16384, 4096, 64, torch.bfloat16)]
        return [AdapterCase(16384, d, k, torch.bfloat16) for d, k in itertools.product((1024, 4096), (16, 64, 256))]
    if quick:
        return [AdapterCase(512, 256, 16, torch.float32)]
    return [AdapterCase(4096, 1024, 64, torch.float32)]


def adapter_providers(case, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    import peftkern
    from peftkern.adapter import activations as act

    gen = torch.Generator(device="cpu").manual_seed(0)
    down = torch.nn.Linear(case.d, case.k, device=device, dtype=case.dtype)
    up = torch.nn.Linear(case.k, case.d, device=device, dtype=case.dtype)
    code, scaling = act.CODES[case.activation], 1.0
    h = torch.randn(case.m, case.d, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
    dy = torch.randn(case.m, case.d, generator=gen).to(device=device, dtype=case.dtype)
    params = list(down.parameters()) + list(up.parameters())

    def zero():
        h.grad = None
        for p in params:
            p.grad = None

    def eager():
        (h + scaling * up(act.activate(down(h), code))).backward(dy)
        zero()

    def fused():
        peftkern.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, activation=case.activation,
                                    scaling=scaling).backward(dy)
        zero()

    def fused_fwd():
        with torch.no_grad():
            peftkern.bottleneck_adapter(h, down.weight, down.bias, up.weight, up.bias, activation=case.activation,
                                        scaling=scaling)

    def floor():
        (h * scaling).backward(dy)
        zero()

    return (with_variants({"eager": eager, "peftkern": fused, "floor": floor, "peftkern_fwd": fused_fwd}, device),
            "AdapterHub-style eager")


def roofline(row: dict, ceilings: dict) -> dict:
    """Share of the copy-bandwidth roofline the adapter forward reaches: the bytes it cannot avoid
    (read h, write out, read the weights) over its time, against the measured copy bandwidth."""
    c = row["case"]
    item = torch.finfo(getattr(torch, c["dtype"])).bits // 8
    bytes_min = (2 * c["m"] * c["d"] + 2 * c["d"] * c["k"]) * item
    seconds = row["results"]["peftkern_fwd"]["median_ms"] * 1e-3
    achieved = bytes_min / seconds / 1e9
    return {"forward_gb_per_s": achieved, "forward_pct_of_copy_bw": 100 * achieved / ceilings["copy_gb_per_s"]}


OPS = [
    BenchOp("adapter", 50, AdapterCase, adapter_cases, adapter_providers, help="bottleneck_adapter",
            floor="one elementwise pass over h (fwd) and dy (bwd)", roofline=roofline),
]
