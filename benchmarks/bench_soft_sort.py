"""l2 soft sort: otloss against torchsort, forward + backward, side by side in one run.

For each shape ``rows x n`` and setting, both methods run on the same float32 input
``scale * randn(rows, n)`` (fixed seed), with ``regularization="l2"`` and the same
``eps``; a sample is one forward plus one backward with a random upstream gradient, and
the two methods alternate sample by sample so that they share the machine's load.
Settings:

* ``paper``: ``eps = 0.1`` on ``randn`` values (the AOT paper's strength on log-ratios
  of order one); no gap reaches ``1 / eps`` there, so no block pools and the soft sort
  is the hard sort.
* ``pooled``: ``eps = 10`` on ``randn`` values: many gaps exceed ``1 / eps = 0.1`` and
  the block search runs (``pooled_frac`` is the fraction of positions whose value
  differs from the hard sort).

Each row of the CSV holds the median and the 20th/80th percentiles in microseconds of
wall-clock time (``median_us``...) and of the process's CPU time (``cpu_median_us``...,
from ``time.process_time``: on a shared machine it leaves out the time the process
waited for a core), ``speedup`` and ``cpu_speedup`` (torchsort's median over the
method's, same run) and the provenance: run time, commit, CPU, threads, torch and
torchsort versions::

    python benchmarks/bench_soft_sort.py                 # measure: all shapes, both settings
    python benchmarks/bench_soft_sort.py --settings paper --samples 50
    python benchmarks/bench_soft_sort.py --plot          # plot the CSV's latest run (measures nothing)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch
from provenance import append_csv
from provenance import commit as _commit
from provenance import cpu_name as _cpu_name
from provenance import version as _version

import otloss

__all__ = ["main", "plot"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "soft_sort.csv"
DEFAULT_PNG = ROOT / "benchmarks" / "results" / "soft_sort_cpu.png"
SHAPES = ((1, 35), (1, 1024), (1, 16384), (64, 1024), (1024, 128))
SETTINGS = {"paper": (0.1, 1.0), "pooled": (10.0, 1.0)}  # name -> (eps, scale of randn)
FIELDS = (
    "run",
    "commit",
    "device",
    "threads",
    "torch",
    "torchsort",
    "setting",
    "eps",
    "rows",
    "n",
    "pooled_frac",
    "method",
    "samples",
    "median_us",
    "p20_us",
    "p80_us",
    "speedup",
    "cpu_median_us",
    "cpu_p20_us",
    "cpu_p80_us",
    "cpu_speedup",
)


def _samples_for(numel: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    return 300 if numel <= 2048 else 60 if numel <= 20000 else 25


def bench_case(rows: int, n: int, eps: float, scale: float, samples: int) -> dict[str, dict[str, list[float]]]:
    """Alternating fwd+bwd timings (seconds) of both methods on one input: ``{method: {"wall": [...], "cpu": [...]}}``."""
    import torchsort

    g = torch.Generator().manual_seed(rows * 100_003 + n)
    x = (scale * torch.randn(rows, n, generator=g)).requires_grad_()
    w = torch.randn(rows, n, generator=g)
    methods = {
        "otloss": lambda: otloss.soft_sort(x, eps),
        "torchsort": lambda: torchsort.soft_sort(x, regularization="l2", regularization_strength=eps),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in methods}
    order = list(methods)
    for i in range(samples + 3):
        for name in order if i % 2 else order[::-1]:
            x.grad = None
            t0, c0 = time.perf_counter(), time.process_time()
            methods[name]().backward(w)
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= 3:  # warm-up
                times[name]["wall"].append(t1 - t0)
                times[name]["cpu"].append(c1 - c0)
    return times


def plot(csv_path: Path, png_path: Path) -> None:
    """Bar chart of the CSV's latest run: median fwd+bwd CPU time per shape, with p20-p80 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    latest = max(r["run"] for r in rows)
    rows = [r for r in rows if r["run"] == latest]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        sub = [r for r in rows if r["setting"] == setting]
        shapes = list(dict.fromkeys(f"{r['rows']}x{r['n']}" for r in sub))
        for k, method in enumerate(("otloss", "torchsort")):
            mine = {f"{r['rows']}x{r['n']}": r for r in sub if r["method"] == method}
            med = np.array([float(mine[s]["cpu_median_us"]) for s in shapes])
            lo = med - np.array([float(mine[s]["cpu_p20_us"]) for s in shapes])
            hi = np.array([float(mine[s]["cpu_p80_us"]) for s in shapes]) - med
            ax.bar(np.arange(len(shapes)) + (k - 0.5) * 0.4, med, 0.4, yerr=[lo, hi], label=method, capsize=3)
        ax.set_xticks(np.arange(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_xlabel("rows x n")
        ax.set_ylabel("forward + backward, median CPU time (us)")
        ax.set_title(f"{setting}: eps = {sub[0]['eps']}")
        ax.legend()
    fig.suptitle(f"l2 soft sort, float32, {rows[0]['device']}, {rows[0]['threads']} thread(s), {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--samples", type=int, default=None, help="samples per method (default: by size)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--plot", action="store_true", help="plot the latest run of --out to --png and exit")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.out, args.png)
        return
    try:
        import torchsort  # noqa: F401
    except ImportError:
        raise SystemExit("bench_soft_sort needs torchsort: pip install 'torch-otloss[soft]'") from None

    torch.set_num_threads(args.threads)
    run = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    prov = {
        "run": run,
        "commit": _commit("otloss/sorting.py", "otloss/_reference.py"),
        "device": _cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "torchsort": _version("torchsort"),
    }
    rows_out = []
    for setting in args.settings:
        eps, scale = SETTINGS[setting]
        for rows, n in SHAPES:
            samples = _samples_for(rows * n, args.samples)
            times = bench_case(rows, n, eps, scale, samples)
            g = torch.Generator().manual_seed(rows * 100_003 + n)
            x = scale * torch.randn(rows, n, generator=g)
            pooled = float((otloss.soft_sort(x, eps) != torch.sort(x, dim=-1).values).float().mean())
            med = {k: float(np.median(v["wall"])) for k, v in times.items()}
            cpu = {k: float(np.median(v["cpu"])) for k, v in times.items()}
            for method, both in times.items():
                us = np.asarray(both["wall"]) * 1e6
                cus = np.asarray(both["cpu"]) * 1e6
                rows_out.append(
                    {
                        **prov,
                        "setting": setting,
                        "eps": eps,
                        "rows": rows,
                        "n": n,
                        "pooled_frac": round(pooled, 4),
                        "method": method,
                        "samples": len(us),
                        "median_us": round(float(np.median(us)), 2),
                        "p20_us": round(float(np.percentile(us, 20)), 2),
                        "p80_us": round(float(np.percentile(us, 80)), 2),
                        "speedup": round(med["torchsort"] / med[method], 3),
                        "cpu_median_us": round(float(np.median(cus)), 2),
                        "cpu_p20_us": round(float(np.percentile(cus, 20)), 2),
                        "cpu_p80_us": round(float(np.percentile(cus, 80)), 2),
                        "cpu_speedup": round(cpu["torchsort"] / cpu[method], 3),
                    }
                )
            print(
                f"{setting:7s} eps={eps:<4} {rows:5d} x {n:<6d} pooled={pooled:.3f}  "
                f"otloss {med['otloss'] * 1e6:10.1f} us  torchsort {med['torchsort'] * 1e6:10.1f} us  "
                f"otloss speedup {med['torchsort'] / med['otloss']:.2f}x (cpu time {cpu['torchsort'] / cpu['otloss']:.2f}x)",
                flush=True,
            )
    append_csv(rows_out, args.out, FIELDS, short_floats=False)
    print(f"appended {len(rows_out)} rows to {args.out}")


if __name__ == "__main__":
    main()
