"""pytest-benchmark suite for LoRA; the same cases and providers as `python -m peftkern bench --op lora`.

    python -m pytest benchmarks --benchmark-only                     # quick cases
    PEFTKERN_BENCH_FULL=1 python -m pytest benchmarks --benchmark-only   # every case of the CLI
Each case is one group, so pytest-benchmark prints eager, peftkern and floor side by side.
"""
import os

import pytest
import torch

from peftkern.bench.cases import lora_cases
from peftkern.bench.providers import lora_providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = lora_cases(DEVICE, quick=os.environ.get("PEFTKERN_BENCH_FULL") != "1")


@pytest.mark.parametrize("provider", ["eager", "peftkern", "floor"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_lora_fwd_bwd(benchmark, case, provider):
    steps, eager_name = lora_providers(case, DEVICE)
    step = steps[provider]
    if DEVICE.type == "cuda":
        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    timed()  # warm-up (Triton compilation, allocator)
    benchmark.group = case.label
    benchmark.extra_info.update({"provider": provider, "eager": eager_name, **case.as_dict()})
    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
