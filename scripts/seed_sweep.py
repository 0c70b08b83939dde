"""Run the randomized accuracy tests over many seeds and report how close each case comes to its bound.

    python scripts/seed_sweep.py                      # 200 seeds (0..199) of the default selection
    python scripts/seed_sweep.py --seeds 20 --first 1000 tests/test_adapter.py -k gelu

Each seed is one pytest session with PEFTKERN_TEST_SEED=<seed> (tests/conftest.py), so any failure it finds
replays with the command printed beside it. The sessions run in this one process: torch, triton and the test
modules are imported once instead of once per seed, which is what makes hundreds of seeds affordable on a
small machine. Threads are pinned to one (the tests' shapes are tiny; more threads only contend).

The error/bound ratio of every passing `a <= b` / `a < b` assertion between two numbers is recorded through
pytest's assertion-pass hook (the tests need no change), keyed by test id, line and the assertion's
occurrence within the test (a loop over outputs asserts on the same line once per output). The report lists,
per test case, the worst ratio over all seeds and the seed that produced it; failures are listed with their
replay commands. Exit status 1 when any test failed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the float64-oracle tests of every family, plus the other randomized comparisons against a bound
DEFAULT_TESTS = [
    "tests/test_lora.py::test_forward_and_grads_match_float64_reference",
    "tests/test_lora.py::test_non_contiguous_inputs",
    "tests/test_lora.py::test_autocast_casts_to_the_autocast_dtype",
    "tests/test_adapter.py::test_forward_and_grads_match_float64_reference",
    "tests/test_adapter.py::test_non_contiguous_inputs_and_empty_batch",
    "tests/test_adapter.py::test_autocast",
    "tests/test_sparse_diff.py::test_linear_matches_float64_reference",
    "tests/test_nn.py::test_matches_pefts_own_lora_layer",
]
_NUMBER = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)"
_COMPARISON = re.compile(rf"^(?:assert )?({_NUMBER}) (<=|<) ({_NUMBER})$")


def _ratio(line: str) -> float | None:
    """a/b for an assertion explanation whose first line reads `a <= b` or `a < b` with two numbers."""
    match = _COMPARISON.match(line.strip())
    if match is None:
        return None
    a, b = float(match.group(1)), float(match.group(3))
    return a / b if b > 0 else None


class Recorder:
    """A pytest plugin: worst ratio per (test, line, occurrence) and every failure, across sessions."""

    def __init__(self):
        self.seed = None
        self.worst = {}  # (nodeid, lineno, occurrence) -> (ratio, seed, assertion text)
        self.failures = []  # (nodeid, seed, ratio or None, first line of the error)
        self.counts = collections.Counter()  # nodeid -> passed runs
        self._occurrence = collections.Counter()

    def pytest_runtest_setup(self, item):
        self._occurrence.clear()

    def pytest_assertion_pass(self, item, lineno, orig, expl):
        key = (item.nodeid, lineno)
        self._occurrence[key] += 1
        ratio = _ratio(expl.splitlines()[0]) if expl else None
        if ratio is None:
            return
        full = (*key, self._occurrence[key])
        if full not in self.worst or ratio > self.worst[full][0]:
            self.worst[full] = (ratio, self.seed, orig)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.counts[report.nodeid] += 1
        if report.failed:
            # pytest's "E   assert a <= b" lines of the failed assertion
            errors = [line[1:].strip() for line in report.longreprtext.splitlines() if line.startswith("E ")]
            ratios = [r for r in map(_ratio, errors) if r is not None]
            ratio = max(ratios) if ratios else None
            self.failures.append((report.nodeid, self.seed, ratio, errors[0] if errors else ""))
            full = (report.nodeid, None, "failed")
            if ratio is not None and (full not in self.worst or ratio > self.worst[full][0]):
                self.worst[full] = (ratio, self.seed, errors[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds (default 200)")
    parser.add_argument("--first", type=int, default=0, help="first seed; seeds are first, first+1, ...")
    parser.add_argument("--top", type=int, default=25, help="how many test cases to list, worst first")
    parser.add_argument("--json", type=Path, help="also write every case's worst ratio here")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to narrow the selection")
    parser.add_argument("tests", nargs="*", help=f"pytest node ids (default: {len(DEFAULT_TESTS)} randomized suites)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.first < 0:
        parser.error(f"--first must be non-negative, got {args.first}")

    os.chdir(ROOT)
    scratch = Path(tempfile.mkdtemp(prefix="peftkern-seed-sweep-"))
    # assertion rewriting must see the pass hook: rewritten modules cached by earlier runs (without it) are
    # not reused, and the ones written now go to the scratch folder, removed at the end
    sys.pycache_prefix = str(scratch / "pycache")
    import pytest
    import torch

    torch.set_num_threads(1)
    recorder = Recorder()
    # no terminal output per session (this script reports), no cache folder, no test reordering plugin
    pytest_args = ["-p", "no:terminal", "-p", "no:cacheprovider", "-p", "no:randomly",
                   "-o", "enable_assertion_pass_hook=true",
                   *(["-k", args.keyword] if args.keyword else []), *(args.tests or DEFAULT_TESTS)]
    start = time.monotonic()
    try:
        for seed in range(args.first, args.first + args.seeds):
            recorder.seed = seed
            os.environ["PEFTKERN_TEST_SEED"] = str(seed)
            code = pytest.main(pytest_args, plugins=[recorder])
            if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
                print(f"seed {seed}: pytest stopped with {code!r}", file=sys.stderr)
                return 2
            print(f"seed {seed}: {len(recorder.failures)} failure(s) so far, {time.monotonic() - start:.0f} s",
                  flush=True)
    finally:
        os.environ.pop("PEFTKERN_TEST_SEED", None)
        shutil.rmtree(scratch, ignore_errors=True)

    by_case = {}
    for (nodeid, lineno, occurrence), (ratio, seed, orig) in recorder.worst.items():
        if nodeid not in by_case or ratio > by_case[nodeid][0]:
            where = "failed" if lineno is None else f"line {lineno} #{occurrence}"
            by_case[nodeid] = (ratio, seed, f"{where}: {orig}")
    ranked = sorted(by_case.items(), key=lambda kv: -kv[1][0])
    print(f"\n{len(by_case)} test cases x {args.seeds} seeds ({args.first}..{args.first + args.seeds - 1}), "
          f"{sum(recorder.counts.values())} passing runs, {len(recorder.failures)} failure(s), "
          f"{time.monotonic() - start:.0f} s")
    if ranked:
        ratios = sorted(r for r, _, _ in by_case.values())
        print(f"worst error/bound ratio per case: median {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f}; "
              f"cases above 0.8: {sum(r > 0.8 for r in ratios)}")
    print(f"\nworst {min(args.top, len(ranked))} cases (ratio, seed, assertion):")
    for nodeid, (ratio, seed, where) in ranked[:args.top]:
        print(f"  {ratio:6.3f}  seed {seed:<6} {nodeid}  [{where}]")
    if recorder.failures:
        print("\nfailures (replay from the repository root):")
        for nodeid, seed, ratio, message in recorder.failures:
            shown = f"ratio {ratio:.3f}, " if ratio is not None else ""
            print(f"  {shown}{message}\n    PEFTKERN_TEST_SEED={seed} python -m pytest {shlex.quote(nodeid)}")
    if args.json:
        args.json.write_text(json.dumps({
            "seeds": [args.first, args.first + args.seeds - 1], "tests": args.tests or DEFAULT_TESTS,
            "cases": {nodeid: {"worst_ratio": r, "seed": s, "assertion": w} for nodeid, (r, s, w) in ranked},
            "failures": [{"test": n, "seed": s, "ratio": r, "message": m} for n, s, r, m in recorder.failures],
        }, indent=1))
    return 1 if recorder.failures else 0


if __name__ == "__main__":
    sys.exit(main())
