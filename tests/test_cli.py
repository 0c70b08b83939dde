"""python -m peftkern info | bench | --version, and examples/finetune.py, as a user runs them."""
import argparse
import importlib.util
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import peftkern
from peftkern.__main__ import build_parser, main
from peftkern.bench import report, runner
from peftkern.bench.background import BackgroundLoad
from peftkern.dora import bench as dora_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS_DOC = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")


def run_cli(*args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "peftkern", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)


def op_choices() -> list[str]:
    """The --op choices as the CLI's own parser declares them."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(next(a for a in commands.choices["bench"]._actions if a.dest == "op").choices)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_info(tmp_path):
    out = run_cli("info", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("torch", "triton", "extension_built", "lora_linear"):
        assert word in out.stdout


def test_version(tmp_path):
    out = run_cli("--version", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"peftkern {peftkern.__version__}"


def test_bench_quick_all_ops_under_background_load(tmp_path):
    """Every op for real (--quick), with one busy background process (the timings of such a tiny run mean
    nothing; what is checked is what gets recorded, and that the worker is gone when the command returns)."""
    pytest.importorskip("matplotlib", reason="the --plot option needs matplotlib (in the test extras)")
    out = run_cli("bench", "--op", "all", "--quick", "--background-load", "1", "--json", "r.json", "--plot", "r.png",
                  tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "speedup vs eager" in out.stdout and "overhead vs floor" in out.stdout
    assert "tokens/s" in out.stdout and "peftkern" in out.stdout  # the end-to-end fine-tuning comparison
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in results["e2e"]] == ["peft", "peftkern"]
    assert results["e2e"][1]["layers_patched"] > 0 and all(r["tokens_per_s"] > 0 for r in results["e2e"])
    from peftkern.bench.registry import OPS

    assert results["torch"] and {row["op"] for row in results["rows"]} == set(OPS)
    for row in results["rows"]:
        assert {"eager", "peftkern", "floor"} <= set(row["results"])
        assert all(r["median_ms"] > 0 for r in row["results"].values())
    apply_rows = [row for row in results["rows"] if row["family"] == "sparse_diff_apply"]
    assert apply_rows and all("eager_inplace" in row["results"] for row in apply_rows)
    assert "vs in-place by hand" in out.stdout  # the second eager baseline has its own table line
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert results["wall_s"] > 0
    # the load: in the JSON, in the table title, and stopped
    assert results["background_load"]["processes"] == 1 and results["background_load"]["kind"]
    assert "background load: 1 busy process" in out.stdout
    assert "background load: 1 process(es) stopped" in out.stdout
    assert not alive(int(re.search(r"pids (\d+)", out.stdout).group(1)))
    # --quick on CPU skips the per-provider memory processes: the output says so, not just "-"
    if not torch.cuda.is_available():  # on CUDA peak memory is always measured (max_memory_allocated)
        assert results["peak_mem_note"] == runner.PEAK_MEM_NOTES["quick"]
        assert 'peak MB "-": not measured with --quick' in out.stdout


def test_bad_arguments(capsys):
    for argv, named in ((["bench", "--op", "nope"], "invalid choice"),
                        (["bench", "--background-load", "-1", "--dry-run"], "--background-load"),
                        (["bench", "--background-load", "two", "--dry-run"], "--background-load")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("op", op_choices())
def test_every_op_is_accepted(op, capsys):
    """--dry-run goes through the same parsing and case lists as a real run, without timing anything
    (a real --quick run of every op is test_bench_quick_writes_table_json_and_plot)."""
    assert main(["bench", "--op", op, "--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = [o for o in op_choices() if o != "all"] if op == "all" else [op]
    for name in ops:
        if name == "e2e":
            assert re.search(r"e2e: fine-tune small: [\d.]+M parameters", out)
        else:
            cases = runner.cases_for(name, device, quick=True)
            assert cases and all(f"{name}: {case.family}: {case.label}" in out for case in cases)


def test_benchmarks_doc_lists_every_op():
    """docs/benchmarks.md's bench synopsis names exactly the CLI's --op choices, and each op is described."""
    choices = op_choices()
    section = BENCHMARKS_DOC.split("## Running the bench", 1)[1].split("\n## ", 1)[0]
    assert f"[--op {'|'.join(choices)}]" in section, "docs/benchmarks.md bench synopsis out of date"
    for op in choices:
        assert f"`{op}`" in section, f"docs/benchmarks.md does not describe --op {op}"


def test_background_load_starts_and_stops_its_processes():
    with BackgroundLoad(2) as load:
        pids = load.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert load.describe()["processes"] == 2 and load.describe()["kind"]
    assert wait_gone(pids, timeout=0.5) == []  # stopped and reaped before the with-block returns
    with pytest.raises(KeyError):  # an error inside the block still stops the workers
        with BackgroundLoad(1) as load:
            pids = load.pids
            raise KeyError("boom")
    assert wait_gone(pids, timeout=0.5) == []
    with BackgroundLoad(0) as load:
        assert load.pids == [] and load.describe()["processes"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt, on purpose
def test_background_load_an_interrupt_swallowed_by_a_finalizer_still_ends_the_block():
    """Ctrl-C delivered while a __del__ runs becomes "Exception ignored" (Python drops exceptions there): the
    block's exit still raises SystemExit(128 + SIGINT), so the bench cannot finish with exit status 0."""
    class InterruptsWhileFinalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes after the signal: its handler runs here, inside __del__
                pass

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with pytest.raises(SystemExit) as stop:
        with BackgroundLoad(1) as load:
            pids = load.pids
            InterruptsWhileFinalized()  # dropped at once: __del__ runs now
    assert stop.value.code == 128 + signal.SIGINT
    assert wait_gone(pids, timeout=0.5) == []
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_background_load_rejects_bad_counts(bad, error):
    with pytest.raises(error, match="background load n"):
        BackgroundLoad(bad)


