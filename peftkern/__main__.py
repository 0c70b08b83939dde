"""python -m peftkern info | bench   (python -m peftkern --version)"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time


def bench_ops() -> tuple[str, ...]:
    """Every op `bench --op` accepts besides "all"; docs/benchmarks.md lists the same (tests/test_cli.py
    checks it)."""
    from .bench.runner import OPS

    return (*OPS, "e2e")


def _op_help() -> str:
    """--op's help: each discovered op with what it times, then e2e and all."""
    from .bench.registry import TABLE

    return "; ".join([f"{op.name}: {op.help}" for op in TABLE.values()]
                     + ["e2e: fine-tune a random-init Llama with PEFT LoRA, unpatched vs patched",
                        "all (default): every one of them"])


def _info(_args) -> int:
    import peftkern

    info = peftkern.backend_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")
    return 0


class OutputPathError(Exception):
    """A --json/--plot destination the bench could not write: raised before any timing starts."""


def _probe_writable(folder: str) -> None:
    """Create and remove a file in `folder` (a real test: os.access says yes to root on a read-only mount)."""
    fd, probe = tempfile.mkstemp(prefix=".peftkern-write-check-", dir=folder)
    os.close(fd)
    os.remove(probe)


def prepare_output(flag: str, path: str, *, create: bool) -> str:
    """Check, before the bench times anything, that `path` (the value of `flag`) can be written once it ends.

    Missing parent folders are created when `create` (a real run) and only checked otherwise (--dry-run: the
    nearest existing folder must take new entries). An existing file is opened for appending (so its contents
    stay as they are until the results replace them); a path that is a folder, or under a file, fails. Returns
    a line saying where the output goes; raises OutputPathError saying why it cannot."""
    target = os.path.abspath(path)
    if os.path.isdir(target) or path.endswith((os.sep, "/")):
        raise OutputPathError(f"{flag} {path}: that is a folder; give a file name (e.g. {os.path.join(path, 'bench')}"
                              f"{'.json' if flag == '--json' else '.png'})")
    parent = os.path.dirname(target)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputPathError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    try:
        if parent != existing and create:
            os.makedirs(parent, exist_ok=True)
            existing = parent
        if os.path.exists(target):
            with open(target, "a", encoding="utf-8"):
                pass
        else:
            _probe_writable(existing)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    if parent != existing:
        return f"{flag}: would create {parent} and write {target}"
    return f"{flag}: {'would write' if not create else 'writes'} {target}"


def _prepare_outputs(args, *, create: bool) -> list[str]:
    return [prepare_output(flag, path, create=create)
            for flag, path in (("--json", args.json), ("--plot", args.plot)) if path]


def _fallback_json(results: dict) -> str:
    """Write the results to a fresh file in the temp folder, or, failing that, to stderr; say where."""
    from .bench import report

    try:
        fd, path = tempfile.mkstemp(prefix="peftkern-bench-", suffix=".json")
        os.close(fd)
        report.write_json(results, path)
        return path
    except OSError:
        print(json.dumps(results, indent=1), file=sys.stderr)
        return "the JSON printed above on stderr"


def _dry_run(ops: list[str], args, device) -> int:
    """Print what the bench would time, without building tensors or timing anything."""
    from .bench import e2e, runner

    print(f"peftkern bench --dry-run on {device.type}{' (--quick)' if args.quick else ''}, "
          f"background load: {args.background_load} busy process(es)")
    for line in _prepare_outputs(args, create=False):
        print(line)
    for op in ops:
        if op == "e2e":
            s = e2e.bench_settings(device.type, args.quick)
            print(f"e2e: fine-tune {e2e.size_summary(s['size'])}; PEFT vs patched, each in a fresh process, "
                  f"{s['steps']} steps of batch {s['batch']} x seq {s['seq']}, dropout {s['dropout']}")
            continue
        for case in runner.cases_for(op, device, quick=args.quick):
            print(f"{op}: {case.family}: {case.label}")
    return 0


