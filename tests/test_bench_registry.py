"""The bench's ops are declared by the families (peftkern/<family>/bench.py) and found by bench/registry.py: every
family has some, the CLI offers exactly those, and a new family's bench.py is picked up with no other edit."""
import importlib.util
import pathlib
import sys

import pytest
import torch

import peftkern
from peftkern.bench import registry
from peftkern.bench.declare import BenchOp
from tests.test_cli import op_choices

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = sorted(d.name for d in (ROOT / "peftkern").iterdir() if (d / "op.py").is_file())


def test_every_family_declares_bench_ops():
    assert {"lora", "sparse_diff"} <= set(FAMILIES)
    for family in FAMILIES:
        assert importlib.util.find_spec(f"peftkern.{family}.bench") is not None, f"peftkern/{family}/bench.py missing"
        module = importlib.import_module(f"peftkern.{family}.bench")
        assert module.OPS and all(isinstance(op, BenchOp) for op in module.OPS), family
        for op in module.OPS:
            assert registry.TABLE[op.name] is op
            assert op.help and op.floor


def test_the_cli_offers_the_discovered_ops_in_their_order():
    assert registry.OPS == tuple(op.name for op in registry.discover())
    # the names and relative order that results JSON files and docs/benchmarks.md use (a new family's ops may
    # come anywhere among them)
    first = ("lora", "qlora", "dora", "multi_lora", "adapter", "sparse")
    assert [name for name in registry.OPS if name in first] == list(first)
    assert op_choices() == [*registry.OPS, "e2e", "all"]


@pytest.mark.parametrize("op", registry.OPS)
def test_cases_round_trip_through_their_json(op):
    """A row's "case" (case.as_dict()) gives the case back, on either device and both sizes."""
    for device in ("cpu", "cuda"):  # building cases needs no GPU
        for quick in (False, True):
            cases = registry.cases_for(op, torch.device(device), quick=quick)
            assert cases and all(isinstance(c, registry.TABLE[op].case_type) for c in cases)
            assert [registry.case_from_dict(op, c.as_dict()) for c in cases] == cases
            assert len({c.label for c in cases}) == len(cases)


def test_a_new_familys_bench_module_is_found(tmp_path, monkeypatch):
    """Discovery names no family: a package with a bench.py beside the others is an op of the bench."""
    package = tmp_path / "toy_family"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bench.py").write_text(
        "from peftkern.bench.declare import BenchOp\n"
        "from peftkern.lora.bench import LoraCase, lora_cases, lora_providers\n"
        "OPS = [BenchOp('toy', 35, LoraCase, lora_cases, lora_providers, help='toy op', floor='none')]\n")
    known = registry.discover()
    monkeypatch.setattr(peftkern, "__path__", [*peftkern.__path__, str(tmp_path)])
    try:
        names = [op.name for op in registry.discover()]
    finally:
        for name in ("peftkern.toy_family.bench", "peftkern.toy_family"):
            sys.modules.pop(name, None)
    assert names == [*(op.name for op in known if op.order < 35), "toy", *(op.name for op in known if op.order >= 35)]
    assert {"dora", "multi_lora"} <= set(names) and names.index("dora") < names.index("toy") < names.index("multi_lora")
