"""Compile, in parallel, the Triton kernels that ``gpu_check.sh``'s tests and benchmarks launch (CUDA).

Triton compiles each specialisation of a kernel (cost id, input dtype, paired margins, block size,
and its integer arguments' divisibility) at its first launch and keeps it in its on-disk cache. A
block of 8192 takes 19 to 52 s to compile (``benchmarks/results/compile_sm90.csv``), and the GPU
check's tests and benchmarks make about a hundred launches of the fused OT kernels, one after
another. This script launches each case of that plan once, through the public API
(``backend="triton"``), in ``--jobs`` processes, longest first, so the later steps find the kernels
in the cache and spend their time budget on running them. Some cases share a specialisation (the
chunked kernel of long rows, for one); the soft-sort kernel, a scalar loop, is not in the plan.

    python benchmarks/warm_kernels.py --jobs 12   # on a CUDA machine (gpu_check.sh runs it)
    python benchmarks/warm_kernels.py --list      # the cases, one per line; no GPU needed

The cases come from where the launches are written: the CUDA sweep of ``tests/test_ops_triton.py``
(``SWEEP_N`` for each dtype, one cost per kernel id), the sizes of ``bench_kernels.py`` and the CUDA
cases of ``bench_sliced.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def _on_path(*dirs: Path) -> None:
    for d in dirs:
        if str(d) not in sys.path:
            sys.path.insert(0, str(d))


class Case(NamedTuple):
    """One launch: ``aot`` (paired, ``aot_loss``) or ``ot`` (``ot_h_1d`` of a cost with this kernel id)."""

    regime: str
    kernel_id: int
    dtype: str
    rows: int
    n: int

    def __str__(self) -> str:
        return f"{self.regime} kernel_id={self.kernel_id} {self.dtype} {self.rows}x{self.n}"


def _test_module():
    """``tests/test_ops_triton.py``, imported from its path (its helpers ``tolerances`` beside it)."""
    _on_path(ROOT, ROOT / "tests")
    spec = importlib.util.spec_from_file_location("_otloss_test_ops_triton", ROOT / "tests" / "test_ops_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> list[Case]:
    """Every launch of the plan, without repeats, longest compilation (largest row) first."""
    _on_path(ROOT, ROOT / "benchmarks")
    import bench_kernels
    import bench_sliced

    tests = _test_module()
    kernel_ids = sorted({c.kernel_id for c in tests.KERNEL_COSTS})
    out = {
        Case("ot", k, str(dtype).removeprefix("torch."), 4, n)
        for dtype, sizes in tests.SWEEP_N.items()
        for n in sizes
        for k in kernel_ids
    }
    out |= {Case("aot", 0, "float32", 1, n) for n in bench_kernels.SIZES}
    out |= {Case("ot", 4, "float32", 1, n) for n in bench_kernels.SIZES}
    out |= {Case("ot", 4, "float32", r, n) for r, n in bench_kernels.BATCHED}
    # sliced OT: the [batch * L, n] projected rows (contiguous), when the kernel takes them (n == m, no weights)
    out |= {Case("ot", 4, "float32", b * L, n) for b, n, m, _, L, w in bench_sliced.CASES_CUDA if n == m and not w}
    from otloss.ops.utils import MAX_FUSED_SIZE, next_power_of_2

    # compile time grows with the fused kernel's block; longer rows take the small chunked kernel
    return sorted(out, key=lambda c: (-(next_power_of_2(c.n) if c.n <= MAX_FUSED_SIZE else 0), c))


def _cost(kernel_id: int):
    import otloss

    return {0: otloss.logistic(0.5), 1: otloss.hinge(0.1), 2: otloss.squared_hinge(0.1),
            3: otloss.least_squares(0.1), 4: otloss.abs_pow(2.0)}[kernel_id]  # fmt: skip


def launch(case: Case, device: str = "cuda") -> float:
    """Run ``case`` forward and backward through the kernels; seconds taken (mostly compilation).

    ``device="cpu"`` runs it under Triton's interpreter (``TRITON_INTERPRET=1``; the tests do).
    """
    _on_path(ROOT)
    import torch

    import otloss

    dtype = getattr(torch, case.dtype)
    t0 = time.perf_counter()
    if case.regime == "aot":  # as bench_kernels calls it: four [n] tensors (rows == 1) or [rows, n]
        shape = (case.n,) if case.rows == 1 else (case.rows, case.n)
        x = [torch.randn(shape, device=device).to(dtype) for _ in range(4)]
        out = otloss.aot_loss(x[0].requires_grad_(True), *x[1:], backend="triton")
    else:
        u = torch.randn(case.rows, case.n, device=device).to(dtype).requires_grad_(True)
        v = torch.randn(case.rows, case.n, device=device).to(dtype)
        out = otloss.ot_h_1d(u, v, _cost(case.kernel_id), backend="triton")
    out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="processes that compile")
    parser.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    todo = cases()
    if args.list:
        for c in todo:
            print(c)
        print(f"{len(todo)} cases")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("warm_kernels: no CUDA device is visible: nothing compiled", file=sys.stderr)
        return 3
    t0 = time.perf_counter()
    failed = 0
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(launch, c): c for c in todo}
        for f in as_completed(futures):
            try:
                print(f"  {futures[f]}: {f.result():.1f} s", flush=True)
            except Exception as e:  # the tests report the same failure with context; say it and go on
                failed += 1
                print(f"  {futures[f]}: FAILED ({type(e).__name__}: {e})", flush=True)
    print(f"warm_kernels: {len(todo)} cases in {time.perf_counter() - t0:.1f} s on {args.jobs} processes, "
          f"{failed} failed")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
