"""`import peftkern` leaves the process environment alone, and the Triton interpreter it needs on a
machine without a GPU is switched on for peftkern's own kernels only (kernels/__init__.py)."""
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
