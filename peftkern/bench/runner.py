"""Runs the benchmark cases with a progress bar and collects one record per case."""
from __future__ import annotations

import datetime
import platform
import sys

import torch

from .ceilings import measure_ceilings
from .memory import peak_mb_in_subprocess
from .registry import OPS, TABLE, case_from_dict, cases_for, providers_for  # noqa: F401  (callers use them)
from .timing import measure_group

PEAK_MEM_NOTES = {
    "quick": "not measured with --quick: on CPU each provider's peak is measured in a fresh process "
             "(peftkern/bench/memory.py), which --quick skips to stay fast; run without --quick",
    "unmeasurable": "this platform cannot measure a CPU step's peak (it needs glibc's mallopt and "
                    "/proc/self/clear_refs)",
}


def run(ops: list[str], *, quick: bool, device: torch.device, background_load: dict | None = None,
        on_row=None) -> dict:
    """Time every case of `ops`; `background_load` (BackgroundLoad.describe()) is recorded as given.
    `on_row(partial)`, when given, is called after every case with the results so far ("complete": False, no
    ceilings or rooflines yet), so a run stopped part-way (a GPU visit's timeout) keeps what it measured."""
    import peftkern

    from .progress import progress

    jobs = [(op, case) for op in ops for case in cases_for(op, device, quick=quick)]
    rows = []
    seen_choices: set = set(peftkern.core.dispatch.choices())
    for op, case in progress(jobs, desc="peftkern bench", unit="case"):
        steps, eager_name = providers_for(op, case, device)
        result = measure_group(steps, device, quick=quick)
        if device.type == "cpu" and not quick:  # CPU peak memory: a fresh process per provider
            for name in result:
                result[name]["peak_mem_mb"] = peak_mb_in_subprocess(op, case.as_dict(), name)
        backend = peftkern.core.backend.auto_choice(case.family, device, case.dtype)
        if backend == "cuda" and device.type == "cpu":
            backend = "cuda (C++ on CPU)"  # the compiled extension's CPU kernels
        rows.append({"op": op, "family": case.family, "case": case.as_dict(), "label": case.label,
                     "backend": backend, "eager_provider": eager_name, "results": result,
                     # what measured dispatch chose for this case (forward and backward), with its timings
                     "dispatch": _new_choices(seen_choices, case.family)})
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_row is not None:
            on_row({**_header(device, quick, background_load), "complete": False, "peak_mem_note": None,
                    "ceilings": None, "rows": rows})
    ceilings = measure_ceilings(device)
    for row in rows:
        hook = TABLE[row["op"]].roofline
        row["roofline"] = hook(row, ceilings) if hook is not None and ceilings is not None else None
    return {
        **_header(device, quick, background_load),
        "complete": True,
        "peak_mem_note": _peak_mem_note(rows, quick, device),
        "ceilings": ceilings,
        "rows": rows,
    }


def _header(device: torch.device, quick: bool, background_load: dict | None) -> dict:
    """What a results file says about the run: device, versions, date, command."""
    import peftkern

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": peftkern.backend_info()["triton"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m peftkern"] + sys.argv[1:]),
        "quick": quick,
        "background_load": background_load or {"processes": 0, "kind": None},
    }


def _new_choices(seen: set, family: str) -> dict:
    """The dispatch choices made since the previous case (peftkern.core.dispatch.choices()), for `family`."""
    import peftkern

    now = peftkern.core.dispatch.choices()
    new = {k: v for k, v in now.items() if k not in seen and k.startswith(family + "|")}
    seen.update(now)
    return new


def _peak_mem_note(rows: list[dict], quick: bool, device: torch.device) -> str | None:
    if all(v["peak_mem_mb"] is not None for row in rows for v in row["results"].values()):
        return None
    return PEAK_MEM_NOTES["quick" if quick and device.type == "cpu" else "unmeasurable"]
