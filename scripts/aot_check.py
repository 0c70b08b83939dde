#!/usr/bin/env python3
"""Ahead-of-time compile check of peftkern's Triton kernels for sm_80 and sm_90, without a GPU: the command line.

    python scripts/aot_check.py [--allow-spills] [--cache DIR | --no-cache] [--arch 80,90] [--dry-run] ...

The check itself is the `aot` package beside this script (scripts/aot/: record, discover, plan, compile,
report); `--help` describes it. The names below are its public pieces, importable from here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aot.cli import _parse_archs, _positive, main  # noqa: E402,F401
from aot.compile import cache_file, cache_load, cache_store, compile_one, default_cache_dir, run_pool  # noqa: E402,F401
from aot.discover import coverage, discover  # noqa: E402,F401
from aot.driver import GRID_TARGETS, SETTINGS, drive, driver_calls, families  # noqa: E402,F401
from aot.plan import _tuner_configs, bind, plan, portable_key  # noqa: E402,F401
from aot.report import (  # noqa: E402,F401
    SMEM_LIMIT,
    config_label,
    exit_status,
    format_table,
    int_class,
    judge,
    parse_ptxas_log,
    spill_report,
    summary_line,
)

if __name__ == "__main__":
    sys.exit(main())
