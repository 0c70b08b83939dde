"""Print the results tables of docs/benchmarks.md (markdown) from a results JSON written by
`python -m peftkern bench --json`.

    python benchmarks/results_table.py benchmarks/results/<device>.json [--plot benchmarks/results/<device>.png]
Every number in the tables comes from that one file; `--plot` redraws its chart from the same file
(what `bench --plot` draws), so the chart can follow changes to the plot without a new measurement.
"""
import argparse
import json

from peftkern.bench import registry, report


def _ms(row, provider):
    r = row["results"].get(provider)
    return "-" if r is None else f"{r['median_ms']:.3f}"


def _mem(row, eager):
    vals = [row["results"][p]["peak_mem_mb"] for p in (eager, "peftkern", "floor")]
    return "-" if any(v is None for v in vals) else " / ".join(f"{v:.0f}" for v in vals)


def table(results: dict) -> str:
    load = results.get("background_load") or {}
    busy = (f" With {load['processes']} busy background process(es) running ({load['kind']})."
            if load.get("processes") else "")
    head = (f"From `{results['command']}` on {results['device']} ({results['device_type']}"
            f"{', %d threads' % results['cpu_threads'] if results['device_type'] == 'cpu' else ''}), "
            f"torch {results['torch']}, triton {results['triton']}, {results['date']}.{busy}")
    lines = [head, "", "| op | case | backend | eager ms | peftkern ms | floor ms | speedup vs eager | "
             "overhead vs floor | peak MB eager / peftkern / floor |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        r = row["results"]
        for eager, suffix in report.baselines(row):  # sparse apply: also against the in-place update by hand
            d = report.derived(row, eager)
            label = f"{row['label']} {suffix}" if suffix else row["label"]
            if "peftkern_fresh" in r and not suffix:
                label += f" (first-time validation: {_ms(row, 'peftkern_fresh')} ms)"
            if row.get("roofline"):
                label += f" (forward at {row['roofline']['forward_pct_of_copy_bw']:.0f}% of copy bandwidth)"
            lines.append(f"| {row['op']} | {label} | {row['backend']} | {_ms(row, eager)} | "
                         f"{_ms(row, 'peftkern')} | {_ms(row, 'floor')} | {d['speedup']:.2f}x | "
                         f"{100 * d['overhead']:+.1f}% | {_mem(row, eager)} |")
    eager = {}
    for row in results["rows"]:
        eager.setdefault(row["op"], row["eager_provider"])
    lines.append("")
    lines.append("Eager baselines: " + "; ".join(f"{op}: {name}" for op, name in eager.items()) + ".")
    for legend in report.legends(results):  # what an op's extra baseline is
        lines.append(legend[0].upper() + legend[1:] + ".")
    for op in registry.TABLE.values():  # each op's notes (a ratio against its target), under its heading
        notes = report.notes(results, op.name)
        if notes:
            lines += ["", op.notes_heading or f"`--op {op.name}`:", ""]
            lines += [f"- {line}" for line in notes]
            lines.append("")
    note = report.peak_memory_note(results)
    if note:
        lines.append(f"Peak memory \"-\": {note}.")
    if results.get("e2e"):
        e = results["e2e"]
        lines.append("")
        lines.append(f"End to end (`--op e2e`): random-init Llama, {e[0]['parameters'] / 1e6:.1f}M parameters, "
                     f"PEFT LoRA r=16 on q/k/v/o/gate/up/down, dropout {e[0]['dropout']}, batch {e[0]['batch']} x seq "
                     f"{e[0]['seq']}, {e[0]['dtype']}, {e[0]['steps']} timed steps:")
        lines.append("")
        lines.append("| variant | tokens/s | peak MB | layers on peftkern |")
        lines.append("|---|---|---|---|")
        for r in e:
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} ({r['memory_kind']}) | "
                         f"{r['layers_patched']} |")
    if results.get("ceilings"):
        c = results["ceilings"]
        lines.append(f"Measured ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
                     f"copy {c['copy_gb_per_s']:.0f} GB/s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a JSON file written by `python -m peftkern bench --json`")
    parser.add_argument("--plot", metavar="PNG", help="also redraw the chart from this JSON into PNG")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    print(table(results))
    if args.plot:
        report.plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
