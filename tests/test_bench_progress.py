"""The bench runs without its optional packages: tqdm's bar when installed, plain lines otherwise."""
import sys

from peftkern.bench.progress import progress


def test_progress_without_tqdm_prints_one_line_per_item(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(progress(["a", "b", "c"], desc="peftkern bench", unit="case")) == ["a", "b", "c"]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err[:3]] == [f"peftkern bench: case {i}/3" for i in (1, 2, 3)]
    assert err[3].startswith("peftkern bench: 3 case(s) in ")


def test_progress_with_tqdm_yields_every_item():
    import pytest

    pytest.importorskip("tqdm", reason="checks the tqdm path; tqdm is not installed here")
    assert list(progress(range(4), desc="x", unit="step")) == [0, 1, 2, 3]
