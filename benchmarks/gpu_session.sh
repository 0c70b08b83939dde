#!/usr/bin/env bash
# One device-tool call: build, check and time on a lent GPU. Everything lands under $OUT:
#   install.log, info.txt, tests.txt (the whole suite on CUDA, bf16 included), tests-fused.txt and
#   tests-composite.txt (the product families with each dispatch variant forced), <device>.json + .png
#   (the bench times measured dispatch beside each variant forced, and records what dispatch chose)
# Commit the JSON as benchmarks/results/<device>.json. Usage (device tool):
#   bash benchmarks/gpu_session.sh [--quick]
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
quick="${1:-}"
pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python -m peftkern info | tee "$OUT/info.txt"
python -m pytest tests -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.txt" | tail -25
# each dispatch variant forced, on the families that have two (tests-<variant>.txt)
for variant in fused composite; do
  PEFTKERN_DISPATCH=$variant python -m pytest tests/test_lora.py tests/test_adapter.py tests/test_sparse_diff.py \
    tests/test_dispatch.py tests/test_qlora.py tests/test_qlora_kernels.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests-$variant.txt" | tail -3
done
name=$(python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))")
python -m peftkern bench --op all $quick --json "$OUT/$name.json" --plot "$OUT/$name.png" 2>&1 | tee "$OUT/bench.txt" | tail -60
