"""Which implementation runs: backend selection, the optional compiled extension, backend_info().

Order of precedence: the innermost `use_backend(...)` context, else the environment variable
PEFTKERN_BACKEND (read at every call), else "auto". `auto` takes the fastest implementation the
device has: the Triton kernels on CUDA, the reference path (with the C++ helpers when built) on CPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import platform

import torch

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")
ENV_VAR = "PEFTKERN_BACKEND"

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("peftkern_backend", default=None)


def _validate(name: str, source: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: the peftkern ops called inside the block run on backend `name`.

    name: "auto" (the default outside any block: Triton kernels on CUDA, the "cpu" path on CPU, the compiled
    extension for sparse-diff apply/restore where it is built), "cpu" (peftkern's fast path for CPU tensors:
    torch in blocks of rows, with the C++ kernels of peftkern._C where built), "triton" (the Triton kernels;
    on CPU tensors through Triton's interpreter, float32/float16 only), "cuda" (the compiled extension
    peftkern._C, which implements sparse-diff apply/restore) or "reference" (plain torch written for clarity:
    the tests' oracle, any device and dtype including float64). Case and surrounding spaces are ignored.

    The innermost block wins, and it wins over the environment variable PEFTKERN_BACKEND (same names,
    read at every call). The backend that runs a forward also runs its backward, so a block around the
    forward alone decides both. Blocks are per thread / asyncio task (a contextvar).

    Raises ValueError (on entry) for a name not in the list above. An op called inside the block raises
    RuntimeError, saying why, when the backend cannot run it (no implementation of that op, Triton or
    the extension not installed or not built, or an unsupported dtype or device).

    Example:  with peftkern.use_backend("reference"): y = peftkern.lora_linear(x, w, a, b)
    """
    token = _override.set(_validate(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    override = _override.get()
    if override is not None:
        return override
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")


# ---- the compiled extension ---------------------------------------------------------------------
_ext_state: dict = {}


def extension():
    """peftkern._C, or None when it was not built (the reason is in backend_info())."""
    if "module" not in _ext_state:
        try:
            _ext_state["module"] = importlib.import_module("peftkern._C")
            _ext_state["error"] = None
        except ImportError as err:
            _ext_state["module"] = None
            _ext_state["error"] = str(err)
    return _ext_state["module"]


def call_extension(name: str, device: torch.device, *args):
    """peftkern._C.<name>(*args, stream) on `device`: for CUDA tensors with that device made current and
    the current stream passed as an integer (the compiled kernels take it explicitly, see csrc/cuda)."""
    fn = getattr(extension(), name)
    if device.type != "cuda":
        return fn(*args, 0)
    with torch.cuda.device(device):
        return fn(*args, torch.cuda.current_stream(device).cuda_stream)


# ---- Triton ---------------------------------------------------------------------------------------
def triton_version() -> str | None:
    import peftkern.kernels  # noqa: F401  (first: it picks interpreter or GPU mode before triton loads)
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def kernels(family: str):
    """peftkern.kernels.<family>; importing it fixes interpreter-or-GPU mode (see kernels/__init__.py)."""
    return importlib.import_module(f"peftkern.kernels.{family}")


def _triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if triton_version() is None:
        return "Triton is not installed (pip install triton)"
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels support float16, bfloat16 and float32, not {dtype}"
    from peftkern.kernels import INTERPRET, INTERPRETER_ERROR
    if device.type == "cpu" and INTERPRETER_ERROR:
        return INTERPRETER_ERROR
    if device.type == "cpu" and not INTERPRET:
        return ("the Triton kernels were compiled for the GPU; to run them on CPU tensors set "
                "TRITON_INTERPRET=1 before importing peftkern")
    if device.type not in ("cpu", "cuda"):
        return f"the Triton kernels run on cuda (or cpu through the interpreter), not {device.type}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        # triton-lang/triton#11584: the interpreter's tl.dot multiplies the raw bits of bf16 operands
        return "the Triton interpreter computes bfloat16 dot products wrongly; use float32/float16 on CPU"
    return None


def _extension_unavailable_reason(device: torch.device) -> str | None:
    """Why the "cuda" backend (the compiled CUDA kernels of peftkern._C) cannot run on `device`, or None."""
    if device.type != "cuda":
        return (f"it runs the compiled CUDA kernels on CUDA tensors, not {device.type} ones (on CPU tensors the "
                f"compiled C++ kernels run in the 'cpu' backend)")
    ext = extension()
    if ext is None:
        return f"peftkern._C is not built ({_ext_state.get('error')}); reinstall with a compiler present"
    if not ext.with_cuda:
        return "peftkern._C was built without CUDA (torch without CUDA, or no nvcc, at install time)"
    return None


def _supported(op: str) -> tuple[str, ...]:
    from . import dispatch
    return dispatch.backends(op)


def select(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend ("triton", "cuda" or "reference") that runs `op` on this device and dtype; within it,
    peftkern.core.dispatch picks the variant."""
    supported = _supported(op)
    name = requested_backend()
    if name == "auto":
        return auto_choice(op, device, dtype)
    if name not in supported:
        raise RuntimeError(f"backend {name!r} has no implementation of {op}; available: "
                           f"{', '.join(supported)} (or 'auto')")
    if name == "triton":
        reason = _triton_unavailable_reason(device, dtype)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available for {op}: {reason}")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' is not available for {op}: it runs CPU tensors, not {device.type} "
                           f"ones (use 'auto', 'triton' or 'reference')")
    if name == "cuda":
        reason = _extension_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'cuda' is not available for {op}: {reason}")
    return name


@functools.lru_cache(maxsize=None)
def auto_choice(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """What `auto` runs for op on this device and dtype. Remembered per (op, device, dtype): it depends only
    on what is installed and built, which does not change while the process runs."""
    supported = _supported(op)
    if device.type == "cpu" and "cpu" in supported:
        return "cpu"
    if "cuda" in supported and _extension_unavailable_reason(device) is None:
        return "cuda"
    if device.type == "cuda" and "triton" in supported and _triton_unavailable_reason(device, dtype) is None:
        return "triton"
    return "reference"


def backend_info() -> dict:
    """What peftkern can run here, as a dict (`python -m peftkern info` prints it):

    "python", "torch", "torch_cuda" (CUDA version torch was built with, or None), "triton" (version or None),
    "triton_interpreter" (True when the Triton kernels run on CPU through the interpreter, None without
    Triton), "devices" (list: "cpu" and "cuda:i (name)" for each GPU), "extension_built" (whether the
    compiled extension peftkern._C imported), "extension_cuda" (whether it has CUDA kernels),
    "extension_error" (why it did not import, or None), "requested_backend" (what use_backend /
    PEFTKERN_BACKEND ask for now), "auto" ({op: {"cpu": backend, "cuda": backend}}: what "auto" picks per
    op, for float32 on CPU and bfloat16 on CUDA), "dispatch" ({"mode": PEFTKERN_DISPATCH's value,
    "cache_file": PEFTKERN_DISPATCH_CACHE or None, "choices": the fused/composite choices measured so far,
    with their timings}). Raises nothing except ValueError when PEFTKERN_BACKEND or PEFTKERN_DISPATCH
    holds an unknown name.
    """
    from . import dispatch
    ext = extension()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    try:
        from peftkern.kernels import INTERPRET
    except ImportError:
        INTERPRET = None
    auto = {}
    for op in dispatch.families():
        auto[op] = {"cpu": auto_choice(op, torch.device("cpu"), torch.float32)}
        if torch.cuda.is_available():
            auto[op]["cuda"] = auto_choice(op, torch.device("cuda"), torch.bfloat16)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "triton_interpreter": INTERPRET,
        "devices": devices,
        "extension_built": ext is not None,
        "extension_cuda": bool(getattr(ext, "with_cuda", False)),
        "extension_error": _ext_state.get("error"),
        "requested_backend": requested_backend(),
        "auto": auto,
        "dispatch": dispatch.info(),
    }