def test_background_load_workers_exit_when_their_parent_is_killed(tmp_path):
    """SIGKILL leaves no exit path to run in the parent: the workers notice the parent is gone."""
    script = ("import os, signal\nfrom peftkern.bench.background import BackgroundLoad\n"
              "load = BackgroundLoad(1).__enter__()\nprint(load.pids[0], flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL
    pid = int(out.stdout.split()[0])
    assert wait_gone([pid]) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_bench_background_load_stops_on_interrupt(sig, tmp_path):
    """Ctrl-C (SIGINT) or SIGTERM during a bench run: the background processes are stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "peftkern", "bench", "--op", "lora", "--quick",
                             "--background-load", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        line = proc.stdout.readline()
        match = re.search(r"pids (\d+)", line)
        assert match, line + proc.stderr.read()
        pid = int(match.group(1))
        assert alive(pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode != 0
    assert wait_gone([pid]) == []


def test_plot_has_a_log_panel_per_op_family_with_e2e():
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (in the test extras)")
    import matplotlib.pyplot as plt

    results = json.loads((ROOT / "benchmarks/results/cpu-2core.json").read_text())
    families = {report.family(row) for row in results["rows"]} | {"e2e"}
    fig = report.figure(results)
    try:
        axes = [ax for ax in fig.axes if ax.get_title()]
        assert {ax.get_title() for ax in axes} == families
        for ax in axes:
            assert ax.get_yscale() == "log"
            labels = [t.get_text() for t in ax.get_xticklabels()]
            assert labels and all(label.startswith(ax.get_title() + "\n") for label in labels)
            assert any(t.get_text() == "1.0 = parity" for t in ax.texts)
            assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())
    finally:
        plt.close(fig)


def test_sparse_apply_has_an_in_place_baseline():
    from peftkern.sparse_diff.bench import SparseCase, sparse_providers

    case = SparseCase("apply", 16, 8, 0.25, torch.float32)
    steps, _ = sparse_providers(case, torch.device("cpu"))
    assert {"eager", "eager_inplace", "peftkern", "floor"} <= set(steps)
    steps["eager_inplace"]()
    row = {"op": "sparse", "family": case.family, "label": case.label, "backend": "x", "eager_provider": "x",
           "results": {k: {"median_ms": 1.0 + i, "peak_mem_mb": None} for i, k in enumerate(steps)}}
    lines = report.table_rows({"rows": [row]})
    assert [line[1] for line in lines] == [case.label, case.label + " vs in-place by hand"]
    assert lines[1][3] == f"{row['results']['eager_inplace']['median_ms']:.3f}"


def test_bench_quick_dora_times_peft_peftkern_its_lora_and_the_floor(tmp_path):
    """--op dora for real (--quick): every row times PEFT's DoRA layer, dora_linear, peftkern's own lora_linear on
    the same adapters and the floor, and the output gives the DoRA / LoRA ratio for each row."""
    out = run_cli("bench", "--op", "dora", "--quick", "--json", "d.json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "d.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert [row["label"] for row in results["rows"]] == [c.label for c in runner.cases_for("dora", device, quick=True)]
    assert {row["case"]["dropout"] for row in results["rows"]} == {0.0, 0.1}
    for row in results["rows"]:
        assert row["op"] == "dora" and row["family"] == "dora_linear"
        assert {"eager", "peftkern", "peftkern_lora", "floor"} <= set(row["results"])
        assert all(r["median_ms"] > 0 for r in row["results"].values())
        peft_here = importlib.util.find_spec("peft") is not None
        assert row["eager_provider"].startswith("peft " if peft_here else "eager DoRA"), row["eager_provider"]
        ratio = dora_bench.dora_vs_lora(row)
        assert ratio == row["results"]["peftkern"]["median_ms"] / row["results"]["peftkern_lora"]["median_ms"]
        assert f"dora {row['label']}: peftkern DoRA / peftkern LoRA = {ratio:.2f}x" in out.stdout
    assert f"dora: eager = {results['rows'][0]['eager_provider']}; floor = bare F.linear" in out.stdout


def test_bench_quick_multi_lora_times_peft_mixed_batch_peftkern_one_adapter_and_the_floor(tmp_path):
    """--op multi_lora for real (--quick): a prefill and a decode row, each timing PEFT's mixed-batch forward,
    multi_lora_linear, lora_linear with one adapter and the floor, with the verdicts against its targets printed
    under the table."""
    out = run_cli("bench", "--op", "multi_lora", "--quick", "--json", "m.json", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "m.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = runner.cases_for("multi_lora", device, quick=True)
    assert [row["label"] for row in results["rows"]] == [c.label for c in cases]
    assert [row["case"]["kind"] for row in results["rows"]] == ["prefill", "decode"]
    for row in results["rows"]:
        assert row["op"] == "multi_lora" and row["family"] == "multi_lora_linear"
        assert set(row["results"]) == {"eager", "peftkern", "peftkern_single", "floor"}
        assert all(r["median_ms"] > 0 for r in row["results"].values())
        peft_here = importlib.util.find_spec("peft") is not None
        assert row["eager_provider"].startswith("peft " if peft_here else "eager mixed batch"), row["eager_provider"]
        assert f"multi_lora {row['label']}: speedup vs PEFT" in out.stdout
    assert "forward (eval) median ms" in out.stdout


def test_multi_lora_notes_judge_the_targets():
    def row(kind, ms):
        return {"op": "multi_lora", "family": "multi_lora_linear", "label": f"{kind} case", "case": {"kind": kind},
                "results": {k: {"median_ms": v, "peak_mem_mb": None} for k, v in ms.items()}}

    results = {"device_type": "cpu",
               "rows": [row("prefill", {"eager": 55.0, "peftkern": 50.0, "peftkern_single": 49.0, "floor": 46.0}),
                        row("decode", {"eager": 3.0, "peftkern": 1.6, "peftkern_single": 1.2, "floor": 0.9})]}
    assert report.notes(results) == [
        "multi_lora prefill case: speedup vs PEFT 1.10x (meets >= 1.00x); vs floor 1.09x (meets <= 1.10x); "
        "vs one adapter 1.02x",
        "multi_lora decode case: speedup vs PEFT 1.88x (misses >= 2.00x); vs one adapter 1.33x"]


def test_multi_lora_eager_fallback_equals_pefts_mixed_batch_forward():
    """Without peft, --op multi_lora times _EagerMixedBatch: PEFT's own mixed-batch loop, the same result."""
    peft = pytest.importorskip("peft", reason="the comparison with PEFT's layer needs peft (in the test extras)")
    from peft.tuners.lora.layer import Linear as PeftLinear

    from peftkern.multi_lora.bench import _EagerMixedBatch

    torch.manual_seed(5)
    base = torch.nn.Linear(24, 20)
    theirs = PeftLinear(base, "a0", config=peft.LoraConfig(r=3, lora_alpha=6), r=3, lora_alpha=6)
    theirs.update_layer("a1", r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                        config=peft.LoraConfig(r=3, lora_alpha=6))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    lora_a = [theirs.lora_A[n].weight for n in ("a0", "a1")]
    lora_b = [theirs.lora_B[n].weight for n in ("a0", "a1")]
    ours = _EagerMixedBatch(base, lora_a, lora_b, [2.0, 2.0])
    x = torch.randn(4, 5, 24)
    names = ["a1", "__base__", "a0", "a1"]
    with torch.no_grad():
        assert torch.allclose(ours(x, adapter_names=names), theirs(x, adapter_names=names), rtol=1e-6, atol=1e-6)


def test_dora_rows_keep_the_table_columns_and_add_a_lora_ratio_note():
    """A dora row has the table line every op has (eager, peftkern, floor), and a note under the table with its
    ratio to peftkern's LoRA, judged against the 1.10x target; rows of other ops get no such note."""
    def row(op, ms):
        return {"op": op, "family": op, "label": f"{op} case", "backend": "reference", "eager_provider": "x",
                "results": {k: {"median_ms": v, "peak_mem_mb": 7.0} for k, v in ms.items()}}

    results = {"rows": [row("lora", {"eager": 3.0, "peftkern": 2.0, "floor": 1.0}),
                        row("dora", {"eager": 4.0, "peftkern": 2.1, "peftkern_lora": 2.0, "floor": 1.0}),
                        row("dora", {"eager": 4.0, "peftkern": 2.4, "peftkern_lora": 2.0, "floor": 1.0})]}
    lines = report.table_rows(results)
    assert [len(line) for line in lines] == [len(report.COLUMNS)] * 3
    assert lines[1] == ("dora", "dora case", "reference", "4.000", "2.100", "1.000", "1.90x", "+110.0%", "7/7/7")
    assert report.notes(results) == [
        "dora dora case: peftkern DoRA / peftkern LoRA = 1.05x (2.100 / 2.000 ms, peak 7 MB; within the 1.10x target)",
        "dora dora case: peftkern DoRA / peftkern LoRA = 1.20x (2.400 / 2.000 ms, peak 7 MB; above the 1.10x target)"]
    panels = dict(report.plot_panels(results))
    assert dict(panels["dora"][0][1])["peftkern LoRA time / peftkern DoRA time"] == pytest.approx(2.0 / 2.1)
    assert "peftkern LoRA time / peftkern DoRA time" not in dict(panels["lora"][0][1])


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_eager_fallback_is_pefts_dora_layer(p, bias, monkeypatch):
    """Without peft, --op dora times _EagerDora: the same outputs and gradients as PEFT's own DoRA Linear (same
    weights, same dropout mask through the same RNG draws), so the baseline does not change with what is installed."""
    peft = pytest.importorskip("peft", reason="the comparison with PEFT's DoRA layer needs peft (in the test extras)")
    from peft.tuners.lora.layer import Linear as PeftLinear

    from peftkern.dora import bench as dora_bench
    from peftkern.dora.bench import DoraCase, _EagerDora, dora_providers

    torch.manual_seed(3)
    k, n, r, alpha = 33, 20, 3, 6
    base = torch.nn.Linear(k, n, bias=bias)
    base.requires_grad_(False)
    theirs = PeftLinear(base, "default", config=peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=True),
                        r=r, lora_alpha=alpha)
    ours = _EagerDora(base, r, alpha, p)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        theirs.lora_magnitude_vector["default"].weight.mul_(torch.rand(n) + 0.5)
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)
        ours.magnitude.copy_(theirs.lora_magnitude_vector["default"].weight)
    theirs.train()
    ours.train()
    x, dy = torch.randn(2, 7, k), torch.randn(2, 7, n)
    got = []
    for layer, params in ((theirs, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight,
                                    theirs.lora_magnitude_vector["default"].weight]),
                          (ours, [ours.lora_A.weight, ours.lora_B.weight, ours.magnitude])):
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = layer(xi)
        y.backward(dy)
        got.append([y.detach(), xi.grad] + [t.grad for t in params])
    for name, a, b in zip(["y", "x", "lora_A", "lora_B", "magnitude"], *got):
        torch.testing.assert_close(b, a, msg=name)
    monkeypatch.setattr(dora_bench, "peft_available", lambda: False)  # the provider set then uses the fallback
    steps, eager_name = dora_providers(DoraCase(16, k, n, r, torch.float32, p, bias), torch.device("cpu"))
    assert eager_name == "eager DoRA (peft not installed)" and set(steps) == {"eager", "peftkern", "peftkern_lora",
                                                                             "floor"}
    for step in steps.values():
        step()


