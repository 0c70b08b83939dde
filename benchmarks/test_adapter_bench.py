"""pytest-benchmark suite for the bottleneck adapter; the same cases and providers as
`python -m peftkern bench --op adapter` (see test_lora_bench.py for how to run)."""
import pytest

from peftkern.adapter.bench import adapter_cases, adapter_providers

from .conftest import DEVICE, QUICK


@pytest.mark.parametrize("provider", ["eager", "peftkern", "floor", "peftkern_fwd"])
@pytest.mark.parametrize("case", adapter_cases(DEVICE, quick=QUICK), ids=lambda c: c.label.replace(" ", "_"))
def test_adapter_step(time_provider, case, provider):
    time_provider(adapter_providers, case, provider)
