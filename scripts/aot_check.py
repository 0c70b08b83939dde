#!/usr/bin/env python3
"""Ahead-of-time compile check: every Triton kernel variant peftkern can launch, compiled for sm_80 and sm_90.

    python scripts/aot_check.py                       # both archs, one worker per core
    python scripts/aot_check.py --arch 90 --jobs 2 --json aot.json
    python scripts/aot_check.py --allow-spills        # report spills, fail only on errors/shared memory

No GPU is needed: Triton's own compiler and the ptxas it ships compile for an explicit target,
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.

1. Record (a child process, TRITON_INTERPRET=1). A driver (`driver_calls()` and `drive()` below) calls
   peftkern's public ops on CPU tensors with the Triton backend, in both dispatch variants (fused,
   composite), forward and backward, in six dtype settings (bf16 or fp16 activations with parameters in
   the same dtype or fp32, fp32 with and without TF32): each family's worst case in every setting, and
   enough other calls that every flag (bias, dropout, residual, which inputs need grad), every adapter
   activation, the rank and bottleneck widths that change a launcher's tiles, and token counts / strides
   off Triton's %16 specialization are each launched (`--full`: the cross product). Before the driver
   runs, the module-level `INTERPRET` flag of every peftkern.kernels submodule is set to False, so the
   launchers pick their GPU tiles and warps, not the interpreter's small ones, and it runs twice, with
   the launchers' `target_programs()` (how many programs a split reduction aims for) at 4 and at an
   H100's 4 x 132, since split counts, and Triton's ==1 specialization of them, depend on the GPU's size.
   Each launch is intercepted
   where Triton would run it (the interpreter's `run`, and the autotuner's `run`, which is tagged so that
   every GPU config is compiled, not the one the interpreter uses), described (tensor dtypes and 16-byte
   alignment; integers by Triton's own specialization: ==1, divisible by 16, 32/64-bit; constexprs) and
   NOT executed: recording needs the arguments, not the results, and skipping the interpreter keeps it fast.
   bfloat16 calls run with fp16 tensors recorded as bf16: the Triton backend refuses bf16 on CPU (the
   interpreter's tl.dot is wrong for it, triton-lang/triton#11584), and no launcher chooses anything differently
   for fp16 and bf16.
2. Coverage. Every kernel is discovered generically: each JITFunction of a peftkern.kernels module that
   no other JITFunction calls (a device function) is an entry kernel, and every entry kernel must have
   been launched by the driver; every bool constexpr must have been launched with both values. A gap is a
   failure: the driver is updated when a kernel or a flag is added.
3. Plan. Launches are bound with Triton's own binder (the same code JITFunction.run uses) for each arch,
   and deduplicated: one compile per distinct (kernel, arch, argument types, constexprs, specialization
   attributes, options). Constexprs the kernel body never reads (autotune keys) are merged. Autotuned
   kernels: every config of the GPU autotuner, after its own `early_config_prune` when it has one.
4. Compile in --jobs worker processes, in a fresh Triton cache deleted afterwards (nothing is reused
   between runs). Registers and spill bytes come from ptxas -v, shared memory from the kernel metadata.

Verdicts (the table's last columns):
  ok                      compiled, no spills, shared memory within the arch's per-block limit
  SPILL                   ptxas spilled registers to local memory (a failure unless --allow-spills)
  SMEM>LIMIT              over the shared-memory limit in a launcher-fixed config, or in every config of
                          an autotuned specialization: the launch would fail on that GPU
  skipped by autotuner    an autotune config over the limit while another config of the same
                          specialization fits: Triton's autotuner skips it at run time (not a failure)
  COMPILE ERROR           triton.compile or ptxas failed (details after the table)
Exit status 0 when nothing failed, 1 otherwise (2 for bad arguments). The last line is the summary.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict

# Largest dynamic shared memory one block may opt into, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 (sm_80) 163 KB, H100 (sm_90) 227 KB. Triton's launcher raises OutOfResources above it.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
KERNEL_PACKAGE = "peftkern.kernels"
LAUNCH_GLOBAL = "INTERPRET"  # the module global that makes launchers pick interpreter-sized tiles
# How many programs a launcher aims for (kernels/_launch.target_programs: 4 per SM on a GPU, 4 on CPU);
# split counts, and so Triton's ==1 specialization of them, depend on it. The driver runs under both
# values: 4 (as when a problem already fills the GPU: no split) and an H100's 4 x 132.
GRID_GLOBAL = "target_programs"
GRID_TARGETS = (4, 4 * 132)
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
               "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# =====================================================================================================
# pure helpers (tests/test_aot_check.py)
# =====================================================================================================

def int_class(v: int) -> tuple:
    """What Triton's specializer sees of an integer argument: ==1, divisible by 16, and its 32/64-bit type.
    Two integers of one class bind to the same kernel signature, so they compile to the same code."""
    width = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
    return (v == 1, v % 16 == 0, width)


def parse_ptxas_log(log: str, entry: str) -> dict | None:
    """{regs, stack, spill_st, spill_ld} of function `entry` in a `ptxas -v` log, or None when absent.

    The log lists every function it compiled (an entry kernel and any non-inlined device function);
    the entry's block starts at "Function properties for <entry>" and its register count follows."""
    start = log.find(f"Function properties for {entry}\n")
    if start < 0:
        return None
    block = log[start:]
    s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    r = re.search(r"Used (\d+) registers", block)
    if not (s and r):
        return None
    stack, spill_st, spill_ld = map(int, s.groups())
    return {"regs": int(r.group(1)), "stack": stack, "spill_st": spill_st, "spill_ld": spill_ld}


def judge(rows: list[dict], allow_spills: bool = False) -> list[dict]:
    """Set each row's "verdict" and "failure" (a kind, or None) and return the rows.

    A row: kernel, arch, group (the specialization without the autotune config), autotuned (bool),
    error (None or text), smem, spill_st, spill_ld. Rules: a compile error fails; shared memory over the
    arch's limit fails in a launcher-fixed config, and in an autotuned one only when no config of the same
    group fits (otherwise the autotuner skips it at run time, and its spills do not matter); spills fail
    unless allow_spills."""
    def over(r):
        limit = SMEM_LIMIT.get(r["arch"])
        return r.get("error") is None and limit is not None and r.get("smem") is not None and r["smem"] > limit

    fits = defaultdict(bool)
    for r in rows:
        if r.get("error") is None and not over(r):
            fits[(r["kernel"], r["group"], r["arch"])] = True
    for r in rows:
        spilled = (r.get("spill_st") or 0) + (r.get("spill_ld") or 0) > 0
        if r.get("error") is not None:
            r["verdict"], r["failure"] = "COMPILE ERROR", "compile"
        elif over(r) and r["autotuned"] and fits[(r["kernel"], r["group"], r["arch"])]:
            r["verdict"], r["failure"] = "skipped by autotuner", None
        elif over(r):
            r["verdict"], r["failure"] = "SMEM>LIMIT", "smem"
        elif spilled:
            r["verdict"], r["failure"] = "SPILL", (None if allow_spills else "spill")
        else:
            r["verdict"], r["failure"] = "ok", None
    return rows


