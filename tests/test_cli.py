"""python -m peftkern info | bench, as a user runs them."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "peftkern", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def test_info(tmp_path):
    out = run_cli("info", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "extension_built", "lora_linear"):
        assert word in out.stdout


def test_bench_quick_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the --plot option needs matplotlib (in the test extras)")
    out = run_cli("bench", "--op", "all", "--quick", "--json", "r.json", "--plot", "r.png", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "speedup vs eager" in out.stdout and "overhead vs floor" in out.stdout
    assert "tokens/s" in out.stdout and "peftkern" in out.stdout  # the end-to-end fine-tuning comparison
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in results["e2e"]] == ["peft", "peftkern"]
    assert results["e2e"][1]["layers_patched"] > 0 and all(r["tokens_per_s"] > 0 for r in results["e2e"])
    assert results["torch"] and {row["op"] for row in results["rows"]} == {"lora", "adapter", "sparse"}
    for row in results["rows"]:
        assert {"eager", "peftkern", "floor"} <= set(row["results"])
        assert all(r["median_ms"] > 0 for r in row["results"].values())
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_bad_arguments(tmp_path):
    out = run_cli("bench", "--op", "nope", tmp_path=tmp_path)
    assert out.returncode != 0 and "invalid choice" in out.stderr
