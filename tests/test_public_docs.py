"""What users read stands alone: every public name's docstring, the CLI's help and `info`, the README and docs/.

No text a user reads may send them to documents they do not have (the project's internal specification or
engineering notes) or to internal tracker numbers ("issue 13", "#13"). References to public upstream trackers
(`triton-lang/triton#9171`, `huggingface/peft#2527`) are fine. Besides, the README's table names every public
name and its one-line examples run, every `peftkern.…` name the docs mention exists, and every relative link
in the docs leads to a file and heading that exist.
"""
import contextlib
import importlib
import importlib.util
import inspect
import io
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import peftkern

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

# internal documents and tracker numbers; `owner/repo#N` (an upstream tracker) is not matched: a `#` right after
# a word character or a slash is left alone
# (the document names in capitals, as they are written; "issue" in any case)
INTERNAL = re.compile(r"\bSPEC\b|ENGINEERING|(?i:\bissue)\s*#?\d+|(?<![\w/])#\d{1,3}\b")


def _own(obj, module_prefix: str = "peftkern") -> bool:
    return (getattr(obj, "__module__", None) or "").startswith(module_prefix)


def _class_docstrings(qualname: str, cls: type) -> dict[str, str]:
    """The class's docstring and those of its public methods and properties (and __init__/__call__), counting
    only what peftkern's own classes define (not what torch.nn.Module or PEFT's classes bring)."""
    docs = {qualname: inspect.getdoc(cls) or ""}
    for klass in inspect.getmro(cls):
        if not _own(klass):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            elif isinstance(member, property):
                member = member.fget
            if not callable(member) or member is None:
                continue
            key = f"{qualname}.{name}"
            if key not in docs:
                docs[key] = inspect.getdoc(member) or ""
    return docs


def _module_docstrings(qualname: str, module, names) -> dict[str, str]:
    docs = {qualname: inspect.getdoc(module) or ""}
    for name in names:
        obj = getattr(module, name)
        key = f"{qualname}.{name}"
        if inspect.ismodule(obj):
            public = [n for n in vars(obj) if not n.startswith("_") and _own(getattr(obj, n), obj.__name__)
                      and (inspect.isclass(getattr(obj, n)) or inspect.isfunction(getattr(obj, n)))]
            docs.update(_module_docstrings(key, obj, public))
        elif inspect.isclass(obj):
            docs.update(_class_docstrings(key, obj))
        elif callable(obj):
            docs[key] = inspect.getdoc(obj) or ""
    return docs


def public_docstrings() -> dict[str, str]:
    """Every docstring a user meets through the public API: peftkern.__all__ (functions, classes and their
    public methods, the nn module and its classes), and peftkern.integrations.peft's public names."""
    from peftkern.integrations import peft as peft_integration

    docs = _module_docstrings("peftkern", peftkern, [n for n in peftkern.__all__ if n != "__version__"])
    nn_names = [n for n, obj in vars(peftkern.nn).items() if not n.startswith("_")
                and (inspect.isclass(obj) or inspect.isfunction(obj)) and _own(obj, "peftkern.nn")]
    docs.update(_module_docstrings("peftkern.nn", peftkern.nn, nn_names))
    peft_names = list(getattr(peft_integration, "__all__", []))
    peft_names += [n for n, obj in vars(peft_integration).items() if not n.startswith("_") and n not in peft_names
                   and (inspect.isclass(obj) or inspect.isfunction(obj)) and _own(obj, peft_integration.__name__)]
    docs.update(_module_docstrings("peftkern.integrations.peft", peft_integration, peft_names))
    return docs


def cli_outputs() -> dict[str, str]:
    """What `python -m peftkern --help`, `bench --help` and `info` print, run as a user runs them."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outputs = {}
    for args in (["--help"], ["bench", "--help"], ["info"]):
        out = subprocess.run([sys.executable, "-m", "peftkern", *args], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        outputs[f"python -m peftkern {' '.join(args)}"] = out.stdout + out.stderr
    return outputs


def cli_outputs_in_process() -> dict[str, str]:
    """The same three outputs from peftkern.__main__.main in this process (faster; same text)."""
    from peftkern.__main__ import main

    outputs = {}
    for args in (["--help"], ["bench", "--help"], ["info"]):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(args)
        outputs[f"python -m peftkern {' '.join(args)}"] = buffer.getvalue()
    return outputs


DOCSTRINGS = public_docstrings()


def test_the_walk_finds_the_public_api():
    """The walk is not vacuous: it reaches the ops, the classes' methods, the modules and the PEFT backend."""
    for name in ("peftkern.lora_linear", "peftkern.QuantizedWeight.quantize", "peftkern.SparseDiff.from_dense",
                 "peftkern.nn.LoRALinear.merge_", "peftkern.nn.MultiLoRALinear", "peftkern.use_backend",
                 "peftkern.integrations.peft.patch", "peftkern.integrations.peft.unpatch"):
        assert name in DOCSTRINGS, name
    assert len(DOCSTRINGS) > 50


@pytest.mark.parametrize("name", sorted(DOCSTRINGS))
def test_docstring_names_no_internal_document_or_issue(name):
    found = INTERNAL.findall(DOCSTRINGS[name])
    assert not found, f"{name}'s docstring mentions {found}: say what is meant instead"


