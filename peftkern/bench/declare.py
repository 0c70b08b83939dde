"""What a family's `bench.py` declares: its benchmarked ops (`BenchOp`, in a module-level list `OPS`) and their
cases (dataclasses built on `Case`). bench/registry.py finds the declarations, so the bench keeps no list of its
ops."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

# one provider: a step function to time, and the set of them for one case with the eager baseline's name
Step = Callable[[], Any]
Providers = Callable[[Any, torch.device], "tuple[dict[str, Step], str]"]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": how cases write their dtype in labels and JSON."""
    return str(dtype).replace("torch.", "")


class Case:
    """Base of a case dataclass: `as_dict()` is its fields with the dtype by name (the "case" of a JSON row,
    which `registry.case_from_dict` turns back into the case). A case also has a `label` (the table's shape
    column), a `dtype` and a `family` (the op family whose backend `auto` chooses)."""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        return d


@dataclasses.dataclass(frozen=True)
class BenchOp:
    """One `python -m peftkern bench --op` choice.

    name: the --op value and every JSON row's "op"; order: its place among the --op choices (ascending);
    case_type: the case dataclass, rebuilt from a row's "case"; cases(device, quick): the cases to time;
    providers(case, device): ({provider name: step function}, the eager baseline's name) for one case;
    help: what it times, for `bench --help`; floor: what its floor provider is, printed under the table.

    What the op adds to the report (bench/report.py), all optional:
    timed: what one timed step is (the table's title says it);
    legend: a line printed once under the table when the op has rows (what an extra baseline is);
    notes(row, device_type): lines printed under the table for one row (a ratio against a target), gathered
        under `notes_heading` in the results page (benchmarks/results_table.py);
    bars(row): extra (name, ratio) bars for the row's chart panel, each "higher is better" with 1.0 = parity;
    roofline(row, ceilings): the row's share of a measured machine ceiling, kept in the JSON row as "roofline"
        ({"forward_gb_per_s", "forward_pct_of_copy_bw"}) and printed under the table."""
    name: str
    order: int
    case_type: type
    cases: Callable[[torch.device, bool], list]
    providers: Providers
    help: str
    floor: str
    timed: str = "fwd+bwd"
    legend: str = ""
    notes: Optional[Callable[[dict, str], list]] = None
    notes_heading: str = ""
    bars: Optional[Callable[[dict], list]] = None
    roofline: Optional[Callable[[dict, dict], Optional[dict]]] = None
