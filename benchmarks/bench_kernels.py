"""Kernel microbenchmarks: otloss's fused Triton kernel vs the PyTorch reference path.

Two regimes, measured side by side in one run:

* ``aot``: one row of a few dozen to a few thousand scalars (AOT's per-device batch),
  where the eager formula is dominated by kernel launches;
* ``sliced``: many rows at once (sliced Wasserstein, many 1-D problems), where it is
  dominated by memory traffic.

For each case it reports forward, backward and full (forward + backward) times as the
median with the 20th and 80th percentiles (``triton.testing.do_bench``), the speed-up
of the kernel over the reference measured in the same run, the achieved bandwidth of
the kernel against the bytes it must move, and the launch floor (an empty kernel).

Bytes moved (``R`` rows of ``n`` elements, input element size ``s``):
forward reads ``2 R n s`` and writes ``2 R n 4 + 4 R`` (saved float32 gradients and
the row losses); backward reads ``2 R n 4 + 4 R`` and writes ``2 R n s``.

Results are appended to a CSV with the device, commit, dtype and versions; plot them
with ``python benchmarks/plot_kernels.py``. Needs a CUDA GPU::

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import subprocess
import sys

import torch

import otloss

REGIMES = {
    "aot": [(1, n) for n in (35, 64, 256, 1024, 4096)],
    "sliced": [(rows, n) for rows, n in ((1024, 64), (1024, 512), (256, 4096), (64, 16384))],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bench(fn, quantiles=(0.5, 0.2, 0.8)):
    from triton.testing import do_bench

    return do_bench(fn, quantiles=list(quantiles), warmup=25, rep=200)


def _launch_floor() -> float:
    import triton

    @triton.jit
    def _empty(x):
        pass

    x = torch.empty(1, device="cuda")
    return _bench(lambda: _empty[(1,)](x))[0]


def run_case(rows: int, n: int, dtype: torch.dtype, cost: otloss.Cost) -> dict[str, list[float]]:
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(rows, n, device="cuda", generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(rows, n, device="cuda", generator=g).to(dtype).requires_grad_(True)
    out = {}
    for backend in ("triton", "torch"):

        def fwd(backend=backend):
            return otloss.ot_h_1d(u, v, cost, backend=backend, validate_args=False)

        loss = fwd()
        out[f"{backend}_fwd"] = _bench(fwd)
        out[f"{backend}_bwd"] = _bench(lambda loss=loss: torch.autograd.grad(loss, (u, v), retain_graph=True))
        out[f"{backend}_full"] = _bench(lambda fwd=fwd: torch.autograd.grad(fwd(), (u, v)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/kernels.csv", help="CSV file to append to")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--regimes", nargs="+", default=sorted(REGIMES), choices=sorted(REGIMES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels.py needs a CUDA GPU (the Triton CPU interpreter is a test path, not a fast one)")
        return 2
    import triton

    device = torch.cuda.get_device_name()
    floor = _launch_floor()
    cost = otloss.logistic(0.01)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new = not os.path.exists(args.out)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(
                ["time", "commit", "device", "torch", "triton", "regime", "dtype", "rows", "n", "pass",
                 "triton_ms_p50", "triton_ms_p20", "triton_ms_p80", "torch_ms_p50", "torch_ms_p20", "torch_ms_p80",
                 "speedup", "bytes", "triton_gbps", "launch_floor_ms"]
            )  # fmt: skip
        for regime in args.regimes:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                s = torch.finfo(dtype).bits // 8
                for rows, n in REGIMES[regime]:
                    res = run_case(rows, n, dtype, cost)
                    nbytes = {
                        "fwd": 2 * rows * n * s + 2 * rows * n * 4 + 4 * rows,
                        "bwd": 2 * rows * n * 4 + 4 * rows + 2 * rows * n * s,
                    }
                    nbytes["full"] = nbytes["fwd"] + nbytes["bwd"]
                    for p in ("fwd", "bwd", "full"):
                        t, r = res[f"triton_{p}"], res[f"torch_{p}"]
                        gbps = nbytes[p] / (t[0] * 1e-3) / 1e9
                        row = [stamp, _commit(), device, torch.__version__, triton.__version__, regime, dname, rows, n,
                               p, *t, *r, r[0] / t[0], nbytes[p], gbps, floor]  # fmt: skip
                        w.writerow(row)
                        print(
                            f"{regime:6s} {dname:8s} {rows:5d}x{n:<6d} {p:4s} triton {t[0]:.4f} ms "
                            f"[{t[1]:.4f}, {t[2]:.4f}]  torch {r[0]:.4f} ms  x{r[0] / t[0]:.2f}  {gbps:.1f} GB/s"
                        )
    print(f"launch floor {floor:.4f} ms; appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
