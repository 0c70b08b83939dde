"""3. Plan: every recorded launch bound with Triton's own binder (the code JITFunction.run uses) for each arch,
and deduplicated: one compile per distinct (kernel, arch, argument types, constexprs, specialization attributes,
options). Constexprs the kernel body never reads (autotune keys) are merged, to the smallest value recorded.
Autotuned kernels: every config of the GPU autotuner, after its own `early_config_prune` when it has one. A kernel
declared with a minimum compute capability (TMA: (9, 0)) compiles only for the archs that have it.
"""
from __future__ import annotations

import json
import os

from .discover import body_names
from .record import OPTION_NAMES
from .report import SHORT_DTYPE, config_label


class ProxyTensor:
    """What Triton's binder and a prune function look at in a tensor: dtype, address, shape, strides."""

    def __init__(self, dtype, aligned, shape=(), stride=()):
        self.dtype = dtype
        self._ptr = 0x10000 if aligned else 0x10008
        self.shape, self._stride = tuple(shape), tuple(stride)

    def data_ptr(self):
        return self._ptr

    def stride(self, i=None):
        return self._stride if i is None else self._stride[i]

    def size(self, i=None):
        return self.shape if i is None else self.shape[i]

    def dim(self):
        return len(self.shape)

    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def element_size(self):
        return self.dtype.itemsize


def _decode(a):
    import torch
    import triton.language as tl
    k = a["k"]
    if k == "tensor":
        return ProxyTensor(getattr(torch, a["dtype"]), a["align16"], a.get("shape", ()), a.get("stride", ()))
    if k == "tensordesc":
        from triton.tools.tensor_descriptor import TensorDescriptor
        base = ProxyTensor(getattr(torch, a["dtype"]), a["align16"], a["shape"], a["stride"])
        return TensorDescriptor(base, list(a["shape"]), list(a["stride"]), list(a["block_shape"]))
    if k == "constexpr":
        def const(c):
            if isinstance(c, dict):
                if "tl_dtype" in c:
                    return tl.dtype(c["tl_dtype"])
                if "tuple" in c:
                    return tuple(const(x) for x in c["tuple"])
            return c
        return const(a["v"])
    if k == "none":
        return None
    return a["v"]


_BACKENDS: dict = {}


def bind(fn, args: list[dict], options: dict, arch: int):
    """Triton's own binding of a launch for `arch`: (signature, constexprs, attrs, options object),
    exactly what JITFunction.run computes before it compiles."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(GPUTarget("cuda", arch, 32))
    backend = _BACKENDS[arch]
    binders = fn.__dict__.setdefault("_aot_binders", {})
    if arch not in binders:
        binders[arch] = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(options)
    kwargs["debug"] = fn.debug or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what JITFunction.run adds (3.9)
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    bound, spec, opts = binders[arch](*[_decode(a) for a in args], **kwargs)
    opts_obj, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return signature, constexprs, attrs, opts_obj


def _tuner_configs(tuner, record) -> tuple[list, str]:
    """The configs the GPU autotuner may pick for this launch: all, or its early_config_prune's choice."""
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if not prune:
        return configs, ""
    tuned = {k for c in configs for k in c.kwargs}
    # Triton passes the launch's positional arguments by name and its keyword arguments (the launchers
    # pass constexprs by keyword) as **kwargs; the recording does not keep which was which, so a prune
    # function gets every argument by name and the constexprs as keywords too
    nargs = {a["name"]: _decode(a) for a in record["args"] if a["name"] not in tuned}
    kwargs = {a["name"]: _decode(a) for a in record["args"] if a["k"] == "constexpr" and a["name"] not in tuned}
    try:
        kept = list(prune(configs, nargs, **kwargs))
        if not kept:
            raise ValueError("it kept no config")
        return kept, ""
    except Exception as e:  # cannot evaluate it on proxies: compile every config (never fewer)
        return configs, f"early_config_prune not evaluated ({type(e).__name__}): all configs compiled"


def _spec_label(fn, args, signature, constexprs, tile_names):
    names = [p.name for p in fn.params]
    ptrs = [SHORT_DTYPE.get(v[1:], v[1:]) for v in signature.values() if isinstance(v, str) and v.startswith("*")]
    flags = []
    for path, v in sorted(constexprs.items()):
        name = names[path[0]]
        if len(path) == 1 and fn.params[path[0]].is_constexpr and name not in tile_names:
            flags.append(f"{name}={int(v) if isinstance(v, bool) else v}")
    ones = [names[p[0]] for p in constexprs if len(p) == 1 and not fn.params[p[0]].is_constexpr]
    odd = [a["name"] for a in args if (a["k"] == "int" and a["v"] != 1 and a["v"] % 16)
           or (a["k"] == "tensor" and not a["align16"])]
    label = f"{','.join(ptrs)}" + (" " + " ".join(flags) if flags else "")
    if ones:
        label += f" ==1:{','.join(ones)}"
    if odd:
        label += f" %16!:{','.join(odd)}"
    return label


def _choices(rec: dict, kernel) -> tuple[list, str]:
    """(index, tile constexprs, launch options, pre_hook) per config a recorded launch compiles, and a note."""
    if not rec["autotuner"]:
        return [(None, {}, dict(rec["options"]), None)], ""
    configs, note = _tuner_configs(kernel.launched, rec)
    return [(i, dict(c.kwargs), {k: v for k, v in c.all_kwargs().items() if k in OPTION_NAMES}, c.pre_hook)
            for i, c in enumerate(configs)], note


