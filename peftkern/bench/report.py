"""The benchmark table (rich), the JSON file and the PNG chart, all from one results dict."""
from __future__ import annotations

import json

# the eager baselines of a row: (results key, how the table names a second one)
EAGER_BASELINES = (("eager", ""), ("eager_inplace", "vs in-place by hand"))
BAR_NAMES = {"eager": "speedup vs eager", "eager_inplace": "speedup vs in-place eager written by hand"}

def family(row: dict) -> str:
    """The op family of a row (what `auto` dispatches on): its "family", or, in older JSON files that lack it, its
    case's."""
    if "family" in row:
        return row["family"]
    from .registry import case_from_dict

    return case_from_dict(row["op"], row["case"]).family


def derived(row: dict, eager: str = "eager") -> dict:
    r = row["results"]
    fused, base, floor = r["peftkern"]["median_ms"], r[eager]["median_ms"], r["floor"]["median_ms"]
    return {"speedup": base / fused, "overhead": fused / floor - 1.0}


def _bench_op(row: dict):
    """The BenchOp a row came from (None for an op this version no longer has)."""
    from .registry import TABLE

    return TABLE.get(row["op"])


def notes(results: dict, op: str | None = None) -> list[str]:
    """The lines the rows' ops print under the table (BenchOp.notes), in row order; only `op`'s when given."""
    lines = []
    for row in results["rows"]:
        declared = _bench_op(row)
        if declared is not None and declared.notes is not None and op in (None, declared.name):
            lines += declared.notes(row, results.get("device_type", "cpu"))
    return lines


def legends(results: dict) -> list[str]:
    """Each op's legend (BenchOp.legend), once, for the ops that have rows."""
    found = []
    for row in results["rows"]:
        declared = _bench_op(row)
        if declared is not None and declared.legend and declared.legend not in found:
            found.append(declared.legend)
    return found


def baselines(row: dict) -> list[tuple[str, str]]:
    """The (results key, label suffix) of each eager baseline this row was timed against."""
    return [(key, suffix) for key, suffix in EAGER_BASELINES if key in row["results"]]


COLUMNS = ("op", "shape", "backend", "eager ms", "peftkern ms", "floor ms", "speedup vs eager",
           "overhead vs floor", "peak MB eager/peftkern/floor")


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """One line per row and eager baseline (sparse apply has two: a scatter into a copy, and in place)."""
    rows = []
    for row in results["rows"]:
        r = row["results"]
        for eager, suffix in baselines(row):
            d = derived(row, eager)

            def mem(name):
                v = r[name]["peak_mem_mb"]
                return "-" if v is None else f"{v:.0f}"

            label = f"{row['label']} {suffix}" if suffix else row["label"]
            rows.append((row["op"], label, row["backend"], f"{r[eager]['median_ms']:.3f}",
                         f"{r['peftkern']['median_ms']:.3f}", f"{r['floor']['median_ms']:.3f}",
                         f"{d['speedup']:.2f}x", f"{100 * d['overhead']:+.1f}%",
                         f"{mem(eager)}/{mem('peftkern')}/{mem('floor')}"))
    return rows


def title(results: dict) -> str:
    cpu = results["device_type"] == "cpu"
    load = results.get("background_load") or {}
    busy = (f"; background load: {load['processes']} busy process{'es' if load['processes'] > 1 else ''} "
            f"({load['kind']})" if load.get("processes") else "")
    return (f"peftkern bench on {results['device']} ({results['device_type']}"
            f"{', %d threads' % results['cpu_threads'] if cpu else ''}), "
            f"torch {results['torch']}, triton {results['triton']}; {_timed(results)} median ms{busy}")


def _timed(results: dict) -> str:
    """What a row's step is (BenchOp.timed): "fwd+bwd", or each op's own where the ops differ."""
    from .declare import BenchOp

    default = BenchOp.timed
    timed = {}
    for row in results["rows"]:
        declared = _bench_op(row)
        timed[row["op"]] = declared.timed if declared is not None else default
    kinds = set(timed.values())
    if len(kinds) == 1:
        return kinds.pop()
    return default + "".join(f"; {op}: {t}" for op, t in timed.items() if t != default)


def peak_memory_note(results: dict) -> str | None:
    """Why the peak-memory column shows "-" (None when every value was measured)."""
    if all(v.get("peak_mem_mb") is not None for row in results["rows"] for v in row["results"].values()):
        return None
    return results.get("peak_mem_note") or "peak memory was not measured for the rows showing \"-\""


