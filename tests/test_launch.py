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

    tuners = [(mod.__name__, name) for mod in vars(kernels).values() if inspect.ismodule(mod)
              and mod.__name__.startswith("peftkern.kernels.") for name, obj in vars(mod).items()
              if isinstance(obj, Autotuner)]
    if not tuners:
        pytest.skip("the interpreter builds no autotuners here (Triton's interpreter replaces autotune)")
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
