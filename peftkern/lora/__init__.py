"""The lora_linear family: y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ over a dense or 4-bit base weight.

op.py the custom ops and the public function; reference.py the plain-torch oracle; cpu.py the fast torch path;
triton.py the GPU variants; examples.py representative arguments for tests, benchmarks and the AOT check.
"""
from ..core import dispatch
from . import cpu, reference, triton  # noqa: F401  (cpu and triton register their variants with core/dispatch.py)
from .op import FAMILY, lora_linear

dispatch.register(FAMILY, "reference", forward=reference.forward, backward=reference.backward)
KERNELS = ("lora", "lora_persistent", "qlora", "rank")  # its modules in kernels/

__all__ = ["lora_linear"]
