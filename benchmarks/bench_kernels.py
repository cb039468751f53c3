"""Kernel microbenchmarks: otloss against the formulas people write by hand, side by side in one run.

Two regimes:

* ``aot``: paired AOT from four log-probability vectors of ``n`` values (the policy's
  two require grad), the logistic cost with ``beta = 0.01``: one row of one (the
  per-call overhead alone) to a few thousand scalars, where the eager formula is bound
  by op launches. Methods: ``otloss_triton`` (the fused kernel, CUDA only),
  ``otloss_torch`` (the PyTorch reference path, ``backend="torch"``), ``minimal`` (the
  least a hand-written loss does: two ``torch.sort``, ``logsigmoid``, ``mean``; the
  baseline), ``minimal_stable`` (the same with stable sorts, the tie order otloss
  guarantees: its gradient among tied values is otloss's), ``trl_eager`` (TRL's formula
  as ``DPOTrainer`` writes it, with both label-smoothing terms) and ``trl_compile``
  (that formula under ``torch.compile``).
  otloss runs with its default value check (``validate_args=True``).
* ``w2``: ``OT_h`` with ``h(z) = z^2`` (squared Wasserstein-2) of ``rows x n``
  problems, ``u`` and ``v`` both requiring grad: one row, and many rows at once (sliced
  Wasserstein), where the work is bound by memory traffic. Methods: ``otloss_triton``,
  ``otloss_torch``, ``eager`` (sort twice, square the difference, mean; the baseline),
  ``eager_stable`` (the same with stable sorts), ``eager_compile`` and ``pot``
  (``ot.wasserstein_1d`` with its torch backend, which computes the same quantity).

Each method is timed in three passes: ``fwd`` (the forward with grad enabled, as in
training), ``bwd`` (``torch.autograd.grad`` of a loss computed beforehand) and
``full`` (forward then backward); only ``full`` compares methods fairly, since
otloss computes ``h'`` in its forward. Compiled methods are compiled for each case's
shapes from a clean cache (``dynamic=False``) and run with
``torch._functorch.config.donated_buffer = False`` so that their backward can be
replayed. Times are the median with the 20th and 80th percentiles:
``triton.testing.do_bench`` on a GPU; on the CPU, interleaved rounds (every method of a
case timed once per round, a block of calls each, at least ten rounds), so that a
change in the machine's load hits every method alike; with one torch thread
(``--threads 1``) each block is timed in the thread's CPU time (``time.thread_time``),
which other processes on a shared machine do not inflate. ``speedup`` is the baseline's
median over the method's, in the same run.

Two references for the absolute numbers:

* ``floor_ms``: on a GPU the launch of an empty Triton kernel; on the CPU the dispatch
  of one PyTorch op on a one-element tensor. A launch-bound method takes a small
  multiple of it.
* ``bytes`` and ``gbps``: the traffic any implementation must have (``fwd`` reads the
  inputs, ``bwd`` writes the gradients of the inputs that require grad, ``full`` both)
  and the rate that traffic reaches at the measured median.

Rows are appended to a CSV with the run time, commit, device, dtype and versions, case
by case (a run stopped early keeps the cases it finished)::

    python benchmarks/bench_kernels.py                  # CUDA when present, else CPU
    python benchmarks/bench_kernels.py --device cpu --threads 1 --min-run-time 0.3   # the committed CPU run
    python benchmarks/bench_kernels.py --device cpu --methods otloss_torch minimal trl_eager trl_compile
    python benchmarks/plot_kernels.py                   # PNG of the latest run
    python benchmarks/summarize_kernels.py              # Markdown table of the latest run
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from provenance import append_csv
from provenance import commit as _commit
from provenance import device_name as _device_name
from provenance import version as _version

import otloss
from otloss.ops import triton_available

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kernels.csv"
SIZES = (1, 32, 35, 128, 280, 1024, 4096, 16384)  # n = 1: the per-call overhead alone
BATCHED = ((64, 1024), (8192, 1024))
QUICK_SIZES = (1, 32)
QUICK_BATCHED = ((4, 64),)
BETA = 0.01
MIN_SAMPLES = 10  # interleaved rounds per CPU measurement (5 for calls of half a second or more)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINE = {"aot": "minimal", "w2": "eager"}
METHODS = {
    "aot": ("otloss_triton", "otloss_torch", "minimal", "minimal_stable", "trl_eager", "trl_compile"),
    "w2": ("otloss_triton", "otloss_torch", "eager", "eager_stable", "eager_compile", "pot"),
}
COLUMNS = [
    "time", "commit", "device", "torch", "triton", "pot", "regime", "dtype", "rows", "n", "method", "pass",
    "ms_p50", "ms_p20", "ms_p80", "speedup", "bytes", "gbps", "floor_ms",
]  # fmt: skip


def trl_formula(pc, pr, rc, rr, beta=BETA, label_smoothing=0.0):
    """TRL's paired ``aot`` loss as ``DPOTrainer`` writes it (both smoothing terms, then the mean)."""
    logratios = pc - pr
    ref_logratios = rc - rr
    logratios_sorted, _ = torch.sort(logratios, dim=0)
    ref_logratios_sorted, _ = torch.sort(ref_logratios, dim=0)
    delta = logratios_sorted - ref_logratios_sorted
    per_sequence_loss = (
        -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    )
    return per_sequence_loss.mean()


