"""Markdown table of the latest kernel benchmark run on each device, from the CSV.

Forward + backward (``full`` pass) medians in milliseconds with the 20th-80th
percentiles, and each method's speed-up over the baseline measured in the same run.
With ``--readme`` the table replaces the block between the README's markers, so the
README's numbers always come from the CSV::

    python benchmarks/summarize_kernels.py                            # print the table
    python benchmarks/summarize_kernels.py --readme README.md         # update the README
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "benchmarks" / "results" / "kernels.csv"
BEGIN, END = "<!-- kernels-table:begin -->", "<!-- kernels-table:end -->"
METHOD_ORDER = (
    "otloss_triton", "otloss_torch", "minimal", "minimal_stable", "trl_eager", "trl_compile",
    "eager", "eager_stable", "eager_compile", "pot",
)  # fmt: skip
REGIME_TITLE = {
    "aot": (
        "Paired AOT loss (logistic, beta 0.01) from four log-prob vectors (n = 1: the per-call overhead); "
        "baseline the minimal hand-written formula (two sorts, logsigmoid, mean)"
    ),
    "w2": "Squared W2 between rows of u and v; baseline the eager sort formula",
}


def machine(device: str) -> str:
    """The device without its CPU thread count: runs of one CPU with 1 or 2 threads are one machine's."""
    return re.sub(r" \(\d+ threads?\)$", "", device)


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of the newest run of each machine, keyed by that run's device name."""
    newest: dict[str, tuple[str, str]] = {}
    for r in rows:
        key = machine(r["device"])
        newest[key] = max(newest.get(key, ("", "")), (r["time"], r["device"]))
    return {
        d: [r for r in rows if r["device"] == d and r["time"] == t]
        for t, d in sorted(newest.values(), key=lambda x: x[1])
    }


def table(rows: list[dict]) -> str:
    out = []
    for device, run in latest_runs(rows).items():
        first = run[0]
        out.append(
            f"**{device}**, commit `{first['commit']}`, torch {first['torch']}, {first['time']} "
            f"(launch floor {float(first['floor_ms']) * 1e3:.1f} us)."
        )
        full = [r for r in run if r["pass"] == "full"]
        for regime in sorted({r["regime"] for r in full}):
            sel = [r for r in full if r["regime"] == regime]
            methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in sel)]
            out.append("")
            out.append(f"{REGIME_TITLE.get(regime, regime)}, forward + backward, ms (p20-p80) and speed-up:")
            out.append("")
            out.append("| dtype | rows x n | " + " | ".join(f"`{m}`" for m in methods) + " |")
            out.append("|---|---|" + "---|" * len(methods))
            cases = sorted({(r["dtype"], int(r["rows"]), int(r["n"])) for r in sel})
            for dtype, nrows, n in cases:
                cells = []
                for m in methods:
                    hit = [
                        r for r in sel if (r["dtype"], int(r["rows"]), int(r["n"]), r["method"]) == (dtype, nrows, n, m)
                    ]
                    if not hit:
                        cells.append("-")
                        continue
                    r = hit[0]
                    cells.append(
                        f"{float(r['ms_p50']):.3f} ({float(r['ms_p20']):.3f}-{float(r['ms_p80']):.3f}) "
                        f"x{float(r['speedup']):.2f}"
                    )
                out.append(f"| {dtype} | {nrows} x {n} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"the file has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--readme", type=Path, help="rewrite the table block of this Markdown file")
    args = parser.parse_args(argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"no rows in {args.csv}")
        return 1
    block = table(rows)
    if args.readme is None:
        print(block, end="")
    else:
        args.readme.write_text(replace_block(args.readme.read_text(), block))
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
