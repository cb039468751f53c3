"""Plot the kernel benchmark CSV written by ``bench_kernels.py``.

python benchmarks/plot_kernels.py benchmarks/results/kernels.csv --out benchmarks/results/kernels.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--out", default="benchmarks/results/kernels.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as f:
        rows = [r for r in csv.DictReader(f) if r["pass"] == "full"]
    if not rows:
        print(f"no 'full' rows in {args.csv}")
        return 1
    last = rows[-1]["commit"]
    rows = [r for r in rows if r["commit"] == last]
    series = defaultdict(list)
    for r in rows:
        series[(r["regime"], r["dtype"])].append((int(r["rows"]) * int(r["n"]), float(r["speedup"])))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (regime, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{regime} {dtype}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("elements per tensor (rows x n)")
    ax.set_ylabel("speed-up over PyTorch reference (fwd+bwd)")
    ax.set_title(f"{rows[0]['device']} @ {last}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
