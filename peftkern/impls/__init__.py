"""The implementations of every op family, registered with peftkern.core.dispatch on import.

One module per (backend, family): reference.py (plain torch, every family), triton_<family>.py (the Triton
backend's fused and composite variants) and extension.py (the compiled extension: sparse-diff apply/restore).
Each implementation takes the arguments of its family's custom ops in peftkern/ops/ (positional, in the op's
order). A new kernel is a new `dispatch.register(...)` here; the ops need no change.
"""
from . import (  # noqa: F401
    extension,
    reference,
    triton_adapter,
    triton_dora,
    triton_qdora,
    triton_sparse,
)
