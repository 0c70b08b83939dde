"""1. Recording (a child process, TRITON_INTERPRET=1): the launches peftkern's public ops make, described as
Triton's binder sees them, and not executed.

The driver (aot/driver.py) runs under a launch configuration (peftkern.kernels._launch.LaunchConfig) that
sizes every launcher for the GPU: its tiles and warps, not the interpreter's small ones, and, in turn, 4
programs per split reduction (as when a problem already fills the GPU) and an H100's 4 x 132, since split
counts, and Triton's ==1 specialization of them, depend on the GPU's size. Each launch is intercepted where
Triton would run it (the interpreter's `run`, and the autotuner's `run`, tagged with the registered kernel it
tunes so that every GPU config is compiled, not the interpreter's one).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import threading
import time

from .driver import GRID_TARGETS, H100_SMS, drive, driver_calls
from .report import int_class

OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _encode_const(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if type(v).__name__ == "constexpr":
        return _encode_const(v.value)
    if type(v).__name__ == "dtype" and type(v).__module__.startswith("triton"):
        return {"tl_dtype": str(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode_const(x) for x in v]}
    raise TypeError(f"cannot record constexpr value {v!r}")


def _describe(v, constexpr: bool, dtype_map=None) -> tuple[dict, tuple]:
    """(record, dedup key) of one kernel argument: what Triton's binder looks at, nothing more."""
    if constexpr:
        c = _encode_const(v)
        return {"k": "constexpr", "v": c}, ("c", json.dumps(c, sort_keys=True))
    if v is None:
        return {"k": "none"}, ("none",)
    if isinstance(v, bool):
        return {"k": "bool", "v": v}, ("bool",)
    if isinstance(v, int):
        return {"k": "int", "v": v}, ("int",) + int_class(v)
    if isinstance(v, float):
        return {"k": "float", "v": v}, ("float",)
    if type(v).__name__ == "TensorDescriptor":  # host TMA descriptor: its base's dtype and its block shape
        base, _ = _describe(v.base, False, dtype_map)
        rec = dict(base, k="tensordesc", shape=list(v.shape), stride=list(v.strides),
                   block_shape=list(v.block_shape))
        return rec, ("d", rec["dtype"], tuple(rec["block_shape"]))
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        name = str(v.dtype).replace("torch.", "")
        name = (dtype_map or {}).get(name, name)
        rec = {"k": "tensor", "dtype": name, "align16": v.data_ptr() % 16 == 0,
               "shape": list(v.shape), "stride": list(v.stride())}
        return rec, ("t", name, rec["align16"])
    raise TypeError(f"cannot record kernel argument of type {type(v).__name__}")


class _Recorder:
    def __init__(self):
        self.records, self.seen = [], set()
        self.tls = threading.local()
        self.errors = []
        self.dtype_map = {}  # tensor dtypes recorded as another (the driver's bf16 stand-in)

    @staticmethod
    def _tuned_kernel(tuner):
        """The registered kernel (module, name) the autotuner tunes (found again in GPU mode by that key)."""
        from peftkern.kernels import registry
        entry = registry.find(tuner)
        if entry is None:
            raise LookupError(f"an autotuner of {tuner.fn!r} is not in peftkern.kernels.registry")
        return entry.key

    def record(self, raw_fn, args, kwargs):
        try:
            sig = inspect.signature(raw_fn)
            params = sig.parameters
            kernel_kwargs = {k: v for k, v in kwargs.items() if k in params}
            options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
            bound = sig.bind(*args, **kernel_kwargs)
            bound.apply_defaults()
            recs, keys = [], []
            for name, value in bound.arguments.items():
                ann = params[name].annotation
                ann = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
                r, k = _describe(value, "constexpr" in ann, self.dtype_map)
                r["name"] = name
                recs.append(r)
                keys.append(k)
            stack = getattr(self.tls, "tuners", None)
            tuner = stack[-1] if stack else None
            key = (raw_fn.__module__, raw_fn.__name__, tuple(keys), tuple(sorted(options.items())), tuner)
            if key in self.seen:
                return
            self.seen.add(key)
            self.records.append({"module": raw_fn.__module__, "name": raw_fn.__name__, "args": recs,
                                 "options": options, "autotuner": list(tuner) if tuner else None})
        except Exception as e:  # reported as a problem by the parent; the driver goes on
            self.errors.append(f"could not record a launch of {raw_fn.__module__}.{raw_fn.__name__}: {e!r}")

    def install(self):
        from triton.runtime import autotuner, interpreter, jit
        recorder = self

        def run_instead(self, *args, grid=None, warmup=False, **kwargs):
            if not warmup:
                recorder.record(self.fn, args, kwargs)
            return None  # not executed: the arguments are all the check needs

        def tuner_run(self, *args, **kwargs):
            stack = recorder.tls.__dict__.setdefault("tuners", [])
            stack.append(recorder._tuned_kernel(self))
            try:  # the first config stands in for all of them (compile time takes the GPU autotuner's list)
                return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
            finally:
                stack.pop()

        interpreter.InterpretedFunction.run = run_instead
        jit.JITFunction.run = run_instead
        autotuner.Autotuner.run = tuner_run


def record_main(out_path: str, full: bool) -> None:
    """The recording child: install the interceptors, drive under the GPU's launch configurations, write JSON."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings
    warnings.filterwarnings("ignore")
    t0 = time.time()
    recorder = _Recorder()
    recorder.install()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    import peftkern  # noqa: F401
    from peftkern.kernels import _launch
    failures, configs = [], []
    for programs in GRID_TARGETS:
        # the one switch: every launcher asks _launch what it launches for
        with _launch.launch_config(interpret=False, programs=programs, num_sms=H100_SMS, arch=90) as config:
            configs.append(repr(config))
            log(f"# driving under {config!r}")
            failures += drive(driver_calls(full), recorder, log)
    problems = [f"driver call failed: {f}" for f in failures] + recorder.errors
    with open(out_path, "w") as f:
        json.dump({"records": recorder.records, "launch_configs": configs, "problems": problems,
                   "seconds": time.time() - t0}, f)
