"""The dora_linear family: DoRA (weight-decomposed LoRA) over a dense or 4-bit base weight, with PEFT's semantics.

op.py the custom ops, the eval-mode norm cache and the public function; reference.py the plain-torch oracle; cpu.py
the fast torch path; triton.py the GPU variants; examples.py representative arguments for tests.
"""
from ..core import dispatch
from . import cpu, reference, triton  # noqa: F401  (cpu and triton register their variants with core/dispatch.py)
from .op import FAMILY, clear_norm_cache, dora_linear, row_norms

dispatch.register(FAMILY, "reference", forward=reference.forward, backward=reference.backward)
KERNELS = ("dora", "lora", "rank")  # its modules in kernels/

__all__ = ["dora_linear", "clear_norm_cache", "row_norms"]
