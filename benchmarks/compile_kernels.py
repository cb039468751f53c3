"""Compile otloss's Triton kernels for a CUDA target on a machine without a GPU, and report their resources.

Triton compiles a kernel ahead of time for a named target (``GPUTarget("cuda", arch, 32)``) with the
``ptxas`` its package ships; no driver or device is needed. This catches what the CPU interpreter
(``TRITON_INTERPRET=1``) cannot: code that does not lower to PTX, and the registers, spills
(local memory) and shared memory each launch configuration uses on the target. ``cuobjdump`` (also
shipped with Triton) reads those from the compiled cubin.

    python benchmarks/compile_kernels.py                      # the quick set, for sm_90 (H100, H200)
    python benchmarks/compile_kernels.py --set sizes --jobs 2 # every block size of the benchmark's kernels
    python benchmarks/compile_kernels.py --arch 80 --csv out.csv

Sets:

* ``quick``: every cost id, the three input dtypes, paired and unpaired margins, one large block,
  the chunked kernel and the soft-sort kernel (about 14 compiles);
* ``sizes``: the fused kernel at every block size from 16 to ``MAX_FUSED_SIZE`` with its launch
  warps, for paired AOT (logistic, cost id 0) and W2 (``abs_pow``, cost id 4), float32: the
  kernels ``bench_kernels.py`` runs.

The signatures are the general ones (integers as ``i32``, no divisibility hints), so a launch's own
specialisation can differ slightly from what is compiled here; the code is the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from provenance import append_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: argument types of each kernel, by argument name ("{x}": the input dtype of the case)
ARG_TYPES = {
    "_ot_rows_fwd_kernel": {
        **{a: "*{x}" for a in ("U", "U2", "V", "V2")},
        **{a: "*fp32" for a in ("LOSS", "ZSUM", "GU", "GV")},
        **{a: "i32" for a in ("n", "stride_u", "stride_u2", "stride_v", "stride_v2", "stride_g")},
        **{a: "fp32" for a in ("beta", "ls", "p")},
    },
    "_ot_sorted_chunks_kernel": {
        **{a: "*fp32" for a in ("US", "VS", "PARTIAL", "ZPARTIAL", "GU", "GV")},
        **{a: "*i64" for a in ("IU", "IV")},
        **{a: "i32" for a in ("n", "n_chunks", "stride_s", "stride_g")},
        **{a: "fp32" for a in ("beta", "ls", "p")},
    },
    "_l2_pav_rows_kernel": {
        **{a: "*fp64" for a in ("XS", "SIZE", "STK_S", "STK_C", "EPS")},
        **{a: "*i32" for a in ("FIRST", "STK_F")},
        "n": "i32",
    },
}
FIELDS = ["triton", "kernel", "dtype", "constexprs", "num_warps", "arch"]
FIELDS += ["compile_s", "registers", "local_bytes", "shared_bytes"]


@dataclass(frozen=True)
class Spec:
    """One compilation: a kernel, its input dtype, its constexpr arguments and launch warps."""

    kernel: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    dtype: str = "fp32"


def _kernels() -> dict[str, object]:
    from otloss.ops import ot_sort, soft_sort

    return {
        "_ot_rows_fwd_kernel": ot_sort._ot_rows_fwd_kernel,
        "_ot_sorted_chunks_kernel": ot_sort._ot_sorted_chunks_kernel,
        "_l2_pav_rows_kernel": soft_sort._l2_pav_rows_kernel,
    }


def _fwd(cost: int, block: int, dtype: str = "fp32", paired: bool = False) -> Spec:
    from otloss.ops.utils import calculate_settings

    _, warps = calculate_settings(block)
    const = (("COST", cost), ("PAIRED_U", paired), ("PAIRED_V", paired), ("BLOCK", block))
    return Spec("_ot_rows_fwd_kernel", const, warps, dtype)


def specs(name: str) -> list[Spec]:
    """The compilations of the set ``name`` (``quick`` or ``sizes``)."""
    from otloss.ops.utils import CHUNK_SIZE, MAX_FUSED_SIZE

    if name == "quick":
        out = [_fwd(cost, 64) for cost in range(5)]
        out += [_fwd(0, 16, "bf16", paired=True), _fwd(4, 32, "fp16"), _fwd(0, 1024, paired=True)]
        out += [_fwd(4, MAX_FUSED_SIZE)]
        out += [Spec("_ot_sorted_chunks_kernel", (("COST", c), ("BLOCK", CHUNK_SIZE)), 4) for c in (0, 4)]
        out += [Spec("_l2_pav_rows_kernel", (("EPS_AT_MOST_ONE", flag),), 1, "fp64") for flag in (True, False)]
        return out
    if name == "sizes":
        blocks = [1 << k for k in range(4, MAX_FUSED_SIZE.bit_length())]
        return [_fwd(cost, b, paired=cost == 0) for cost in (0, 4) for b in blocks]
    raise ValueError(f"unknown set {name!r}; expected 'quick' or 'sizes'")


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in this triton package ({path})")
    return str(path)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers, local memory (spills and stack arrays) and static shared memory of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {"registers": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]),
                    "shared_bytes": int(fields["SHARED"])}  # fmt: skip
    raise RuntimeError(f"cuobjdump reported no function:\n{out.stdout}")


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile ``spec`` for ``sm_<arch>``; one CSV row (raises what Triton raises when it does not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[spec.kernel]
    types = ARG_TYPES[spec.kernel]
    const = dict(spec.constexprs)
    missing = [a for a in fn.arg_names if a not in types and a not in const]
    if missing:
        raise ValueError(f"{spec.kernel}: no type for argument(s) {missing}; update ARG_TYPES")
    signature = {a: "constexpr" if a in const else types[a].format(x=spec.dtype) for a in fn.arg_names}
    t0 = time.perf_counter()
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=const),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps},
    )
    seconds = time.perf_counter() - t0
    row = {"triton": triton.__version__, "kernel": spec.kernel, "dtype": spec.dtype}
    row["constexprs"] = " ".join(f"{k}={v}" for k, v in spec.constexprs)
    row.update(num_warps=spec.num_warps, arch=f"sm_{arch}", compile_s=round(seconds, 2))
    row.update(resources(kernel.asm["cubin"]))
    return row


def _worker(args: tuple[Spec, int]) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    return compile_spec(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="quick", choices=("quick", "sizes"), help="which compilations (see above)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 (H100/H200), 80 (A100)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--csv", type=Path, help="also append the table to this CSV (header first when new)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: unset it (the interpreter compiles nothing)")
    todo = [(s, args.arch) for s in specs(args.set)]
    # a fresh cache: every kernel is compiled (and timed), none read from an earlier run
    cache = tempfile.TemporaryDirectory(prefix="otloss-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    t0 = time.perf_counter()
    if args.jobs == 1:
        rows = [compile_spec(*a) for a in todo]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_worker, todo))
    head = ("kernel", "dtype", "constexprs", "warps", "s", "regs", "local", "smem")
    print("{:26s} {:5s} {:46s} {:>5s} {:>6s} {:>5s} {:>6s} {:>6s}".format(*head))
    for r in rows:
        print(f"{r['kernel']:26s} {r['dtype']:5s} {r['constexprs']:46s} {r['num_warps']:5d} {r['compile_s']:6.1f} "
              f"{r['registers']:5d} {r['local_bytes']:6d} {r['shared_bytes']:6d}")  # fmt: skip
    print(f"{len(rows)} kernels compiled for sm_{args.arch} in {time.perf_counter() - t0:.1f} s")
    if args.csv:  # appended, as every benchmark's CSV: one file holds the runs of several triton versions
        append_csv(rows, args.csv, FIELDS, short_floats=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
