"""2. Which kernels there are, and whether the recording covered them (the parent, TRITON_INTERPRET=0).

The kernels are those of peftkern.kernels.registry: each kernel module declares the kernels its launchers
launch (`@registry.kernel`, `registry.autotuned(...)`), with the archs it needs. A JIT function of a kernel
module that no other JIT function calls and that is not declared is reported (a kernel the check would not
see), and so is a kernel module that reads the interpreter flag itself instead of asking the launch
configuration (kernels/_launch.py) what it launches for: the recording could not size it for the GPU.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import textwrap
from collections import defaultdict

KERNEL_PACKAGE = "peftkern.kernels"
# modules that may read kernels/_mode.py's INTERPRET: where it is decided and where the launch configuration
# takes its default from it
_MODE_MODULES = ("__init__", "_mode", "_launch")


def gpu_mode_env():
    os.environ["TRITON_INTERPRET"] = "0"


def _tree(jit_fn):
    return ast.parse(textwrap.dedent(jit_fn.src if hasattr(jit_fn, "src") else inspect.getsource(jit_fn.fn)))


def _called_names(jit_fn) -> set[str]:
    names = set()
    for n in ast.walk(_tree(jit_fn)):
        if isinstance(n, ast.Call):
            f = n.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)
    return names


def body_names(jit_fn) -> set[str]:
    fdef = next(n for n in ast.walk(_tree(jit_fn)) if isinstance(n, ast.FunctionDef))
    return {n.id for stmt in fdef.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}


def kernel_modules() -> list:
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def discover() -> tuple[dict, list[str]]:
    """({(module, fn name): registry.Kernel} of the declared kernels, in GPU mode; problems)."""
    from triton.runtime.interpreter import InterpretedFunction

    modules = kernel_modules()
    from peftkern.kernels import registry
    kernels = {k.key: k for k in registry.kernels()}
    for k in kernels.values():
        if isinstance(k.jit, InterpretedFunction):
            raise RuntimeError(f"{k.module}.{k.name} was made in interpreter mode; the check compiles with "
                               "TRITON_INTERPRET=0 set before peftkern is imported")
    return kernels, undeclared(modules, kernels) + mode_readers(modules)


def undeclared(modules, kernels) -> list[str]:
    """JIT functions of `modules` that no JIT function calls (so not device functions) and that are not among
    the declared `kernels` ({(module, name): ...})."""
    from triton.runtime.jit import JITFunction

    jits = {(o.fn.__module__, o.fn.__name__): o for mod in modules for o in vars(mod).values()
            if isinstance(o, JITFunction)}
    called = set().union(*(_called_names(fn) for fn in jits.values())) if jits else set()
    return [f"{m}.{n} is a JIT function no kernel calls and is not declared in peftkern.kernels.registry "
            "(@registry.kernel or registry.autotuned): the check cannot compile what it does not know"
            for (m, n) in sorted(jits) if n not in called and (m, n) not in kernels]


def mode_readers(modules) -> list[str]:
    """Kernel modules that read INTERPRET themselves: their launchers would not follow the launch configuration."""
    problems = []
    for mod in modules:
        if mod.__name__.rsplit(".", 1)[-1] in _MODE_MODULES:
            continue
        tree = ast.parse(inspect.getsource(mod))
        if any(isinstance(n, (ast.Name, ast.alias, ast.Attribute)) and "INTERPRET" in (
                getattr(n, "id", None), getattr(n, "name", None), getattr(n, "attr", None)) for n in ast.walk(tree)):
            problems.append(f"{mod.__name__} reads INTERPRET: its launchers must ask kernels/_launch.py "
                            "(interpreting(), target_programs(), num_sms()) so that the check can size them")
    return problems


def coverage(records: list[dict], entries: dict) -> tuple[list[str], list[str]]:
    """(problems, info lines): entry kernels never launched, bool constexprs launched with one value only."""
    problems, info = [], []
    launched = defaultdict(list)
    for rec in records:
        launched[(rec["module"], rec["name"])].append(rec)
    for kid in sorted(entries):
        recs = launched.get(kid)
        if not recs:
            problems.append(f"coverage: {kid[0]}.{kid[1]} is never launched by the driver: add the call that "
                            "launches it to its family's examples.aot_calls (peftkern/<family>/examples.py)")
            continue
        values = defaultdict(set)
        for rec in recs:
            for a in rec["args"]:
                if a["k"] == "constexpr" and not isinstance(a["v"], dict):
                    values[a["name"]].add(a["v"])
        for name, vs in values.items():
            if any(isinstance(v, bool) for v in vs) and len(vs) < 2:
                problems.append(f"coverage: {kid[1]}.{name} is only launched with {sorted(vs)}: add a call "
                                "that launches the other value to its family's examples.aot_calls")
        shown = " ".join(f"{n}={{{','.join(str(v) for v in sorted(vs, key=str))}}}" for n, vs in sorted(values.items()))
        info.append(f"#   {kid[1]}: {len(recs)} launch signatures; {shown}")
    return problems, info
