"""What the providers of every family share. A provider is a step function the bench times: one training step
(forward + backward) of one layer unless its family's bench.py says otherwise; each family's `bench.py` says what
its rows time (eager baseline, peftkern, floor and any extra provider).

x / h requires grad in every provider, as an activation inside a network does. On CUDA, `with_variants` adds
peftkern_fused and peftkern_composite: the same peftkern step with PEFTKERN_DISPATCH forced to each variant,
beside `peftkern` (measured dispatch).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

VARIANTS = ("fused", "composite")


def with_variants(steps: dict[str, Callable[[], None]], device: torch.device, case=None
                  ) -> dict[str, Callable[[], None]]:
    """On CUDA, add peftkern_<variant> for each dispatch variant: the peftkern step with PEFTKERN_DISPATCH
    forced to it (set for the step only, then restored). With `case`, only where the backend `auto` picks
    for the case's family has both a fused and a composite variant (forcing a missing one raises)."""
    if device.type != "cuda":
        return steps
    if case is not None:
        from ..core import backend as _backend, dispatch

        backend = _backend.auto_choice(case.family, device, case.dtype)
        if {dispatch.kind_of(v) for v in dispatch.variants(case.family, backend)} != set(VARIANTS):
            return steps
    import os

    def forced(step, mode):
        def run():
            previous = os.environ.get("PEFTKERN_DISPATCH")
            os.environ["PEFTKERN_DISPATCH"] = mode
            try:
                step()
            finally:
                if previous is None:
                    os.environ.pop("PEFTKERN_DISPATCH", None)
                else:
                    os.environ["PEFTKERN_DISPATCH"] = previous
        return run

    return {**steps, **{f"peftkern_{v}": forced(steps["peftkern"], v) for v in VARIANTS}}


def _importable(name: str) -> bool:
    """False when the package is not installed; an installed package that fails to import is an error, not a
    missing baseline (the bench would otherwise time its own eager copy and call it the baseline)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except ImportError as err:
        raise RuntimeError(f"{name} is installed but does not import ({type(err).__name__}: {err}); the bench "
                           f"compares against it, so fix the environment (or uninstall {name} to time the "
                           f"built-in eager copy instead)") from err
    return True


def peft_available() -> bool:
    return _importable("peft")


def bnb_available() -> bool:
    return _importable("bitsandbytes")


class _EagerLora(torch.nn.Module):
    """PEFT's eager LoRA computation, for machines without peft (the eager LoRA baseline, and the base of the
    eager DoRA one)."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.dropout = torch.nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
