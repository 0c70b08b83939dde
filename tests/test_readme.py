"""Every ```python block of the README and of docs/*.md runs as written.

A ```py block is a fragment of a package file (relative imports, `...` bodies), shown but not run:
docs/adding-a-family.md uses them for the files a new family writes.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


BLOCKS = _blocks(README)
EXAMPLES = [(path.relative_to(ROOT).as_posix(), index, code) for path in PAGES
            for index, code in enumerate(_blocks(path))]


# packages the examples use that peftkern itself does not need (the test extra installs them); an
# example that imports one that is missing is skipped, saying which, rather than failing
OPTIONAL = ("peft", "transformers", "bitsandbytes", "safetensors", "accelerate")


def _missing_optional(code: str) -> list[str]:
    import importlib.util

    imported = set(re.findall(r"^\s*from\s+([A-Za-z_][A-Za-z0-9_]*)", code, flags=re.M))
    for names in re.findall(r"^\s*import\s+(.+)$", code, flags=re.M):  # import a, b as c, d.e
        imported |= {part.split()[0].split(".")[0] for part in names.split(",") if part.strip()}
    return [name for name in OPTIONAL if name in imported and importlib.util.find_spec(name) is None]


@pytest.mark.parametrize(("page", "index", "code"), EXAMPLES, ids=[f"{page}-{index}" for page, index, _ in EXAMPLES])
def test_example_runs(page, index, code):
    code = code.replace("\n    ...\n", "\n    pass\n")
    missing = _missing_optional(code)
    if missing:
        pytest.skip(f"{page} block {index} imports {', '.join(missing)}, not installed here (the test extra has it)")
    exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "readme"})


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_every_docs_page_example_is_collected():
    """The docs pages hold examples, and every one of them is in the parametrization above."""
    docs_examples = [e for e in EXAMPLES if e[0].startswith("docs/")]
    assert len(docs_examples) >= 10
    assert {page for page, _, _ in docs_examples} >= {"docs/lora.md", "docs/dora.md", "docs/multi_lora.md",
                                                      "docs/adapter.md", "docs/sparse_diff.md", "docs/peft.md",
                                                      "docs/dispatch-and-precision.md"}


def test_results_tables_are_generated_from_the_committed_json():
    """The CPU results in docs/benchmarks.md are benchmarks/results_table.py's output for the committed JSON,
    so no number in them was typed by hand."""
    import json

    from benchmarks import results_table

    for name in ("cpu-2core.json", "cpu-2core-load1.json", "cpu-2core-qlora.json", "cpu-2core-dora.json",
                 "cpu-2core-multi-lora.json"):
        results = json.loads((ROOT / "benchmarks/results" / name).read_text(encoding="utf-8"))
        assert results_table.table(results) in BENCHMARKS_DOC.read_text(encoding="utf-8"), name


FRAGMENTS = [(path.relative_to(ROOT).as_posix(), index, code) for path in PAGES
             for index, code in enumerate(re.findall(r"```py\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S))]


@pytest.mark.parametrize(("page", "index", "code"), FRAGMENTS, ids=[f"{page}-{index}" for page, index, _ in FRAGMENTS])
def test_fragment_is_valid_python(page, index, code):
    import ast

    ast.parse(code, filename=f"{page} fragment {index}")  # a fragment is not run, but it must still be Python
