#!/usr/bin/env bash
# CI lane: the GPU machine's software stack, checked on this CPU machine. The lent GPU machine has Python 3.12,
# torch 2.11.0+cu130, Triton 3.6.0, numpy 2.5.2, pytest and ninja, and no peft, bitsandbytes, tqdm or
# safetensors. This lane builds that stack in its own virtual environment and checks, on CPU:
#   - the install in auto mode (PEFTKERN_BUILD_EXT unset) succeeds on a host with nvcc and no GPU;
#   - the Triton interpreter test files pass (Triton 3.6's interpreter with numpy >= 2.4);
#   - scripts/aot_check.py passes strictly (no spills) for sm_80 and sm_90 with Triton 3.6's compiler.
#
#   bash .ci/gpu_stack_lane.sh prepare   # make the venv and install the stack (network-bound; .ci/run starts
#                                        # it in the background while the main lane runs)
#   bash .ci/gpu_stack_lane.sh check     # install peftkern, run the tests and the AOT check (prepares if needed)
#
# The venv lives outside the clone ($PEFTKERN_LANE_DIR, default ~/.cache/peftkern/gpu-stack-lane) and is reused
# while its stack is unchanged: it holds only pinned third-party packages, so reusing it is safe. The AOT
# check's result cache (~/.cache/peftkern/aot) is keyed by kernel source, specialization, Triton and ptxas.
set -euo pipefail
cd "$(dirname "$0")/.."

STACK=(torch==2.11.0 numpy==2.5.2 pytest ninja "setuptools>=64" wheel)
PYTHON_VERSION=3.12
lane_dir="${PEFTKERN_LANE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/peftkern/gpu-stack-lane}"
venv="$lane_dir/venv"
stamp="$venv/.stack"
TEST_FILES=(tests/test_lora_persistent.py tests/test_qlora_kernels.py tests/test_dora_kernels.py
            tests/test_dora_variants.py
            tests/test_multi_lora_kernels.py tests/test_sparse_kernels.py tests/test_grid_limits.py tests/test_tf32.py
            tests/test_launch.py tests/test_environment.py tests/test_dispatch.py)

prepare() {
  if [[ -f "$stamp" && "$(cat "$stamp")" == "${STACK[*]}" ]] && "$venv/bin/python" -c "import torch, triton, numpy" 2>/dev/null; then
    echo "gpu-stack lane: reusing $venv ($(cat "$stamp"))"
    return 0
  fi
  local py="" candidate
  # a pyenv shim on PATH fails unless 3.12 is pyenv's selected version: look in pyenv's versions too
  for candidate in "${PEFTKERN_LANE_PYTHON:-}" "$(command -v "python$PYTHON_VERSION" || true)" \
                   "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$PYTHON_VERSION".*/bin/python"$PYTHON_VERSION" \
                   /usr/local/bin/python"$PYTHON_VERSION" /usr/bin/python"$PYTHON_VERSION"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      py="$candidate"
      break
    fi
  done
  if [[ -z "$py" ]]; then
    echo "gpu-stack lane: FAILED, no Python $PYTHON_VERSION found (numpy 2.5.2 needs Python >= 3.12, as on the GPU" \
         "machine); install it or name it in PEFTKERN_LANE_PYTHON, or set PEFTKERN_GPU_STACK_LANE=0 to leave this" \
         "lane out of .ci/run" >&2
    return 1
  fi
  echo "gpu-stack lane: $py ($("$py" --version 2>&1))"
  rm -rf "$venv"
  mkdir -p "$lane_dir"
  "$py" -m venv "$venv"
  # no constraint file: torch 2.11.0 is below this machine's pip cap, and its wheel pins Triton 3.6.0
  # (this machine's pip configuration names local wheel folders that may not exist: that warning is noise here)
  "$venv/bin/python" -m pip install --quiet "${STACK[@]}" 2>&1 | { grep -v "is neither a file nor a directory" || true; }
  echo "${STACK[*]}" >"$stamp"
  "$venv/bin/python" -c "import torch, triton, numpy; print('gpu-stack lane: torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
}

check() {
  local t0=$SECONDS
  # a background `prepare` may still be running: wait for it rather than racing it
  while [[ -f "$lane_dir/.preparing" ]] && kill -0 "$(cat "$lane_dir/.preparing")" 2>/dev/null; do sleep 5; done
  prepare
  local py="$venv/bin/python"
  # the GPU machine has none of these; the lane's venv must not either (tests that need them skip, saying why)
  for pkg in peft bitsandbytes tqdm safetensors; do
    if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)"; then
      echo "gpu-stack lane: FAILED, $pkg is installed in $venv but not on the GPU machine" >&2
      return 1
    fi
  done
  echo "gpu-stack lane: pip install in auto mode (PEFTKERN_BUILD_EXT unset)"
  (unset PEFTKERN_BUILD_EXT; "$py" -m pip install --quiet --no-build-isolation --no-deps -e .)
  "$py" -m peftkern info | grep -E "^(python|torch|triton|extension_built|extension_cuda|extension_error) "
  echo "gpu-stack lane: Triton interpreter tests"
  "$py" -m pytest "${TEST_FILES[@]}" -q -p no:cacheprovider
  echo "gpu-stack lane: ahead-of-time compile check with Triton 3.6 (sm_80, sm_90, strict)"
  "$py" scripts/aot_check.py
  echo "gpu-stack lane: passed in $((SECONDS - t0)) s"
}

case "${1:-check}" in
  prepare)
    mkdir -p "$lane_dir"
    echo $$ >"$lane_dir/.preparing"
    trap 'rm -f "$lane_dir/.preparing"' EXIT
    prepare ;;
  check) check ;;
  *) echo "usage: bash .ci/gpu_stack_lane.sh [prepare|check]" >&2; exit 2 ;;
esac
