"""The kernel benchmark's plumbing: refuses to time without a GPU, and its plot script reads its CSV."""

from __future__ import annotations

import csv
import importlib.util
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_needs_a_gpu(capsys):
    assert _load("bench_kernels").main(["--out", "unused.csv"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_plot_reads_the_csv(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "k.csv"
    header = ["commit", "device", "regime", "dtype", "rows", "n", "pass", "speedup"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for n, s in ((64, 3.0), (1024, 2.0)):
            w.writerow(["abc", "GPU", "aot", "float32", 1, n, "full", s])
            w.writerow(["abc", "GPU", "aot", "float32", 1, n, "fwd", s])
    out = tmp_path / "k.png"
    assert _load("plot_kernels").main([str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
