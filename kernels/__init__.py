"""Triton kernels of peftkern, installed as `peftkern.kernels`; one module per op family.

Triton decides when `triton` is first imported whether its language helpers (and, at decoration
time, our kernels) are compiled for the GPU or run by its CPU interpreter (TRITON_INTERPRET=1).
With no CUDA device there is nothing to compile for, so the interpreter is switched on here; that
is how the `triton` backend runs on CPU tensors (and how CI tests these kernels). peftkern imports
this package before it imports triton. If triton was imported earlier with the interpreter off,
interpreted kernels cannot run: `INTERPRETER_ERROR` then says so, and the backend reports it.
"""
import os
import sys

import torch

_triton_was_imported = "triton" in sys.modules
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
INTERPRETER_ERROR = None
if INTERPRET and _triton_was_imported:
    import triton.language as _tl

    if type(_tl.interleave).__name__ == "JITFunction":  # decorated for the GPU, unusable by the interpreter
        INTERPRETER_ERROR = ("triton was imported before TRITON_INTERPRET=1 was set; set it in the "
                             "environment (or import peftkern first) to run Triton kernels on CPU")
