"""python -m peftkern info | bench"""
from __future__ import annotations

import argparse
import json
import sys


def _info(_args) -> int:
    import peftkern

    info = peftkern.backend_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args) -> int:
    import torch

    from .bench import report, runner

    ops = list(runner.OPS) + ["e2e"] if args.op == "all" else [args.op]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = runner.run([op for op in ops if op != "e2e"], quick=args.quick, device=device)
    if results["rows"]:
        report.print_table(results)
    from .bench.providers import peft_available

    if "e2e" in ops and not peft_available():
        print("e2e skipped: it fine-tunes a Hugging Face PEFT model, and peft is not installed "
              "(pip install peft, or the bench extra)")
    elif "e2e" in ops:
        from .bench import e2e

        if device.type == "cuda" and not args.quick:
            settings = dict(size="1b", steps=20, batch=1, seq=2048, dropout=0.1)
        else:
            settings = dict(size="small", steps=3 if args.quick else 10, batch=4, seq=128 if args.quick else 256,
                            dropout=0.1)
        results["e2e"] = e2e.compare(**settings)
        e2e.print_rows(results["e2e"])
    if args.json:
        report.write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot and results["rows"]:
        try:
            report.plot(results, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib, or the bench extra); no chart written")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print backend_info(): versions, devices, extension, auto choices")
    bench = sub.add_parser("bench", help="time each op against the eager baseline and the F.linear floor")
    bench.add_argument("--op", choices=["lora", "adapter", "sparse", "e2e", "all"], default="all",
                       help="e2e: fine-tune a random-init Llama with PEFT LoRA, unpatched vs patched")
    bench.add_argument("--quick", action="store_true", help="fewer, smaller cases and repeats")
    bench.add_argument("--json", metavar="PATH", help="write all medians and metadata as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart of speedup and share of the floor")
    args = parser.parse_args(argv)
    return {"info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