def _config_args(rec: dict, param_names: list, cfg_params: dict, read: set, canon: dict, pre_hook) -> list[dict]:
    """The launch's arguments with the config's tile constexprs; constexprs the body never reads merged."""
    kid = (rec["module"], rec["name"])
    by_name = {a["name"]: a for a in rec["args"]}
    args = []
    for name in param_names:
        a = dict(by_name[name])
        if name in cfg_params:
            a = {"k": "constexpr", "v": cfg_params[name], "name": name}
        if a["k"] == "constexpr" and name not in read:  # never read: same code
            a["v"] = canon.setdefault((kid, name), a["v"])
        args.append(a)
    if pre_hook is not None:  # e.g. a config's TMA block shapes, set on its descriptors
        nargs = {a["name"]: _decode(a) for a in args}
        pre_hook(nargs)
        args = [dict(a, block_shape=list(nargs[a["name"]].block_shape)) if a["k"] == "tensordesc" else a
                for a in args]
    return args


def _task(tasks: list, fn, rec: dict, args: list, options: dict, arch: int, index, cfg_params: dict, key) -> dict:
    sig, consts, attrs, opt = key[-1]
    param_names = [p.name for p in fn.params]
    tile_names = [n for n in param_names if n.startswith("BLOCK_") or n in cfg_params]
    tiles = {n: a["v"] for n, a in zip(param_names, args) if n in tile_names and a["k"] == "constexpr"}
    return {"id": len(tasks), "module": rec["module"], "kernel": rec["name"], "args": args,
            # what the compiled code depends on: the kernel's source and everything it calls (Triton's own
            # cache key) and this exact specialization
            "cache_key": f"{fn.cache_key}|{portable_key(key[:-1], opt.__dict__)!r}",
            "options": options, "arch": arch, "autotuned": bool(rec["autotuner"]), "config_index": index,
            "config": config_label(tiles, {"num_warps": opt.num_warps, "num_stages": opt.num_stages,
                                           "num_ctas": getattr(opt, "num_ctas", 1),
                                           "maxnreg": getattr(opt, "maxnreg", None)}),
            # one specialization's configs: the autotuner chooses among them
            "spec": _spec_label(fn, args, sig, consts, tile_names),
            "group": json.dumps([a for a in args if a["name"] not in cfg_params], sort_keys=True),
            "cost": _cost(tiles, opt.num_warps)}


def _unread_values(records: list[dict], read: dict) -> dict:
    """The one value each constexpr a kernel body never reads (an autotune key) is compiled with: the smallest
    recorded, so that which launch came first (the order of the driver's calls) changes no compile."""
    canon = {}
    for rec in records:
        kid = (rec["module"], rec["name"])
        for a in rec["args"]:
            if kid in read and a["k"] == "constexpr" and a["name"] not in read[kid]:
                key = (kid, a["name"])
                if key not in canon or json.dumps(a["v"], sort_keys=True) < json.dumps(canon[key], sort_keys=True):
                    canon[key] = a["v"]
    return canon


def plan(records: list[dict], archs: list[int], kernels: dict) -> tuple[list[dict], list[str], set]:
    """Tasks (one per distinct compile), problems (records that could not be bound) and notes. `kernels`:
    {(module, name): registry.Kernel}."""
    problems, notes = [], set()
    tasks, seen = [], set()
    read = {k: body_names(kernel.jit) for k, kernel in kernels.items()}
    canon = _unread_values(records, read)
    for rec in records:
        kid = (rec["module"], rec["name"])
        kernel = kernels.get(kid)
        if kernel is None or (rec["autotuner"] and not kernel.autotuned):
            problems.append(f"{rec['module']}.{rec['name']} was launched but is not a kernel declared in "
                            "peftkern.kernels.registry (as launched: plain or autotuned) in GPU mode")
            continue
        fn = kernel.jit
        param_names = [p.name for p in fn.params]
        if {a["name"] for a in rec["args"]} != set(param_names):
            problems.append(f"{rec['name']}: its parameters changed between recording and compiling (was the "
                            "kernel edited during the check?)")
            continue
        choices, note = _choices(rec, kernel)
        if note:
            notes.add(f"{rec['name']}: {note}")
        cap = kernel.min_capability
        rec_archs = [x for x in archs if cap is None or x >= 10 * cap[0] + cap[1]]
        for index, cfg_params, cfg_options, pre_hook in choices:
            args = _config_args(rec, param_names, cfg_params, read[kid], canon, pre_hook)
            options = {k: v for k, v in cfg_options.items() if v is not None}
            for arch in rec_archs:
                try:
                    bound = bind(fn, args, options, arch)
                except Exception as e:
                    problems.append(f"{rec['name']}: Triton cannot bind a recorded launch: {e!r}")
                    continue
                sig, consts, attrs, opt = bound
                key = (kid, arch, repr(sorted(sig.items())), repr(sorted(consts.items())),
                       repr(sorted(attrs.items())), repr(sorted(opt.__dict__.items())))
                if key not in seen:
                    seen.add(key)
                    tasks.append(_task(tasks, fn, rec, args, options, arch, index, cfg_params, key + (bound,)))
    return tasks, list(dict.fromkeys(problems)), notes


def portable_key(key: tuple, options: dict) -> tuple:
    """A compile's key for the result cache, the same in every checkout and venv: the options' library paths
    (libdevice inside the venv Triton is installed in) by file name; the rest of `key` as the plan dedupes."""
    portable = tuple((k, tuple((name, os.path.basename(path)) for name, path in v) if k == "extern_libs" and v else v)
                     for k, v in sorted(options.items()))
    return key[:-1] + (repr(portable),)


def _cost(tiles: dict, warps: int) -> float:
    """A rough relative compile time, to start the long compiles first (better packing of the workers)."""
    prod = 1
    for v in tiles.values():
        if isinstance(v, int):
            prod *= max(v, 1)
    return prod * (1 + warps / 8)
