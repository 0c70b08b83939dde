"""The kernel registry: every Triton kernel a launcher launches declares itself here, where it is defined.

    @registry.kernel
    @triton.jit
    def _rank_down_kernel(...): ...

    _lora_gemm_tuned = registry.autotuned(_lora_gemm_kernel, configs=_gemm_configs, key=[...],
                                          prune=_prune_configs)

`autotuned` builds the autotuner (triton.autotune with the early_config_prune wrapped by
_launch.tuning_prune, so PEFTKERN_AUTOTUNE=first holds for every kernel) and records which function gives
its configs, so that a tool can ask for the GPU's list (`gpu_configs()`, under a LaunchConfig that sizes for
the GPU). `min_capability` marks a kernel that needs a newer GPU (TMA: (9, 0)).

Readers: scripts/aot_check.py (which kernels to record, compile and check for coverage; which autotuner a
launch went through; the archs a kernel compiles for), kernels/__init__.py (the interpreted kernels' launch
scope) and the grid-limit tests (which objects to replace with grid recorders). The JIT device functions the
kernels call (kernels/blocks.py, dropout.py, tf32.py, ...) are not registered: they are never launched.
"""
import dataclasses
import sys
from typing import Callable, Optional

import triton

from . import _launch

_KERNELS: dict = {}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launched kernel: where it is defined, what the launchers launch (the JIT function or its autotuner)."""
    module: str
    name: str  # the Python function's name (what Triton and ptxas call the compiled kernel)
    launched: object
    configs: Optional[Callable] = None  # autotuned: the function that builds its config list
    min_capability: Optional[tuple] = None

    @property
    def key(self) -> tuple:
        return self.module, self.name

    @property
    def autotuned(self) -> bool:
        return self.configs is not None

    @property
    def jit(self):
        """The JIT (or, interpreted, InterpretedFunction) object under any autotuner."""
        fn = self.launched
        while not hasattr(fn, "run") or hasattr(getattr(fn, "fn", None), "run"):
            fn = fn.fn
        return fn

    @property
    def attr(self) -> str:
        """The name the defining module binds the launched object to (what a launcher looks up at launch)."""
        for name, value in vars(sys.modules[self.module]).items():
            if value is self.launched:
                return name
        raise LookupError(f"{self.module} binds no global to the launched object of {self.name}")

    def gpu_configs(self) -> list:
        """The configs the autotuner has on a GPU, whatever this process launches for."""
        with _launch.launch_config(interpret=False):
            return list(self.configs())


def _python_function(obj):
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _register(launched, configs=None, min_capability=None):
    fn = _python_function(launched)
    entry = Kernel(fn.__module__, fn.__name__, launched, configs, min_capability)
    _KERNELS[entry.key] = entry
    return entry


def kernel(jit_fn=None, *, min_capability: Optional[tuple] = None):
    """Decorator (outermost, above @triton.jit): declare a kernel launched without an autotuner."""
    def declare(fn):
        _register(fn, min_capability=min_capability)
        return fn
    return declare(jit_fn) if jit_fn is not None else declare


def autotuned(jit_fn, *, configs: Callable, key: list, prune: Callable, min_capability: Optional[tuple] = None):
    """triton.autotune(jit_fn) over configs(), keyed on `key`, pruned by `prune` (through _launch.tuning_prune);
    declared as the kernel the launchers launch."""
    tuner = triton.autotune(configs=configs(), key=key,
                            prune_configs_by={"early_config_prune": _launch.tuning_prune(prune)})(jit_fn)
    _register(tuner, configs, min_capability)
    return tuner


def kernels(module: Optional[str] = None) -> list:
    """Every declared kernel (of one module, `peftkern.kernels.<name>` or its last part), in declaration order."""
    found = list(_KERNELS.values())
    if module is not None:
        found = [k for k in found if k.module == module or k.module.rsplit(".", 1)[-1] == module]
    return found


def find(launched) -> Optional[Kernel]:
    """The declared kernel whose launched object (or JIT function) is `launched`."""
    for entry in _KERNELS.values():
        if entry.launched is launched or entry.jit is launched:
            return entry
    return None