def print_table(results: dict) -> None:
    rows = table_rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is in the bench extra; without it, a plain aligned table
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
        print(title(results))
        for line in [COLUMNS] + rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    else:
        table = Table(title=title(results))
        for col in COLUMNS:
            table.add_column(col, justify="right" if "ms" in col or "vs" in col else "left")
        for line in rows:
            table.add_row(*line)
        console = Console()
        if not console.is_terminal:  # piped into a file or CI log: do not squeeze the table to 80 columns
            console = Console(width=200)
        console.print(table)
    from .registry import TABLE

    for op in TABLE.values():
        row = next((r for r in results["rows"] if r["op"] == op.name), None)
        if row is not None:
            print(f"{op.name}: eager = {row['eager_provider']}; floor = {op.floor}")
    for line in legends(results) + notes(results):
        print(line)
    note = peak_memory_note(results)
    if note:
        print(f"peak MB \"-\": {note}")
    for row in results["rows"]:
        if row.get("roofline"):
            print(f"{row['label']}: forward {row['roofline']['forward_gb_per_s']:.0f} GB/s = "
                  f"{row['roofline']['forward_pct_of_copy_bw']:.0f}% of the measured copy bandwidth")
    for row in results["rows"]:
        r = row["results"]
        if "peftkern_fused" in r:
            chosen = sorted({f"{k.split('|')[1]}: {v['variant']}" for k, v in (row.get("dispatch") or {}).items()})
            print(f"{row['label']}: fused {r['peftkern_fused']['median_ms']:.3f} ms, composite "
                  f"{r['peftkern_composite']['median_ms']:.3f} ms, measured dispatch "
                  f"{r['peftkern']['median_ms']:.3f} ms ({', '.join(chosen) or 'chosen earlier'})")
    for row in results["rows"]:
        fresh = row["results"].get("peftkern_fresh")
        if fresh:
            print(f"{row['label']}: peftkern with first-time index validation {fresh['median_ms']:.3f} ms")
    if results.get("ceilings"):
        c = results["ceilings"]
        print(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gb_per_s']:.0f} GB/s")


def write_json(results: dict, path: str) -> None:
    """Written whole or not at all (a temp file renamed over `path`): the bench rewrites it after every case,
    and a run killed mid-write (a GPU visit's timeout) must leave the previous complete file."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".peftkern-bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plot_panels(results: dict) -> list[tuple[str, list[tuple[str, list[tuple[str, float]]]]]]:
    """What the chart draws: [(op family, [(case label, [(bar name, ratio)])])], every ratio "higher is
    better" with 1.0 = parity. Kept apart from matplotlib so it can be checked without drawing."""
    panels: dict[str, list] = {}
    for row in results["rows"]:
        r = row["results"]
        bars = [(BAR_NAMES[eager], derived(row, eager)["speedup"]) for eager, _ in baselines(row)]
        bars.append(("floor time / peftkern time", r["floor"]["median_ms"] / r["peftkern"]["median_ms"]))
        declared = _bench_op(row)
        if declared is not None and declared.bars is not None:
            bars += declared.bars(row)
        panels.setdefault(family(row), []).append((row["label"], bars))
    e2e = results.get("e2e") or []
    by_variant = {e["variant"]: e for e in e2e}
    if {"peft", "peftkern"} <= set(by_variant):
        peft, kern = by_variant["peft"], by_variant["peftkern"]
        label = f"{peft['parameters'] / 1e6:.1f}M Llama, {peft['batch']}x{peft['seq']}"
        panels["e2e"] = [(label, [("tokens/s, patched / PEFT", kern["tokens_per_s"] / peft["tokens_per_s"]),
                                  ("peak memory, PEFT / patched", peft["peak_mem_mb"] / kern["peak_mem_mb"])])]
    return list(panels.items())


def plot(results: dict, path: str) -> None:
    """Write the chart of `figure(results)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(results: dict):
    """One panel per op family (each with its own log axis, so a 40x sparse bar does not flatten the
    LoRA bars), the family named in every label, the 1.0 line labelled, values written on the bars.
    Returns the matplotlib Figure; the caller closes it (matplotlib.pyplot.close).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ratio = FuncFormatter(lambda v, _: f"{v:g}x")

    panels = plot_panels(results)
    if not panels:
        raise ValueError("nothing to plot: the results have no rows and no e2e comparison")
    widths = [max(2, sum(len(bars) for _, bars in cases)) for _, cases in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 0.9 * sum(widths) + 2), 5.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    colors = {}
    for ax, (fam, cases) in zip(axes[0], panels):
        n_bars = max(len(bars) for _, bars in cases)
        width = 0.8 / n_bars
        values = []
        for x, (_, bars) in enumerate(cases):
            for j, (name, value) in enumerate(bars):
                color = colors.setdefault(name, f"C{len(colors)}")
                pos = x - 0.4 + width * (j + 0.5)
                ax.bar(pos, value, width=width, color=color, label=name)
                ax.annotate(f"{value:.2f}x", (pos, value), ha="center", va="bottom", fontsize=6)
                values.append(value)
        ax.set_yscale("log")
        low, high = min(values + [1.0]), max(values + [1.0])
        ax.set_ylim(low / 1.6, high * 1.8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.annotate("1.0 = parity", (0.99, 1.0), xycoords=("axes fraction", "data"), ha="right", va="top",
                    fontsize=7, bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{fam}\n{label}" for label, _ in cases], rotation=35, ha="right", fontsize=6)
        ax.set_title(fam, fontsize=9)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.yaxis.set_major_formatter(ratio)  # 0.5x, 2x, 40x rather than 5 x 10^-1
        ax.yaxis.set_minor_formatter(ratio if high / low < 20 else NullFormatter())
    axes[0][0].set_ylabel("ratio, higher is better (log scale)")
    handles, names = [], []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    load = results.get("background_load") or {}
    busy = f", {load['processes']} busy background process(es)" if load.get("processes") else ""
    fig.suptitle(f"peftkern on {results['device']} ({results['device_type']}{busy})", fontsize=10)
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 3), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    return fig