def _bench(args) -> int:
    import torch

    from .bench import report, runner
    from .bench.background import BackgroundLoad

    ops = list(bench_ops()) if args.op == "all" else [args.op]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # where the results go, checked (and missing folders made) before minutes of timing
        if args.dry_run:
            return _dry_run(ops, args, device)
        _prepare_outputs(args, create=True)
    except OutputPathError as exc:
        print(f"python -m peftkern bench: error: {exc}; nothing was timed", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("--plot needs matplotlib (pip install matplotlib, or the bench extra); no chart will be written",
              flush=True)
    started = time.perf_counter()
    with BackgroundLoad(args.background_load) as load:
        if load.n:
            print(f"background load: {load.n} busy process(es) running (pids {' '.join(map(str, load.pids))}), "
                  f"each a {load.describe()['kind']}; stopped when the bench ends", flush=True)
        def write_partial(partial: dict) -> None:  # after every case: a run cut short keeps what it measured
            try:
                report.write_json(partial, args.json)
            except OSError:
                pass  # reported when the final results are written

        results = runner.run([op for op in ops if op != "e2e"], quick=args.quick, device=device,
                             background_load=load.describe(), on_row=write_partial if args.json else None)
        if results["rows"]:
            report.print_table(results)
        from .bench.providers import peft_available

        if "e2e" in ops and not peft_available():
            print("e2e skipped: it fine-tunes a Hugging Face PEFT model, and peft is not installed "
                  "(pip install peft, or the bench extra)")
        elif "e2e" in ops:
            from .bench import e2e

            results["e2e"] = e2e.compare(**e2e.bench_settings(device.type, args.quick))
            e2e.print_rows(results["e2e"])
    if load.n:
        print(f"background load: {load.n} process(es) stopped")
    results["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"bench took {results['wall_s']:.0f} s")
    status = 0
    if args.json:
        try:
            report.write_json(results, args.json)
            print(f"wrote {args.json}")
        except OSError as exc:  # e.g. the folder went away during the run: the results are kept all the same
            print(f"could not write {args.json} ({exc.strerror or exc}); the results are in {_fallback_json(results)}",
                  file=sys.stderr)
            status = 1
    if args.plot and (results["rows"] or results.get("e2e")):
        try:
            report.plot(results, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib, or the bench extra); no chart written")
        except OSError as exc:
            print(f"could not write {args.plot} ({exc.strerror or exc})", file=sys.stderr)
            status = 1
    return status


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more processes, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    import peftkern

    parser = argparse.ArgumentParser(prog="python -m peftkern", description=__doc__)
    parser.add_argument("--version", action="version", version=f"peftkern {peftkern.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print backend_info(): versions, devices, extension, auto choices")
    bench = sub.add_parser("bench", help="time each op against the eager baseline and the F.linear floor")
    bench.add_argument("--op", choices=[*bench_ops(), "all"], default="all", help=_op_help())
    bench.add_argument("--quick", action="store_true",
                       help="fewer, smaller cases and repeats; on CPU also no peak-memory measurement "
                            "(it needs a fresh process per provider), so that column shows \"-\"")
    bench.add_argument("--background-load", type=_non_negative_int, default=0, metavar="N",
                       help="keep N busy processes (single-threaded matmul loops) running for the whole "
                            "bench, to show how the CPU rows hold up on a loaded machine; recorded in the "
                            "table header and JSON; stopped when the bench ends, Ctrl-C included")
    bench.add_argument("--dry-run", action="store_true",
                       help="list the cases each op would time and exit, timing nothing")
    bench.add_argument("--json", metavar="PATH", help="write all medians and metadata as JSON (missing folders "
                       "are created, and a path that cannot be written fails before anything is timed)")
    bench.add_argument("--plot", metavar="PATH",
                       help="write a PNG chart: one panel per op family, speedup and share of the floor "
                            "(missing folders created, checked before timing, as --json)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
