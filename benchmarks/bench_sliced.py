"""Sliced optimal transport: ``otloss.sliced_ot`` against POT's ``ot.sliced_wasserstein_distance`` (torch backend).

Both compute the sliced squared Wasserstein-2 cost of two point clouds ``x [n, d]`` and
``y [m, d]`` over the same ``L`` directions (drawn once per case and given to both, so
neither times a random draw): otloss returns ``mean_l W_2^2`` (``cost=abs_pow(2)``), POT
its square root, which costs one scalar op. Before timing, every case checks that the two
agree (``rel_diff`` column, otloss against POT squared).

Methods:

* ``pot``: ``ot.sliced_wasserstein_distance(x, y, a, b, p=2, projections=P.T)`` on torch
  tensors (the baseline). For a batch of problems it is called once per problem.
* ``otloss``: ``otloss.sliced_ot(x, y, abs_pow(2), projections=P, ...)`` with its default
  value checks (NaN/Inf, weights: host syncs on a GPU).
* ``otloss_unchecked``: the same with ``validate_args=False``.

Without POT (a GPU machine may lack it) only the otloss methods are timed, ``speedup`` is
left empty and ``rel_diff`` compares against ``sliced_ot`` in float64 on the CPU instead
(the ``pot`` column is then empty too); that comparison is made, and must pass, in every run.

Passes: ``fwd`` (the forward with ``x`` and ``y`` requiring grad, as in training) and
``full`` (forward, then ``torch.autograd.grad`` with respect to ``x`` and ``y``).

Timing is interleaved so that the methods of a case see the same machine load: in each
of ``--rounds`` rounds every method runs one block of calls (sized to about
``--block-ms`` milliseconds), and a block's time per call is one sample. Reported: the
median with the 20th and 80th percentiles over the rounds, in milliseconds; on CUDA each
block is bracketed by ``torch.cuda.synchronize()``. ``load_avg`` is the machine's 1-minute
load average when the case started (other jobs on a shared machine inflate every time). ``speedup`` is POT's median over the
method's, from the same run. Rows are appended, case by case, to ``benchmarks/results/sliced.csv`` with
the run time, commit, device, dtype and versions::

    python benchmarks/bench_sliced.py                  # CUDA when present, else CPU
    python benchmarks/bench_sliced.py --quick          # two small cases (a smoke run)
    python benchmarks/bench_sliced.py --summarize      # Markdown table of the latest run in the CSV
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from provenance import append_csv
from provenance import commit as _commit
from provenance import device_name as _device_name
from provenance import version as _version

import otloss
from otloss.sliced import random_projections, sliced_ot

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sliced.csv"
BASELINE = "pot"
METHODS = ("pot", "otloss", "otloss_unchecked")
PASSES = ("fwd", "full")
# (batch, n, m, d, L, weighted); batch 1 is a single problem [n, d]
CASES_CPU = (
    (1, 500, 500, 8, 64, False),
    (1, 2000, 2000, 32, 128, False),
    (1, 4000, 4000, 32, 256, False),
    (1, 1500, 1000, 16, 128, True),
    (16, 250, 250, 8, 64, False),
)
CASES_CUDA = (
    (1, 2000, 2000, 32, 128, False),
    (1, 8000, 8000, 64, 256, False),
    (1, 32000, 32000, 128, 1024, False),
    (1, 1500, 1000, 16, 128, True),
    (64, 1000, 1000, 32, 256, False),
)
QUICK_CASES = ((1, 64, 64, 4, 8, False), (2, 48, 32, 3, 8, True))
DTYPES = {"float32": torch.float32, "float64": torch.float64}
COLUMNS = [
    "time", "commit", "device", "torch", "pot", "dtype", "batch", "n", "m", "d", "L", "weighted", "method", "pass",
    "ms_p50", "ms_p20", "ms_p80", "speedup", "rounds", "rel_diff", "load_avg",
]  # fmt: skip


def _inputs(batch, n, m, d, L, weighted, dtype, device):
    g = torch.Generator().manual_seed(0)
    shape = () if batch == 1 else (batch,)
    x = torch.randn(*shape, n, d, generator=g)
    y = torch.randn(*shape, m, d, generator=g) * 1.5 + 0.3
    a = torch.rand(n, generator=g) + 0.1 if weighted else None
    b = torch.rand(m, generator=g) + 0.1 if weighted else None
    P = random_projections(L, d, generator=g, dtype=torch.float64)
    put = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return put(x).requires_grad_(), put(y).requires_grad_(), put(a), put(b), put(P)


def _loss_fn(method, x, y, a, b, P) -> Callable[[], torch.Tensor]:
    h = otloss.abs_pow(2)
    if method == "pot":
        import ot

        an = None if a is None else a / a.sum()
        bn = None if b is None else b / b.sum()
        Pt = P.T.contiguous()
        if x.dim() == 2:
            return lambda: ot.sliced_wasserstein_distance(x, y, an, bn, p=2, projections=Pt)
        return lambda: torch.stack(
            [ot.sliced_wasserstein_distance(x[i], y[i], an, bn, p=2, projections=Pt) for i in range(len(x))]
        ).mean()
    validate = method != "otloss_unchecked"
    return lambda: sliced_ot(x, y, h, projections=P, u_weights=a, v_weights=b, validate_args=validate)


def _rel_diff(x, y, a, b, P) -> float:
    """otloss against POT squared, on the case's inputs (both from this run)."""
    with torch.no_grad():
        ours = _loss_fn("otloss", x, y, a, b, P)().double()
        if x.dim() == 2:
            pot = _loss_fn("pot", x, y, a, b, P)().double() ** 2
        else:
            pot = torch.stack([_loss_fn("pot", x[i], y[i], a, b, P)().double() ** 2 for i in range(len(x))]).mean()
    return float((ours - pot).abs() / pot.abs())


