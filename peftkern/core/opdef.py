"""Declare a family's custom ops once, by name; the fake, the dispatch call, the autocast rule and the autograd
wiring between a forward and a backward op all follow from the names.

A family writes its op's schema (torch's schema language, the argument names are the contract) and three small
functions of the named arguments `a` (a namedtuple: `a.x`, `a.weight`, `a.need_x`):

    fwd = Op("lora_linear_fwd(Tensor x, Tensor weight, ..., Tensor? seed) -> (Tensor y, Tensor s_down)",
             family="lora_linear", fake=lambda a: ..., key=lambda a: ..., prepare=lambda a: a)
    bwd = Op("lora_linear_bwd(Tensor dy, Tensor x, ..., Tensor s_down, bool need_x, ..., str backend)"
             " -> (Tensor dx, ...)", family="lora_linear", phase="backward", fake=..., key=...)
    wire_autograd(fwd, bwd)

Every implementation registered for the family (core/dispatch.py) receives the same `a`. The backward op's
arguments are found by name (wire_autograd): a forward input or output of that name (saved for backward),
`d<output>` (the gradient reaching a forward output), `need_<input>` (whether autograd wants that input's
gradient) and `backend` (the backend that ran the forward runs the backward). Its results are named
`d<input>`, one per forward input that can take a gradient. A Tensor[] input (a list of adapters) has a bool[]
`need_<input>` and a Tensor[] `d<input>`, one entry per element. A misspelt name fails when the family is imported,
not at the first backward.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional

import torch

from . import backend as _backend, dispatch

NAMESPACE = "peftkern"


def _identity(a):
    return a


class Op:
    """One custom op peftkern::<name> whose implementation is `dispatch.call(family, phase, backend, key, a)`.

    schema: "name(arguments) -> returns", with named returns.
    fake: a -> the outputs' shapes and dtypes (empty tensors), for torch.compile and meta tensors.
    key: a -> tuple, what decides which variant is faster (core/dispatch.py); evaluated only when measuring.
    prepare: a -> a, run before dispatch: checks a direct torch.ops call must not skip, and normalisation the
        implementations rely on (e.g. the seed tensor as an int). Returns the arguments the variants receive.
    device_arg: the tensor whose device and dtype select the backend (forward ops; a backward op is told).
    mutates: names of arguments written in place.
    autocast_keep: None for no autocast rule; else names of floating arguments autocast must leave as they are
        (a quantized weight's float32 scales). Every other floating input is cast to the autocast dtype.
    """

    def __init__(self, schema: str, *, family: str, fake: Callable, key: Optional[Callable] = None,
                 prepare: Callable = _identity, phase: str = "forward", device_arg: str = "x",
                 mutates: tuple = (), autocast_keep: Optional[tuple] = None):
        name, signature = schema.split("(", 1)
        self.name, self.family, self.phase = name.strip(), family, phase
        self._key, self._prepare, self._device_arg = key or (lambda a: ()), prepare, device_arg
        self.custom_op = torch.library.custom_op(f"{NAMESPACE}::{self.name}", self._run, mutates_args=mutates,
                                                 schema="(" + signature)
        self.overload = getattr(getattr(torch.ops, NAMESPACE), self.name).default
        parsed = self.overload._schema
        self.names = tuple(arg.name for arg in parsed.arguments)
        self.list_args = frozenset(arg.name for arg in parsed.arguments if str(arg.type).startswith("List[Tensor"))
        self.returns = tuple(ret.name for ret in parsed.returns)
        if len(self.returns) > 1 and not all(self.returns):
            raise ValueError(f"{self.name}: name every result in the schema")
        self.Args = collections.namedtuple(f"{self.name}_args", self.names)
        self.mutates = tuple(mutates)
        self.has_autocast_rule = autocast_keep is not None
        self.tensor_args = tuple(arg.name for arg in parsed.arguments if "Tensor" in str(arg.type))
        self.eager_autograd = None  # wire_autograd's torch.autograd.Function for eager calls that need gradients
        self.custom_op.register_fake(lambda *args: fake(self.Args(*args)))
        if autocast_keep is not None:
            unknown = set(autocast_keep) - set(self.names)
            if unknown:
                raise ValueError(f"{self.name}: autocast_keep names no argument {sorted(unknown)}")
            _register_autocast(self.name, self.overload, keep={self.names.index(n) for n in autocast_keep})

    def _run(self, *args):
        a = self._prepare(self.Args(*args))
        if "backend" in a._fields:  # a backward op: the forward's backend
            backend = a.backend
        else:
            lead = getattr(a, self._device_arg)
            backend = _backend.select(self.family, lead.device, lead.dtype)
        return dispatch.call(self.family, self.phase, backend, lambda: self._key(a), a)

    def named(self, **kwargs):
        """The arguments an implementation receives for this call (tests call implementations directly)."""
        return self._prepare(self.Args(**kwargs))

    def __call__(self, **kwargs):
        """Call the op with named arguments: through torch's dispatcher (autograd, autocast, fakes, modes,
        transforms), or straight into its body where the dispatcher could only add its per-call cost
        (direct_call_ok: the same body runs, so the result is the same bit for bit)."""
        path = call_path(self, kwargs)
        if path == "direct":
            out = self._run(*self.Args(**kwargs))
            if self.mutates:  # what the dispatcher's ADInplaceOrView kernel does for a mutated argument
                torch.autograd.graph.increment_version([kwargs[n] for n in self.mutates])
            return out
        if path == "autograd":
            return self.eager_autograd.apply(*self.Args(**kwargs))
        return self.overload(**kwargs)


# ---- calling an op past the dispatcher -------------------------------------------------------------
# torch's custom-op dispatch costs ~70 µs a call on a CPU (measured: sparse_diff_apply_ of 16 entries takes
# 2.6 µs in the C++ loop, 80 µs through torch.ops), as much as a whole decode-step product or a small diff's
# apply. Where nothing can differentiate, cast, trace, transform or intercept the call, the dispatcher would
# only route it to the same body, so the op runs it directly.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# the thread-local dispatch keys of plain eager code (grad mode on or off, inference mode); anything more is a
# functorch transform (vmap, grad, functionalize) or a Python dispatcher in force
_PLAIN_INCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.BackendSelect).add(
    torch._C.DispatchKey.ADInplaceOrView)


def _plain_eager(op: Op, values: dict) -> Optional[str]:
    """None when the dispatcher could change this call (a trace, transform, mode, subclass, meta tensor, profiler,
    or autocast for an op with an autocast rule); else what autograd must record (grad mode on and an input that
    requires grad): "" nothing, "tensor" only plain Tensor inputs, "list" an element of a Tensor[] input."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._autograd._profiler_enabled():
        return None
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0:
        return None
    if (torch._C._dispatch_tls_local_include_set() - _PLAIN_INCLUDE).raw_repr():
        return None
    if op.has_autocast_rule and (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return None
    grad = torch.is_grad_enabled()
    needs = ""
    for name in op.tensor_args:
        value = values[name]
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if t is None:
                continue
            if type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta:
                return None
            if grad and t.requires_grad:
                needs = "list" if name in op.list_args else (needs or "tensor")
    return needs


def call_path(op: Op, values: dict) -> str:
    """How Op.__call__ runs this call: "direct" (the body, no autograd: nothing can take a gradient), "autograd"
    (the body under the op's own torch.autograd.Function: the same setup_context and backward the custom op has,
    without the custom op's dispatch and argument flattening, ~0.3 ms a forward + backward on a CPU) or
    "dispatcher" (through torch.ops, for everything else)."""
    needs = _plain_eager(op, values)
    if needs is None:
        return "dispatcher"
    if not needs:
        return "direct"
    # a torch.autograd.Function tracks Tensor arguments only: a Tensor[] element that needs a gradient (a list of
    # adapters) takes the custom op's list handling
    return "autograd" if needs == "tensor" and op.eager_autograd is not None else "dispatcher"


def direct_call_ok(op: Op, values: dict) -> bool:
    """True when calling op's body directly gives exactly what the dispatcher would: no torch.compile, jit trace,
    profiler, TorchFunctionMode or TorchDispatchMode, functorch transform, autocast (for an op with an autocast
    rule), gradient (grad mode on and an input that requires grad), tensor subclass (FakeTensor, DTensor, ...)
    or meta tensor in the call."""
    return call_path(op, values) == "direct"


# ---- autograd ---------------------------------------------------------------------------------------

def _check_names(fwd: Op, bwd: Op, saved: list, derived: dict, passthrough: dict, constants: tuple) -> None:
    """wire_autograd's names, checked when the family is imported: each backward argument resolvable, each result
    d<forward input>, passthrough and constants naming forward inputs and outputs."""
    for n in bwd.names:
        resolvable = (n in saved or n in derived or n == "backend" or (n.startswith("need_") and n[5:] in fwd.names)
                      or (n.startswith("d") and n[1:] in fwd.returns))
        if not resolvable:
            raise ValueError(f"{bwd.name}: argument {n!r} is no forward input or output, d<output>, need_<input> "
                             f"or backend")
    for r in bwd.returns:
        if not (r.startswith("d") and r[1:] in fwd.names):
            raise ValueError(f"{bwd.name}: result {r!r} must be named d<forward input>")
    for n, out in passthrough.items():
        if n not in fwd.names or out not in fwd.returns:
            raise ValueError(f"{fwd.name}: passthrough {n!r} -> {out!r} names no forward input and output")
    unknown = set(constants) - set(fwd.returns)
    if unknown:
        raise ValueError(f"{fwd.name}: constants {sorted(unknown)} name no forward output")


def wire_autograd(fwd: Op, bwd: Op, *, derived: Optional[dict] = None, passthrough: Optional[dict] = None,
                  constants: tuple = ()) -> None:
    """Register bwd as fwd's backward, matching arguments and results by name (module docstring).

    derived: {backward argument: function of the forward's named arguments}, for a backward argument that is no
        forward input or output (bottleneck_adapter's `residual_is_h = residual is None`).
    passthrough: {forward input: forward output}, an input whose gradient is the gradient reaching that output,
        unchanged (an adapter's residual): handed to autograd as it is, no copy and no backward result for it.
    constants: forward outputs autograd treats as constants (ctx.mark_non_differentiable): state saved for the
        backward, or a value held fixed in it (dora_linear's weight norm), that no gradient flows through."""
    derived, passthrough = dict(derived or {}), dict(passthrough or {})
    saved = [n for n in bwd.names if n in fwd.names or n in fwd.returns]
    _check_names(fwd, bwd, saved, derived, passthrough, constants)
    targets = [fwd.names.index(r[1:]) for r in bwd.returns]

    def setup_context(ctx, inputs, output):
        values = dict(zip(fwd.names, inputs))
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        values.update(zip(fwd.returns or ("out",), outputs))
        tensors, layout, plain = [], {}, {}
        for n in saved:
            v = values[n]
            if n in fwd.list_args:  # Tensor[]: saved element by element
                layout[n] = (len(tensors), len(v))
                tensors.extend(v)
            elif isinstance(v, torch.Tensor) or v is None:
                layout[n] = (len(tensors), None)
                tensors.append(v)
            else:
                plain[n] = v
        named = fwd.Args(*inputs)
        plain.update({n: fn(named) for n, fn in derived.items()})
        ctx.save_for_backward(*tensors)
        if constants:
            ctx.mark_non_differentiable(*(values[n] for n in constants))
        ctx.layout, ctx.plain = layout, plain
        lead = values[fwd._device_arg]
        # the backend that ran the forward runs the backward, so a use_backend block around the forward alone
        # decides both
        ctx.backend = _backend.select(fwd.family, lead.device, lead.dtype)

    def backward(ctx, *grads):
        stored = ctx.saved_tensors
        need = ctx.needs_input_grad
        kwargs = dict(ctx.plain)
        for n, (i, count) in ctx.layout.items():
            kwargs[n] = stored[i] if count is None else list(stored[i:i + count])
        for n in bwd.names:
            if n in kwargs:
                continue
            if n == "backend":
                kwargs[n] = ctx.backend
            elif n.startswith("need_") and n[5:] in fwd.names:
                flag = need[fwd.names.index(n[5:])]  # a list of flags for a Tensor[] input
                kwargs[n] = [bool(f) for f in flag] if isinstance(flag, (list, tuple)) else bool(flag)
            else:
                kwargs[n] = grads[fwd.returns.index(n[1:])]
        results = bwd(**kwargs)
        results = results if isinstance(results, (tuple, list)) else (results,)
        out = [[None] * len(v) if isinstance(v, list) else None for v in need]
        for pos, g in zip(targets, results):
            if isinstance(need[pos], (list, tuple)):  # Tensor[]: one gradient per element, None where not needed
                out[pos] = [gi if k else None for gi, k in zip(g, need[pos])]
            elif need[pos] is True:
                out[pos] = g
        for n, output in passthrough.items():
            pos = fwd.names.index(n)
            if need[pos] is True:
                out[pos] = grads[fwd.returns.index(output)]
        return tuple(out)

    fwd.custom_op.register_autograd(backward, setup_context=setup_context)
    # the same setup_context and backward as a plain torch.autograd.Function, for eager calls (call_path)
    fwd.eager_autograd = type(f"{fwd.name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: fwd._run(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward)})


def grad_slot(flag: bool, like: torch.Tensor, shape, empty_from: torch.Tensor) -> torch.Tensor:
    """A gradient result of a backward op's fake: `like`-typed [shape] when asked for, else an empty tensor typed
    like `empty_from` (the implementations' empty slots are made from one tensor, x or h: custom ops may not
    return None, and their outputs may not alias one another, so each unused slot is its own tensor)."""
    return like.new_empty(shape) if flag else empty_from.new_empty((0,))


# ---- autocast ---------------------------------------------------------------------------------------
# torch.library.register_autocast fixes one dtype when it is registered, which is not what a user running bf16
# one day and fp16 the next expects: F.linear's rule is to cast to the *current* autocast dtype, so peftkern
# registers that rule itself.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):  # Tensor[] arguments
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _register_autocast(op_name: str, overload, keep=frozenset(), device_types=("cpu", "cuda")) -> None:
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*(a if i in keep else _cast(a, _device_type, dtype) for i, a in enumerate(args)))

        _lib.impl(op_name, kernel, key_name, with_keyset=True)
