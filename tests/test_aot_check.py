"""scripts/aot_check.py's own logic: ptxas log parsing, verdicts and exit status, the table and summary,
integer-specialization classes, the driver's covering set, coverage of recorded launches, and one dry run
(record + plan, nothing compiled) of the real kernels."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("aot_check", ROOT / "scripts" / "aot_check.py")
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)

# the shape of a real `ptxas -v` log (Triton 3.9's ptxas, sm_90), with a device function listed first
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    1600 bytes stack frame, 1620 bytes spill stores, 1596 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1600 bytes cumulative stack size, 392 bytes cmem[0]
"""
CLEAN_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_80'
ptxas info    : Function properties for _k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 392 bytes cmem[0]
"""


def row(**kw):
    base = dict(kernel="_k", arch=90, group="g", autotuned=False, error=None, smem=1024, spill_st=0, spill_ld=0,
                regs=96, config="M64 w4 s3", config_index=None, spec="fp16,fp32")
    base.update(kw)
    return base


def test_parse_ptxas_log_reads_the_entry_function_not_a_device_function():
    assert aot.parse_ptxas_log(PTXAS_LOG, "_k") == {"regs": 255, "stack": 1600, "spill_st": 1620, "spill_ld": 1596}
    assert aot.parse_ptxas_log(CLEAN_LOG, "_k") == {"regs": 96, "stack": 0, "spill_st": 0, "spill_ld": 0}
    assert aot.parse_ptxas_log(CLEAN_LOG, "_other") is None
    assert aot.parse_ptxas_log("", "_k") is None


def test_exit_status_from_ptxas_logs():
    spilling, clean = aot.parse_ptxas_log(PTXAS_LOG, "_k"), aot.parse_ptxas_log(CLEAN_LOG, "_k")
    assert aot.exit_status(aot.judge([row(**clean), row(**clean, arch=80)]), []) == 0
    rows = aot.judge([row(**clean, arch=80), row(**spilling)])
    assert [r["verdict"] for r in rows] == ["ok", "SPILL"] and aot.exit_status(rows, []) == 1
    assert aot.exit_status(aot.judge([row(**clean, arch=80), row(**spilling)], allow_spills=True), []) == 0


def test_int_class_is_tritons_specialization():
    assert aot.int_class(1) == (True, False, "i32")
    assert aot.int_class(32) == aot.int_class(4096) == (False, True, "i32")
    assert aot.int_class(250) == aot.int_class(7) == (False, False, "i32")
    assert aot.int_class(2**31) == (False, True, "i64")
    assert aot.int_class(2**63 + 16) == (False, True, "u64")
    assert aot.int_class(-16) == (False, True, "i32")


def test_judge_clean_row_passes():
    rows = aot.judge([row()])
    assert (rows[0]["verdict"], rows[0]["failure"]) == ("ok", None)
    assert aot.exit_status(rows, []) == 0


def test_judge_spill_fails_unless_allowed():
    spilled = row(spill_st=64, spill_ld=60)
    assert aot.judge([dict(spilled)])[0]["failure"] == "spill"
    assert aot.exit_status(aot.judge([dict(spilled)]), []) == 1
    allowed = aot.judge([dict(spilled)], allow_spills=True)
    assert (allowed[0]["verdict"], allowed[0]["failure"]) == ("SPILL", None)
    assert aot.exit_status(allowed, []) == 0
    # a spill is a spill whichever direction ptxas reports
    assert aot.judge([row(spill_st=0, spill_ld=4)])[0]["failure"] == "spill"


def test_judge_compile_error_fails_even_with_spills_allowed():
    rows = aot.judge([row(error="PTXASError: ptxas failed", regs=None, smem=None, spill_st=None, spill_ld=None)],
                     allow_spills=True)
    assert (rows[0]["verdict"], rows[0]["failure"]) == ("COMPILE ERROR", "compile")
    assert aot.exit_status(rows, []) == 1


@pytest.mark.parametrize("arch,limit", [(80, 166912), (90, 232448)])
def test_judge_shared_memory_limit_per_arch(arch, limit):
    assert aot.judge([row(arch=arch, smem=limit)])[0]["verdict"] == "ok"
    over = aot.judge([row(arch=arch, smem=limit + 1)], allow_spills=True)[0]
    assert (over["verdict"], over["failure"]) == ("SMEM>LIMIT", "smem")  # launcher-fixed: the launch would fail


def test_judge_autotune_config_over_the_limit_is_skipped_when_another_fits():
    big = row(autotuned=True, smem=200_000, arch=80, spill_st=8, spill_ld=8, config="M256 w8 s3")
    small = row(autotuned=True, smem=90_000, arch=80, config="M64 w4 s4")
    rows = aot.judge([big, small])
    assert [(r["verdict"], r["failure"]) for r in rows] == [("skipped by autotuner", None), ("ok", None)]
    assert aot.exit_status(rows, []) == 0
    # the same config on sm_90 fits, so there its spill counts
    assert aot.judge([dict(big, arch=90)])[0]["failure"] == "spill"


def test_judge_autotuned_specialization_with_no_config_that_fits_fails():
    rows = aot.judge([row(autotuned=True, smem=200_000, arch=80, config="a"),
                      row(autotuned=True, smem=180_000, arch=80, config="b"),
                      row(autotuned=True, smem=90_000, arch=80, config="c", group="another specialization")])
    assert [r["failure"] for r in rows] == ["smem", "smem", None]
    # a config that failed to compile does not count as one that fits
    rows = aot.judge([row(autotuned=True, smem=200_000, arch=80), row(autotuned=True, arch=80, error="boom")])
    assert [r["failure"] for r in rows] == ["smem", "compile"]


def test_exit_status_fails_on_recording_or_coverage_problems():
    assert aot.exit_status(aot.judge([row()]), ["coverage: _k is never launched"]) == 1


def test_table_and_summary():
    rows = aot.judge([row(kernel="_b", spill_st=32, spill_ld=32, regs=255, smem=98304, arch=80),
                      row(kernel="_a", smem=200_000, autotuned=True, arch=80, config="big"),
                      row(kernel="_a", smem=1000, autotuned=True, arch=80, config="small"),
                      row(kernel="_a", error="boom", arch=90, regs=None, smem=None, spill_st=None, spill_ld=None)])
    table = aot.format_table(rows).splitlines()
    assert table[0].split() == ["kernel", "config", "arch", "regs", "spill", "st/ld", "smem", "verdict",
                                "specialization"]
    body = table[2:]
    assert len(body) == 4 and [line.split()[0] for line in body] == ["_a", "_a", "_a", "_b"]
    assert "32/32" in body[3] and "96.0K" in body[3] and "SPILL" in body[3] and "sm_80" in body[3]
    assert "skipped by autotuner" in " ".join(body) and "COMPILE ERROR" in " ".join(body)
    line = aot.summary_line(rows, [], [80, 90], 12.3, allow_spills=False)
    assert line.startswith("aot_check: 2 kernels, 4 configs (sm_80, sm_90), 2 failures (1 compile errors, 1 spills, "
                           "0 over shared memory); 1 skipped by autotuner;")
    assert "\n" not in line
    allowed = aot.judge([dict(r) for r in rows], allow_spills=True)
    line = aot.summary_line(allowed, ["coverage: x"], [80], 1, allow_spills=True)
    assert "2 failures (1 compile errors, 0 spills, 0 over shared memory, 1 recording/coverage problems)" in line
    assert "1 spilling configs allowed (--allow-spills)" in line


def test_spill_report_groups_by_kernel_and_config():
    rows = aot.judge([row(kernel="_g", config="M128 w8 s3", spec="fp16 A", spill_st=100, spill_ld=90, regs=255),
                      row(kernel="_g", config="M128 w8 s3", spec="bf16 A", spill_st=400, spill_ld=380, regs=255),
                      row(kernel="_g", config="M64 w4 s4", spec="fp16 A"),
                      row(kernel="_h", config="M64 w4 s3", spec="fp32", spill_st=8, spill_ld=8, regs=255, arch=80)])
    report = aot.spill_report(rows)
    assert report.splitlines() == [
        "spills by kernel (3 rows; registers, spill store/load bytes):",
        "  _g: 2",
        "    M128 w8 s3 sm_90: 2 specializations, up to 255 regs 400/380 B (worst: bf16 A)",
        "  _h: 1",
        "    M64 w4 s3 sm_80: 1 specializations, up to 255 regs 8/8 B (worst: fp32)",
    ]
    assert aot.spill_report(aot.judge([row()])) == ""


def test_config_label():
    assert aot.config_label({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, {"num_warps": 8, "num_stages": 3}) == \
        "M128 N256 GROUP_M=8 w8 s3"
    assert aot.config_label({}, {"num_warps": 4, "num_stages": 2, "num_ctas": 2, "maxnreg": 128}) == "w4 s2 c2 r128"


def test_autotuner_configs_follow_its_early_config_prune():
    class Config:
        def __init__(self, block):
            self.kwargs = {"BLOCK_M": block}

    class Tuner:
        configs = [Config(32), Config(64), Config(128)]
        early_config_prune = None

    record = {"args": [{"k": "int", "name": "M", "v": 64}, {"k": "constexpr", "name": "HAS_BIAS", "v": True},
                       {"k": "constexpr", "name": "BLOCK_M", "v": 16}]}
    assert aot._tuner_configs(Tuner, record) == (Tuner.configs, "")  # no prune function: every config

    def prune(configs, named_args, **kwargs):
        assert kwargs == {"HAS_BIAS": True} and "BLOCK_M" not in named_args
        return [c for c in configs if c.kwargs["BLOCK_M"] <= named_args["M"]]

    Tuner.early_config_prune = staticmethod(prune)
    kept, note = aot._tuner_configs(Tuner, record)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32, 64] and note == ""

    def broken(configs, named_args, **kwargs):
        return named_args["missing"]

    Tuner.early_config_prune = staticmethod(broken)  # cannot be evaluated: never compile fewer configs
    kept, note = aot._tuner_configs(Tuner, record)
    assert kept == Tuner.configs and "early_config_prune not evaluated (KeyError)" in note


def test_arch_and_jobs_arguments():
    assert aot._parse_archs("90,80,sm_90") == [80, 90]
    with pytest.raises(Exception, match="--arch"):
        aot._parse_archs("hopper")
    with pytest.raises(Exception, match="no shared-memory limit"):
        aot._parse_archs("75")
    with pytest.raises(SystemExit):
        aot.main(["--jobs", "0"])


def _family_folders() -> list[str]:
    return sorted(p.name for p in (ROOT / "peftkern").iterdir() if (p / "op.py").is_file())


def _setting(c):
    return c["act_dtype"], c["param_dtype"], c["tf32"]


def test_every_family_declares_its_aot_calls_and_the_driver_drives_every_family():
    """Each folder of peftkern with an op.py is a family whose examples module declares the check's calls; the
    driver finds them (in folder order) and drives every family in every setting, default and full. scripts/
    names no family: a new family needs no edit there."""
    import importlib

    import peftkern  # noqa: F401

    folders = _family_folders()
    assert len(folders) >= 5 and [name for name, _ in aot.families()] == folders
    for name in folders:
        examples = importlib.import_module(f"peftkern.{name}.examples")
        assert callable(getattr(examples, "aot_calls", None)) and callable(getattr(examples, "run_aot_call", None)), \
            f"peftkern/{name}/examples.py declares no aot_calls / run_aot_call"
    for full in (False, True):
        calls = aot.driver_calls(full=full)
        for s in aot.SETTINGS:
            order = [c["family"] for c in calls if _setting(c) == s]
            assert set(order) == set(folders) and order == sorted(order, key=folders.index), (full, s)
        assert calls == aot.driver_calls(full=full)  # deterministic
    for path in [ROOT / "scripts" / "aot_check.py", *sorted((ROOT / "scripts" / "aot").glob("*.py"))]:
        source = path.read_text(encoding="utf-8")
        named = [f for f in folders if f'"{f}"' in source or f"'{f}'" in source]
        assert not named, f"{path.relative_to(ROOT)} names op families {named}"


def test_driver_covering_set_reaches_every_setting_flag_activation_and_width():
    from peftkern.core import rules

    calls = aot.driver_calls()
    assert {_setting(c) for c in calls} == set(aot.SETTINGS)
    assert {"bfloat16", "float16", "float32"} == {c["act_dtype"] for c in calls}
    assert {("bfloat16", "float32"), ("bfloat16", "bfloat16")} <= {(c["act_dtype"], c["param_dtype"]) for c in calls}

    def is_lora(c, four_bit):
        return c["family"] == "lora" and ("wq" in c) == four_bit

    for s in aot.SETTINGS:  # every family in every setting, each in its worst case
        mine = [c for c in calls if _setting(c) == s]
        assert any(c["family"] == "dora" and c["bias"] and c["p"] > 0 and c["r"] == 64 for c in mine), s
        # many adapters: ranks that differ (64 the largest, one off 16) with bias and dropout, and a decode shape
        assert any(c["family"] == "multi_lora" and c["bias"] and c["p"] > 0 and max(c["ranks"]) == 64
                   and any(r % 16 for r in c["ranks"]) for c in mine), s
        assert any(c["family"] == "multi_lora" and c["M"] <= 16 * len(c["ranks"]) for c in mine), s
        assert any(is_lora(c, True) and c["bias"] and c["p"] > 0 for c in mine), s
        assert any(is_lora(c, False) and c["bias"] and c["p"] > 0 and c["r"] == 64 for c in mine), s
        assert any(c["family"] == "adapter" and c["act"] == "gelu" and c["k"] == 64 for c in mine), s
        assert any(c["family"] == "sparse_diff" and c["bias"] and c["M"] % 16 == 0 for c in mine), s
    adapters = [c for c in calls if c["family"] == "adapter"]
    # every activation the kernels tell apart (an alias shares its code)
    assert {rules.ACTIVATION_CODES[c["act"]] for c in adapters} == set(rules.ACTIVATION_CODES.values())
    assert {c["k"] for c in adapters} == {16, 24, 32, 64, 128, 256}  # every BLOCK_K, 16..256, and k off %16
    for flag, default in (("biases", True), ("residual", False), ("need_h", True), ("need_wu", True)):
        assert {c.get(flag, default) for c in adapters} == {True, False}, flag
    lora = [c for c in calls if is_lora(c, False)]
    assert {c["p"] > 0 for c in lora} == {c["bias"] for c in lora} == {True, False}
    assert {c["r"] for c in lora} == {8, 32, 64}  # rank tiles 16, 32, 64
    assert {c["M"] % 16 == 0 for c in calls if c["family"] != "adapter"} == {True, False}
    assert {c["M"] % 16 == 0 for c in calls if c["family"] == "sparse_diff"} == {True, False}
    qlora = [c for c in calls if is_lora(c, True)]
    assert {c["p"] > 0 for c in qlora} == {c["bias"] for c in qlora} == {True, False}
    assert {c["wq"] for c in qlora} == {"bfloat16", "float16", "float32"}
    assert {c.get("dq", True) for c in qlora} == {True, False}  # absmax double-quantized (resolved on chip) or not
    dora = [c for c in calls if c["family"] == "dora"]
    assert {c["p"] > 0 for c in dora} == {c["bias"] for c in dora} == {True, False}
    assert {c.get("train_magnitude", True) for c in dora} == {True, False}  # z written, or not
    full = aot.driver_calls(full=True)
    assert len(full) > 3 * len(calls) and {_setting(c) for c in full} == set(aot.SETTINGS)


def test_coverage_flags_unlaunched_kernels_and_one_sided_flags():
    entries = {("m", "_a"): None, ("m", "_b"): None, ("m", "_c"): None}

    def rec(name, **consts):
        return {"module": "m", "name": name, "args": [{"k": "constexpr", "name": k, "v": v} for k, v in consts.items()]
                + [{"k": "int", "name": "M", "v": 5}]}

    records = [rec("_a", HAS_BIAS=True, BLOCK_M=64), rec("_a", HAS_BIAS=False, BLOCK_M=64),
               rec("_b", HAS_DROPOUT=True, PRECISION="tf32")]
    problems, info = aot.coverage(records, entries)
    assert len(problems) == 2
    assert "_b.HAS_DROPOUT is only launched with [True]" in problems[0]
    assert "m._c is never launched by the driver" in problems[1]
    assert any("_a: 2 launch signatures; BLOCK_M={64} HAS_BIAS={False,True}" in line for line in info)


def test_dry_run_records_every_kernel_and_plans_without_problems(tmp_path):
    """Record + discover + coverage + plan on the real kernels (no compile): every kernel declared in
    peftkern.kernels.registry is launched by the driver with GPU tiles, every flag both ways, and Triton binds every
    launch. (The compile itself runs in .ci/run: python scripts/aot_check.py.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_check.py"), "--dry-run", "--arch", "90",
                          "--json", str(tmp_path / "unused.json")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("aot_check --dry-run:") and ", 0 problems;" in last
    # the launchers were sized for the GPU through the one launch configuration, at both program targets
    for programs in aot.GRID_TARGETS:
        assert f"LaunchConfig(interpret=False, programs={programs}, num_sms=132, arch=90)" in out.stderr
    counts = dict(line.split(": ") for line in out.stdout.splitlines() if line.startswith("_"))
    assert counts and all(int(n) > 0 for n in counts.values())
    assert not (tmp_path / "unused.json").exists()  # --dry-run compiles nothing and writes nothing


def test_registry_declares_every_kernel_and_no_kernel_module_reads_the_interpreter_flag():
    """What the check compiles is the registry: each declared kernel's module and name, its launched object (the
    autotuner for tuned ones, whose configs the registry can give for the GPU), and nothing a launcher launches
    is missing from it (discover() reports an undeclared kernel and a module that reads INTERPRET itself)."""
    import peftkern  # noqa: F401
    from peftkern.kernels import registry

    kernels = registry.kernels()
    names = {k.name for k in kernels}
    assert {"_lora_gemm_kernel", "_lora_gemm_persistent_kernel", "_qlora_gemm_kernel", "_rank_down_kernel",
            "_dora_fwd_kernel", "_dora_fwd_epilogue_kernel", "_multi_lora_gemm_kernel", "_adapter_fwd_kernel",
            "_spmm_tiles_kernel", "_sddmm_tiles_kernel"} <= names
    for k in kernels:
        assert getattr(__import__(k.module, fromlist=[k.attr]), k.attr) is k.launched
        if k.autotuned:  # the autotuner, whose GPU configs the registry gives whatever this process launches for
            assert k.launched.fn is k.jit and len(k.gpu_configs()) > 1
    assert registry.find(registry.kernels("lora")[0].launched).name == "_lora_gemm_kernel"
    assert [k.min_capability for k in registry.kernels("lora_persistent")] == [(9, 0)]


def test_discover_flags_undeclared_kernels_and_modules_that_read_the_interpreter_flag(tmp_path):
    """A kernel module with a JIT kernel no kernel calls and nobody declared, and a launcher that reads the
    interpreter flag: both are problems; a device function (called by a kernel) is not."""
    from aot import discover as disc

    path = tmp_path / "fake.py"
    path.write_text(textwrap.dedent("""
        import triton
        from peftkern.kernels import INTERPRET

        @triton.jit
        def helper(x):
            return x

        @triton.jit
        def kernel(x_ptr):
            helper(x_ptr)

        BLOCK = 16 if INTERPRET else 64
    """))
    spec = importlib.util.spec_from_file_location("peftkern.kernels.fake", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    problems = disc.undeclared([mod], {}) + disc.mode_readers([mod])
    assert any("peftkern.kernels.fake.kernel is a JIT function no kernel calls and is not declared" in p
               for p in problems), problems
    assert not any(".helper is" in p for p in problems)  # called by a kernel: a device function
    assert any("peftkern.kernels.fake reads INTERPRET" in p for p in problems)
    assert disc.undeclared([mod], {("peftkern.kernels.fake", "kernel"): None}) == []  # declared: no problem


# ---- the result cache: an unchanged compile is not done again ------------------------------------------------

def _task(i, key, kernel="_k"):
    return {"id": i, "cache_key": key, "kernel": kernel, "arch": 90}


def _result(i, **over):
    r = {"id": i, "error": None, "regs": 96, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 4096, "seconds": 1.5,
         "cpu_seconds": 1.2}
    r.update(over)
    return r


def test_result_cache_round_trips_successful_compiles_only(tmp_path):
    tasks = [_task(0, "a"), _task(1, "b"), _task(2, "c")]
    results = {0: _result(0, spill_st=4, spill_ld=4, regs=255), 1: _result(1, error="CompileError: boom",
                                                                           regs=None), 2: _result(2)}
    aot.cache_store(str(tmp_path), "triton 3.6.0; ptxas 12.8", tasks, results)
    found = aot.cache_load(str(tmp_path), "triton 3.6.0; ptxas 12.8", tasks)
    assert sorted(found) == [0, 2]  # a compile error is compiled again next time
    assert found[0]["spill_st"] == 4 and found[0]["regs"] == 255 and found[0]["cached"] is True
    assert found[2]["error"] is None and found[2]["cpu_seconds"] == 0.0
    # another toolchain or another kernel source / specialization misses
    assert aot.cache_load(str(tmp_path), "triton 3.9.0; ptxas 13.0", tasks) == {}
    assert aot.cache_load(str(tmp_path), "triton 3.6.0; ptxas 12.8", [_task(0, "a2")]) == {}


def test_result_cache_ignores_damaged_entries_and_unwritable_folders(tmp_path):
    task = _task(0, "a")
    aot.cache_store(str(tmp_path), "t", [task], {0: _result(0)})
    path = aot.cache_file(str(tmp_path), "t", task)
    pathlib.Path(path).write_text("{not json")
    assert aot.cache_load(str(tmp_path), "t", [task]) == {}
    blocker = tmp_path / "file"
    blocker.write_text("")
    aot.cache_store(str(blocker), "t", [task], {0: _result(0)})  # cannot make a folder under a file: no error


def test_result_cache_default_folder_is_outside_the_clone(monkeypatch, tmp_path):
    monkeypatch.delenv("PEFTKERN_AOT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert aot.default_cache_dir() == str(tmp_path / "peftkern" / "aot")
    monkeypatch.setenv("PEFTKERN_AOT_CACHE", "/somewhere/else")
    assert aot.default_cache_dir() == "/somewhere/else"


def test_cache_key_is_the_same_in_every_venv():
    # libdevice's path names the venv Triton lives in (CI makes a fresh one per run): the key keeps only its name
    key = ("mod", 90, "sig", "consts", "attrs", "opts")
    a = aot.portable_key(key, {"num_warps": 4, "extern_libs": (("libdevice", "/tmp/a/venv/x/libdevice.10.bc"),)})
    b = aot.portable_key(key, {"num_warps": 4, "extern_libs": (("libdevice", "/tmp/b/venv/x/libdevice.10.bc"),)})
    c = aot.portable_key(key, {"num_warps": 8, "extern_libs": (("libdevice", "/tmp/a/venv/x/libdevice.10.bc"),)})
    assert a == b and a != c and a[:5] == key[:5] and "libdevice.10.bc" in a[5] and "/tmp/" not in a[5]
