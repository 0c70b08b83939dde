"""pytest-benchmark suite for many adapters over one base; the same cases and providers as
`python -m peftkern bench --op multi_lora`.

    python -m pytest benchmarks/test_multi_lora_bench.py --benchmark-only                        # quick cases
    PEFTKERN_BENCH_FULL=1 python -m pytest benchmarks/test_multi_lora_bench.py --benchmark-only  # every CLI case
Each case is one group: eager (PEFT's mixed-batch forward), peftkern (multi_lora_linear), peftkern_single
(lora_linear, one adapter on every row) and floor (F.linear), forward only in eval mode.
"""
import pytest

from peftkern.multi_lora.bench import multi_lora_cases, multi_lora_providers

from .conftest import DEVICE, QUICK


@pytest.mark.parametrize("provider", ["eager", "peftkern", "peftkern_single", "floor"])
@pytest.mark.parametrize("case", multi_lora_cases(DEVICE, quick=QUICK), ids=lambda c: c.label.replace(" ", "_"))
def test_multi_lora_forward(time_provider, case, provider):
    time_provider(multi_lora_providers, case, provider)
