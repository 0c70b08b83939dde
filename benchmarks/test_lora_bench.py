"""pytest-benchmark suite for LoRA; the same cases and providers as `python -m peftkern bench --op lora`.

    python -m pytest benchmarks --benchmark-only                       # quick cases
    PEFTKERN_BENCH_FULL=1 python -m pytest benchmarks --benchmark-only # every case of the CLI
Each case is one group, so pytest-benchmark prints eager, peftkern and floor side by side.
"""
import pytest

from peftkern.lora.bench import lora_cases, lora_providers

from .conftest import DEVICE, QUICK


@pytest.mark.parametrize("provider", ["eager", "peftkern", "floor"])
@pytest.mark.parametrize("case", lora_cases(DEVICE, quick=QUICK), ids=lambda c: c.label.replace(" ", "_"))
def test_lora_fwd_bwd(time_provider, case, provider):
    time_provider(lora_providers, case, provider)