def test_cli_output_names_no_internal_document_or_issue():
    found = {name: INTERNAL.findall(text) for name, text in cli_outputs().items() if INTERNAL.search(text)}
    assert not found, found


def test_the_pattern_leaves_upstream_references_alone():
    for upstream in ("triton-lang/triton#9171", "huggingface/peft#2527", "color #1f77b4", "issues/2527"):
        assert not INTERNAL.search(upstream), upstream
    for internal in ("SPEC section 8", "see ENGINEERING.md", "issue 13", "issue #13", "Issue 11 item F", "(#13)",
                     "see #7"):
        assert INTERNAL.search(internal), internal
    assert not INTERNAL.search("spec = specs[0]  # a Python name, not the document")


# every source and text file of the project, comments included; this file spells the patterns out to test them
SOURCES = sorted(p for folder in ("benchmarks", "scripts", "peftkern", "kernels", "csrc", "tests", ".ci")
                 for p in (ROOT / folder).rglob("*")
                 if p.suffix in (".py", ".sh", ".md", ".cpp", ".cu", ".h", ".cuh", "") and p.is_file()
                 and p.name != "test_public_docs.py" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", DOC_FILES + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_and_tools_name_no_internal_document_or_issue(path):
    text = path.read_text(encoding="utf-8")
    found = [(text.count("\n", 0, m.start()) + 1, m.group()) for m in INTERNAL.finditer(text)]
    assert not found, f"{path.relative_to(ROOT)} (line, text): {found}"


# ---- the README's table of public names --------------------------------------------------------------------

def _readme_table() -> list[tuple[str, str]]:
    """(name, one-line example) for each row of the README's table of public names."""
    section = README.read_text(encoding="utf-8").split("## Every public name", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) == 3:
            name = cells[0].strip("`")
            example = cells[2]
            assert example.startswith("`") and example.endswith("`"), line
            rows.append((name, example[1:-1]))
    return rows


def test_readme_table_names_every_public_name():
    from peftkern.integrations import peft as peft_integration

    listed = {name for name, _ in _readme_table()}
    expected = {n for n in peftkern.__all__ if n != "nn"}
    expected |= {f"nn.{n}" for n, obj in vars(peftkern.nn).items()
                 if inspect.isclass(obj) and _own(obj, "peftkern.nn") and not n.startswith("_")}
    expected |= {f"integrations.peft.{n}" for n in peft_integration.__all__}
    assert expected - listed == set(), f"the README's table lacks {sorted(expected - listed)}"
    assert listed - expected == set(), f"the README's table names what is not public: {sorted(listed - expected)}"


def test_readme_table_examples_run():
    """The set-up block above the table, then each row's one-liner in order, as a user pasting them would. The
    PEFT rows run over a small PEFT model when peft is installed."""
    text = README.read_text(encoding="utf-8").split("## Every public name", 1)[1]
    setup = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace = {"__name__": "readme_table"}
    exec(compile(setup, "README.md table set-up", "exec"), namespace)
    rows = _readme_table()
    for name, example in rows:
        if not name.startswith("integrations."):
            exec(compile(example, f"README.md table: {name}", "exec"), namespace)
    if importlib.util.find_spec("peft") is None:
        pytest.skip("the integrations.peft rows need peft, not installed here (the test extra has it)")
    prelude = """
import warnings
import torch
from peft import LoraConfig, get_peft_model
from peftkern.integrations.peft import (patch, unpatch, unsupported_reason, FusedLoraLinear,
                                        LayersNotPatchedWarning)
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 64)
    def forward(self, x):
        return self.q_proj(x)
peft_model = get_peft_model(Block(), LoraConfig(r=4, target_modules=["q_proj"]))
"""
    exec(compile(prelude, "PEFT rows' prelude", "exec"), namespace)
    with warnings.catch_warnings():  # the last row turns a warning into an error
        for name, example in rows:
            if name.startswith("integrations."):
                exec(compile(example, f"README.md table: {name}", "exec"), namespace)
    assert namespace["n"] == 1 and namespace["patched"] and namespace["reason"] is None


# ---- names and links in the docs ---------------------------------------------------------------------------

def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_peftkern_name_the_docs_mention_exists(path):
    text = path.read_text(encoding="utf-8")
    names = set(re.findall(r"`(?:[^`]*?\W)?(peftkern(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    missing = []
    for name in sorted(names):
        if name == "peftkern._C" and not peftkern.backend_info().get("extension_built"):
            continue  # the optional compiled extension, not built here
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.is_file():
            body = re.sub(r"```.*?```", "", dest.read_text(encoding="utf-8"), flags=re.S)
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", body, flags=re.M)}
            if anchor not in anchors:
                broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_short_and_every_family_has_a_page_with_a_runnable_example():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250
    families = sorted(d.name for d in (ROOT / "peftkern").iterdir() if (d / "op.py").is_file())
    assert families
    for page in (*families, "dispatch-and-precision", "peft"):
        text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
        assert "```python\n" in text, f"docs/{page}.md has no runnable example"
