#!/usr/bin/env bash
# A GPU visit that returns answers within its budget: steps run in order, each under its own timeout, and
# each writes its results under OUT_DIR before the next one starts, so a visit cut short keeps what it got.
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--budget SECONDS] [--steps LIST] [OUT_DIR]
#
#   OUT_DIR        where results go (default: $OUT, the device tool's folder, else a new temp folder)
#   --budget S     wall seconds for the whole call (default 540: one device call may run 600)
#   --steps LIST   comma-separated subset of the steps below, in the order given (default 1,2,3,4)
#   --dry-run      print the plan and each step's budget, check that every command is there, run nothing
#
# Steps (cap = the most a step may take; it also never takes more than what is left of the budget):
#   1 install   (cap 120 s)  no network: PEFTKERN_BUILD_EXT=0 pip install --no-build-isolation --no-deps -e .,
#                            then `python -m peftkern info`                  -> install.log, info.txt
#   2 smoke     (cap 180 s)  every family forward+backward on the device, bf16 and fp16, fused and composite,
#                            one autotune config per kernel (PEFTKERN_AUTOTUNE=first), against the float64
#                            oracle                                          -> smoke.txt, smoke/*.jsonl
#   3 bench     (cap 240 s)  the headline timings: `python -m peftkern bench --quick` (LoRA, QLoRA, DoRA,
#                            multi-LoRA, adapter, sparse; fused, composite, measured dispatch, eager, floor),
#                            the JSON rewritten after every case             -> bench.txt, <device>.json, .png
#   4 suite     (rest)       the test suite on the device, kernel tests first, one config per kernel
#                                                                            -> tests.txt
#   5 ext       (cap 300 s)  not in the default plan: build peftkern._C with its CUDA part (auto mode) and
#                            run the extension's tests                       -> ext-install.log, ext-tests.txt
# steps.json records each step's exit status, seconds and budget as it finishes. Commit <device>.json as
# benchmarks/results/<device>.json. Expected times on an H100 are in docs/testing.md (A GPU visit).
set -uo pipefail
cd "$(dirname "$0")/.."

budget=540
steps="1,2,3,4"
dry_run=0
out="${OUT:-}"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget) budget="${2:?--budget needs a number of seconds}"; shift ;;
    --steps) steps="${2:?--steps needs a list such as 2,3}"; shift ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    -*) echo "gpu_session.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "--budget must be a whole number of seconds, got '$budget'" >&2; exit 2; }
out="${out:-$(mktemp -d)}"
mkdir -p "$out" || { echo "cannot create the output folder $out" >&2; exit 2; }
start=$(date +%s)
declare -A cap=([1]=120 [2]=180 [3]=240 [4]=100000 [5]=300)
declare -A name=([1]=install [2]=smoke [3]=bench [4]=suite [5]=ext)
RESERVE=15  # seconds kept back at the end for writing steps.json and the device tool's copy-back

device_name() {
  python -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-') if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown
}

step_cmd() {  # the command line of step $1 (run with bash -c)
  case "$1" in
    1) echo "PEFTKERN_BUILD_EXT=0 python -m pip install --no-build-isolation --no-deps -e . >'$out/install.log' 2>&1 && python -m peftkern info >'$out/info.txt' 2>&1; cat '$out/info.txt'" ;;
    2) echo "PEFTKERN_AUTOTUNE=first python benchmarks/gpu_smoke.py --out '$out/smoke' 2>&1 | tee '$out/smoke.txt' | awk '!/^PASS/'" ;;
    3) local dev; dev=$(device_name)
       echo "python -m peftkern bench --quick --json '$out/$dev.json' --plot '$out/$dev.png' 2>&1 | tee '$out/bench.txt' | tail -40" ;;
    4) echo "PEFTKERN_AUTOTUNE=first python -m pytest tests/test_lora.py tests/test_qlora_kernels.py tests/test_dora_kernels.py tests/test_dora_variants.py tests/test_multi_lora_kernels.py tests/test_lora_persistent.py tests/test_sparse_kernels.py tests/test_adapter.py tests/test_dispatch.py tests -q -p no:cacheprovider 2>&1 | tee '$out/tests.txt' | tail -25" ;;
    5) echo "PEFTKERN_BUILD_EXT=1 python -m pip install --no-build-isolation --no-deps -e . >'$out/ext-install.log' 2>&1 && python -m peftkern info | grep extension && python -m pytest tests/test_sparse_diff.py tests/test_dropout_mask.py -q -p no:cacheprovider 2>&1 | tee '$out/ext-tests.txt' | tail -5" ;;
  esac
}

record() {  # step, rc, seconds, budget: appended to steps.json (a JSON list, rewritten whole each time)
  python - "$out/steps.json" "$@" <<'EOF'
import json, os, sys
path, step, rc, seconds, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
done = json.load(open(path)) if os.path.exists(path) else []
done.append({"step": step, "rc": rc, "seconds": seconds, "budget_s": budget, "timed_out": rc in (124, 137)})
json.dump(done, open(path, "w"), indent=1)
EOF
}

IFS=',' read -r -a plan <<<"$steps"
for s in "${plan[@]}"; do
  [[ -n "${name[$s]:-}" ]] || { echo "--steps: no step '$s' (steps are 1-5)" >&2; exit 2; }
done

if ((dry_run)); then
  echo "gpu_session.sh --dry-run: budget ${budget} s (${RESERVE} s kept back), results to $out"
  left=$((budget - RESERVE))
  for s in "${plan[@]}"; do
    b=$((cap[$s] < left ? cap[$s] : left))
    printf 'step %s %-8s budget %4d s   %s\n' "$s" "${name[$s]}" "$b" "$(step_cmd "$s")"
    left=$((left - b))
  done
  problems=0
  python -c "import torch" 2>/dev/null || { echo "PROBLEM: torch does not import"; problems=1; }
  for f in benchmarks/gpu_smoke.py setup.py tests; do [[ -e "$f" ]] || { echo "PROBLEM: $f is missing"; problems=1; }; done
  python -m peftkern bench --quick --dry-run >/dev/null 2>&1 || { echo "PROBLEM: python -m peftkern bench --dry-run fails (is peftkern installed? step 1 does it)"; }
  python benchmarks/gpu_smoke.py --help >/dev/null 2>&1 || { echo "PROBLEM: benchmarks/gpu_smoke.py --help fails"; problems=1; }
  ((problems)) && exit 1
  echo "plan ok"
  exit 0
fi

echo "gpu_session.sh: steps ${steps}, budget ${budget} s, results to $out"
failed=0
for s in "${plan[@]}"; do
  left=$((budget - RESERVE - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== step $s ${name[$s]}: skipped, ${left} s left of the budget"
    record "${name[$s]}" 125 0 0
    continue
  fi
  b=$((cap[$s] < left ? cap[$s] : left))
  echo "== step $s ${name[$s]} (budget ${b} s)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$b" bash -o pipefail -c "$(step_cmd "$s")"
  rc=$?
  secs=$(($(date +%s) - t0))
  ((rc == 124 || rc == 137)) && echo "== step $s ${name[$s]}: stopped at its budget (${b} s); what it wrote so far is in $out"
  echo "== step $s ${name[$s]}: exit ${rc} after ${secs} s"
  record "${name[$s]}" "$rc" "$secs" "$b"
  ((rc != 0)) && failed=1
  if [[ "$s" == 1 && $rc -ne 0 ]]; then
    echo "install failed: the other steps need it (see $out/install.log)"; tail -20 "$out/install.log"; exit 1
  fi
done
echo "gpu_session.sh: done in $(($(date +%s) - start)) s; results in $out"
exit $failed
