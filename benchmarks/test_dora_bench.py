"""pytest-benchmark suite for DoRA; the same cases and providers as `python -m peftkern bench --op dora`.

    python -m pytest benchmarks/test_dora_bench.py --benchmark-only                        # quick cases
    PEFTKERN_BENCH_FULL=1 python -m pytest benchmarks/test_dora_bench.py --benchmark-only  # every CLI case
Each case is one group, so pytest-benchmark prints eager (PEFT's DoRA layer), peftkern (dora_linear),
peftkern_lora (lora_linear on the same adapters: the target is DoRA at most 1.10x of it) and floor
side by side.
"""
import pytest

from peftkern.dora.bench import dora_cases, dora_providers

from .conftest import DEVICE, QUICK


@pytest.mark.parametrize("provider", ["eager", "peftkern", "peftkern_lora", "floor"])
@pytest.mark.parametrize("case", dora_cases(DEVICE, quick=QUICK), ids=lambda c: c.label.replace(" ", "_"))
def test_dora_fwd_bwd(time_provider, case, provider):
    time_provider(dora_providers, case, provider)
