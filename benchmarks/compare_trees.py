"""Time the bench's `peftkern` rows of two source trees side by side, on one machine, in one run.

    python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--rounds 8] [--op lora --op sparse ...] [--quick]

Each tree is a checkout with peftkern built in place (`python setup.py build_ext --inplace`, or
PEFTKERN_BUILD_EXT=0 for none), e.g. `git worktree add /tmp/old <commit>`. A round runs one fresh process per tree,
old then new, each importing peftkern from its tree (PYTHONPATH) and timing the `peftkern` provider of every bench
case of the chosen ops (the cases and inputs `python -m peftkern bench` uses on this device, from that tree's own
bench declarations; `--quick`: those of `bench --quick`). Within a process a case's step is timed in blocks of at
least 30 ms, and the best block kept; across rounds the table shows the median of those per-process bests and the
best overall, with new / old ratios.
Alternating processes rather than timing one tree after the other keeps a slow spell of a shared machine from
landing on one side only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BLOCK_SECONDS = 0.03
BLOCKS = 7


def worker(ops: list[str], quick: bool) -> None:
    """Runs inside a tree's process: print {case label: [seconds per step of each block]} as one JSON line."""
    import torch

    from peftkern.bench import runner

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for op in ops or runner.OPS:
        for case in runner.cases_for(op, device, quick=quick):
            steps, _ = runner.providers_for(op, case, device)
            step = steps["peftkern"]
            for _ in range(2):  # warm-up: allocator growth, kernel compilation, remembered index checks
                step()
            sync()
            start = time.perf_counter()
            step()
            sync()
            inner = max(1, int(BLOCK_SECONDS / max(time.perf_counter() - start, 1e-6)))
            blocks = []
            for _ in range(BLOCKS):
                start = time.perf_counter()
                for _ in range(inner):
                    step()
                sync()
                blocks.append((time.perf_counter() - start) / inner)
            out[f"{op} {case.label}"] = blocks
    print(json.dumps(out))


def run_tree(tree: str, ops: list[str], quick: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + [a for op in ops for a in ("--op", op)]
    cmd += ["--quick"] if quick else []
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"timing {tree} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", nargs="?", help="the baseline tree")
    parser.add_argument("new", nargs="?", help="the tree compared with it")
    parser.add_argument("--rounds", type=int, default=8, help="processes per tree, alternating (default 8)")
    parser.add_argument("--op", action="append", default=[], help="only this bench op (repeatable; default all)")
    parser.add_argument("--quick", action="store_true", help="the cases of `bench --quick` (smaller, fewer)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.op, args.quick)
        return
    if not (args.old and args.new):
        parser.error("give the two trees: OLD_TREE NEW_TREE")
    best = {"old": [], "new": []}
    for r in range(args.rounds):
        for side, tree in (("old", args.old), ("new", args.new)):
            best[side].append({k: min(v) for k, v in run_tree(tree, args.op, args.quick).items()})
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{'case':58s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s} {'best old':>9s} {'best new':>9s} "
          f"{'new/old':>8s}")
    for case in best["old"][0]:
        old = [b[case] for b in best["old"]]
        new = [b[case] for b in best["new"] if case in b]
        if not new:
            continue
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"{case:58s} {mo * 1e3:9.3f} {mn * 1e3:9.3f} {mn / mo:8.3f} {min(old) * 1e3:9.3f} "
              f"{min(new) * 1e3:9.3f} {min(new) / min(old):8.3f}")
    print(f"(median over {args.rounds} processes per tree of each process's best block, then the best overall)")


if __name__ == "__main__":
    main()