def test_finetune_help_states_the_model_size_it_builds():
    from peftkern.bench import e2e

    out = subprocess.run([sys.executable, str(ROOT / "examples/finetune.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for size in e2e.SIZES:
        assert e2e.size_summary(size) in text
    assert "10M" not in text  # the old, wrong figure
    transformers = pytest.importorskip("transformers", reason="the size check builds the model on meta")
    peft = pytest.importorskip("peft", reason="the LoRA size check builds the PEFT model on meta")
    for size in e2e.SIZES:  # the counts in --help are those of the model train() really builds
        cfg = transformers.LlamaConfig(max_position_embeddings=64, **e2e.SIZES[size])
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
            base = sum(p.numel() for p in model.parameters())
            model = peft.get_peft_model(model, peft.LoraConfig(r=e2e.LORA_R, target_modules=e2e.TARGETS))
            total = sum(p.numel() for p in model.parameters())
        assert e2e.parameter_counts(size) == {"base": base, "lora": total - base}


# ---- --json / --plot destinations: checked (missing folders made) before anything is timed ----

def _canned_results(op: str = "sparse") -> dict:
    """Results as runner.run returns them (the committed CPU run's rows of one op), to stand in for the timing."""
    results = json.loads((ROOT / "benchmarks/results/cpu-2core.json").read_text())
    results["rows"] = [row for row in results["rows"] if row["op"] == op]
    results.pop("e2e", None)
    assert results["rows"]
    return results


def test_bench_creates_missing_folders_for_json_and_plot_before_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    canned = _canned_results()
    seen = {}

    def fake_run(ops, **kwargs):  # the folders exist by the time timing would start
        seen["ops"] = ops
        seen["folders"] = [(tmp_path / "out/a").is_dir(), (tmp_path / "figs/b/c").is_dir()]
        return json.loads(json.dumps(canned))

    monkeypatch.setattr(runner, "run", fake_run)
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    assert main(["bench", "--op", "sparse", "--quick", "--json", "out/a/r.json", "--plot", "figs/b/c/r.png"]) == 0
    out = capsys.readouterr().out
    assert seen == {"ops": ["sparse"], "folders": [True, True]}
    written = json.loads((tmp_path / "out/a/r.json").read_text())
    assert written["rows"] == canned["rows"] and written["wall_s"] >= 0
    assert "wrote out/a/r.json" in out
    if have_mpl:
        assert (tmp_path / "figs/b/c/r.png").stat().st_size > 1000 and "wrote figs/b/c/r.png" in out
    else:
        assert out.index("no chart will be written") < out.index("bench took")  # said before the run


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["under a file", "a folder", "a folder, trailing slash", "deep under a file"])
def test_bench_unwritable_destination_fails_before_timing(flag, where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "results").mkdir()
    path = {"under a file": "notes.txt/r.out", "a folder": "results", "a folder, trailing slash": "new/",
            "deep under a file": "notes.txt/x/y/r.out"}[where]

    def fake_run(ops, **kwargs):
        raise AssertionError("the bench started timing before checking its output path")

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["bench", "--op", "sparse", "--quick", flag, path]) == 2
    captured = capsys.readouterr()
    assert f"error: {flag} {path}:" in captured.err and "nothing was timed" in captured.err
    assert "bench took" not in captured.out
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results"]  # no folder left behind
    assert list((tmp_path / "results").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: the check cannot fail")
def test_bench_read_only_folder_fails_before_timing(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        monkeypatch.setattr(runner, "run", lambda ops, **kw: pytest.fail("timed before checking the path"))
        assert main(["bench", "--op", "sparse", "--quick", "--json", str(locked / "sub/r.json")]) == 2
        assert "cannot write there" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_bench_existing_json_is_kept_until_the_results_replace_it(tmp_path, monkeypatch):
    """The up-front check opens an existing file for appending: its contents stay while the bench runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text('{"old": true}')
    canned = _canned_results()

    def fake_run(ops, **kwargs):
        assert (tmp_path / "r.json").read_text() == '{"old": true}'
        return json.loads(json.dumps(canned))

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["bench", "--op", "sparse", "--quick", "--json", "r.json"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == canned["rows"]


def test_bench_dry_run_checks_destinations_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--op", "sparse", "--quick", "--dry-run", "--json", "new/deep/r.json"]) == 0
    out = capsys.readouterr().out
    assert f"--json: would create {tmp_path / 'new/deep'} and write {tmp_path / 'new/deep/r.json'}" in out
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("")
    assert main(["bench", "--op", "sparse", "--quick", "--dry-run", "--plot", "f/r.png"]) == 2
    assert "--plot f/r.png: " in capsys.readouterr().err


def test_bench_results_survive_a_destination_that_fails_at_the_end(tmp_path, monkeypatch, capsys):
    """The folder is replaced by a file while the bench runs: the write fails, the results go to a temp file
    named on stderr, exit status 1."""
    monkeypatch.chdir(tmp_path)
    canned = _canned_results()

    def fake_run(ops, **kwargs):
        (tmp_path / "out").rmdir()
        (tmp_path / "out").write_text("")
        return json.loads(json.dumps(canned))

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["bench", "--op", "sparse", "--quick", "--json", "out/r.json"]) == 1
    err = capsys.readouterr().err
    kept = re.search(r"the results are in (\S+\.json)", err)
    assert "could not write out/r.json" in err and kept
    assert json.loads(pathlib.Path(kept.group(1)).read_text())["rows"] == canned["rows"]
    os.remove(kept.group(1))


def test_bench_cli_bad_destination_exits_at_once(tmp_path):
    """As a user runs it: `bench --op all` (minutes of timing) with a --json under a file stops in the time it
    takes to start Python, with the reason, and times nothing."""
    (tmp_path / "notes.txt").write_text("")
    started = time.monotonic()
    out = run_cli("bench", "--op", "all", "--json", "notes.txt/r.json", tmp_path=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--json notes.txt/r.json: " in out.stderr and "nothing was timed" in out.stderr
    assert "%|" not in out.stderr and out.stdout == ""  # no progress bar, no table
    assert time.monotonic() - started < 60


def test_bench_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    """A run stopped part-way (a GPU visit's timeout) keeps every case it finished, marked incomplete."""
    monkeypatch.chdir(tmp_path)
    canned = _canned_results()
    assert len(canned["rows"]) > 1

    def fake_run(ops, **kwargs):
        for i in range(1, len(canned["rows"]) + 1):
            kwargs["on_row"]({**canned, "complete": False, "rows": canned["rows"][:i]})
            on_disk = json.loads((tmp_path / "r.json").read_text())
            assert on_disk["complete"] is False and on_disk["rows"] == canned["rows"][:i]
        return {**json.loads(json.dumps(canned)), "complete": True}

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["bench", "--op", "sparse", "--quick", "--json", "r.json"]) == 0
    final = json.loads((tmp_path / "r.json").read_text())
    assert final["complete"] is True and final["rows"] == canned["rows"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left from the atomic writes


def test_runner_reports_each_case_as_it_finishes(monkeypatch):
    import dataclasses

    import torch

    from peftkern.bench import registry
    from peftkern.lora.bench import LoraCase

    def cases(device, quick):
        return [LoraCase(m, 8, 8, 2, torch.float32, 0.0) for m in (3, 5, 7)]

    monkeypatch.setitem(registry.TABLE, "lora", dataclasses.replace(
        registry.TABLE["lora"], cases=cases, providers=lambda case, device: ({"peftkern": None}, "eager")))
    monkeypatch.setattr(runner, "measure_group",
                        lambda steps, device, quick: {"peftkern": {"median_ms": 1.0, "peak_mem_mb": None}})
    seen = []
    results = runner.run(["lora"], quick=True, device=torch.device("cpu"),
                         on_row=lambda partial: seen.append((partial["complete"],
                                                             [r["case"]["m"] for r in partial["rows"]])))
    assert seen == [(False, [3]), (False, [3, 5]), (False, [3, 5, 7])]
    assert results["complete"] is True and [r["case"]["m"] for r in results["rows"]] == [3, 5, 7]


def test_bench_output_and_help_name_no_internal_issue():
    """What users read (every public name's docstring, the CLI's help and info, the notes under the tables, the
    bench's sources that --help and the docs draw on) speaks of targets and behaviour, not of the project's
    internal issue numbers or documents."""
    import pkgutil

    import peftkern.bench
    from tests.test_public_docs import INTERNAL, cli_outputs_in_process, public_docstrings

    texts = {**public_docstrings(), **cli_outputs_in_process()}
    from peftkern.bench import registry

    names = [m.name for m in pkgutil.walk_packages(peftkern.bench.__path__, "peftkern.bench.")]
    names += sorted({op.providers.__module__ for op in registry.TABLE.values()})  # each family's bench.py
    for name in names:
        source = pathlib.Path(importlib.util.find_spec(name).origin)
        texts[name] = source.read_text(encoding="utf-8")
    assert {"peftkern.bench.report", "peftkern.bench.runner", "peftkern.lora.bench"} <= set(texts)
    canned = _canned_results()
    texts["notes"] = "\n".join(report.legends(canned) + report.notes(canned))
    found = {name: INTERNAL.findall(text) for name, text in texts.items() if INTERNAL.search(text)}
    assert not found, found
