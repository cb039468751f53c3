"""Plot the latest run of ``bench_kernels.py`` on one device: forward + backward times per method.

One panel per regime: median time (20th-80th percentile bars) against the number of
elements per input, one line per method, with the launch floor as a grey line::

    python benchmarks/plot_kernels.py                                        # newest device run
    python benchmarks/plot_kernels.py benchmarks/results/kernels.csv --device H100 --out h100.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize_kernels import DEFAULT_CSV, METHOD_ORDER, REGIME_TITLE, latest_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--device", help="a substring of the device name (default: the newest run)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the CSV, named after the device)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as f:
        runs = latest_runs(list(csv.DictReader(f)))
    if args.device is not None:
        runs = {d: r for d, r in runs.items() if args.device in d}
    if not runs:
        print(f"no run in {args.csv}" + (f" on a device matching {args.device!r}" if args.device else ""))
        return 1
    device, run = max(runs.items(), key=lambda kv: kv[1][0]["time"])
    full = [r for r in run if r["pass"] == "full" and r["dtype"] == args.dtype]
    regimes = sorted({r["regime"] for r in full})
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        sel = [r for r in full if r["regime"] == regime]
        for method in [m for m in METHOD_ORDER if any(r["method"] == m for r in sel)]:
            pts = sorted((int(r["rows"]) * int(r["n"]), r) for r in sel if r["method"] == method)
            x = [p[0] for p in pts]
            y = [float(p[1]["ms_p50"]) for p in pts]
            lo = [y_ - float(p[1]["ms_p20"]) for y_, p in zip(y, pts)]
            hi = [float(p[1]["ms_p80"]) - y_ for y_, p in zip(y, pts)]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=method)
        ax.axhline(float(run[0]["floor_ms"]), color="grey", lw=0.8, ls="--", label="launch floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements per input (rows x n)")
        ax.set_ylabel("forward + backward, ms (median, p20-p80)")
        ax.set_title(REGIME_TITLE.get(regime, regime), fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"{device} @ {run[0]['commit']} ({args.dtype})", fontsize=10)
    fig.tight_layout()
    out = args.out
    if out is None:
        slug = "cuda" if not device.startswith("CPU") else "cpu"
        out = args.csv.parent / f"kernels_{slug}.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
