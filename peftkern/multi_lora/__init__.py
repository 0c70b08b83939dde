"""The multi_lora_linear family: many LoRA adapters over one dense or 4-bit base in one call, row t of x through
adapter row_ids[t] (-1: none): y_t = x_t·Wᵀ + bias + s_i·(dropout(x)_t·A_iᵀ)·B_iᵀ.

op.py the custom ops and the public function; reference.py the plain-torch oracle; cpu.py the fast torch path (with
the C++ row kernel of peftkern._C where built); triton.py the GPU variants; examples.py representative arguments for
tests, benchmarks and the AOT check.
"""
from ..core import dispatch
from . import cpu, reference, triton  # noqa: F401  (cpu and triton register their variants with core/dispatch.py)
from .op import FAMILY, multi_lora_linear

dispatch.register(FAMILY, "reference", forward=reference.forward, backward=reference.backward)
KERNELS = ("multi_lora",)  # its modules in kernels/

__all__ = ["multi_lora_linear"]
