"""The command line of the ahead-of-time check (scripts/aot_check.py): record, discover and check coverage, plan,
compile, report. The usage and the verdicts are in the aot package's docstring."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict

from . import __doc__ as USAGE
from .compile import cache_load, cache_store, default_cache_dir, run_pool
from .discover import coverage, discover, gpu_mode_env
from .plan import plan
from .record import record_main
from .report import SMEM_LIMIT, exit_status, format_table, judge, spill_report, summary_line

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "aot_check.py")


def say(s: str) -> None:
    """Progress, to stderr (the table goes to stdout)."""
    print(s, file=sys.stderr, flush=True)


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aot_check.py", description=USAGE.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE)
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
    return ap


def _record(a, work: str):
    """1. Record in a child: its Triton runs in interpreter mode, ours compiles for the GPU. (records, problems)
    or None when the recording failed."""
    rec_path = os.path.join(work, "launches.json")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, SCRIPT, "--_record", rec_path] + (["--full"] if a.full else [])
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not os.path.exists(rec_path):
        print(f"aot_check: recording failed (exit {rc}); 0 kernels, 0 configs, 1 failure")
        return None
    with open(rec_path) as f:
        recorded = json.load(f)
    say(f"# recorded {len(recorded['records'])} launch signatures (launchers sized by "
        f"peftkern.kernels._launch: {'; '.join(recorded['launch_configs'])})")
    return recorded["records"], list(recorded["problems"])


def _plan(a, records: list[dict], work: str):
    """2. discover and check coverage, 3. plan, in GPU mode. (tasks, problems)."""
    import triton
    kernels, problems = discover()
    cov_problems, cov_info = coverage(records, kernels)
    tasks, plan_problems, notes = plan(records, a.arch, kernels)
    problems += cov_problems + plan_problems
    if a.kernel:
        tasks = [t for t in tasks if any(name in t["kernel"] for name in a.kernel)]
    for n in sorted(notes):
        say(f"# note: {n}")
    say(f"# triton {triton.__version__}, {_ptxas_versions(a.arch)}; {len(kernels)} kernels declared in "
        f"peftkern.kernels.registry: {', '.join(sorted(k[1] for k in kernels))}")
    for line in cov_info:
        say(line)
    say(f"# {len(tasks)} compiles planned ({', '.join(f'sm_{x}' for x in a.arch)}), {a.jobs} workers")
    return tasks, problems


def _dry_run(tasks: list[dict], problems: list[str], t0: float) -> int:
    per = defaultdict(int)
    for t in tasks:
        per[t["kernel"]] += 1
    for k, n in sorted(per.items()):
        print(f"{k}: {n}")
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"aot_check --dry-run: {len(per)} kernels, {len(tasks)} configs planned, {len(problems)} problems; "
          f"{time.time() - t0:.0f} s")
    return 1 if problems else 0


def _compile(a, tasks: list[dict], cache_dir: str) -> list[dict]:
    """4. Compile what an earlier run with the same inputs did not (the result cache); the rows, judged."""
    import triton
    toolchain = f"triton {triton.__version__}; {_ptxas_versions(a.arch)}"
    results = {} if a.no_cache else cache_load(a.cache, toolchain, tasks)
    if results:
        say(f"# {len(results)} of {len(tasks)} compiles reused from {a.cache} (same kernel source, "
            f"specialization and toolchain; --no-cache compiles them again)")
    results.update(run_pool([t for t in tasks if t["id"] not in results], a.jobs, cache_dir, say))
    if not a.no_cache:
        cache_store(a.cache, toolchain, tasks, results)
    rows = []
    for t in tasks:
        r = dict(results[t["id"]])
        r.update({k: t[k] for k in ("kernel", "config", "config_index", "arch", "autotuned", "spec", "group")})
        rows.append(r)
    return judge(rows, allow_spills=a.allow_spills)


def _report(a, rows: list[dict], problems: list[str], times: dict) -> int:
    import triton
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
    seconds = time.time() - times["start"]
    cpu = sum(r["cpu_seconds"] for r in rows)
    print(f"# record {times['record']:.0f} s, compile {times['compile']:.0f} s with {a.jobs} workers; the compiles "
          f"used {cpu:.0f} CPU-seconds ({cpu / max(len(rows), 1):.1f} per compile), so {cpu / a.jobs:.0f} s of "
          f"compiling with {a.jobs} otherwise idle cores")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "archs": a.arch, "jobs": a.jobs, "seconds": seconds,
                       "record_seconds": times["record"], "compile_seconds": times["compile"],
                       "compile_cpu_seconds": cpu, "problems": problems, "rows": rows}, f, indent=1)
    print(summary_line(rows, problems, a.arch, seconds, a.allow_spills))
    return exit_status(rows, problems)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a._record:
        record_main(a._record, a.full)
        return 0
    # every config the autotuner may pick is checked, whatever a smoke run's knob says
    os.environ.pop("PEFTKERN_AUTOTUNE", None)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C: workers stopped, temporary files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    times = {"start": time.time()}
    work = tempfile.mkdtemp(prefix="peftkern-aot-")
    try:
        recorded = _record(a, work)
        if recorded is None:
            return 1
        records, problems = recorded
        times["record"] = time.time() - times["start"]
        gpu_mode_env()
        cache_dir = os.path.join(work, "triton-cache")  # fresh and private: every compile runs ptxas
        os.environ["TRITON_CACHE_DIR"] = cache_dir
        import warnings
        warnings.filterwarnings("ignore")
        tasks, more = _plan(a, records, work)
        problems += more
        if a.dry_run:
            return _dry_run(tasks, problems, times["start"])
        t1 = time.time()
        rows = _compile(a, tasks, cache_dir)
        times["compile"] = time.time() - t1
        return _report(a, rows, problems, times)
    finally:
        shutil.rmtree(work, ignore_errors=True)
