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
    with knobs.runtime.scope(), _numpy_scalar_index():  # restores the knobs and the variables they set
        knobs.runtime.interpret = True
        yield


@contextlib.contextmanager
def _numpy_scalar_index():
    """Triton's interpreter (3.6 and earlier) turns a runtime scalar into a Python int with
    `int(handle.data)`, its data a one-element 1-d array; numpy 2.4 made that a TypeError, so every `range()`
    over a runtime bound fails (triton-lang/triton#9171, fixed upstream with `.squeeze()`). While our kernels
    run, the interpreter's tensor patching also sets an `__index__` that takes the one element explicitly;
    the interpreter itself is restored on the way out, so other libraries' kernels see it unchanged."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not _NUMPY_REFUSES_ARRAY_TO_INT:
        yield
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))  # restored with the rest

    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original


def _numpy_refuses_array_to_int() -> bool:
    import numpy

    try:
        int(numpy.zeros(1))
    except TypeError:
        return True
    return False


_NUMPY_REFUSES_ARRAY_TO_INT = _numpy_refuses_array_to_int()


def _scope_launches(kernel) -> None:
    """Make `kernel`, when interpreted, launch inside interpreter_scope() (Triton's interpreter consults the
    knob while it runs a kernel, not only when it decorates one). kernels/__init__.py calls it for every kernel
    of the registry."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        run = kernel.run

        def scoped_run(*args, _run=run, **kwargs):
            with interpreter_scope():
                return _run(*args, **kwargs)
        kernel.run = scoped_run



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