def minimal_formula(pc, pr, rc, rr, beta=BETA, stable=False):
    """The least a hand-written paired AOT loss does: two sorts, ``logsigmoid``, ``mean``."""
    u, v = torch.sort(pc - pr, stable=stable).values, torch.sort(rc - rr, stable=stable).values
    return -F.logsigmoid(beta * (u - v)).mean()


def eager_w2(u, v, stable=False):
    us, _ = torch.sort(u, dim=-1, stable=stable)
    vs, _ = torch.sort(v, dim=-1, stable=stable)
    return (us - vs).square().mean()


def pot_w2(u, v):
    import ot

    return ot.wasserstein_1d(u.T, v.T, p=2).mean()  # POT sorts along the first axis


class Timer:
    """Median and 20th/80th percentiles in milliseconds of several functions, side by side."""

    def __init__(self, device: str, min_run_time: float) -> None:
        self.device = device
        self.min_run_time = min_run_time

    def many(self, fns: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float, float]]:
        """Each function's ``(p50, p20, p80)``; on the CPU in interleaved rounds."""
        if self.device == "cuda":
            return {name: self(fn) for name, fn in fns.items()}
        # one torch thread: the thread's CPU time, which time taken by other processes on a shared
        # machine does not inflate; several threads: wall time (their work is not this thread's)
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        per_call = {}
        for name, fn in fns.items():
            fn()  # warm-up (and first-call work such as compilation)
            t0 = clock()
            fn()
            per_call[name] = max(clock() - t0, 1e-7)
        rounds = MIN_SAMPLES if max(per_call.values()) < 0.5 else MIN_SAMPLES // 2  # seconds-long calls: 5 rounds
        # a block of calls per method and round, so that all the rounds fill about min_run_time per method
        number = {k: max(1, int(self.min_run_time / rounds / t)) for k, t in per_call.items()}
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = clock()
                for _ in range(number[name]):
                    fn()
                samples[name].append((clock() - t0) / number[name] * 1e3)
        return {
            k: (float(np.median(v)), float(np.percentile(v, 20)), float(np.percentile(v, 80)))
            for k, v in samples.items()
        }

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float, float]:
        if self.device == "cuda":
            from triton.testing import do_bench

            p50, p20, p80 = do_bench(
                fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=max(50, int(self.min_run_time * 1e3))
            )
            return p50, p20, p80
        return self.many({"fn": fn})["fn"]

    def floor(self) -> float:
        if self.device == "cuda":
            import triton

            @triton.jit
            def _empty(x):
                pass

            x = torch.empty(1, device="cuda")
            return self(lambda: _empty[(1,)](x))[0]
        x = torch.zeros(1)
        return self(lambda: x.neg())[0]


