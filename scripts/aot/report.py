"""Verdicts and reports of the ahead-of-time check: what Triton's integer specialization sees, ptxas -v logs, the
rules that pass or fail a compile, the table, the summary line and the spill report. Pure functions
(tests/test_aot_check.py)."""
from __future__ import annotations

import re
from collections import defaultdict

# Largest dynamic shared memory one block may opt into, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 (sm_80) 163 KB, H100 (sm_90) 227 KB. Triton's launcher raises OutOfResources above it.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
               "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


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
