"""The benchmarked ops: for each, its cases and the providers that time them. The runner (timing every case) and
the memory probe (one provider of one case in a fresh process) both read this table, so neither imports the other."""
from __future__ import annotations

import torch

from .cases import (
    AdapterCase,
    DoraCase,
    LoraCase,
    MultiLoraCase,
    QLoraCase,
    SparseCase,
    adapter_cases,
    dora_cases,
    lora_cases,
    multi_lora_cases,
    qlora_cases,
    sparse_cases,
)
from .providers import (
    adapter_providers,
    dora_providers,
    lora_providers,
    multi_lora_providers,
    qlora_providers,
    sparse_providers,
)

OPS = ("lora", "qlora", "dora", "multi_lora", "adapter", "sparse")
# op -> (cases, providers)
TABLE = {"lora": (lora_cases, lora_providers), "qlora": (qlora_cases, qlora_providers),
         "dora": (dora_cases, dora_providers), "multi_lora": (multi_lora_cases, multi_lora_providers),
         "adapter": (adapter_cases, adapter_providers), "sparse": (sparse_cases, sparse_providers)}
_CASE_TYPES = {"lora": LoraCase, "qlora": QLoraCase, "dora": DoraCase, "multi_lora": MultiLoraCase,
               "adapter": AdapterCase, "sparse": SparseCase}


def case_from_dict(op: str, d: dict):
    """The case of `op` that `case.as_dict()` describes (its dtype given by name)."""
    d = dict(d)
    d["dtype"] = getattr(torch, d["dtype"])
    return _CASE_TYPES[op](**d)


def cases_for(op: str, device: torch.device, *, quick: bool) -> list:
    return TABLE[op][0](device, quick)


def providers_for(op: str, case, device: torch.device):
    """({provider name: step function}, name of the eager baseline) for one case of `op`."""
    return TABLE[op][1](case, device)
