"""Triton kernels of peftkern, installed as `peftkern.kernels`; one module per op family.

_mode.py decides whether they are interpreted (no CUDA device: Triton's CPU interpreter) or compiled;
_launch.py holds the launch configuration the launchers size their launches for; registry.py lists every
launched kernel (what scripts/aot_check.py compiles); blocks.py the building blocks the GEMM kernels share.
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
        import importlib as _importlib
        import pkgutil as _pkgutil

        # every kernel module now, inside the scope: a kernel is interpreted or compiled as decided in _mode,
        # however and whenever its module is imported later. Each declares its launched kernels in registry.py.
        with interpreter_scope():
            for _info in _pkgutil.iter_modules(__path__):
                _importlib.import_module(f"{__name__}.{_info.name}")
        if INTERPRET:
            from . import registry as _registry

            for _kernel in _registry.kernels():
                _scope_launches(_kernel.jit)