def _compiled(fn: Callable) -> Callable:
    """``torch.compile`` specialised to this case's shapes, from a clean cache (no dynamic-shape reuse)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _case(regime: str, method: str, rows: int, n: int, dtype: torch.dtype, device: str):
    """``(loss_fn, inputs that require grad, bytes read, bytes of gradients)`` for one case."""
    g = torch.Generator().manual_seed(0)
    size = torch.finfo(dtype).bits // 8
    if regime == "aot":
        logps = [(torch.randn(n, generator=g) - 50.0).to(device=device, dtype=dtype) for _ in range(4)]
        pc, pr = (t.requires_grad_(True) for t in logps[:2])
        rc, rr = logps[2:]
        if method.startswith("otloss"):
            backend = method.removeprefix("otloss_")

            def loss():
                return otloss.aot_loss(pc, pr, rc, rr, beta=BETA, backend=backend)
        else:
            formula = (
                _compiled(trl_formula)
                if method == "trl_compile"
                else {
                    "trl_eager": trl_formula,
                    "minimal": minimal_formula,
                    "minimal_stable": functools.partial(minimal_formula, stable=True),
                }[method]
            )

            def loss():
                return formula(pc, pr, rc, rr)

        return loss, (pc, pr), 4 * n * size, 2 * n * size
    u = torch.randn(rows, n, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    v = (torch.randn(rows, n, generator=g) + 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    cost = otloss.abs_pow(2.0)
    if method.startswith("otloss"):
        backend = method.removeprefix("otloss_")

        def loss():
            return otloss.ot_h_1d(u, v, cost, backend=backend)
    else:
        formula = (
            _compiled(eager_w2)
            if method == "eager_compile"
            else {"eager": eager_w2, "eager_stable": functools.partial(eager_w2, stable=True), "pot": pot_w2}[method]
        )

        def loss():
            return formula(u, v)

    return loss, (u, v), 2 * rows * n * size, 2 * rows * n * size


def _available(method: str, device: str) -> str | None:
    """Why ``method`` cannot run here, or ``None``."""
    if method == "otloss_triton" and (device != "cuda" or not triton_available()):
        return "the fused kernel needs a CUDA GPU and triton"
    if method == "pot" and not _version("ot"):
        return "POT is not installed (pip install 'torch-otloss[pot]')"
    return None


def run(args: argparse.Namespace, out: Path | None = None) -> list[dict]:
    """Time every case; with ``out``, append each case's rows to that CSV as soon as it is timed."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the Triton CPU interpreter is a test path, not one to time")
    if any(m.endswith("compile") for m in args.methods):
        # timing the backward alone replays it with retain_graph=True, which donated buffers forbid
        from torch._functorch import config as functorch_config

        functorch_config.donated_buffer = False
    timer = Timer(device, args.min_run_time)
    floor = timer.floor()
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = {
        "time": stamp, "commit": _commit(), "device": _device_name(device), "torch": torch.__version__,
        "triton": _version("triton"), "pot": _version("ot"),
    }  # fmt: skip
    sizes = QUICK_SIZES if args.quick else SIZES
    batched = QUICK_BATCHED if args.quick else BATCHED
    cases = [("aot", 1, n) for n in sizes] + [("w2", 1, n) for n in sizes] + [("w2", r, n) for r, n in batched]
    results: list[dict] = []
    skipped: set[str] = set()
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for regime, rows, n in cases:
            if regime not in args.regimes:
                continue
            methods = [m for m in METHODS[regime] if m in args.methods]
            if BASELINE[regime] not in methods:
                methods.insert(0, BASELINE[regime])
            passes: dict[str, dict[str, Callable[[], object]]] = {"fwd": {}, "bwd": {}, "full": {}}
            nbytes = {}
            for method in methods:
                why = _available(method, device)
                if why is not None:
                    if why not in skipped:
                        skipped.add(why)
                        print(f"skipping {method}: {why}", flush=True)
                    continue
                loss_fn, inputs, read, written = _case(regime, method, rows, n, dtype, device)
                loss = loss_fn()
                passes["fwd"][method] = loss_fn
                passes["bwd"][method] = lambda loss=loss, inputs=inputs: torch.autograd.grad(
                    loss, inputs, retain_graph=True
                )
                passes["full"][method] = lambda loss_fn=loss_fn, inputs=inputs: torch.autograd.grad(loss_fn(), inputs)
                nbytes.update({(method, "fwd"): read, (method, "bwd"): written, (method, "full"): read + written})
            timed = {}
            for p, fns in passes.items():
                for method, t in timer.many(fns).items():
                    timed[(method, p)] = (t, nbytes[(method, p)])
            case_rows = []
            for (method, p), ((p50, p20, p80), nbytes_) in timed.items():
                base = timed[(BASELINE[regime], p)][0][0]
                row = {
                    **meta, "regime": regime, "dtype": dname, "rows": rows, "n": n, "method": method, "pass": p,
                    "ms_p50": p50, "ms_p20": p20, "ms_p80": p80, "speedup": base / p50, "bytes": nbytes_,
                    "gbps": nbytes_ / (p50 * 1e-3) / 1e9, "floor_ms": floor,
                }  # fmt: skip
                case_rows.append(row)
                if p == "full":
                    print(
                        f"{regime:3s} {dname:8s} {rows:5d}x{n:<6d} {method:14s} full {p50:9.4f} ms "
                        f"[{p20:.4f}, {p80:.4f}]  x{base / p50:5.2f} vs {BASELINE[regime]}",
                        flush=True,
                    )
            if out is not None:
                write_csv(case_rows, out)
            results += case_rows
    return results


def write_csv(rows: list[dict], path: Path) -> None:
    append_csv(rows, path, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV file to append to")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--regimes", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    all_methods = sorted({m for ms in METHODS.values() for m in ms})
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=all_methods,
        help="default: all on CUDA; on the CPU all but the torch.compile ones (the baselines always run)",
    )
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--quick", action="store_true", help="two small sizes and one tiny batch (a smoke run)")
    parser.add_argument(
        "--threads", type=int, help="torch's CPU threads (default: torch's own); 1 keeps a loaded machine's noise out"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.methods is None:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.methods = [m for m in all_methods if cuda or not m.endswith("compile")]
    start = time.perf_counter()
    rows = run(args, out=args.out)
    print(f"{len(rows)} rows appended to {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
