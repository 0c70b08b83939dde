"""The benchmark table (rich), the JSON file and the PNG chart, all from one results dict."""
from __future__ import annotations

import json


def derived(row: dict) -> dict:
    r = row["results"]
    fused, eager, floor = r["peftkern"]["median_ms"], r["eager"]["median_ms"], r["floor"]["median_ms"]
    return {"speedup": eager / fused, "overhead": fused / floor - 1.0}


COLUMNS = ("op", "shape", "backend", "eager ms", "peftkern ms", "floor ms", "speedup vs eager",
           "overhead vs floor", "peak MB eager/peftkern/floor")


def table_rows(results: dict) -> list[tuple[str, ...]]:
    rows = []
    for row in results["rows"]:
        r, d = row["results"], derived(row)

        def mem(name):
            v = r[name]["peak_mem_mb"]
            return "-" if v is None else f"{v:.0f}"

        rows.append((row["op"], row["label"], row["backend"], f"{r['eager']['median_ms']:.3f}",
                     f"{r['peftkern']['median_ms']:.3f}", f"{r['floor']['median_ms']:.3f}",
                     f"{d['speedup']:.2f}x", f"{100 * d['overhead']:+.1f}%",
                     f"{mem('eager')}/{mem('peftkern')}/{mem('floor')}"))
    return rows


def print_table(results: dict) -> None:
    title = (f"peftkern bench on {results['device']} ({results['device_type']}"
             f"{', %d threads' % results['cpu_threads'] if results['device_type'] == 'cpu' else ''}), "
             f"torch {results['torch']}, triton {results['triton']}; fwd+bwd median ms")
    rows = table_rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is in the bench extra; without it, a plain aligned table
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
        print(title)
        for line in [COLUMNS] + rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    else:
        table = Table(title=title)
        for col in COLUMNS:
            table.add_column(col, justify="right" if "ms" in col or "vs" in col else "left")
        for line in rows:
            table.add_row(*line)
        console = Console()
        if not console.is_terminal:  # piped into a file or CI log: do not squeeze the table to 80 columns
            console = Console(width=200)
        console.print(table)
    for op, what in (("lora", "bare F.linear of the frozen base, fwd+bwd"),
                     ("adapter", "one elementwise pass over h (fwd) and dy (bwd)"),
                     ("sparse", "apply: in-place index_put_(accumulate=True); linear: bare F.linear fwd+bwd")):
        row = next((r for r in results["rows"] if r["op"] == op), None)
        if row is not None:
            print(f"{op}: eager = {row['eager_provider']}; floor = {what}")
    for row in results["rows"]:
        if row.get("roofline"):
            print(f"{row['label']}: forward {row['roofline']['forward_gb_per_s']:.0f} GB/s = "
                  f"{row['roofline']['forward_pct_of_copy_bw']:.0f}% of the measured copy bandwidth")
    for row in results["rows"]:
        fresh = row["results"].get("peftkern_fresh")
        if fresh:
            print(f"{row['label']}: peftkern with first-time index validation {fresh['median_ms']:.3f} ms")
    if results.get("ceilings"):
        c = results["ceilings"]
        print(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gb_per_s']:.0f} GB/s")


def write_json(results: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [row["label"] for row in rows]
    speedup = [derived(row)["speedup"] for row in rows]
    of_floor = [row["results"]["floor"]["median_ms"] / row["results"]["peftkern"]["median_ms"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 3), 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], speedup, width=0.4, label="speedup vs eager (x)")
    ax.bar([x + 0.2 for x in xs], of_floor, width=0.4, label="floor time / peftkern time")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(f"peftkern on {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
