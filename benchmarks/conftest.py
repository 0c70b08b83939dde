"""Shared by the pytest-benchmark suites: device choice and the timing of one provider of one case."""
import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("PEFTKERN_BENCH_FULL") != "1"


@pytest.fixture
def time_provider(benchmark):
    """time_provider(providers, case, provider): time one fwd+bwd step function of a bench provider set."""
    def run(providers, case, provider):
        steps, eager_name = providers(case, DEVICE)
        step = steps[provider]

        def timed():
            step()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        timed()  # warm-up: Triton compilation, allocator growth
        benchmark.group = case.label
        benchmark.extra_info.update({"provider": provider, "eager": eager_name, **case.as_dict()})
        benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    return run
