"""The one dropout mask of every backend: torch spelling, C++ extension and Triton kernel agree bit for bit."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (in the test extras)")
from hypothesis import given, settings, strategies as st

import peftkern  # noqa: E402
from peftkern.core import cpu as core_cpu, dropout as ref_dropout

from .conftest import ERROR_FLOOR, rel_err  # noqa: E402

masks = st.tuples(st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**63 - 1), st.integers(0, 50),
                  st.floats(0.01, 0.95))


@settings(max_examples=40, deadline=None)
@given(masks)
def test_cpp_multiplier_matches_torch_spelling(case):
    rows, cols, seed, row_offset, p = case
    if peftkern.core.backend.extension() is None:
        pytest.skip("peftkern._C is not built in this environment")
    got = ref_dropout.multiplier(rows, cols, seed, p, dtype=torch.float64, device="cpu", row_offset=row_offset)
    keep = ref_dropout.keep_mask(rows, cols, seed, p, row_offset=row_offset)
    assert torch.equal(got != 0, keep)


def test_keep_rate_and_independence_of_rows():
    keep = ref_dropout.keep_mask(400, 250, seed=5, p=0.2)
    assert abs(keep.float().mean().item() - 0.8) < 0.01
    # a block of rows made on its own equals the same rows of the whole mask
    assert torch.equal(ref_dropout.keep_mask(30, 250, seed=5, p=0.2, row_offset=100), keep[100:130])


def test_reference_without_the_extension_gives_the_same_result(monkeypatch):
    x = torch.randn(50, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 37, dtype=torch.float64)
    a = torch.randn(4, 37, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)

    def step():
        for t in (x, a, b):
            t.grad = None
        with peftkern.use_backend("reference"):
            y = peftkern.lora_linear(x, w, a, b, dropout_p=0.3, seed=77)
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad, a.grad, b.grad]

    monkeypatch.setattr(core_cpu, "BLOCK_BYTES", 1024)  # several row blocks even at this size
    with_ext = step()
    monkeypatch.setattr(peftkern.core.backend, "extension", lambda: None)
    without = step()
    for p, q in zip(with_ext, without):
        assert rel_err(p, q) <= ERROR_FLOOR[torch.float64]
