"""4. Compile (worker processes, TRITON_INTERPRET=0) and the result cache.

Each task is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` in a fresh
Triton cache (every compile runs ptxas); registers and spill bytes come from ptxas -v, shared memory from
the kernel metadata. A compile's verdict depends only on its inputs (the kernel's source and everything it
calls, the specialization, Triton and ptxas), so an unchanged kernel's result is kept outside the clone and
not compiled again; compile errors are never kept.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time

from .discover import discover, gpu_mode_env
from .plan import bind
from .report import parse_ptxas_log

_WORKER_STATE: dict = {}


def _worker_init(cache_dir):
    gpu_mode_env()
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
    _WORKER_STATE["entries"] = {key: kernel.jit for key, kernel in discover()[0].items()}


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


# ---- the result cache ----------------------------------------------------------------------------------

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
