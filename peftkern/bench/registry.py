"""The benchmarked ops, found rather than listed: every subpackage of peftkern with a `bench` module (a family's
`peftkern/<family>/bench.py`) declares its ops in a module-level list `OPS` of `bench.declare.BenchOp`, ordered by
their declared `order`. The runner (timing every case) and the memory probe (one provider of one case in a fresh
process) both read this table, so neither imports the other."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import torch

from .declare import BenchOp


def discover() -> list[BenchOp]:
    """Every BenchOp declared by a `peftkern.<subpackage>.bench` module, by declared order (then name)."""
    import peftkern

    found = []
    for info in pkgutil.iter_modules(peftkern.__path__, "peftkern."):
        if not info.ispkg or importlib.util.find_spec(f"{info.name}.bench") is None:
            continue
        module = importlib.import_module(f"{info.name}.bench")
        declared = getattr(module, "OPS", None)
        if not declared or not all(isinstance(op, BenchOp) for op in declared):
            raise TypeError(f"{module.__name__}.OPS must be a non-empty list of peftkern.bench.declare.BenchOp, "
                            f"got {declared!r}")
        found.extend(declared)
    found.sort(key=lambda op: (op.order, op.name))
    names = [op.name for op in found]
    if len(set(names)) != len(names):
        raise ValueError(f"bench ops declared twice: {sorted({n for n in names if names.count(n) > 1})}")
    return found


# op name -> its declaration, in --op order
TABLE: dict[str, BenchOp] = {op.name: op for op in discover()}
OPS: tuple[str, ...] = tuple(TABLE)


def case_from_dict(op: str, d: dict):
    """The case of `op` that `case.as_dict()` describes (its dtype given by name)."""
    d = dict(d)
    d["dtype"] = getattr(torch, d["dtype"])
    return TABLE[op].case_type(**d)


def cases_for(op: str, device: torch.device, *, quick: bool) -> list:
    return TABLE[op].cases(device, quick)


def providers_for(op: str, case, device: torch.device):
    """({provider name: step function}, name of the eager baseline) for one case of `op`."""
    return TABLE[op].providers(case, device)
