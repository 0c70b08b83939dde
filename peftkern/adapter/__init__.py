"""The bottleneck_adapter family: out = residual + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up).

op.py the custom ops and the public function; reference.py the plain-torch oracle; cpu.py the fast torch path;
triton.py the GPU variants; activations.py the activations' torch forms for the fast path; examples.py
representative arguments for tests, benchmarks and the AOT check.
"""
from ..core import dispatch
from . import cpu, reference, triton  # noqa: F401  (cpu and triton register their variants with core/dispatch.py)
from .op import FAMILY, bottleneck_adapter

dispatch.register(FAMILY, "reference", forward=reference.forward, backward=reference.backward)
KERNELS = ("adapter", "activations", "rank")  # its modules in kernels/

__all__ = ["bottleneck_adapter"]
