"""The kernel benchmark as a smoke step: a quick CPU run, its CSV, the plot and the README table."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import sys

import pytest
import torch
from tolerances import tol

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kernels.csv"


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    pytest.importorskip("ot")
    path = tmp_path_factory.mktemp("bench") / "kernels.csv"
    bench = _load("bench_kernels")
    assert bench.main(["--device", "cpu", "--quick", "--min-run-time", "0.01", "--out", str(path)]) == 0
    with open(path) as f:
        return path, list(csv.DictReader(f))


def test_quick_cpu_run_writes_every_case_method_and_pass(quick_csv):
    _, rows = quick_csv
    bench = _load("bench_kernels")
    assert list(rows[0]) == bench.COLUMNS
    got = {(r["regime"], int(r["rows"]), int(r["n"]), r["method"], r["pass"]) for r in rows}
    cases = [("aot", 1, n) for n in bench.QUICK_SIZES] + [("w2", 1, n) for n in bench.QUICK_SIZES]
    cases += [("w2", r, n) for r, n in bench.QUICK_BATCHED]
    methods = {
        "aot": ("otloss_torch", "minimal", "minimal_stable", "trl_eager"),
        "w2": ("otloss_torch", "eager", "eager_stable", "pot"),
    }
    want = {(g, r, n, m, p) for g, r, n in cases for m in methods[g] for p in ("fwd", "bwd", "full")}
    assert got == want  # no kernel rows without a GPU, no torch.compile rows by default on the CPU
    for r in rows:
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert r["device"].startswith("CPU") and r["torch"] == torch.__version__
        size = 4 if r["dtype"] == "float32" else 2
        n_in = (4 if r["regime"] == "aot" else 2 * int(r["rows"])) * int(r["n"])
        n_grad = 2 * int(r["rows"]) * int(r["n"])
        assert int(r["bytes"]) == size * {"fwd": n_in, "bwd": n_grad, "full": n_in + n_grad}[r["pass"]]
        # special: the CSV keeps 6 significant digits of each number, so derived columns agree to that, not to a dtype
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (p50 * 1e-3) / 1e9, rel=1e-3)
    # speed-ups are the baseline's median over the method's, from the same run
    for r in rows:
        base = bench.BASELINE[r["regime"]]
        b = next(x for x in rows if (x["regime"], x["rows"], x["n"], x["pass"], x["method"])
                 == (r["regime"], r["rows"], r["n"], r["pass"], base))  # fmt: skip
        assert float(r["speedup"]) == pytest.approx(float(b["ms_p50"]) / float(r["ms_p50"]), rel=1e-3)  # 6 digits


def test_trl_formula_is_what_the_reference_path_computes():
    import otloss

    bench = _load("bench_kernels")
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(35, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    torch.testing.assert_close(bench.trl_formula(pc, pr, rc, rr), otloss.aot_loss(pc, pr, rc, rr, beta=bench.BETA))
    torch.testing.assert_close(bench.minimal_formula(pc, pr, rc, rr), otloss.aot_loss(pc, pr, rc, rr, beta=bench.BETA))
    u, v = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(3, 50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(bench.eager_w2(u, v), otloss.ot_h_1d(u, v, otloss.abs_pow(2.0)))
    pytest.importorskip("ot")
    torch.testing.assert_close(bench.pot_w2(u, v), bench.eager_w2(u, v))


def test_the_stable_formulas_give_otloss_gradient_among_ties():
    # the stable-sort baselines compute what otloss computes, tie order included; the plain ones need not
    import otloss

    bench = _load("bench_kernels")
    ties = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, -0.0, 2.0, 0.0], dtype=torch.float64)
    pc, pr = ties.clone().requires_grad_(True), torch.zeros(8, dtype=torch.float64, requires_grad=True)
    rc, rr = torch.arange(8.0, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    ours = torch.autograd.grad(otloss.aot_loss(pc, pr, rc, rr, beta=bench.BETA), (pc, pr))
    stable = torch.autograd.grad(bench.minimal_formula(pc, pr, rc, rr, stable=True), (pc, pr))
    for a, b in zip(ours, stable):
        torch.testing.assert_close(a, b, **tol(torch.float64, "ulp"))
    u, v = ties.reshape(1, 8).requires_grad_(True), torch.arange(8.0, dtype=torch.float64).reshape(1, 8)
    ours = torch.autograd.grad(otloss.ot_h_1d(u, v, otloss.abs_pow(2.0)), u)[0]
    stable = torch.autograd.grad(bench.eager_w2(u, v, stable=True), u)[0]
    torch.testing.assert_close(ours, stable, **tol(torch.float64, "ulp"))


def test_bench_refuses_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        _load("bench_kernels").main(["--device", "cuda", "--quick"])


def test_plot_and_table_read_the_csv(quick_csv, tmp_path):
    pytest.importorskip("matplotlib")
    path, rows = quick_csv
    out = tmp_path / "k.png"
    assert _load("plot_kernels").main([str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    text = _load("summarize_kernels").table(rows)
    assert "| float32 | 1 x 32 |" in text and "| float32 | 1 x 1 |" in text  # n = 1: the per-call overhead
    assert "`minimal`" in text and "`trl_eager`" in text and "`pot`" in text
    median = next(
        r for r in rows if (r["regime"], r["n"], r["method"], r["pass"]) == ("aot", "32", "trl_eager", "full")
    )
    assert f"{float(median['ms_p50']):.3f} (" in text


def test_summary_keeps_the_newest_run_of_each_device():
    summarize = _load("summarize_kernels")
    base = {"regime": "aot", "dtype": "float32", "rows": "1", "n": "35", "pass": "full", "commit": "c", "torch": "t"}
    base |= {"ms_p20": "1", "ms_p80": "1", "speedup": "1", "floor_ms": "0.001", "method": "trl_eager"}
    rows = [
        base | {"device": "A", "time": "2026-01-01", "ms_p50": "9.0"},
        base | {"device": "A", "time": "2026-02-01", "ms_p50": "1.0"},
        base | {"device": "B", "time": "2026-01-15", "ms_p50": "5.0"},
    ]
    runs = summarize.latest_runs(rows)
    assert {d: [r["ms_p50"] for r in run] for d, run in runs.items()} == {"A": ["1.0"], "B": ["5.0"]}
    # one CPU timed with 2 threads, then with 1: one machine, the newest run shown
    rows += [
        base | {"device": "CPU X (2 threads)", "time": "2026-01-01", "ms_p50": "3.0"},
        base | {"device": "CPU X (1 threads)", "time": "2026-03-01", "ms_p50": "4.0"},
    ]
    runs = summarize.latest_runs(rows)
    assert {d: [r["ms_p50"] for r in run] for d, run in runs.items()} == {
        "A": ["1.0"],
        "B": ["5.0"],
        "CPU X (1 threads)": ["4.0"],
    }
    with pytest.raises(ValueError, match="no <!-- kernels-table:begin -->"):
        summarize.replace_block("no markers", "x")
    assert summarize.replace_block(f"a {summarize.BEGIN}old{summarize.END} b", "new\n") == (
        f"a {summarize.BEGIN}\nnew\n{summarize.END} b"
    )


@pytest.mark.skipif(not RESULTS.exists(), reason="no committed benchmark results")
def test_readme_table_is_generated_from_the_committed_csv():
    summarize = _load("summarize_kernels")
    with open(RESULTS) as f:
        block = summarize.table(list(csv.DictReader(f)))
    readme = (ROOT / "README.md").read_text()
    assert summarize.replace_block(readme, block) == readme, (
        "run: python benchmarks/summarize_kernels.py --readme README.md"
    )


@pytest.mark.requires_triton
@pytest.mark.parametrize("regime", ["aot", "w2"])
def test_kernel_cases_compute_what_the_reference_cases_compute(regime):
    # the GPU run's kernel cases, built here on whatever device runs the kernels (CPU: the interpreter)
    pytest.importorskip("triton")
    bench = _load("bench_kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for method in ("otloss_triton", "otloss_torch", bench.BASELINE[regime]):
        loss_fn, inputs, _, _ = bench._case(regime, method, 3, 40, torch.float32, device)
        loss = loss_fn()
        results[method] = (loss.detach(), torch.autograd.grad(loss, inputs))
    for method in ("otloss_triton", "otloss_torch"):
        torch.testing.assert_close(
            results[method][0], results[bench.BASELINE[regime]][0], **tol(torch.float32, "parity")
        )
        for a, b in zip(results[method][1], results[bench.BASELINE[regime]][1]):
            # gradients are h'/n with n = 40, far below 1: atol scaled to their size
            torch.testing.assert_close(a, b, **tol(torch.float32, "parity", scale=0.1))
