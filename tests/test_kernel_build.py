"""The Triton kernels compiled for a Hopper GPU without one, and the GPU check's parallel compilation plan.

``benchmarks/compile_kernels.py`` compiles the kernels to a cubin for ``sm_90`` with the ``ptxas``
Triton ships, so code that only the interpreter has run is lowered for real in CI, and each
configuration's registers and spills are checked. ``benchmarks/warm_kernels.py`` compiles on the GPU
machine, ahead of ``gpu_check.sh``'s tests and benchmark, the launches those make.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from otloss.ops import triton_available

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu means the interpreter (TRITON_INTERPRET=1)

pytestmark = [
    pytest.mark.requires_triton,
    pytest.mark.skipif(not triton_available(), reason="needs triton (pip install 'torch-otloss[triton]')"),
]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_otloss_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def _nvidia_tools() -> bool:
    import triton

    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "cuobjdump").exists() and any(bin_dir.glob("ptxas*"))


@pytest.mark.skipif(not triton_available() or not _nvidia_tools(), reason="needs triton's NVIDIA tools (ptxas)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile and run the kernels")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    # the kernels import as interpreted functions under TRITON_INTERPRET=1 (set for this suite): a subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compile.csv"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--jobs", "2", "--csv", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    specs = _load("compile_kernels").specs("quick")
    assert len(rows) == len(specs)
    assert {r["kernel"] for r in rows} == {"_ot_rows_fwd_kernel", "_ot_sorted_chunks_kernel", "_l2_pav_rows_kernel"}
    # every cost id, every input dtype, paired margins, and the largest on-chip block were compiled
    fused = [r for r in rows if r["kernel"] == "_ot_rows_fwd_kernel"]
    assert {f"COST={c}" for c in range(5)} <= {r["constexprs"].split()[0] for r in fused}
    assert {r["dtype"] for r in fused} == {"fp32", "bf16", "fp16"}
    assert any("PAIRED_U=True" in r["constexprs"] for r in fused)
    assert any("BLOCK=8192" in r["constexprs"] and r["num_warps"] == "16" for r in fused)
    for r in rows:
        assert r["arch"] == "sm_90"
        assert 0 < int(r["registers"]) <= 255, r
        assert int(r["local_bytes"]) == 0, f"spills to local memory: {r}"
    assert f"{len(rows)} kernels compiled for sm_90" in res.stdout


def test_compile_kernels_rejects_bad_arguments():
    mod = _load("compile_kernels")
    with pytest.raises(ValueError, match="unknown set 'all'"):
        mod.specs("all")
    with pytest.raises(SystemExit):
        mod.main(["--jobs", "0"])
    # every argument of every kernel has a type (or is a constexpr of each spec)
    kernels = mod._kernels()
    for spec in mod.specs("quick") + mod.specs("sizes"):
        names = set(kernels[spec.kernel].arg_names)
        assert names == set(mod.ARG_TYPES[spec.kernel]) | {k for k, _ in spec.constexprs}, spec


def test_warm_plan_covers_the_cuda_sweep_and_the_benchmark():
    warm = _load("warm_kernels")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = _load("bench_kernels")
        sliced = _load("bench_sliced")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import test_ops_triton as sweep

    cases = warm.cases()
    assert len(cases) == len(set(cases))
    have = set(cases)
    for dtype, sizes in sweep.SWEEP_N.items():
        for n in sizes:
            for cost in sweep.KERNEL_COSTS:
                assert warm.Case("ot", cost.kernel_id, str(dtype).removeprefix("torch."), 4, n) in have
    for n in bench.SIZES:
        assert warm.Case("aot", 0, "float32", 1, n) in have and warm.Case("ot", 4, "float32", 1, n) in have
    for rows, n in bench.BATCHED:
        assert warm.Case("ot", 4, "float32", rows, n) in have
    for batch, n, m, _, L, weighted in sliced.CASES_CUDA:
        if n == m and not weighted:  # the rows sliced_ot hands to the kernel: [batch * L, n]
            assert warm.Case("ot", 4, "float32", batch * L, n) in have
    # longest compilations first: the fused kernel's block never grows along the list
    from otloss.ops.utils import MAX_FUSED_SIZE, next_power_of_2

    blocks = [next_power_of_2(c.n) if c.n <= MAX_FUSED_SIZE else 0 for c in cases]
    assert blocks == sorted(blocks, reverse=True) and blocks[0] == MAX_FUSED_SIZE


@pytest.mark.parametrize(
    "case",
    [("aot", 0, "float32", 1, 9), ("aot", 0, "bfloat16", 3, 5)]
    + [("ot", k, "float16" if k % 2 else "float32", 2, 6) for k in range(5)],
    ids=str,
)
def test_warm_launch_runs_each_regime_through_the_kernels(case):
    # the calls the GPU machine makes (without a GPU: under the interpreter)
    warm = _load("warm_kernels")
    assert warm.launch(warm.Case(*case), device=DEVICE) >= 0.0


def test_warm_cli_lists_the_plan_and_needs_cuda(capsys):
    warm = _load("warm_kernels")
    assert warm.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("x8192")  # a largest on-chip block first
    assert out.rstrip().endswith(f"{len(warm.cases())} cases")
    with pytest.raises(SystemExit):
        warm.main(["--jobs", "0"])
    if not torch.cuda.is_available():
        assert warm.main(["--jobs", "1"]) == 3
        assert "no CUDA device is visible" in capsys.readouterr().err
