"""benchmarks/compare_trees.py: times the bench's peftkern step of two trees in alternating processes and prints
one line per case with both times and their ratio (here a tree against itself, one round, the quick cases)."""
import os
import pathlib
import re
import subprocess
import sys

import torch

from peftkern.bench import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compare_trees_prints_every_case_with_both_times_and_the_ratio():
    done = subprocess.run([sys.executable, "benchmarks/compare_trees.py", ".", ".", "--rounds", "1", "--op", "sparse",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    labels = [f"sparse {case.label}" for case in runner.cases_for("sparse", device, quick=True)]
    number = r"\s+(\d+\.\d{3})"
    for label in labels:
        line = re.search(re.escape(label) + number * 6, done.stdout)
        assert line, (label, done.stdout)
        old, new, ratio = (float(line.group(i)) for i in (1, 2, 3))
        # the ratio is of the unrounded times; the printed ones are rounded to 0.0005 ms
        assert old > 0 and new > 0 and abs(ratio - new / old) <= 0.0005 + ratio * (0.0005 / old + 0.0005 / new)
    assert "round 1/1 done" in done.stderr
