"""Every ```python block of the README runs as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


# packages the README's examples use that peftkern itself does not need (the test extra installs them); an
# example that imports one that is missing is skipped, saying which, rather than failing
OPTIONAL = ("peft", "transformers", "bitsandbytes", "safetensors", "accelerate")


def _missing_optional(code: str) -> list[str]:
    import importlib.util

    imported = set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][A-Za-z0-9_]*)", code, flags=re.M))
    return [name for name in OPTIONAL if name in imported and importlib.util.find_spec(name) is None]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index].replace("\n    ...\n", "\n    pass\n")
    missing = _missing_optional(code)
    if missing:
        pytest.skip(f"README block {index} imports {', '.join(missing)}, not installed here (the test extra has it)")
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_readme_results_table_is_generated_from_the_committed_json():
    """The CPU results in the README are benchmarks/results_table.py's output for the committed JSON,
    so no number in them was typed by hand."""
    import json

    from benchmarks import results_table

    for name in ("cpu-2core.json", "cpu-2core-qlora.json", "cpu-2core-dora.json", "cpu-2core-multi-lora.json"):
        results = json.loads((README.parent / "benchmarks/results" / name).read_text(encoding="utf-8"))
        assert results_table.table(results) in README.read_text(encoding="utf-8"), name
