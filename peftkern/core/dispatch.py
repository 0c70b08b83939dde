"""Which implementation runs a peftkern op: one registry, one choice, measured where it matters.

Every op family (lora_linear, dora_linear, multi_lora_linear, bottleneck_adapter, sparse_diff_linear,
sparse_diff_apply) is defined once, as custom ops in its folder's op.py (peftkern/<family>/); its implementations
register here, from that folder's reference.py, cpu.py and triton.py, as (family, backend, variant) -> Implementation.
An op body makes one call:

    dispatch.call(family, phase, backend, key, *args)      # phase: "forward" or "backward"
                                                           # key: a callable giving the measurement key

Two levels decide what runs:
1. The backend (peftkern.core.backend.select: use_backend() / PEFTKERN_BACKEND / auto): which library.
   "reference" (plain torch), "triton" (peftkern's GPU kernels; on CPU tensors through Triton's
   interpreter), "cuda" (the compiled extension).
2. The variant within that backend, where it has several. The Triton backend has two for the
   products: "fused" (peftkern's own kernel with the epilogue fused in) and "composite" (library
   calls, cuBLAS for the big GEMM, plus peftkern's skinny kernels); a kind can have several variants,
   named kind_something (lora_linear's "fused_persistent": the Hopper TMA kernel, on sm_90 only).
   PEFTKERN_DISPATCH picks:
     measure   (default) on CUDA, time every variant that can run this call once per key and keep the
               fastest (in memory, and on disk when PEFTKERN_DISPATCH_CACHE names a file);
               elsewhere (no GPU to time: the interpreter's speed says nothing) the fused variant
     fused / composite   always that kind (RuntimeError, saying why, when none of its variants can run the
               call); where several variants of the kind can run it, they are measured among themselves
   The key is what decides which one is faster: op phase, device, dtypes, a power-of-two bucket of
   the token count, the other dimensions, flags and layout (each op's declared `key`).

Measuring runs each candidate on the call's real arguments (every implementation is a pure function
of its inputs: sparse composite's in-place apply is restored bit-exactly before it returns), so the
first call of a new key costs a few extra runs, and the winner's last result is returned. The fused kind
is kept unless another variant is faster by more than 3% (PREFER_FUSED_MARGIN), so near-ties do not flip
between runs. Inside CUDA-graph capture the choice made by the warm-up call before the capture is used
(torch requires such a warm-up on a side stream); a key never seen before runs the fused variant there and
nothing is measured (timing would break the capture).

backend_info()["dispatch"] and `python -m peftkern bench` show the choices made and their timings.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from typing import Callable, Optional

import torch

MODES = ("measure", "fused", "composite")
ENV_VAR = "PEFTKERN_DISPATCH"
CACHE_ENV_VAR = "PEFTKERN_DISPATCH_CACHE"
DEFAULT_VARIANT = "fused"  # what runs when nothing is measured
WARMUP_RUNS = 2  # the first run of a Triton variant compiles and autotunes; the second settles caches
TIMED_RUNS = 5  # median of five: one preempted run does not decide
PREFER_FUSED_MARGIN = 0.03  # another variant replaces the fused one only when faster by more than 3%


class NotApplicable(str):
    """A reason a variant cannot run a call because the call is for another kind of input (a 4-bit base weight
    for a dense-weight kernel): not a gap in the variant. Among the variants that apply to a call, a single one runs
    whatever PEFTKERN_DISPATCH asks for, as a family with a single variant always has."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run a family: `forward(*args)` and `backward(*args)` take the family's op arguments
    (see the family's op module). `unsupported(phase, *args)` returns why this implementation cannot run
    that call (then another variant runs it), or None."""
    family: str
    backend: str
    variant: str
    forward: Callable
    backward: Optional[Callable] = None
    unsupported: Optional[Callable[..., Optional[str]]] = None

    def why_not(self, phase: str, args) -> Optional[str]:
        return None if self.unsupported is None else self.unsupported(phase, *args)


_registry: dict[str, dict[str, dict[str, Implementation]]] = {}


def register(family: str, backend: str, variant: str = DEFAULT_VARIANT, *, forward: Callable,
             backward: Optional[Callable] = None, unsupported=None) -> Implementation:
    if kind_of(variant) not in MODES[1:]:
        raise ValueError(f"variant {variant!r} must be fused, composite, or one of them with a _suffix")
    impl = Implementation(family, backend, variant, forward, backward, unsupported)
    variants = _registry.setdefault(family, {}).setdefault(backend, {})
    if variant in variants:
        raise ValueError(f"{family}/{backend}/{variant} is registered twice")
    variants[variant] = impl
    return impl


def families() -> tuple[str, ...]:
    """Every family with a registered implementation, in registration order."""
    return tuple(_registry)


def backends(family: str) -> tuple[str, ...]:
    return tuple(_registry[family])


def variants(family: str, backend: str) -> dict[str, Implementation]:
    return _registry[family][backend]


def kind_of(variant: str) -> str:
    """The PEFTKERN_DISPATCH mode a variant belongs to: "fused_persistent" is a fused variant."""
    return variant.split("_", 1)[0]


def requested_mode() -> str:
    """PEFTKERN_DISPATCH, read at every call (like PEFTKERN_BACKEND)."""
    mode = (os.environ.get(ENV_VAR, "measure") or "measure").strip().lower()
    if mode not in MODES:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


# ---- timing ---------------------------------------------------------------------------------------

def _cuda_time_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Median milliseconds of fn() on `device` (CUDA events on the current stream), and its last result."""
    out = None
    for _ in range(WARMUP_RUNS):
        out = fn()
    stream = torch.cuda.current_stream(device)
    times = []
    for _ in range(TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        out = fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


# tests replace this: (candidate name, fn, device) -> (ms, result); None means "time on CUDA only"
_timer: Optional[Callable] = None


def set_timer(timer: Optional[Callable]) -> Optional[Callable]:
    """Install a timer `(variant, fn, device) -> (milliseconds, fn's result)` used instead of CUDA
    events, on any device (the CPU tests use it to exercise measuring); None restores the default.
    Returns the previous one. Clears remembered choices."""
    global _timer
    previous, _timer = _timer, timer
    clear()
    return previous


# ---- remembered choices -----------------------------------------------------------------------------

_lock = threading.Lock()
_choices: dict[str, dict] = {}  # key string -> {"variant": ..., "ms": {variant: ms}}
_disk_loaded_from: Optional[str] = None


def clear() -> None:
    """Forget every measured choice (in memory; a cache file is left as it is)."""
    global _disk_loaded_from
    with _lock:
        _choices.clear()
        _disk_loaded_from = None


def choices() -> dict[str, dict]:
    """A copy of the measured choices: {key: {"variant": chosen, "ms": {variant: median ms}}}."""
    with _lock:
        return {k: {"variant": v["variant"], "ms": dict(v["ms"])} for k, v in _choices.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index).replace(" ", "_")
    return device.type


def _key_string(family: str, phase: str, backend: str, device: torch.device, key: tuple) -> str:
    return "|".join([family, phase, backend, _device_name(device)] + [str(k) for k in key])


def _cache_path() -> Optional[str]:
    path = os.environ.get(CACHE_ENV_VAR, "").strip()
    return os.path.expanduser(path) if path else None


def _versions() -> str:
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    from .. import __version__
    return f"peftkern {__version__}, torch {torch.__version__}, triton {triton_v}"


def _load_disk() -> None:
    """Merge the cache file's choices once per path (choices made by other versions are ignored: a new
    kernel or library can change which one is faster)."""
    global _disk_loaded_from
    path = _cache_path()
    if path is None or path == _disk_loaded_from:
        return
    _disk_loaded_from = path
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{CACHE_ENV_VAR}={path} is not a readable dispatch cache ({err}); delete it or "
                           f"point {CACHE_ENV_VAR} elsewhere") from err
    if not isinstance(data, dict) or data.get("versions") != _versions():
        return
    for k, v in data.get("choices", {}).items():
        if isinstance(v, dict) and isinstance(v.get("variant"), str):
            _choices.setdefault(k, {"variant": v["variant"], "ms": dict(v.get("ms", {}))})


def _save_disk() -> None:
    path = _cache_path()
    if path is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump({"versions": _versions(), "choices": _choices}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


# ---- the choice -----------------------------------------------------------------------------------

def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, tuple):  # a family's named arguments (core/opdef.py)
            found = _device_of(a)
            if found.type != "cpu":
                return found
    return torch.device("cpu")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def call(family: str, phase: str, backend: str, key: Callable[[], tuple], *args):
    """Run `phase` ("forward"/"backward") of `family` on `backend` with `args`, in the variant chosen as
    described in this module's docstring. `key()` is only evaluated when a measured choice is needed."""
    impls = variants(family, backend)
    mode = requested_mode()  # validated on every call, whatever the backend
    if len(impls) == 1:
        (impl,) = impls.values()
        return getattr(impl, phase)(*args)
    reasons = {name: impl.why_not(phase, args) for name, impl in impls.items()}
    applicable = [name for name, why in reasons.items() if not isinstance(why, NotApplicable)]
    if len(applicable) == 1:
        return getattr(impls[applicable[0]], phase)(*args)
    runnable = {name: impl for name, impl in impls.items() if reasons[name] is None}
    if mode != "measure":
        forced = {name: impl for name, impl in runnable.items() if kind_of(name) == mode}
        if not forced:
            why = impls[mode].why_not(phase, args) if mode in impls else f"{backend} has no {mode} variant"
            raise RuntimeError(f"{ENV_VAR}={mode}: {family} {phase} cannot run the {mode} variant on backend "
                               f"{backend!r}: {why}; unset {ENV_VAR} (or set it to measure) to let peftkern choose")
        if len(forced) == 1:
            (impl,) = forced.values()
            return getattr(impl, phase)(*args)
        runnable = forced  # several variants of that kind (fused, fused_persistent): measured among themselves
    if not runnable:
        reasons = "; ".join(f"{n}: {i.why_not(phase, args)}" for n, i in impls.items())
        raise RuntimeError(f"no variant of backend {backend!r} can run this {family} {phase} call ({reasons})")
    if len(runnable) == 1:
        (impl,) = runnable.values()
        return getattr(impl, phase)(*args)
    device = _device_of(args)
    fallback = runnable.get(DEFAULT_VARIANT) or next(iter(runnable.values()))
    if _timer is None and device.type != "cuda":
        return getattr(fallback, phase)(*args)
    # the candidates are part of the key: a choice among the fused variants only (PEFTKERN_DISPATCH=fused) is
    # not a choice against the composite one
    ks = _key_string(family, phase, backend, device, key()) + "|" + ",".join(sorted(runnable))
    with _lock:
        _load_disk()
        known = _choices.get(ks)
    if known is not None and known["variant"] in runnable:
        # also inside CUDA-graph capture: the warm-up call that precedes a capture (as torch requires) decided
        return getattr(runnable[known["variant"]], phase)(*args)
    if _capturing(device):  # no warm-up call made this decision: timing would break the capture
        return getattr(fallback, phase)(*args)
    timer = _timer or (lambda name, fn, dev: _cuda_time_ms(fn, dev))
    ms, results = {}, {}
    for name, impl in runnable.items():
        ms[name], results[name] = timer(name, lambda impl=impl: getattr(impl, phase)(*args), device)
    best = _fastest(ms)
    with _lock:
        _choices[ks] = {"variant": best, "ms": {n: round(float(t), 4) for n, t in ms.items()}}
        _save_disk()
    return results[best]


def _fastest(ms: dict[str, float]) -> str:
    """The variant to keep: the fastest, except that a fused-kind variant stays unless another is faster by more
    than PREFER_FUSED_MARGIN. Two variants within a few percent swap places from run to run (clocks, other
    work on the GPU); with the margin, repeated runs make the same choice, and the fused one saves memory."""
    best = min(ms, key=lambda n: (ms[n], n != DEFAULT_VARIANT))  # an exact tie keeps the fused variant
    if kind_of(best) == DEFAULT_VARIANT:
        return best
    fused = [n for n in ms if kind_of(n) == DEFAULT_VARIANT]
    if not fused:
        return best
    fastest_fused = min(fused, key=lambda n: (ms[n], n != DEFAULT_VARIANT))
    return best if ms[best] < ms[fastest_fused] * (1.0 - PREFER_FUSED_MARGIN) else fastest_fused


def token_bucket(m: int) -> int:
    """Power-of-two bucket of a token count: training with varying batch sizes re-measures per bucket,
    not per size."""
    return 0 if m <= 0 else 1 << math.ceil(math.log2(m))


def layout(*tensors: Optional[torch.Tensor]) -> str:
    """A short layout tag for a key: per tensor 'c' (row-major contiguous), 't' (transposed view) or 's'."""
    tags = []
    for t in tensors:
        if t is None:
            tags.append("-")
        elif t.is_contiguous():
            tags.append("c")
        elif t.dim() == 2 and t.t().is_contiguous():
            tags.append("t")
        else:
            tags.append("s")
    return "".join(tags)


def info() -> dict:
    """For backend_info(): the mode, the cache file, and the choices measured so far in this process."""
    return {"mode": requested_mode(), "cache_file": _cache_path(), "choices": choices()}
