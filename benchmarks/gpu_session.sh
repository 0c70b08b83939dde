#!/usr/bin/env bash
# One device-tool call: build, check and time on a lent GPU. Everything lands under $OUT:
#   install.log, info.txt, tests.txt (the whole suite on CUDA, bf16 included), <device>.json + .png
# Commit the JSON as benchmarks/results/<device>.json. Usage (device tool):
#   bash benchmarks/gpu_session.sh [--quick]
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
quick="${1:-}"
pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python -m peftkern info | tee "$OUT/info.txt"
python -m pytest tests -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.txt" | tail -25
name=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")
python -m peftkern bench --op all $quick --json "$OUT/$name.json" --plot "$OUT/$name.png" 2>&1 | tee "$OUT/bench.txt" | tail -60
