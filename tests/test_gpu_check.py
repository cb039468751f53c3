"""``benchmarks/gpu_check.sh``: its CPU-side logic (arguments, environment report, skip messages, no CUDA)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str, pythonpath: str | None = None, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=300
    )


def test_help_and_usage_errors(tmp_path):
    ok = run("--help")
    assert ok.returncode == 0 and "gpu_check.sh OUTDIR" in ok.stdout and "--dry-run" in ok.stdout
    for args, message in (
        ((), "OUTDIR is missing"),
        ((str(tmp_path / "a"), str(tmp_path / "b")), "one OUTDIR expected"),
        (("--fast", str(tmp_path)), "unknown option --fast"),
    ):
        bad = run(*args)
        assert bad.returncode == 2, bad
        assert message in bad.stderr and "gpu_check.sh OUTDIR" in bad.stderr  # the usage follows the error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_without_cuda_it_reports_the_plan_and_exits_3(tmp_path):
    out = tmp_path / "results"
    res = run(str(out), cwd=tmp_path)  # from another directory: the script finds the checkout itself
    assert res.returncode == 3, res.stdout + res.stderr
    log = (out / "gpu_check.log").read_text()
    assert "no CUDA device is visible" in log and "nothing run" in log
    assert not (out / "kernels.csv").exists()
    # the plan: the kernels compiled ahead in parallel, a marker expression over the suite's own files,
    # then the kernel and sliced-OT benchmarks on CUDA, each under its own time limit
    assert re.search(r"compile: +timeout 95 \S+ benchmarks/warm_kernels.py --jobs 12", log), log
    assert re.search(r"tests: +timeout 205 ", log) and re.search(r"benchmark: +timeout 110 ", log)
    assert re.search(r"sliced: +timeout 40 \S+ benchmarks/bench_sliced.py --device cuda", log)
    assert str(out / "sliced.csv") in log
    limits = [int(x) for x in re.findall(r"(?m)^  \w+: +timeout (\d+) ", log)]
    assert len(limits) == 4 and sum(limits) <= 450, limits  # under 8 minutes with the untimed report around them
    assert "-m requires_cuda or requires_triton" in log
    assert "tests/test_ops_triton.py" in log and "tests/test_compile.py" in log
    if (ROOT / "tests" / "test_sliced.py").exists():
        assert "tests/test_sliced.py" in log
    assert "benchmarks/bench_kernels.py --device cuda" in log and str(out / "kernels.csv") in log
    # the package comes from this checkout (PYTHONPATH), installed or not
    assert f"otloss from {ROOT / 'otloss'}" in log
    for required in ("torch", "triton", "pytest", "hypothesis", "numpy", "scipy"):
        assert f"required {required}" in log
    dry = run("--dry-run", str(tmp_path / "dry"))
    assert dry.returncode == 0 and "dry run" in dry.stdout


def _stub(tmp_path: pathlib.Path, *modules: str) -> str:
    for module in modules:
        pkg = tmp_path / "stubs" / module
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('{module} is not installed here (simulated)')\n")
    return str(tmp_path / "stubs")


def test_missing_optional_packages_are_named_with_what_is_skipped(tmp_path):
    res = run("--dry-run", str(tmp_path / "out"), pythonpath=_stub(tmp_path, "ot", "trl"))
    assert res.returncode == 0, res.stdout + res.stderr
    for name, extra in (("POT", "pot"), ("TRL", "trl")):
        line = next(x for x in res.stdout.splitlines() if f"optional {name} " in x)
        assert "missing: its test cases and benchmark rows are skipped" in line
        assert f"torch-otloss[{extra}]" in line


def test_a_missing_required_package_stops_it_with_status_4(tmp_path):
    res = run(str(tmp_path / "out"), pythonpath=_stub(tmp_path, "scipy"))
    assert res.returncode == 4
    assert re.search(r"required scipy +MISSING \(ImportError: scipy is not installed here", res.stdout)
    assert "required package(s) missing: scipy" in (tmp_path / "out" / "gpu_check.log").read_text()
