"""scripts/peft_suite/peftkern_patch_plugin.py (the plugin that runs PEFT's own tests patched) really patches
every model PEFT injects into and counts the fused forwards, and compare.py reads junit outcomes right."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="the PEFT integration tests need peft (in the test extras)")
pytest.importorskip("transformers", reason="the PEFT integration tests need transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner  # noqa: E402

import peftkern.integrations.peft as integration  # noqa: E402

from .test_peft_patch_safety import MLP, patched_layers  # noqa: E402

SUITE = Path(__file__).resolve().parent.parent / "scripts" / "peft_suite"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_peftkern_suite_{name}", SUITE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def plugin(monkeypatch):
    # monkeypatch records the originals first, so the plugin's replacements are undone after the test
    monkeypatch.setattr(BaseTuner, "inject_adapter", BaseTuner.inject_adapter)
    monkeypatch.setattr(integration, "lora_linear", integration.lora_linear)
    monkeypatch.setattr(integration, "dora_linear", integration.dora_linear)
    module = _load("peftkern_patch_plugin")
    module.pytest_configure(None)
    return module


def test_plugin_patches_every_injection_and_counts_fused_forwards(plugin):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))  # never passed to patch()
    assert patched_layers(model) == ["base_model.model.lin0"]
    model.add_adapter("other", LoraConfig(target_modules=["lin1"]))
    assert patched_layers(model) == ["base_model.model.lin0", "base_model.model.lin1"]
    with torch.no_grad():
        model(torch.randn(3, 10))
    assert plugin._counts == {"patched_layers": 2, "fused_forwards": 1}  # lin1's adapter is not active


def test_compare_reads_each_outcome_from_junit(tmp_path):
    compare = _load("compare")
    junit = tmp_path / "r.xml"
    junit.write_text("""<testsuites><testsuite>
        <testcase classname="t.A" name="ok"/>
        <testcase classname="t.A" name="bad"><failure message="x"/></testcase>
        <testcase classname="t.A" name="err"><error message="y"/></testcase>
        <testcase classname="t.A" name="skip"><skipped message="z"/></testcase>
    </testsuite></testsuites>""")
    assert compare.outcomes(junit) == {"t.A::ok": "passed", "t.A::bad": "failed", "t.A::err": "error",
                                       "t.A::skip": "skipped"}
