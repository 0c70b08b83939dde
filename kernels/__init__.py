"""Triton kernels of peftkern, installed as `peftkern.kernels`; one module per op family.

_mode.py decides whether they are interpreted (no CUDA device: Triton's CPU interpreter) or compiled.
"""
if __name__ == "kernels":
    # This folder is peftkern.kernels. Python finds it as a top-level `kernels` only when the repository root
    # is on sys.path (a script, `python -c` or pytest run from the root), and that name belongs to another
    # package (Hugging Face's `kernels`, which transformers imports). Step aside: import that package with
    # the root left out of the search, or fail exactly as if this folder were not there.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    _saved_path = list(_sys.path)
    _sys.path[:] = [p for p in _saved_path if _os.path.realpath(p or _os.curdir) != _root]
    del _sys.modules["kernels"]  # the import machinery hands out whatever sys.modules holds once we return
    try:
        _importlib.import_module("kernels")
    finally:
        _sys.path[:] = _saved_path + [p for p in _sys.path if p not in _saved_path]
else:
    from ._mode import INTERPRET, INTERPRETER_ERROR, _scope_launches, interpreter_scope, triton  # noqa: F401

    if triton is not None:
        # every kernel module now, inside the scope: a kernel is interpreted or compiled as decided in _mode,
        # however and whenever its module is imported later
        with interpreter_scope():
            from . import (  # noqa: F401
                _launch,
                activations,
                adapter,
                dora,
                dropout,
                lora,
                lora_persistent,
                multi_lora,
                qlora,
                rank,
                sparse_diff,
                tf32,
            )
        if INTERPRET:
            for _module in (activations, adapter, dora, dropout, lora, lora_persistent, multi_lora, qlora, rank,
                            sparse_diff):
                _scope_launches(_module)
