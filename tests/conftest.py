"""Test set-up. Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on
before triton is first imported (peftkern.kernels does the same; this makes the order explicit)."""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# a fresh torch.compile cache per run: a cache left by an older checkout can hold graphs that call
# the custom ops with an older schema
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="peftkern-inductor-"))

import peftkern  # noqa: E402  (after the environment is set)
from peftkern import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(op: str, dtype: torch.dtype) -> list[str]:
    """Backends that can run `op` on DEVICE in `dtype` on this machine."""
    names = []
    for name in _backend._OP_BACKENDS[op]:
        if name == "triton" and _backend._triton_unavailable_reason(DEVICE, dtype) is not None:
            continue
        names.append(name)
    return names


def device_dtypes() -> list[torch.dtype]:
    if DEVICE.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    # fp16 on CPU runs (slowly) in both the reference path and the interpreter; bf16 is GPU-only here
    return [torch.float32, torch.float16]


# the error floor of ENGINEERING.md, added to 2x the error plain PyTorch makes in the same dtype
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def run_step(fn, tensors, dy):
    """y = fn(*tensors); y.backward(dy). Returns [y] + the gradient of each tensor (None where it has none)."""
    for t in tensors:
        if t is not None:
            t.grad = None
    y = fn(*tensors)
    y.backward(dy)
    return [y.detach()] + [t.grad if t is not None and t.requires_grad else None for t in tensors]


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN, so an element a Triton kernel forgets to write fails the comparison."""
    from peftkern.kernels import _launch

    def nan_empty(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(_launch, "empty", nan_empty)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs every run, but reproducible from the printed seed when a test fails
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # shown with the output of a failing test
    yield
