"""Runs the benchmark cases with a progress bar and collects one record per case."""
from __future__ import annotations

import datetime
import platform
import sys

import torch

from .cases import lora_cases
from .ceilings import measure_ceilings
from .providers import lora_providers
from .timing import measure_group

OPS = ("lora",)


def run(ops: list[str], *, quick: bool, device: torch.device) -> dict:
    from tqdm.auto import tqdm

    import peftkern

    jobs = []
    if "lora" in ops:
        jobs += [("lora", case) for case in lora_cases(device, quick)]
    rows = []
    for op, case in tqdm(jobs, desc="peftkern bench", unit="case"):
        steps, eager_name = lora_providers(case, device)
        result = measure_group(steps, device, quick=quick)
        backend = peftkern._backend.auto_choice("lora_linear", device, case.dtype)
        rows.append({"op": op, "case": case.as_dict(), "label": case.label, "backend": backend,
                     "eager_provider": eager_name, "results": result})
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": peftkern.backend_info()["triton"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m peftkern"] + sys.argv[1:]),
        "quick": quick,
        "ceilings": measure_ceilings(device),
        "rows": rows,
    }
