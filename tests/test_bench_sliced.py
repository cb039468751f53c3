"""The sliced-OT benchmark as a smoke step: a quick CPU run, its CSV and its Markdown summary."""

from __future__ import annotations

import csv
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sliced", ROOT / "benchmarks" / "bench_sliced.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.requires_pot
def test_quick_cpu_run_writes_every_case_method_and_pass(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "sliced.csv"
    argv = ["--device", "cpu", "--quick", "--rounds", "5", "--block-ms", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == bench.COLUMNS
    cases = {(str(b), str(n), str(m), str(d), str(L), str(w)) for b, n, m, d, L, w in bench.QUICK_CASES}
    got = {(r["batch"], r["n"], r["m"], r["d"], r["L"], r["weighted"], r["method"], r["pass"]) for r in rows}
    assert got == {(*c, meth, p) for c in cases for meth in bench.METHODS for p in bench.PASSES}
    for r in rows:
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert r["device"].startswith("CPU") and r["rounds"] == "5" and r["pot"]
        # special: the benchmark's own float32 agreement limit (benchmarks/bench_sliced.py), checked on its CSV
        assert float(r["rel_diff"]) <= 1e-4  # otloss and POT agree on the case they were timed on
        base = next(x for x in rows if x["method"] == bench.BASELINE and x["pass"] == r["pass"] and x["n"] == r["n"])
        assert float(r["speedup"]) == pytest.approx(float(base["ms_p50"]) / p50, rel=1e-4)  # CSV: 6 digits
    capsys.readouterr()
    assert bench.main(["--summarize", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| float32 |") == len(bench.QUICK_CASES)


def test_without_pot_only_otloss_is_timed_and_checked_against_float64(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "_version", lambda module: "" if module == "ot" else "1")
    out = tmp_path / "sliced.csv"
    argv = ["--device", "cpu", "--quick", "--rounds", "5", "--block-ms", "1", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "POT is not installed" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"otloss", "otloss_unchecked"}
    assert all(r["pot"] == "" and r["speedup"] == "" and float(r["rel_diff"]) <= 1e-4 for r in rows)  # bench's limit
    assert bench.main(["--summarize", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "POT not installed" in table and table.count("| - |") == len(bench.QUICK_CASES)


def test_bad_arguments_are_refused(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "2", "--out", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0", "--out", str(tmp_path / "x.csv")])


def test_a_run_stopped_after_its_first_case_keeps_that_case_in_the_csv(tmp_path, monkeypatch):
    bench = _bench()
    timed = bench.time_interleaved
    calls = []

    def stop_at_the_second(*args, **kwargs):  # a time limit reached while the second case is timed
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return timed(*args, **kwargs)

    monkeypatch.setattr(bench, "time_interleaved", stop_at_the_second)
    out = tmp_path / "sliced.csv"
    argv = ["--device", "cpu", "--quick", "--rounds", "5", "--block-ms", "1", "--threads", "1", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    first = bench.QUICK_CASES[0]
    assert {(r["batch"], r["n"], r["m"]) for r in rows} == {(str(first[0]), str(first[1]), str(first[2]))}
    assert len(rows) == len({(r["method"], r["pass"]) for r in rows}) >= 2 * len(bench.PASSES)
