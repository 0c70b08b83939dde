"""benchmarks/gpu_session.sh (a GPU visit in budgeted steps) and benchmarks/gpu_smoke.py, exercised on CPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SESSION = ROOT / "benchmarks" / "gpu_session.sh"


def _run(args, **kwargs):
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(SESSION), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_dry_run_prints_the_plan_and_each_steps_budget(tmp_path):
    out = _run(["--dry-run", str(tmp_path / "visit")])
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gpu_session.sh --dry-run: budget 540 s (15 s kept back)")
    steps = [line.split()[:5] for line in lines if line.startswith("step ")]
    assert steps == [["step", "1", "install", "budget", "120"], ["step", "2", "smoke", "budget", "180"],
                     ["step", "3", "bench", "budget", "225"], ["step", "4", "suite", "budget", "0"]]
    assert lines[-1] == "plan ok"
    assert not (tmp_path / "visit" / "steps.json").exists()  # nothing ran


def test_bad_arguments_are_refused(tmp_path):
    assert _run(["--steps", "1,9", str(tmp_path)]).returncode == 2
    assert _run(["--budget", "ten", str(tmp_path)]).returncode == 2
    assert _run(["--frobnicate"]).returncode == 2


def test_a_step_that_no_longer_fits_the_budget_is_skipped_and_recorded(tmp_path):
    out = _run(["--budget", "30", "--steps", "2", str(tmp_path)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step 2 smoke: skipped, 15 s left of the budget" in out.stdout
    assert json.loads((tmp_path / "steps.json").read_text()) == [
        {"step": "smoke", "rc": 125, "seconds": 0, "budget_s": 0, "timed_out": False}]


def test_smoke_writes_one_line_per_check_as_it_goes(tmp_path):
    pytest.importorskip("triton", reason="the smoke runs the Triton backend (through the interpreter on CPU)")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--out", str(tmp_path),
                          "--family", "sparse_apply"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = [json.loads(line) for line in (tmp_path / "smoke-sparse_apply.jsonl").read_text().splitlines()]
    assert [(c["family"], c["dtype"], c["status"]) for c in checks] == [
        ("sparse_apply", "float16", "PASS"), ("sparse_apply", "float32", "PASS")]
    assert all("apply bit-exact True, restore bit-exact True" == c["worst"] for c in checks)
