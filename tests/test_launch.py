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
