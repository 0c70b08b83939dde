"""pytest-benchmark suite for sparse diffs (apply, and sparse_diff_linear forward + backward); the same
cases and providers as `python -m peftkern bench --op sparse` (see test_lora_bench.py for how to run)."""
import pytest

from peftkern.sparse_diff.bench import sparse_cases, sparse_providers

from .conftest import DEVICE, QUICK

PARAMS = [(case, provider) for case in sparse_cases(DEVICE, quick=QUICK)
          for provider in (["eager", "eager_inplace", "peftkern", "peftkern_fresh", "floor"] if case.kind == "apply"
                           else ["eager", "peftkern", "floor"])]


@pytest.mark.parametrize("case,provider", PARAMS, ids=lambda v: v.label.replace(" ", "_") if hasattr(v, "label") else v)
def test_sparse_step(time_provider, case, provider):
    time_provider(sparse_providers, case, provider)
