"""Whether peftkern's Triton kernels are interpreted (CPU) or compiled (GPU), decided once at import.

With no CUDA device there is nothing to compile for, so peftkern runs its kernels in Triton's CPU
interpreter (that is how the `triton` backend runs on CPU tensors, and how CI tests these kernels);
TRITON_INTERPRET, when the user has set it, decides instead. The interpreter is switched on for
peftkern's own kernels only, and the process environment is left as it was:
- Triton decides when it is first imported whether its own language helpers are interpreted. If
  peftkern imports it first, it does so with TRITON_INTERPRET=1 set for the duration of that import
  and then restores the environment. (If triton was imported earlier without the interpreter,
  interpreted kernels cannot run: INTERPRETER_ERROR says so, and the backend reports it.)
- Our kernels are decorated, and launched, inside `interpreter_scope()`: Triton's interpret knob is
  on there and back to what it was afterwards, so another library's Triton kernels in the same
  process keep their own mode.
"""
import contextlib
import functools
import os
import sys

import torch

_ENV = "TRITON_INTERPRET"
_triton_was_imported = "triton" in sys.modules


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "on", "yes")


INTERPRET = _truthy(os.environ[_ENV]) if _ENV in os.environ else not torch.cuda.is_available()
INTERPRETER_ERROR = None


@contextlib.contextmanager
def _env(value: str):
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = previous


@contextlib.contextmanager
def interpreter_scope():
    """Inside: Triton interprets what it decorates and launches, when INTERPRET (else a no-op)."""
    if not INTERPRET:
        yield
        return
    import triton
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton before 3.4 reads the variable itself
        with _env("1"):
            yield
        return
    with knobs.runtime.scope():  # restores the knobs and the variables they set
        knobs.runtime.interpret = True
        yield


def _scope_launches(module) -> None:
    """Make every interpreted kernel of `module` launch inside interpreter_scope() (Triton's interpreter
    consults the knob while it runs a kernel, not only when it decorates one)."""
    from triton.runtime.interpreter import InterpretedFunction

    for value in vars(module).values():
        if isinstance(value, InterpretedFunction):
            run = value.run

            def scoped_run(*args, _run=run, **kwargs):
                with interpreter_scope():
                    return _run(*args, **kwargs)
            value.run = scoped_run



try:
    if INTERPRET and not _triton_was_imported:
        with _env("1"):
            import triton
    else:
        import triton
except ImportError:  # no Triton: the triton backend reports it as unavailable
    triton = None

if triton is not None and INTERPRET and _triton_was_imported:
    import triton.language as _tl

    if type(_tl.interleave).__name__ == "JITFunction":  # decorated for the GPU, unusable by the interpreter
        INTERPRETER_ERROR = ("triton was imported before peftkern without TRITON_INTERPRET=1; set it in the "
                             "environment (or import peftkern first) to run Triton kernels on CPU")
