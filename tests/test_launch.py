"""Launch helpers shared by the kernel families (kernels/_launch.py)."""
import pytest

pytest.importorskip("triton", reason="the kernel package's launch helpers import triton")

from peftkern.kernels import _launch  # noqa: E402


def test_autotune_knob_keeps_the_first_config_the_pruning_leaves(monkeypatch):
    calls = []

    def prune(configs, named_args, **kwargs):
        calls.append((list(configs), named_args, kwargs))
        return [c for c in configs if c % 2 == 1]  # stands in for a dtype/spill pruning

    tuned = _launch.tuning_prune(prune)
    monkeypatch.delenv("PEFTKERN_AUTOTUNE", raising=False)
    assert tuned([1, 2, 3, 5], {"a": 1}, R=16) == [1, 3, 5]
    monkeypatch.setenv("PEFTKERN_AUTOTUNE", "all")
    assert tuned([4, 7, 9], {}) == [7, 9]
    monkeypatch.setenv("PEFTKERN_AUTOTUNE", "first")
    assert tuned([4, 7, 9], {}) == [7]
    assert calls[0] == ([1, 2, 3, 5], {"a": 1}, {"R": 16})  # the pruning sees the arguments unchanged
    monkeypatch.setenv("PEFTKERN_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="PEFTKERN_AUTOTUNE must be 'all'.*'first'"):
        tuned([1], {})


def test_every_autotuned_kernel_honours_the_knob():
    # every triton.autotune of the package goes through tuning_prune, so a smoke run never tunes a full list
    import inspect

    from triton.runtime.autotuner import Autotuner

    from peftkern import kernels
    from peftkern.kernels import registry

    tuners = [(mod.__name__, name) for mod in vars(kernels).values() if inspect.ismodule(mod)
              and mod.__name__.startswith("peftkern.kernels.") for name, obj in vars(mod).items()
              if isinstance(obj, Autotuner)]
    if not tuners:
        pytest.skip("the interpreter builds no autotuners here (Triton's interpreter replaces autotune)")
    # every autotuner is a declared kernel of the registry (what the AOT check compiles)
    assert sorted(tuners) == sorted((k.module, k.attr) for k in registry.kernels() if k.autotuned)
    for module, name in tuners:
        tuner = getattr(__import__(module, fromlist=[name]), name)
        assert getattr(tuner.early_config_prune, "__wrapped__", None) is not None, f"{module}.{name}"


def test_runtime_loop_bounds_run_in_the_interpreter_with_the_installed_numpy():
    # numpy >= 2.4 refuses int() of a one-element array, which Triton <= 3.6's interpreter does for every range()
    # over a runtime value (triton-lang/triton#9171); kernels/_mode.py works around it while our kernels run
    import torch

    from peftkern.kernels import INTERPRET, rank

    if not INTERPRET:
        pytest.skip("kernels compile for a GPU here: the interpreter's numpy handling does not apply")
    x, p = torch.randn(5, 200), torch.randn(3, 200)  # K = 200: the rank-down kernel loops over K at run time
    torch.testing.assert_close(rank.rank_down(x, p, scale=1.0), x @ p.t(), rtol=1e-5, atol=1e-5)


def test_the_numpy_workaround_is_undone_outside_our_kernels():
    from peftkern.kernels import INTERPRET, _mode, interpreter_scope

    if not INTERPRET:
        pytest.skip("kernels compile for a GPU here: the interpreter is not used")
    import triton.runtime.interpreter as interpreter

    before = interpreter._patch_lang_tensor
    with interpreter_scope():
        inside = interpreter._patch_lang_tensor
        with interpreter_scope():  # nested scopes (a launch inside a decorated region) restore in order
            pass
        assert interpreter._patch_lang_tensor is inside
    assert interpreter._patch_lang_tensor is before  # other libraries' interpreted kernels see Triton unchanged
    assert (inside is not before) == _mode._NUMPY_REFUSES_ARRAY_TO_INT


# ---- the launch configuration: the one place launchers ask what they launch for -------------------------------

def test_launch_config_defaults_to_the_mode_and_overrides_restore():
    from peftkern.kernels import INTERPRET

    base = _launch.config()
    assert base == _launch.LaunchConfig() and base.interpret == INTERPRET and _launch.interpreting() == INTERPRET
    with _launch.launch_config(interpret=not INTERPRET, programs=528, num_sms=132, arch=90) as inside:
        assert _launch.config() is inside and _launch.interpreting() is (not INTERPRET)
        cpu = __import__("torch").device("cpu")
        assert _launch.target_programs(cpu) == 528 and _launch.num_sms(cpu) == 132
        assert _launch.capability(cpu) == (9, 0)
        with _launch.launch_config(programs=4):  # nested: only what it names changes
            assert _launch.target_programs(cpu) == 4 and _launch.num_sms(cpu) == 132
        assert _launch.target_programs(cpu) == 528
    assert _launch.config() is base
    with pytest.raises(ValueError):
        with _launch.launch_config(programs=8):
            raise ValueError("restored on the way out")
    assert _launch.config() is base
    assert _launch.target_programs(__import__("torch").device("cpu")) == 4  # CPU tensors: few programs


def test_split_reduction_covers_every_element_in_whole_blocks():
    import torch

    cpu = torch.device("cpu")
    with _launch.launch_config(programs=64):
        parts, per_part = _launch.split_reduction(1000, 32, 4, cpu)  # 32 blocks, 16 parts wanted
        assert per_part % 32 == 0 and (parts - 1) * per_part < 1000 <= parts * per_part and parts == 16
        assert _launch.split_reduction(1000, 32, 64, cpu) == (1, 1024)  # the tiles fill the device already
        assert _launch.split_reduction(40, 32, 1, cpu) == (2, 32)  # never more parts than blocks


def test_launchers_follow_the_launch_configuration(monkeypatch):
    """A launcher's tiles and split counts come from the launch configuration, not from a module flag: the
    interpreter's small tiles, or the GPU's (what scripts/aot_check.py and the grid-limit tests size for)."""
    import torch

    from peftkern.kernels import rank

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs))
            return launch

    monkeypatch.setattr(rank, "_rank_down_kernel", Recorder())
    x = torch.empty(2048, 4096, device="meta", dtype=torch.bfloat16)
    p = torch.empty(16, 4096, device="meta", dtype=torch.bfloat16)
    with _launch.launch_config(interpret=True):
        rank.rank_down(x, p, scale=1.0)
    with _launch.launch_config(interpret=False, programs=4 * 132):
        rank.rank_down(x, p, scale=1.0)
    (small_grid, small), (gpu_grid, gpu) = launches
    assert (small["BLOCK_M"], small["BLOCK_C"]) == (32, 32) and small_grid[2] == 1  # 4 programs: no split
    assert (gpu["BLOCK_M"], gpu["BLOCK_C"]) == (64, 128) and gpu_grid[2] > 1  # 32 row tiles: C is split


def test_no_kernel_module_reads_the_interpreter_flag_itself():
    """Launchers ask kernels/_launch.py (interpreting(), target_programs(), num_sms()); only the modules that
    decide the mode and the launch configuration's default read INTERPRET."""
    import ast
    import pathlib

    from peftkern import kernels

    readers = []
    for path in sorted(pathlib.Path(kernels.__file__).parent.glob("*.py")):
        if path.stem in ("__init__", "_mode", "_launch"):
            continue
        tree = ast.parse(path.read_text())
        names = {getattr(n, "id", None) or getattr(n, "name", None) or getattr(n, "attr", None) for n in ast.walk(tree)}
        if "INTERPRET" in names or "target_programs" in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}:
            readers.append(path.name)
    assert not readers, f"kernel modules that read INTERPRET or define their own target_programs: {readers}"
