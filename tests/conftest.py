"""Test set-up.

- Without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before triton is
  first imported (peftkern.kernels does the same; this makes the order explicit).
- Seeds: every test draws fresh random inputs from its own seed, printed with a failure as a command that
  replays it: `PEFTKERN_TEST_SEED=<seed> python -m pytest '<test id>'`. With PEFTKERN_TEST_SEED set, every
  test (hypothesis tests included) uses that seed, so a run is repeatable and scripts/seed_sweep.py can run
  the suite over many seeds.
- Nothing is left behind: the session's temporary files (tmp_path, torch.compile's cache, whatever
  subprocesses and libraries write to the temp dir) go to one folder that is removed when the session ends.
"""
import os
import random
import shlex
import shutil
import tempfile

import pytest
import torch

# no TRITON_INTERPRET here: peftkern switches Triton's interpreter on for its own kernels when there is
# no GPU (kernels/__init__.py), and the suite runs the way a user's process does

SEED_ENV = "PEFTKERN_TEST_SEED"
SEED_LIMIT = 2**63  # torch.manual_seed takes any 64-bit value; hypothesis.seed any int


def _seed_from_env() -> int | None:
    raw = os.environ.get(SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        seed = int(raw)
    except ValueError:
        seed = -1
    if not 0 <= seed < SEED_LIMIT:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer in [0, 2**63), got {raw!r}")
    return seed


try:
    import hypothesis
except ImportError:  # the property tests skip themselves with a reason
    hypothesis = None
else:
    # no example database: a replay must depend on the seed alone (the database would also re-run old
    # failures first, whatever the seed), and a run must not leave a .hypothesis folder behind
    hypothesis.settings.register_profile("peftkern", database=None)
    hypothesis.settings.load_profile("peftkern")

import peftkern  # noqa: E402  (after the environment is set)
from peftkern.core import backend as _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(op: str, dtype: torch.dtype) -> list[str]:
    """Backends that can run `op` on DEVICE in `dtype` on this machine."""
    names = []
    for name in peftkern.core.dispatch.backends(op):
        if name == "triton" and _backend._triton_unavailable_reason(DEVICE, dtype) is not None:
            continue
        if name == "cpu" and DEVICE.type != "cpu":  # the fast torch path runs CPU tensors only
            continue
        names.append(name)
    return names


def device_dtypes() -> list[torch.dtype]:
    if DEVICE.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    # fp16 on CPU runs (slowly) in both the reference path and the interpreter; bf16 is GPU-only here
    return [torch.float32, torch.float16]


# the project's error floor, added to 2x the error plain PyTorch makes in the same dtype
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


_SEED_KEY = pytest.StashKey[int]()
_REPLAYS: list[str] = []


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)


_SESSION = {}  # the session's temp folder and the settings it replaced


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Every temp file of the session goes to one fresh folder, removed by pytest_unconfigure: tmp_path (pytest
    # keeps its last three runs otherwise), subprocesses (TMPDIR), and torch.compile, whose cache (fresh per
    # session: an older checkout's cache can hold graphs that call the custom ops with an older schema) and
    # precompiled headers (written to the temp dir whatever TORCHINDUCTOR_CACHE_DIR says) land there.
    # A TORCHINDUCTOR_CACHE_DIR the user chose is theirs and is left alone.
    # The seed variable is read per session (scripts/seed_sweep.py runs several sessions in one process);
    # a bad value stops the run before anything is made.
    seed = _seed_from_env()
    folder = tempfile.mkdtemp(prefix="peftkern-tests-")
    _SESSION.update(folder=folder, tempdir=tempfile.tempdir,
                    env={name: os.environ.get(name) for name in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")})
    os.environ["TMPDIR"] = tempfile.tempdir = folder
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    # pytest-benchmark makes its storage folder (./.benchmarks) at start-up, even for tests that time
    # nothing; unless one was asked for, it goes to the session folder too
    if getattr(config.option, "benchmark_storage", None) == "file://./.benchmarks":
        config.option.benchmark_storage = "file://" + os.path.join(folder, "benchmarks")
    _REPLAYS.clear()
    if seed is not None:
        # draws made while test modules are imported (e.g. bad-input tensors) follow the seed too
        _seed_everything(seed)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch, Python's random and hypothesis from one seed per test: fresh each run, or PEFTKERN_TEST_SEED."""
    seed = _seed_from_env()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    request.node.stash[_SEED_KEY] = seed
    _seed_everything(seed)
    if hypothesis is not None and getattr(request.function, "is_hypothesis_test", False):
        hypothesis.seed(seed)(request.function)  # hypothesis draws its examples from this seed, not its own
    yield


def replay_command(nodeid: str, seed: int) -> str:
    return f"{SEED_ENV}={seed} python -m pytest {shlex.quote(nodeid)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        command = replay_command(item.nodeid, seed)
        report.sections.append(("replay (from the repository root)", command))
        _REPLAYS.append(command)


def pytest_terminal_summary(terminalreporter):
    if _REPLAYS:
        terminalreporter.section("replay failed tests with their seeds (from the repository root)")
        for command in dict.fromkeys(_REPLAYS):
            terminalreporter.write_line(command)


def pytest_unconfigure(config):
    if "folder" not in _SESSION:
        return
    shutil.rmtree(_SESSION["folder"], ignore_errors=True)
    # restored for whatever runs next in this process (scripts/seed_sweep.py runs several sessions)
    tempfile.tempdir = _SESSION["tempdir"]
    for name, value in _SESSION["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SESSION.clear()
