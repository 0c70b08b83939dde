"""CPU peak memory of one benchmark step, measured in a fresh process:

    python -m peftkern.bench.memory OP CASE_JSON PROVIDER   ->  prints the peak in MiB

The peak is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
during one step after a warm-up step, with glibc told first to mmap every block over 64 KiB, so a
freed tensor really leaves the resident set and every new one is counted. That setting slows
allocation, which is why it lives in its own process and never in the timed runs.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys


def _mmap_everything_large() -> bool:
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) == 1  # M_MMAP_THRESHOLD
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_mb_in_subprocess(op: str, case: dict, provider: str) -> float | None:
    """Run this module for one provider of one case; None where the platform cannot measure it."""
    out = subprocess.run([sys.executable, "-m", "peftkern.bench.memory", op, json.dumps(case), provider],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return None
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "None" else float(value)


def main(argv: list[str]) -> int:
    op, case_json, provider = argv
    if not _mmap_everything_large():
        print("None")
        return 0
    import torch

    from .registry import case_from_dict, providers_for  # after mallopt: torch's own allocations follow it

    steps, _ = providers_for(op, case_from_dict(op, json.loads(case_json)), torch.device("cpu"))
    step = steps[provider]
    step()  # warm-up: thread pools, lazy initialisation
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        print("None")
        return 0
    before = _status_kb("VmRSS")
    step()
    print((_status_kb("VmHWM") - before) / 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
