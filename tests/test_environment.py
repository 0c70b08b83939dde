"""`import peftkern` leaves the process environment alone, the Triton interpreter it needs on a machine
without a GPU is switched on for peftkern's own kernels only (kernels/_mode.py), and the top-level kernels/
folder never shadows another package named `kernels` when Python runs from the repository root."""
import subprocess
import sys
import textwrap

import pytest

OTHER_KERNEL = '''
import triton

@triton.jit
def other_kernel(x):
    pass
'''


def run_python(code: str, tmp_path, env_extra=None) -> str:
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    (tmp_path / "other_lib.py").write_text(OTHER_KERNEL)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_leaves_the_environment_unchanged(tmp_path):
    out = run_python("""
        import os
        before = dict(os.environ)
        import peftkern
        peftkern.backend_info()
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        print("unchanged")
    """, tmp_path)
    assert out.strip() == "unchanged"


def test_interpreter_is_on_for_peftkerns_kernels_only(tmp_path):
    pytest.importorskip("triton")
    out = run_python("""
        import os
        import torch
        import peftkern
        from peftkern import kernels
        if not kernels.INTERPRET:
            print("gpu")
            raise SystemExit
        import triton
        import other_lib  # another library's kernel, decorated after peftkern was imported
        print(type(other_lib.other_kernel).__name__, type(kernels.rank._rank_down_kernel).__name__,
              bool(triton.knobs.runtime.interpret), "TRITON_INTERPRET" in os.environ)
        # peftkern's kernels still run in the interpreter, launched directly or through an op
        x, p = torch.randn(5, 8), torch.randn(3, 8)
        torch.testing.assert_close(kernels.rank.rank_down(x, p, scale=1.0), x @ p.t())
        with peftkern.use_backend("triton"):
            peftkern.lora_linear(x, torch.randn(4, 8), p, torch.randn(4, 3))
        print(bool(triton.knobs.runtime.interpret), "TRITON_INTERPRET" in os.environ)
    """, tmp_path)
    if out.strip() == "gpu":
        pytest.skip("a CUDA device is present: peftkern compiles its kernels and never interprets them")
    first, second = out.strip().splitlines()
    assert first == "JITFunction InterpretedFunction False False"
    assert second == "False False"


def test_an_explicit_triton_interpret_is_respected(tmp_path):
    pytest.importorskip("triton")
    out = run_python("""
        import os
        import peftkern
        print(peftkern.kernels.INTERPRET, os.environ["TRITON_INTERPRET"])
    """, tmp_path, {"TRITON_INTERPRET": "0"})
    assert out.strip() == "False 0"


REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_in_repo_root(code: str) -> str:
    """Run `python -c code` with the repository root as the working directory (and so first on sys.path), as a
    user does who saves a README example there or runs the bench from a clone."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_top_level_kernels_folder_does_not_shadow_a_package_named_kernels():
    # the folder is peftkern.kernels; run from the root, `import kernels` must find the package that owns the name
    # (Hugging Face's `kernels`, a transformers dependency) or nothing at all, never this folder
    out = run_in_repo_root("""
        import importlib.util, os
        installed = importlib.util.find_spec("kernels") is not None  # finds the folder itself when run here
        try:
            import kernels
        except ModuleNotFoundError:
            print("absent")
        else:
            print(os.path.realpath(kernels.__file__))
        import peftkern.kernels
        print(os.path.realpath(peftkern.kernels.__file__))
    """).split("\n")
    own = str(REPO_ROOT / "kernels" / "__init__.py")
    assert out[0] != own, "`import kernels` from the repository root found peftkern's kernel folder"
    assert out[1] == own


def test_peft_imports_and_the_bench_sees_it_from_the_repository_root():
    pytest.importorskip("peft", reason="peft is not installed: the bench's PEFT baseline cannot be checked")
    out = run_in_repo_root("""
        import peft
        from peftkern.bench.providers import peft_available
        print(peft_available())
    """)
    assert out.strip() == "True"


def test_a_broken_peft_is_an_error_not_a_missing_baseline(tmp_path):
    # an installed package that fails to import must not silently turn the PEFT baseline into the eager copy
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    out = subprocess.run([sys.executable, "-c", "from peftkern.bench.providers import peft_available\n"
                          "peft_available()"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "peft is installed but does not import" in out.stderr and "broken on purpose" in out.stderr
