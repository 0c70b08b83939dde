"""The lora_linear family: y = x·Wᵀ + bias + s·(dropout(x)·Aᵀ)·Bᵀ over a dense or 4-bit base weight.

op.py the custom ops and the public function; reference.py the plain-torch oracle; cpu.py the fast torch path;
triton.py the GPU variants; examples.py representative arguments for tests, benchmarks and the AOT check.
"""
from . import cpu, reference, triton  # noqa: F401  (each registers its variants with core/dispatch.py)
from .op import lora_linear

FAMILY = "lora_linear"
KERNELS = ("lora", "lora_persistent", "qlora", "rank")  # its modules in kernels/

__all__ = ["lora_linear"]