def exit_status(rows: list[dict], problems: list[str]) -> int:
    """1 when any row failed or the recording/coverage found a problem, else 0."""
    return 1 if problems or any(r["failure"] for r in rows) else 0


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f}K" if n >= 1024 else str(n)


def format_table(rows: list[dict]) -> str:
    """The table: kernel, config, arch, registers, spills (store/load bytes), shared memory, verdict,
    specialization; sorted so that one specialization's configs and archs sit together."""
    head = ("kernel", "config", "arch", "regs", "spill st/ld", "smem", "verdict", "specialization")
    body = []
    for r in sorted(rows, key=lambda r: (r["kernel"], r["spec"], r.get("config_index") or 0, r["config"],
                                         r["arch"])):
        spill = "-" if r.get("spill_st") is None else f"{r['spill_st']}/{r['spill_ld']}"
        body.append((r["kernel"], r["config"], f"sm_{r['arch']}", "-" if r.get("regs") is None else str(r["regs"]),
                     spill, _fmt_bytes(r.get("smem")), r["verdict"], r["spec"]))
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head) - 1)]
    right = {3, 4, 5}

    def line(cells):
        out = [(str(c).rjust(w) if i in right else str(c).ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out + [str(cells[-1])]).rstrip()

    sep = "-" * (sum(widths) + 2 * len(widths) + len(head[-1]))
    return "\n".join([line(head), sep] + [line(b) for b in body])


def summary_line(rows: list[dict], problems: list[str], archs, seconds: float, allow_spills: bool) -> str:
    """One line: kernels, compiled configs, failures by kind, autotuner skips, allowed spills, time."""
    kinds = defaultdict(int)
    for r in rows:
        if r["failure"]:
            kinds[r["failure"]] += 1
    failures = sum(kinds.values()) + len(problems)
    spills = sum(1 for r in rows if r["verdict"] == "SPILL")
    parts = [f"{kinds['compile']} compile errors", f"{kinds['spill']} spills", f"{kinds['smem']} over shared memory"]
    if problems:
        parts.append(f"{len(problems)} recording/coverage problems")
    extra = [f"{sum(1 for r in rows if r['verdict'] == 'skipped by autotuner')} skipped by autotuner"]
    if allow_spills:
        extra.append(f"{spills} spilling configs allowed (--allow-spills)")
    arch_s = ", ".join(f"sm_{a}" for a in archs)
    return (f"aot_check: {len({r['kernel'] for r in rows})} kernels, {len(rows)} configs ({arch_s}), "
            f"{failures} failures ({', '.join(parts)}); {'; '.join(extra)}; {seconds:.0f} s")


def spill_report(rows: list[dict]) -> str:
    """The spilling rows grouped by kernel, then specialization: what to prune or fix."""
    spilled = [r for r in rows if r["verdict"] == "SPILL"]
    if not spilled:
        return ""
    out = [f"spills by kernel ({len(spilled)} rows; registers, spill store/load bytes):"]
    by_kernel = defaultdict(list)
    for r in spilled:
        by_kernel[r["kernel"]].append(r)
    for kernel in sorted(by_kernel):
        out.append(f"  {kernel}: {len(by_kernel[kernel])}")
        by_cfg = defaultdict(list)
        for r in by_kernel[kernel]:
            by_cfg[(r["config"], r["arch"])].append(r)
        for (cfg, arch), rs in sorted(by_cfg.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            worst = max(rs, key=lambda r: r["spill_st"] + r["spill_ld"])
            out.append(f"    {cfg} sm_{arch}: {len(rs)} specializations, up to {worst['regs']} regs "
                       f"{worst['spill_st']}/{worst['spill_ld']} B (worst: {worst['spec']})")
    return "\n".join(out)


def config_label(params: dict, options: dict) -> str:
    """`M128 N256 K64 GROUP_M=8 w8 s3` from the tile constexprs and the launch options."""
    parts = []
    for k, v in params.items():
        parts.append(f"{k[6:]}{v}" if k.startswith("BLOCK_") else f"{k}={v}")
    parts.append(f"w{options.get('num_warps')}")
    parts.append(f"s{options.get('num_stages')}")
    if options.get("num_ctas", 1) not in (1, None):
        parts.append(f"c{options['num_ctas']}")
    if options.get("maxnreg"):
        parts.append(f"r{options['maxnreg']}")
    return " ".join(parts)


# =====================================================================================================
# 1. recording (child process, TRITON_INTERPRET=1)
# =====================================================================================================

def _encode_const(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if type(v).__name__ == "constexpr":
        return _encode_const(v.value)
    if type(v).__name__ == "dtype" and type(v).__module__.startswith("triton"):
        return {"tl_dtype": str(v)}
    if isinstance(v, (tuple, list)):
        return {"tuple": [_encode_const(x) for x in v]}
    raise TypeError(f"cannot record constexpr value {v!r}")


def _describe(v, constexpr: bool, dtype_map=None) -> tuple[dict, tuple]:
    """(record, dedup key) of one kernel argument: what Triton's binder looks at, nothing more."""
    if constexpr:
        c = _encode_const(v)
        return {"k": "constexpr", "v": c}, ("c", json.dumps(c, sort_keys=True))
    if v is None:
        return {"k": "none"}, ("none",)
    if isinstance(v, bool):
        return {"k": "bool", "v": v}, ("bool",)
    if isinstance(v, int):
        return {"k": "int", "v": v}, ("int",) + int_class(v)
    if isinstance(v, float):
        return {"k": "float", "v": v}, ("float",)
    if type(v).__name__ == "TensorDescriptor":  # host TMA descriptor: its base's dtype and its block shape
        base, _ = _describe(v.base, False, dtype_map)
        rec = dict(base, k="tensordesc", shape=list(v.shape), stride=list(v.strides),
                   block_shape=list(v.block_shape))
        return rec, ("d", rec["dtype"], tuple(rec["block_shape"]))
    if hasattr(v, "data_ptr") and hasattr(v, "dtype"):
        name = str(v.dtype).replace("torch.", "")
        name = (dtype_map or {}).get(name, name)
        rec = {"k": "tensor", "dtype": name, "align16": v.data_ptr() % 16 == 0,
               "shape": list(v.shape), "stride": list(v.stride())}
        return rec, ("t", name, rec["align16"])
    raise TypeError(f"cannot record kernel argument of type {type(v).__name__}")


class _Recorder:
    def __init__(self):
        self.records, self.seen = [], set()
        self.tls = threading.local()
        self.errors = []
        self.dtype_map = {}  # tensor dtypes recorded as another (the driver's bf16 stand-in)

    def _tuner_attr(self, tuner):
        """The name under which the autotuner is bound in its kernel's module (found again in GPU mode)."""
        raw = tuner
        while not inspect.isfunction(raw):
            raw = raw.fn
        module = sys.modules[raw.__module__]
        for name, obj in vars(module).items():
            o = obj
            while o is not None:
                if o is tuner:
                    return raw.__module__, name
                o = getattr(o, "fn", None)
        raise LookupError(f"autotuner of {raw.__qualname__} is not a global of {raw.__module__}")

    def record(self, raw_fn, args, kwargs):
        try:
            sig = inspect.signature(raw_fn)
            params = sig.parameters
            kernel_kwargs = {k: v for k, v in kwargs.items() if k in params}
            options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
            bound = sig.bind(*args, **kernel_kwargs)
            bound.apply_defaults()
            recs, keys = [], []
            for name, value in bound.arguments.items():
                ann = params[name].annotation
                ann = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
                r, k = _describe(value, "constexpr" in ann, self.dtype_map)
                r["name"] = name
                recs.append(r)
                keys.append(k)
            stack = getattr(self.tls, "tuners", None)
            tuner = stack[-1] if stack else None
            key = (raw_fn.__module__, raw_fn.__name__, tuple(keys), tuple(sorted(options.items())), tuner)
            if key in self.seen:
                return
            self.seen.add(key)
            self.records.append({"module": raw_fn.__module__, "name": raw_fn.__name__, "args": recs,
                                 "options": options, "autotuner": list(tuner) if tuner else None})
        except Exception as e:  # reported as a problem by the parent; the driver goes on
            self.errors.append(f"could not record a launch of {raw_fn.__module__}.{raw_fn.__name__}: {e!r}")

    def install(self):
        from triton.runtime import autotuner, interpreter, jit
        recorder = self

        def run_instead(self, *args, grid=None, warmup=False, **kwargs):
            if not warmup:
                recorder.record(self.fn, args, kwargs)
            return None  # not executed: the arguments are all the check needs

        def tuner_run(self, *args, **kwargs):
            stack = recorder.tls.__dict__.setdefault("tuners", [])
            stack.append(recorder._tuner_attr(self))
            try:  # the first config stands in for all of them (compile time takes the GPU autotuner's list)
                return self.fn.run(*args, **kwargs, **self.configs[0].all_kwargs())
            finally:
                stack.pop()

        interpreter.InterpretedFunction.run = run_instead
        jit.JITFunction.run = run_instead
        autotuner.Autotuner.run = tuner_run


def _kernel_modules():
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def _switch_launchers_to_gpu() -> list[str]:
    """Set INTERPRET = False in each kernel module that has it, so its launchers choose GPU tiles."""
    flipped = []
    for mod in _kernel_modules():
        if isinstance(mod.__dict__.get(LAUNCH_GLOBAL), bool):
            mod.__dict__[LAUNCH_GLOBAL] = False
            flipped.append(mod.__name__)
    return flipped


# what a driver call varies; the names are the public ops' arguments
_SETTINGS = [  # (activation dtype, trainable-parameter dtype, torch.backends.cuda.matmul.allow_tf32)
    ("bfloat16", "float32", False),  # PEFT's default: fp32 adapters beside 16-bit activations
    ("bfloat16", "bfloat16", False),
    ("float16", "float32", False),
    ("float16", "float16", False),
    ("float32", "float32", False),   # fp32 products that keep fp32-class accuracy
    ("float32", "float32", True),    # fp32 with TF32 allowed
]
_ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"]
# adapter calls: activation, bottleneck k (its BLOCK_K and the launcher's tile shape), token count
# (aligned or not), and the flags that change a kernel: biases, an explicit residual, which inputs need grad.
# The first is the worst case (the heaviest activation at the largest 64-row tile, every flag adding work).
_ADAPTER_VARIANTS = [
    dict(act="gelu", k=64, M=256),
    dict(act="gelu_tanh", k=256, M=250),
    dict(act="silu", k=128, M=256, biases=False, residual=True),
    dict(act="tanh", k=24, M=250, need_h=False),
    dict(act="relu", k=16, M=256, need_wu=False),
    dict(act="identity", k=32, M=250, residual=True),
]
# LoRA calls: the worst case (bias, dropout, rank 64: the largest rank tiles, aligned sizes), PEFT's common
# case (no bias, no dropout, rank 8, a token count and B's row stride off Triton's %16 specialization), and
# rank 32 (rank_down's middle tile)
_LORA_MAX = dict(M=256, r=64, bias=True, p=0.1)
_LORA_COMMON = dict(M=250, r=8, bias=False, p=0.0)
_LORA_MID = dict(M=256, r=32, bias=True, p=0.1)
# QLoRA calls (LoRA over a 4-bit weight; `wq` is the weight's dtype, BLOCKSIZE a constexpr of the kernel): the
# worst case (bias, dropout, double-quantized absmax resolved on chip) with the weight in the activations' dtype,
# and in PEFT's default setting the common case (no bias, no dropout, a token count off %16, block 128, a
# float32 absmax) over an fp32 weight as well
_QLORA_MAX = dict(M=256, r=16, bias=True, p=0.1)
_QLORA_COMMON = dict(M=250, r=16, bias=False, p=0.0, blocksize=128, dq=False)
# DoRA calls: the worst case (bias, dropout: the two-accumulator GEMMs, rank 64) in every setting, and in PEFT's
# default setting the common one (no dropout, rank 16, an odd M) and a frozen magnitude (no z written)
_DORA_MAX = dict(M=256, r=64, bias=True, p=0.1)
_DORA_COMMON = dict(M=250, r=16, bias=False, p=0.0)
_DORA_RANK8 = dict(M=250, r=8, bias=True, p=0.0)  # the no-dropout GEMM at a rank off 16 (its padded rank factors)
_DORA_FROZEN_MAGNITUDE = dict(M=256, r=16, bias=True, p=0.0, train_magnitude=False)
# many adapters (multi_lora_linear): ranks that differ (the largest sets the tiles; 8 and 4 are off 16), with bias
# and dropout at full tiles; and a decode shape (few rows per adapter: the small row tiles)
_MULTI_MAX = dict(M=256, ranks=(64, 8, 16), bias=True, p=0.1)
_MULTI_DECODE = dict(M=24, ranks=(16, 16, 4, 16), bias=False, p=0.0)
_MULTI_MID = dict(M=256, ranks=(32, 4), bias=False, p=0.1)  # the 32-wide rank tiles of the shrink and grad kernels


def driver_calls(full: bool = False) -> list[dict]:
    """The driver's calls: dicts with family ("lora", "qlora", "dora", "multi_lora", "adapter", "sparse"), dtypes, tf32
    and the call's arguments.

    Default, a covering set sized for CI: in every dtype setting each family's worst case (LoRA with bias,
    dropout and rank 64; the adapter's heaviest variant; sparse with aligned sizes) and one more adapter
    variant (rotating, so every activation, bottleneck width and flag value is launched); in PEFT's default
    setting (bf16 activations, fp32 adapters) also LoRA's common case, rank 32 and odd-sized sparse.
    full=True: every setting gets every LoRA (bias x dropout x rank) combination, every activation at every
    bottleneck width, every adapter variant and both sparse sizes (several times the compiles: a deep check
    before a GPU session, not CI)."""
    calls = []
    for i, (act_dtype, param_dtype, tf32) in enumerate(_SETTINGS):
        base = dict(act_dtype=act_dtype, param_dtype=param_dtype, tf32=tf32)
        peft_default = i == 0
        if full:
            for bias in (False, True):
                for p in (0.0, 0.1):
                    for r in (8, 16, 32, 64):
                        calls.append(dict(base, family="lora", M=250 if r == 8 else 256, r=r, bias=bias, p=p))
            for act in _ACTIVATIONS:
                for k in (16, 24, 64, 128, 256):
                    calls.append(dict(base, family="adapter", act=act, k=k, M=256))
            calls += [dict(base, family="adapter", **v) for v in _ADAPTER_VARIANTS]
            for bias in (False, True):
                for p in (0.0, 0.1):
                    for r in (8, 16, 64):
                        for train_magnitude in (False, True):
                            calls.append(dict(base, family="dora", M=250 if r == 8 else 256, r=r, bias=bias, p=p,
                                              train_magnitude=train_magnitude))
            for ranks in ((64, 8, 16), (16, 16), (32, 4)):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    calls.append(dict(base, family="multi_lora", M=256, ranks=ranks, bias=bias, p=p))
            calls.append(dict(base, family="multi_lora", **_MULTI_DECODE))
            for wq in sorted({act_dtype, "float32"}):
                for bias, p in ((False, 0.0), (True, 0.1)):
                    for blocksize, dq in ((64, True), (128, False)):
                        calls.append(dict(base, family="qlora", wq=wq, M=256, r=16, bias=bias, p=p,
                                          blocksize=blocksize, dq=dq))
        else:
            calls.append(dict(base, family="lora", **_LORA_MAX))
            calls.append(dict(base, family="qlora", wq=act_dtype, **_QLORA_MAX))
            calls.append(dict(base, family="dora", **_DORA_MAX))
            calls.append(dict(base, family="dora", **_DORA_RANK8))
            calls.append(dict(base, family="multi_lora", **_MULTI_MAX))
            calls.append(dict(base, family="multi_lora", **_MULTI_DECODE))
            calls.append(dict(base, family="multi_lora", **_MULTI_MID))
            if peft_default:
                calls.append(dict(base, family="dora", **_DORA_COMMON))
                calls.append(dict(base, family="dora", **_DORA_FROZEN_MAGNITUDE))
                calls.append(dict(base, family="qlora", wq=act_dtype, **_QLORA_COMMON))
                calls.append(dict(base, family="qlora", wq="float32", **_QLORA_COMMON))
                calls.append(dict(base, family="lora", **_LORA_COMMON))
                calls.append(dict(base, family="lora", **_LORA_MID))
            calls.append(dict(base, family="adapter", **_ADAPTER_VARIANTS[0]))
            calls.append(dict(base, family="adapter", **_ADAPTER_VARIANTS[1 + i % (len(_ADAPTER_VARIANTS) - 1)]))
        for M in ((256, 250) if full or peft_default else (256,)):
            calls.append(dict(base, family="sparse", M=M, nnz=333 if M % 16 else 1000, bias=M % 16 == 0))
    return calls


def _set_grid_target(programs: int) -> list[str]:
    """Make every kernel module's target_programs(device) return `programs` (see GRID_TARGETS)."""
    patched = []
    for mod in _kernel_modules():
        if callable(mod.__dict__.get(GRID_GLOBAL)):
            mod.__dict__[GRID_GLOBAL] = lambda device, _n=programs: _n
            patched.append(mod.__name__)
    return patched


def drive(calls: list[dict], recorder, log) -> list[str]:
    """Run each call of driver_calls() with the Triton backend, in both dispatch variants (fused and
    composite launch different kernels), forward and backward. Returns the calls that raised: a failure,
    since the driver only asks for what the ops must run.

    bfloat16 calls run with float16 tensors and are recorded with bfloat16 in their place: the Triton
    backend refuses bf16 on CPU (the interpreter's tl.dot is wrong for it, triton-lang/triton#11584), and no
    launcher chooses anything differently for fp16 and bf16 (they ask "is it fp32" and "are both 16-bit")."""
    import torch

    import peftkern

    failures = []

    def rnd(*shape, dtype, grad=False):
        return (torch.randn(*shape, dtype=dtype) * 0.1).requires_grad_(grad)

    def lora(xd, pd, M, r, bias, p, K=256, N=384):
        x, w = rnd(M, K, dtype=xd, grad=True), rnd(N, K, dtype=xd)
        a, b = rnd(r, K, dtype=pd, grad=True), rnd(N, r, dtype=pd, grad=True)
        bb = rnd(N, dtype=xd) if bias else None
        if xd != torch.float32:
            lora_persistent(x, w, a, b, bb, p, M)
        return peftkern.lora_linear(x, w, a, b, scaling=0.5, bias=bb, dropout_p=p, seed=3)

    def lora_persistent(x, w, a, b, bb, p, M):
        from peftkern.kernels import lora_persistent as lp
        N, K = w.shape
        s, ds = rnd(M, a.shape[0], dtype=torch.float32), rnd(M, a.shape[0], dtype=torch.float32)
        y, dx = torch.empty(M, N, dtype=x.dtype), torch.empty(M, K, dtype=x.dtype)
        lp.launch(x.detach(), w.t(), s, b.detach().t(), bb, y, lora_scale=0.5, seed=3, dropout_p=0.0,
                  num_sms=132)  # forward: B = Wᵀ (a transposed view), H100's SM count
        lp.launch(y, w, ds, a.detach(), None, dx, lora_scale=1.0, seed=3, dropout_p=p, num_sms=132)  # dx

    def qlora(xd, pd, M, r, bias, p, wq, blocksize=64, dq=True, K=256, N=384):
        x = rnd(M, K, dtype=xd, grad=True)
        qw = peftkern.QuantizedWeight.quantize(rnd(N, K, dtype=getattr(torch, wq)), blocksize=blocksize,
                                               double_quant=dq)
        a, b = rnd(r, K, dtype=pd, grad=True), rnd(N, r, dtype=pd, grad=True)
        bb = rnd(N, dtype=xd) if bias else None
        return peftkern.lora_linear(x, qw, a, b, scaling=0.5, bias=bb, dropout_p=p, seed=3)

    def dora(xd, pd, M, r, bias, p, train_magnitude=True, K=256, N=384):
        x, w = rnd(M, K, dtype=xd, grad=True), rnd(N, K, dtype=xd)
        a, b = rnd(r, K, dtype=pd, grad=True), rnd(N, r, dtype=pd, grad=True)
        magnitude = (rnd(N, dtype=pd).abs() + 1.0).requires_grad_(train_magnitude)
        bb = rnd(N, dtype=xd) if bias else None
        return peftkern.dora_linear(x, w, a, b, magnitude, scaling=0.5, bias=bb, dropout_p=p, seed=3)

    def multi_lora(xd, pd, M, ranks, bias, p, K=256, N=384):
        x, w = rnd(M, K, dtype=xd, grad=True), rnd(N, K, dtype=xd)
        a = [rnd(r, K, dtype=pd, grad=True) for r in ranks]
        b = [rnd(N, r, dtype=pd, grad=True) for r in ranks]
        bb = rnd(N, dtype=xd) if bias else None
        ids = torch.randint(-1, len(ranks), (M,), generator=torch.Generator().manual_seed(M))
        return peftkern.multi_lora_linear(x, w, a, b, ids, scalings=[0.5] * len(ranks), bias=bb, dropout_p=p,
                                          seed=3)

    def adapter(hd, pd, act, k, M, d=256, biases=True, residual=False, need_h=True, need_wu=True):
        h = rnd(M, d, dtype=hd, grad=need_h)
        wd, wu = rnd(k, d, dtype=pd, grad=True), rnd(d, k, dtype=pd, grad=need_wu)
        bd = rnd(k, dtype=pd, grad=True) if biases else None
        bu = rnd(d, dtype=pd, grad=need_wu) if biases else None
        res = rnd(M, d, dtype=hd, grad=True) if residual else None
        return peftkern.bottleneck_adapter(h, wd, bd, wu, bu, activation=act, scaling=0.5, residual=res)

    def sparse(xd, vd, M, nnz, bias, K=256, N=384):
        x, w = rnd(M, K, dtype=xd, grad=True), rnd(N, K, dtype=xd)
        idx = torch.randperm(N * K)[:nnz]
        vals = rnd(nnz, dtype=vd, grad=True)
        return peftkern.sparse_diff_linear(x, w, idx, vals, rnd(N, dtype=xd) if bias else None)

    families = {"lora": lora, "qlora": qlora, "dora": dora, "multi_lora": multi_lora, "adapter": adapter,
                "sparse": sparse}
    old_mode = os.environ.get("PEFTKERN_DISPATCH")
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with peftkern.use_backend("triton"):
            for mode in ("fused", "composite"):
                os.environ["PEFTKERN_DISPATCH"] = mode
                log(f"# driving {len(calls)} calls, {mode}")
                for call in calls:
                    args = {k: v for k, v in call.items() if k not in ("family", "act_dtype", "param_dtype", "tf32")}
                    torch.backends.cuda.matmul.allow_tf32 = call["tf32"]
                    # bf16 runs as fp16 (the interpreter cannot run bf16 dots) and is recorded as bf16
                    bf16 = "bfloat16" in (call["act_dtype"], call["param_dtype"])
                    recorder.dtype_map = {"float16": "bfloat16"} if bf16 else {}
                    cpu = {"bfloat16": torch.float16, "float16": torch.float16, "float32": torch.float32}
                    try:
                        out = families[call["family"]](cpu[call["act_dtype"]], cpu[call["param_dtype"]], **args)
                        out.float().sum().backward()
                    except Exception as e:
                        failures.append(f"{mode} {call}: {type(e).__name__}: {e}")
                    finally:
                        recorder.dtype_map = {}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        if old_mode is None:
            os.environ.pop("PEFTKERN_DISPATCH", None)
        else:
            os.environ["PEFTKERN_DISPATCH"] = old_mode
    return failures


def record_main(out_path: str, full: bool) -> None:
    """The recording child: install the interceptors, switch launchers to GPU tiles, drive, write JSON."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings
    warnings.filterwarnings("ignore")
    t0 = time.time()
    recorder = _Recorder()
    recorder.install()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    import peftkern  # noqa: F401
    flipped = _switch_launchers_to_gpu()
    problems = []
    if not flipped:
        problems.append(f"no {KERNEL_PACKAGE} module has a bool global {LAUNCH_GLOBAL}: the launchers' GPU "
                        "tiles cannot be selected; update scripts/aot_check.py to the new switch")
    failures = []
    for programs in GRID_TARGETS:
        patched = _set_grid_target(programs)
        log(f"# target_programs() = {programs} in {', '.join(patched) or 'no module'}")
        failures += drive(driver_calls(full), recorder, log)
    problems += [f"driver call failed: {f}" for f in failures] + recorder.errors
    with open(out_path, "w") as f:
        json.dump({"records": recorder.records, "flipped": flipped, "problems": problems,
                   "seconds": time.time() - t0}, f)


# =====================================================================================================
# 2-4. discover, plan, compile (the parent and its workers, TRITON_INTERPRET=0)
# =====================================================================================================

def _gpu_mode_env():
    os.environ["TRITON_INTERPRET"] = "0"


def _jit_types():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    return JITFunction, Autotuner


def _called_names(jit_fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(jit_fn.src if hasattr(jit_fn, "src") else inspect.getsource(jit_fn.fn)))
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            f = n.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)
    return names


def _body_names(jit_fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(jit_fn.src if hasattr(jit_fn, "src") else inspect.getsource(jit_fn.fn)))
    fdef = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    return {n.id for stmt in fdef.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}


def discover() -> tuple[dict, dict]:
    """({(module, fn name): JITFunction} of entry kernels, {(module, attr): Autotuner}) in GPU mode."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import KernelInterface
    JITFunction, Autotuner = _jit_types()
    jits, tuners = {}, {}
    for mod in _kernel_modules():
        for attr, obj in vars(mod).items():
            if isinstance(obj, InterpretedFunction):
                raise RuntimeError(f"{mod.__name__}.{attr} was made in interpreter mode; the check compiles "
                                   "with TRITON_INTERPRET=0 set before peftkern is imported")
            chain, o = [], obj
            while isinstance(o, KernelInterface) and not isinstance(o, JITFunction):
                chain.append(o)  # autotuner / heuristics wrappers, outermost first
                o = getattr(o, "fn", None)
            if not isinstance(o, JITFunction):
                continue
            jits[(o.fn.__module__, o.fn.__name__)] = o
            for c in chain:
                if isinstance(c, Autotuner):
                    tuners[(mod.__name__, attr)] = c
    called = set()
    for fn in jits.values():
        called |= _called_names(fn)
    entries = {k: fn for k, fn in jits.items() if k[1] not in called}
    return entries, tuners


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


def plan(records: list[dict], archs: list[int], entries: dict, tuners: dict) -> tuple[list[dict], list[str], set]:
    """Tasks (one per distinct compile), problems (records that could not be bound) and notes."""
    problems, notes = [], set()
    tasks, seen = [], set()
    body_names = {k: _body_names(fn) for k, fn in entries.items()}
    canon: dict = {}
    for rec in records:
        kid = (rec["module"], rec["name"])
        fn = entries.get(kid)
        if fn is None:
            problems.append(f"{rec['module']}.{rec['name']} was launched but is not an entry kernel found in GPU mode")
            continue
        param_names = [p.name for p in fn.params]
        if {a["name"] for a in rec["args"]} != set(param_names):
            problems.append(f"{rec['name']}: its parameters changed between recording and compiling (was the "
                            "kernel edited during the check?)")
            continue
        if rec["autotuner"]:
            tuner = tuners.get(tuple(rec["autotuner"]))
            if tuner is None:
                problems.append(f"autotuner {'.'.join(rec['autotuner'])} not found in GPU mode")
                continue
            configs, note = _tuner_configs(tuner, rec)
            if note:
                notes.add(f"{rec['name']}: {note}")
            choices = [(i, dict(c.kwargs), {k: v for k, v in c.all_kwargs().items() if k in OPTION_NAMES},
                        c.pre_hook) for i, c in enumerate(configs)]
        else:
            choices = [(None, {}, dict(rec["options"]), None)]
        # kernels that need a newer GPU (a module-level MIN_CAPABILITY, e.g. (9, 0) for TMA) compile only there
        min_cap = getattr(sys.modules.get(kid[0]), "MIN_CAPABILITY", None)
        rec_archs = [x for x in archs if min_cap is None or x >= 10 * min_cap[0] + min_cap[1]]
        for base_args in (rec["args"],):
            for index, cfg_params, cfg_options, pre_hook in choices:
                by_name = {a["name"]: a for a in base_args}
                args = []
                for name in param_names:
                    a = dict(by_name[name])
                    if name in cfg_params:
                        a = {"k": "constexpr", "v": cfg_params[name], "name": name}
                    if a["k"] == "constexpr" and name not in body_names[kid]:  # never read: same code
                        a["v"] = canon.setdefault((kid, name), a["v"])
                    args.append(a)
                if pre_hook is not None:  # e.g. a config's TMA block shapes, set on its descriptors
                    nargs = {a["name"]: _decode(a) for a in args}
                    pre_hook(nargs)
                    args = [dict(a, block_shape=list(nargs[a["name"]].block_shape)) if a["k"] == "tensordesc" else a
                            for a in args]
                options = {k: v for k, v in cfg_options.items() if v is not None}
                tile_names = [n for n in param_names if n.startswith("BLOCK_") or n in cfg_params]
                for arch in rec_archs:
                    try:
                        sig, consts, attrs, opt = bind(fn, args, options, arch)
                    except Exception as e:
                        problems.append(f"{rec['name']}: Triton cannot bind a recorded launch: {e!r}")
                        continue
                    key = (kid, arch, repr(sorted(sig.items())), repr(sorted(consts.items())),
                           repr(sorted(attrs.items())), repr(sorted(opt.__dict__.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    tiles = {n: a["v"] for n, a in zip(param_names, args) if n in tile_names and a["k"] == "constexpr"}
                    spec = _spec_label(fn, args, sig, consts, tile_names)
                    tasks.append({"id": len(tasks), "module": kid[0], "kernel": kid[1], "args": args,
                                  # what the compiled code depends on: the kernel's source and everything it calls
                                  # (Triton's own cache key) and this exact specialization
                                  "cache_key": f"{fn.cache_key}|{portable_key(key, opt.__dict__)!r}",
                                  "options": options, "arch": arch, "autotuned": bool(rec["autotuner"]),
                                  "config_index": index,
                                  "config": config_label(tiles, {"num_warps": opt.num_warps,
                                                                 "num_stages": opt.num_stages,
                                                                 "num_ctas": getattr(opt, "num_ctas", 1),
                                                                 "maxnreg": getattr(opt, "maxnreg", None)}),
                                  # one specialization's configs: the autotuner chooses among them
                                  "spec": spec, "group": json.dumps([a for a in args if a["name"] not in cfg_params],
                                                                    sort_keys=True),
                                  "cost": _cost(tiles, opt.num_warps)})
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


def coverage(records: list[dict], entries: dict) -> tuple[list[str], list[str]]:
    """(problems, info lines): entry kernels never launched, bool constexprs launched with one value only."""
    problems, info = [], []
    launched = defaultdict(list)
    for rec in records:
        launched[(rec["module"], rec["name"])].append(rec)
    for kid in sorted(entries):
        recs = launched.get(kid)
        if not recs:
            problems.append(f"coverage: {kid[0]}.{kid[1]} is never launched by the driver (scripts/aot_check.py "
                            "drive()): add the call that launches it")
            continue
        values = defaultdict(set)
        for rec in recs:
            for a in rec["args"]:
                if a["k"] == "constexpr" and not isinstance(a["v"], dict):
                    values[a["name"]].add(a["v"])
        for name, vs in values.items():
            if any(isinstance(v, bool) for v in vs) and len(vs) < 2:
                problems.append(f"coverage: {kid[1]}.{name} is only launched with {sorted(vs)}: add a driver "
                                "call that launches the other value")
        shown = " ".join(f"{n}={{{','.join(str(v) for v in sorted(vs, key=str))}}}" for n, vs in sorted(values.items()))
        info.append(f"#   {kid[1]}: {len(recs)} launch signatures; {shown}")
    return problems, info


# ---- workers ------------------------------------------------------------------------------------------

_WORKER_STATE: dict = {}


def _worker_init(cache_dir):
    _gpu_mode_env()
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import warnings
    warnings.filterwarnings("ignore")
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v: registers and spills
    default_hook = sys.unraisablehook

    def quiet_hook(u):  # Triton 3.9's CompiledKernel.__del__ fails on kernels never loaded on a GPU: noise
        if not (isinstance(u.exc_value, AttributeError) and "CompiledKernel" in repr(u.object)):
            default_hook(u)
    sys.unraisablehook = quiet_hook
    _WORKER_STATE["entries"], _ = discover()


def compile_one(task: dict) -> dict:
    """Compile one task; never raises: {id, error, regs, stack, spill_st, spill_ld, smem, seconds}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    res = {"id": task["id"], "error": None, "regs": None, "stack": None, "spill_st": None, "spill_ld": None,
           "smem": None}
    t0 = time.time()
    cpu0 = _cpu_seconds()
    out = io.StringIO()
    try:
        fn = _WORKER_STATE["entries"][(task["module"], task["kernel"])]
        sig, consts, attrs, opt = bind(fn, task["args"], task["options"], task["arch"])
        with contextlib.redirect_stdout(out):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", task["arch"], 32),
                               options=opt.__dict__)
        res["smem"] = k.metadata.shared
        usage = parse_ptxas_log(out.getvalue(), k.metadata.name)
        if usage is None:
            raise RuntimeError("no ptxas -v report for the kernel (a cached compile?)")
        res.update(usage)
    except Exception as e:
        msg = str(e).strip() or type(e).__name__
        res["error"] = f"{type(e).__name__}: {msg}"[:3000]
    res["seconds"] = round(time.time() - t0, 2)
    res["cpu_seconds"] = round(_cpu_seconds() - cpu0, 2)
    return res


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost whatever the load."""
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_pool(tasks: list[dict], jobs: int, cache_dir: str, log) -> dict:
    """Compile tasks in `jobs` spawned processes, longest first. A task whose worker dies (a compiler
    crash) is retried alone and reported as a compile error if it dies again."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("spawn")
    results, pending, done = {}, sorted(tasks, key=lambda t: -t["cost"]), 0
    t0 = time.time()
    while pending:
        retry = []
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,))
        try:
            futs = {pool.submit(compile_one, t): t for t in pending}
            for fut in as_completed(futs):
                t = futs[fut]
                try:
                    results[t["id"]] = fut.result()
                    done += 1
                    if done % 50 == 0:
                        log(f"#   {done}/{len(tasks)} compiled, {time.time() - t0:.0f} s")
                except BrokenProcessPool:
                    retry.append(t)
        except BaseException:  # interrupted: stop the workers now rather than after their queue
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()
            raise
        pool.shutdown(wait=True)
        if retry and jobs == 1 and len(retry) == len(pending):
            t = retry.pop(0)
            results[t["id"]] = {"id": t["id"], "error": "the compiler process crashed (signal or abort)",
                                "regs": None, "stack": None, "spill_st": None, "spill_ld": None, "smem": None,
                                "seconds": 0.0, "cpu_seconds": 0.0}
        pending, jobs = retry, 1
    return results


# =====================================================================================================
# result cache: a compile's verdict depends only on its inputs, so an unchanged kernel is not recompiled
# =====================================================================================================

RESULT_FIELDS = ("regs", "stack", "spill_st", "spill_ld", "smem")


def default_cache_dir() -> str:
    """Outside the clone, so a fresh checkout (CI) on the same machine reuses it."""
    return os.environ.get("PEFTKERN_AOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peftkern", "aot")


def cache_file(cache_dir: str, toolchain: str, task: dict) -> str:
    """One JSON file per compile, named by a hash of the toolchain (Triton and ptxas versions) and the task's key."""
    import hashlib
    digest = hashlib.sha256(f"{toolchain}|{task['cache_key']}".encode()).hexdigest()
    return os.path.join(cache_dir, digest[:2], digest + ".json")


def cache_load(cache_dir: str, toolchain: str, tasks: list[dict]) -> dict:
    """{task id: result} for the tasks compiled before with this toolchain (an unreadable entry is ignored)."""
    found = {}
    for t in tasks:
        try:
            with open(cache_file(cache_dir, toolchain, t)) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            continue
        if all(isinstance(cached.get(k), int) for k in RESULT_FIELDS):
            found[t["id"]] = {"id": t["id"], "error": None, **{k: cached[k] for k in RESULT_FIELDS},
                              "seconds": 0.0, "cpu_seconds": 0.0, "cached": True}
    return found


def cache_store(cache_dir: str, toolchain: str, tasks: list[dict], results: dict) -> None:
    """Keep every compile that succeeded (errors are compiled again next time: they may be transient)."""
    for t in tasks:
        r = results.get(t["id"])
        if r is None or r.get("error") or r.get("cached") or not all(isinstance(r.get(k), int) for k in RESULT_FIELDS):
            continue
        path = cache_file(cache_dir, toolchain, t)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({k: r[k] for k in RESULT_FIELDS} | {"kernel": t["kernel"], "arch": t["arch"]}, f)
            os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
        except OSError:
            return  # a read-only or full disk: the check itself is unaffected


# =====================================================================================================
# command line
# =====================================================================================================

def _ptxas_versions(archs) -> str:
    """Which ptxas compiles each arch (Triton picks one per arch; TRITON_PTXAS_PATH and friends override)."""
    out = []
    for arch in archs:
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            path = get_ptxas(arch).path
            text = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            out.append(f"sm_{arch}: {os.path.basename(path)} {re.search(r'release ([0-9.]+)', text).group(1)}")
        except Exception as e:  # informational only; a missing ptxas fails every compile anyway
            out.append(f"sm_{arch}: ptxas unknown ({type(e).__name__})")
    return ", ".join(out)


def _parse_archs(text: str) -> list[int]:
    archs = []
    for part in text.split(","):
        part = part.strip().removeprefix("sm_")
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"--arch takes compute capabilities like 80,90; got {text!r}")
        if int(part) not in SMEM_LIMIT:
            raise argparse.ArgumentTypeError(f"--arch {part}: no shared-memory limit known; known: "
                                             f"{', '.join(map(str, SMEM_LIMIT))}")
        archs.append(int(part))
    return sorted(set(archs))


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--jobs must be a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", type=_parse_archs, default=[80, 90], help="compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=_positive, default=os.cpu_count() or 1,
                    help="compile worker processes (default: one per core)")
    ap.add_argument("--json", metavar="PATH", help="write every row, the problems and the timings to PATH")
    ap.add_argument("--allow-spills", action="store_true",
                    help="report spills but do not fail on them (CI until the kernels are fixed)")
    ap.add_argument("--kernel", action="append", metavar="NAME",
                    help="compile only kernels whose name contains NAME (repeatable; coverage is still checked)")
    ap.add_argument("--full", action="store_true",
                    help="drive the cross product of every factor, not the covering set (many more compiles)")
    ap.add_argument("--dry-run", action="store_true", help="record and plan, print the compile count, compile nothing")
    ap.add_argument("--cache", metavar="DIR", default=default_cache_dir(),
                    help="reuse the results of compiles made before with the same kernel source, specialization, "
                         "Triton and ptxas (default: $PEFTKERN_AOT_CACHE or ~/.cache/peftkern/aot)")
    ap.add_argument("--no-cache", action="store_true", help="compile everything; read and write no cache")
    ap.add_argument("--_record", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._record:
        record_main(a._record, a.full)
        return 0

    # every config the autotuner may pick is checked, whatever a smoke run's knob says
    os.environ.pop("PEFTKERN_AUTOTUNE", None)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C: workers stopped, temporary files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.time()
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731  (progress; the table goes to stdout)
    work = tempfile.mkdtemp(prefix="peftkern-aot-")
    try:
        # 1. record in a child: its Triton runs in interpreter mode, ours compiles for the GPU
        rec_path = os.path.join(work, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--_record", rec_path] + (["--full"] if a.full else [])
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0 or not os.path.exists(rec_path):
            print(f"aot_check: recording failed (exit {rc}); 0 kernels, 0 configs, 1 failure")
            return 1
        with open(rec_path) as f:
            recorded = json.load(f)
        records, problems = recorded["records"], list(recorded["problems"])
        t_record = time.time() - t0
        say(f"# recorded {len(records)} launch signatures in {t_record:.0f} s "
            f"(launchers switched to GPU tiles in: {', '.join(recorded['flipped'])})")

        # 2. discover and check coverage, 3. plan
        _gpu_mode_env()
        cache_dir = os.path.join(work, "triton-cache")  # fresh and private: every compile runs ptxas
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        import warnings
        warnings.filterwarnings("ignore")
        import triton
        entries, tuners = discover()
        cov_problems, cov_info = coverage(records, entries)
        problems += cov_problems
        tasks, plan_problems, notes = plan(records, a.arch, entries, tuners)
        problems += plan_problems
        if a.kernel:
            tasks = [t for t in tasks if any(name in t["kernel"] for name in a.kernel)]
        for n in sorted(notes):
            say(f"# note: {n}")
        say(f"# triton {triton.__version__}, {_ptxas_versions(a.arch)}; {len(entries)} entry kernels: "
            f"{', '.join(sorted(k[1] for k in entries))}")
        for line in cov_info:
            say(line)
        say(f"# {len(tasks)} compiles planned ({', '.join(f'sm_{x}' for x in a.arch)}), {a.jobs} workers")
        if a.dry_run:
            per = defaultdict(int)
            for t in tasks:
                per[t["kernel"]] += 1
            for k, n in sorted(per.items()):
                print(f"{k}: {n}")
            for p in problems:
                print(f"PROBLEM {p}")
            print(f"aot_check --dry-run: {len(per)} kernels, {len(tasks)} configs planned, "
                  f"{len(problems)} problems; {time.time() - t0:.0f} s")
            return 1 if problems else 0

        # 4. compile (what an earlier run with the same inputs compiled comes from the result cache)
        t1 = time.time()
        toolchain = f"triton {triton.__version__}; {_ptxas_versions(a.arch)}"
        results = {} if a.no_cache else cache_load(a.cache, toolchain, tasks)
        if results:
            say(f"# {len(results)} of {len(tasks)} compiles reused from {a.cache} (same kernel source, "
                f"specialization and toolchain; --no-cache compiles them again)")
        results.update(run_pool([t for t in tasks if t["id"] not in results], a.jobs, cache_dir, say))
        if not a.no_cache:
            cache_store(a.cache, toolchain, tasks, results)
        t_compile = time.time() - t1
        rows = []
        for t in tasks:
            r = dict(results[t["id"]])
            r.update({k: t[k] for k in ("kernel", "config", "config_index", "arch", "autotuned", "spec", "group")})
            rows.append(r)
        judge(rows, allow_spills=a.allow_spills)
        print(format_table(rows))
        for r in rows:
            if r["error"]:
                print(f"\nCOMPILE ERROR {r['kernel']} [{r['config']}] sm_{r['arch']} {r['spec']}:\n"
                      + textwrap.indent(r["error"], "    "))
        report = spill_report(rows)
        if report:
            print("\n" + report)
        for p in problems:
            print(f"PROBLEM {p}")
        seconds = time.time() - t0
        cpu = sum(r["cpu_seconds"] for r in rows)
        print(f"# record {t_record:.0f} s, compile {t_compile:.0f} s with {a.jobs} workers; the compiles used "
              f"{cpu:.0f} CPU-seconds ({cpu / max(len(rows), 1):.1f} per compile), so {cpu / a.jobs:.0f} s of "
              f"compiling with {a.jobs} otherwise idle cores")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"triton": triton.__version__, "archs": a.arch, "jobs": a.jobs, "seconds": seconds,
                           "record_seconds": t_record, "compile_seconds": t_compile, "compile_cpu_seconds": cpu,
                           "problems": problems,
                           "rows": rows}, f, indent=1)
        print(summary_line(rows, problems, a.arch, seconds, a.allow_spills))
        return exit_status(rows, problems)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
