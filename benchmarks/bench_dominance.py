"""Time of the dominance test: multivariate (entropic) and one-dimensional (exact), and a 12-model ranking.

The issue's case is ``n = m = 5000`` samples of ``d = 4`` metrics with 100 bootstrap replicates. On a CPU a
multivariate replicate (two entropic problems of size 5000 x 5000) takes long, so the script times the parts
separately and, when asked for fewer replicates than the total (``--measure``), extrapolates::

    total = build + point + n_bootstrap * median(replicate)

and writes the row with ``extrapolated = True``. Phases (one CSV row each, milliseconds, median and 20th/80th
percentiles over the timed repetitions):

* ``mv_build``: the two ``[n, m]`` cost matrices ``sum_k h(x_ik - y_jk)`` (built once per test);
* ``mv_point``: the ratio on the full samples (two entropic solves, batched);
* ``mv_replicate``: one bootstrap replicate (integer resampling weights on the same cost matrices);
* ``mv_total_100``: the whole test, measured or extrapolated;
* ``1d_test_100``: ``dominance_test`` on the first metric alone (exact sorted solver), all replicates measured;
* ``1d_rank12_100``: ``rank_models`` of 12 models, Borda over the ``d`` metrics, all replicates measured;
* ``mv_rank12_100``: the multivariate ranking of 12 models, extrapolated from ``mv_replicate``
  (66 pairs x (1 + n_bootstrap) replicates).

Data: metrics on ``[0, 1]`` (uniform), the first sample ``0.1 + 0.9 U`` (it dominates ``U``), so the paper's
``epsilon = 0.01 d`` is on the scale it assumes. Rows go to ``benchmarks/results/dominance.csv``::

    python benchmarks/bench_dominance.py                    # n = 5000, d = 4, 100 replicates, 2 of them timed
    python benchmarks/bench_dominance.py --n 500 --measure 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from provenance import append_csv
from provenance import commit as _commit
from provenance import device_name as _device_name
from provenance import version as _version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import otloss  # noqa: E402
from otloss import dominance as dom  # noqa: E402

FIELDS = [
    "time", "commit", "device", "torch", "pot", "dtype", "backend", "n", "d", "epsilon", "n_bootstrap", "phase",
    "ms_p50", "ms_p20", "ms_p80", "repeats", "extrapolated", "value", "load_avg",
]  # fmt: skip


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times, out


def _quantiles(ms: list[float]) -> tuple[float, float, float]:
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n, d, B = args.n, args.d, args.n_bootstrap
    x = (torch.rand(n, d, generator=g) * 0.9 + 0.1).to(device=device, dtype=dtype)
    y = torch.rand(n, d, generator=g).to(device=device, dtype=dtype)
    eps = 0.01 * d if args.epsilon is None else args.epsilon
    h = otloss.squared_hinge(0.0)
    solver = {"max_iter": args.max_iter, "tol": args.tol, "backend": args.backend}
    base = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
        "device": _device_name(device), "torch": torch.__version__, "pot": _version("ot"), "dtype": args.dtype,
        "backend": args.backend, "n": n, "d": d, "epsilon": eps, "n_bootstrap": B,
    }  # fmt: skip
    rows: list[dict] = []

    def add(phase, ms, extrapolated=False, value=""):
        p50, p20, p80 = _quantiles(ms)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rows.append({**base, "phase": phase, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "repeats": len(ms),
                     "extrapolated": extrapolated, "value": value, "load_avg": load})  # fmt: skip
        print(f"{phase:<16} p50 {p50 / 1000:9.2f} s  (p20 {p20 / 1000:.2f}, p80 {p80 / 1000:.2f}, {len(ms)} runs)"
              f"{'  EXTRAPOLATED' if extrapolated else ''}  {value}", flush=True)  # fmt: skip

    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build, C2 = _timed(lambda: dom.dominance_cost_matrices(x, y, h), device, 3)
        add("mv_build", build)
        point, ratio = _timed(lambda: dom._ratio_from_costs(C2, None, None, eps, solver), device, 1)
        add("mv_point", point, value=f"ratio={float(ratio):.4f}")
        counts_x = dom._counts(n, args.measure, g, x.device, C2.dtype)
        counts_y = dom._counts(n, args.measure, g, x.device, C2.dtype)
        reps = []
        for r in range(args.measure):
            ms, _ = _timed(lambda r=r: dom._ratio_from_costs(C2, counts_x[r], counts_y[r], eps, solver), device, 1)
            reps += ms
        add("mv_replicate", reps)
        rep50 = statistics.median(reps)
        total = [statistics.median(build) + point[0] + B * rep50]
        add(f"mv_total_{B}", total, extrapolated=args.measure < B)
        add(f"mv_rank12_{B}", [66 * (statistics.median(build) + (1 + B) * rep50)], extrapolated=True)
        nonconv = sum("did not converge" in str(w.message) for w in caught)

        t1, res = _timed(lambda: dom.dominance_test(x[:, 0], y[:, 0], n_bootstrap=B, generator=g), device, 3)
        add(f"1d_test_{B}", t1, value=f"ratio={res.ratio:.4f} ci=[{res.ci_low:.4f},{res.ci_high:.4f}]")
        models = {f"m{i}": (torch.rand(n, d, generator=g) + 0.01 * i).to(device=device, dtype=dtype) for i in range(12)}
        tr, rk = _timed(lambda: dom.rank_models(models, n_bootstrap=B, generator=g), device, 1)
        add(f"1d_rank12_{B}", tr, value="order=" + ",".join(rk.order[:3]) + ",...")
    if nonconv:
        print(f"warning: {nonconv} entropic solves stopped at max_iter={args.max_iter} before tol={args.tol}")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    append_csv(rows, path, FIELDS, short_floats=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--d", type=int, default=4)
    p.add_argument("--n-bootstrap", type=int, default=100)
    p.add_argument("--measure", type=int, default=2, help="bootstrap replicates actually timed (multivariate)")
    p.add_argument("--epsilon", type=float, default=None, help="default 0.01 * d")
    p.add_argument("--max-iter", type=int, default=5000)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--backend", default="auto", choices=["auto", "pot", "torch"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dominance.csv")
    args = p.parse_args(argv)
    write_csv(run(args), args.out)
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
