"""pytest-benchmark suite for the bottleneck adapter; the same cases and providers as
`python -m peftkern bench --op adapter` (see benchmarks/test_lora_bench.py for how to run)."""
import os

import pytest
import torch

from peftkern.bench.cases import adapter_cases
from peftkern.bench.providers import adapter_providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = adapter_cases(DEVICE, quick=os.environ.get("PEFTKERN_BENCH_FULL") != "1")


@pytest.mark.parametrize("provider", ["eager", "peftkern", "floor", "peftkern_fwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_adapter_step(benchmark, case, provider):
    steps, eager_name = adapter_providers(case, DEVICE)
    step = steps[provider]
    if DEVICE.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    timed()
    benchmark.group = case.label
    benchmark.extra_info.update({"provider": provider, "eager": eager_name, **case.as_dict()})
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