def _ref_diff(x, y, a, b, P) -> float:
    """otloss against itself in float64 on the CPU (the PyTorch path): checks the device path before timing it."""
    cpu = [None if t is None else t.detach().cpu().double() for t in (x, y, a, b, P)]
    with torch.no_grad():
        ours = _loss_fn("otloss", x, y, a, b, P)().double().cpu()
        ref = sliced_ot(*cpu[:2], otloss.abs_pow(2), projections=cpu[4], u_weights=cpu[2], v_weights=cpu[3])
    return float((ours - ref).abs() / ref.abs())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, rounds: int, block_ms: float
) -> dict[str, tuple[float, float, float]]:
    """Median, 20th and 80th percentile (ms per call) of each function, its blocks interleaved with the others'."""
    reps = {}
    for name, fn in fns.items():  # warm-up, then the number of calls that fills one block
        fn()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        one = max(time.perf_counter() - t, 1e-6)
        reps[name] = max(1, int(block_ms * 1e-3 / one))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t) / reps[name] * 1e3)
    return {
        name: (float(np.median(s)), float(np.percentile(s, 20)), float(np.percentile(s, 80)))
        for name, s in samples.items()
    }


def run(args: argparse.Namespace, out: Path | None = None) -> list[dict]:
    """Time every case; with ``out``, append each case's rows to that CSV as soon as it is timed."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the Triton CPU interpreter is a test path, not one to time")
    has_pot = bool(_version("ot"))
    methods = METHODS if has_pot else tuple(m for m in METHODS if m != BASELINE)
    if not has_pot:
        print(
            'POT is not installed (pip install "torch-otloss[pot]"): timing otloss only, without speed-ups; '
            "rel_diff is against sliced_ot in float64 on the CPU",
            flush=True,
        )
    meta = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
        "device": _device_name(device), "torch": torch.__version__, "pot": _version("ot"),
    }  # fmt: skip
    cases = QUICK_CASES if args.quick else (CASES_CUDA if device == "cuda" else CASES_CPU)
    results = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for batch, n, m, d, L, weighted in cases:
            x, y, a, b, P = _inputs(batch, n, m, d, L, weighted, dtype, device)
            limit = 1e-4 if dtype == torch.float32 else 1e-10
            ref = _ref_diff(x, y, a, b, P)
            if not ref <= limit:
                raise SystemExit(
                    f"otloss on {device} disagrees with its float64 CPU path on case {(batch, n, m, d, L, weighted)}: "
                    f"rel diff {ref:.3g}"
                )
            rel = _rel_diff(x, y, a, b, P) if has_pot else ref
            if not rel <= limit:
                raise SystemExit(f"otloss and POT disagree on case {(batch, n, m, d, L, weighted)}: rel diff {rel:.3g}")
            fns = {}
            for method in methods:
                loss = _loss_fn(method, x, y, a, b, P)
                fns[(method, "fwd")] = loss
                fns[(method, "full")] = lambda loss=loss, xy=(x, y): torch.autograd.grad(loss(), xy)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            timed = time_interleaved(fns, device, args.rounds, args.block_ms)
            done = len(results)
            for (method, p), (p50, p20, p80) in timed.items():
                base = timed[(BASELINE, p)][0] if has_pot else float("nan")
                results.append({
                    **meta, "dtype": dname, "batch": batch, "n": n, "m": m, "d": d, "L": L, "weighted": weighted,
                    "method": method, "pass": p, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                    "speedup": "" if not has_pot else base / p50, "rounds": args.rounds, "rel_diff": rel, "load_avg": load,
                })  # fmt: skip
                if p == "full":
                    print(
                        f"{dname} batch {batch:3d} n {n:6d} m {m:6d} d {d:4d} L {L:5d} w {int(weighted)} "
                        f"{method:17s} full {p50:9.3f} ms [{p20:.3f}, {p80:.3f}]"
                        + (f"  x{base / p50:6.2f} vs {BASELINE}" if has_pot else ""),
                        flush=True,
                    )
            if out is not None:  # a run stopped at a time limit keeps every case it finished
                write_csv(results[done:], out)
    return results


def write_csv(rows: list[dict], path: Path) -> None:
    append_csv(rows, path, COLUMNS)


def _ms(v: str) -> str:
    x = float(v)
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _speedup(row: dict) -> str:
    return f"{float(row['speedup']):.2f}x" if row["speedup"] else "-"


def summarize(path: Path) -> str:
    """Markdown table of the latest run in the CSV (``full`` pass): POT's and otloss's medians and the speed-up."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} holds no rows")
    latest = rows[-1]["time"]
    rows = [r for r in rows if r["time"] == latest and r["pass"] == "full"]
    keys = list(dict.fromkeys((r["dtype"], r["batch"], r["n"], r["m"], r["d"], r["L"], r["weighted"]) for r in rows))
    lines = [
        f"{rows[0]['device']}, torch {rows[0]['torch']}, POT {rows[0]['pot'] or 'not installed'}, commit {rows[0]['commit']}, "
        f"{latest}; forward + backward, median ms [p20, p80] over {rows[0]['rounds']} interleaved rounds; "
        f"1-minute load average {min(float(r['load_avg']) for r in rows):.1f}-{max(float(r['load_avg']) for r in rows):.1f}.",
        "",
        "| dtype | batch | n | m | d | L | weights | POT | otloss | otloss unchecked | otloss speed-up (unchecked) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in keys:
        by = {
            r["method"]: r
            for r in rows
            if (r["dtype"], r["batch"], r["n"], r["m"], r["d"], r["L"], r["weighted"]) == key
        }

        def cell(method, by=by):
            if method not in by:
                return "-"
            r = by[method]
            return f"{_ms(r['ms_p50'])} [{_ms(r['ms_p20'])}, {_ms(r['ms_p80'])}]"

        dtype, batch, n, m, d, L, weighted = key
        lines.append(
            f"| {dtype} | {batch} | {n} | {m} | {d} | {L} | {'yes' if weighted == 'True' else 'no'} | {cell('pot')} | "
            f"{cell('otloss')} | {cell('otloss_unchecked')} | "
            f"{_speedup(by['otloss'])} ({_speedup(by['otloss_unchecked'])}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV file to append to (or to summarize)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per case (samples)")
    parser.add_argument("--block-ms", type=float, default=30.0, help="target length of one timing block")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="two tiny cases (a smoke run)")
    parser.add_argument("--summarize", action="store_true", help="print the latest run in --out as Markdown")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.out))
        return 0
    if args.rounds < 5:
        parser.error("--rounds must be at least 5 for the percentiles to mean something")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args, args.out)
    print(f"{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
