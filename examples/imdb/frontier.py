"""Multi-seed experiment: reward-against-KL frontiers, the batch-size effect, and global-batch sorting.

The demo's single run compares the methods at one ``beta``, where they sit at
different KL distances from the reference. This experiment sweeps ``beta`` for
every method and several seeds, so that rewards can be compared at matched KL.

Parts (``--parts``, all by default):

- ``frontier``: every method in :data:`~examples.imdb.losses.METHODS` times its beta
  grid (:data:`BETA_GRIDS`, or ``--betas`` for every method) times every ``--seeds``
  seed; one row per (method, beta, seed) in ``frontier.csv``, plus the reference policy
  once per seed (``beta`` empty, KL 0). The grids differ so that every method's KL range
  meets the others': the AOT losses stay far from the reference unless ``beta`` is
  large, IPO stays close unless ``beta`` is small.
- ``batch_size``: paired AOT at each ``--batch-sizes`` value under two designs, a
  fixed number of training samples seen (``design=samples``: ``steps * 32 / batch``
  steps) and a fixed number of optimizer steps (``design=steps``); rows in
  ``batch_size.csv``.
- ``global_batch``: paired AOT on 2 CPU processes (gloo) at a global batch of 32,
  sorting the global batch (``design=global_2proc``, ``global_batch=True``) or each
  process's 16 (``design=local_2proc``); rows in ``batch_size.csv``. Process 0 draws
  the same samples as a single-process run at batch 32, so ``global_2proc`` should
  match ``design=steps`` at batch 32 up to float roundoff.
- ``repro``: two cells of the frontier run again (``frontier_repro.csv``); ``report``
  checks that they are identical.

A seed sets the alignment's batch order and the evaluation's sampling; the scorer,
the reference policy and the preference data are the demo's (seed 0) and are built
once, then read from the demo's cache. Cells already in the CSVs are skipped, so an
interrupted sweep resumes. ``report`` reads the CSVs and the saved reward samples and
writes the plots and ``frontier.md``.

    python -m examples.imdb.frontier run             # the committed sweep (about 1.5-2 h on a 2-core CPU)
    python -m examples.imdb.frontier report --figures docs/assets   # tables, dominance tests, plots
    python -m examples.imdb.frontier run --size tiny --seeds 0,1 --betas 0.1,1 --out /tmp/f   # seconds

Run from the repository root with the demo extras installed (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .cli import _positive_float, _positive_int
from .losses import METHODS

__all__ = ["build_parser", "experiment_config", "main", "make_tasks", "task_key"]

PARTS = ("frontier", "batch_size", "global_batch", "repro")
_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
#: the frontier's beta grid per method (chosen from a first pass over ``_GRID`` so that the KL ranges overlap)
BETA_GRIDS: dict[str, tuple[float, ...]] = {
    **{m: _GRID for m in METHODS},
    **{m: (*_GRID, 10.0) for m in ("aot_paired", "aot_unpaired", "plot_aot")},
    "ipo": (0.01, *_GRID),
}
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128)
BASE_BATCH = 32  # the frontier's batch, the samples design's reference batch and the global batch
REPRO_CELLS = (("aot_paired", 0.1, 0), ("dpo", 0.1, 0))
FRONTIER_COLUMNS = (
    "method beta seed batch_size steps kl mean_reward reward_q10 reward_q50 reward_q90 final_loss seconds"
).split()
BATCH_COLUMNS = (
    "design method beta seed batch_size steps kl mean_reward reward_q10 reward_q50 reward_q90 final_loss seconds"
).split()
RESULTS = Path("benchmarks/results")


def experiment_config(
    size: str = "small",
    *,
    align_steps: int | None = None,
    eval_prompts: int | None = None,
    cache_dir: str = "outputs/cache",
):
    """The demo preset the experiment runs at: ``small`` with 60 alignment steps and 512 held-out prompts.

    The held-out prompts are the first ``eval_prompts`` of the demo's (its preference cache is reused).
    """
    from .pipeline import preset

    cfg = preset(size, progress=False, threads=1, cache_dir=cache_dir)
    steps = align_steps or (60 if size == "small" else cfg.align_steps)
    n_eval = eval_prompts or (512 if size == "small" else cfg.n_eval_prompts)
    if n_eval > cfg.n_eval_prompts:
        raise ValueError(f"eval_prompts must be at most the preset's {cfg.n_eval_prompts}, got {n_eval}")
    return replace(cfg, align_steps=steps), n_eval


def task_key(t: dict) -> str:
    beta = "" if t["beta"] is None else f"{t['beta']:g}"
    return f"{t['part']}|{t['design']}|{t['method']}|{beta}|{t['seed']}|{t['batch_size']}|{t['steps']}"


def make_tasks(
    parts, methods, betas, seeds, batch_sizes, steps: int, beta: float, base_batch: int = BASE_BATCH
) -> list[dict]:
    """The single-process cells, seed by seed (so a partial sweep has whole grids for its first seeds).

    ``betas`` is one grid for every method, or ``None`` for :data:`BETA_GRIDS`.
    """
    out = []

    def add(part, design, method, b, seed, bs, n_steps):
        out.append(dict(part=part, design=design, method=method, beta=b, seed=seed, batch_size=bs, steps=n_steps))

    for seed in seeds:
        if "frontier" in parts:
            add("frontier", "frontier", "reference", None, seed, base_batch, 0)
            for m in methods:
                for b in BETA_GRIDS[m] if betas is None else betas:
                    add("frontier", "frontier", m, b, seed, base_batch, steps)
        if "batch_size" in parts:
            for bs in batch_sizes:
                add("batch_size", "samples", "aot_paired", beta, seed, bs, max(1, round(steps * base_batch / bs)))
                add("batch_size", "steps", "aot_paired", beta, seed, bs, steps)
    if "repro" in parts:
        for m, b, seed in REPRO_CELLS:
            if m in methods:
                add("repro", "frontier", m, b, seed, base_batch, steps)
    return out


# ---------------------------------------------------------------------------- workers

_STATE: dict = {}


def _load(cfg, n_eval: int) -> dict:
    from .data import load_reviews
    from .pipeline import _Log, get_preferences, get_reference, get_scorer

    torch.set_num_threads(cfg.threads)
    log = _Log(False)
    device = torch.device("cpu")
    reviews = load_reviews(cfg.n_scorer_train, cfg.n_test_reviews, cfg.seed)
    scorer, _ = get_scorer(cfg, reviews, log)
    ref, tok, _, _ = get_reference(cfg, reviews, device, log)
    data, _ = get_preferences(cfg, reviews, ref, tok, scorer, device, log)
    data["eval"] = {k: (v[:n_eval] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in data["eval"].items()}
    return dict(cfg=cfg, log=log, scorer=scorer, ref=ref, tok=tok, data=data, device=device)


def _init_worker(cfg, n_eval: int) -> None:
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        _STATE.update(_load(cfg, n_eval))


def _summary(rewards: torch.Tensor) -> dict:
    r = rewards.double()
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return dict(mean_reward=float(r.mean()), reward_q10=float(q[0]), reward_q50=float(q[1]), reward_q90=float(q[2]))


def _run_task(t: dict) -> tuple[dict, np.ndarray]:
    from .pipeline import align, evaluate

    s = _STATE
    start = time.perf_counter()
    run_cfg = replace(
        s["cfg"],
        seed=s["cfg"].seed + 1000 * t["seed"],
        align_steps=max(1, t["steps"]),
        beta=t["beta"] if t["beta"] is not None else s["cfg"].beta,
    )
    torch.manual_seed(run_cfg.seed)
    if t["method"] == "reference":
        policy, curve = s["ref"], [float("nan")]
    else:
        policy, curve = align(
            run_cfg, t["method"], s["ref"], s["data"], s["device"], s["log"], batch_size=t["batch_size"]
        )
    ev = evaluate(run_cfg, t["method"], policy, s["ref"], s["tok"], s["scorer"], s["data"], s["device"], s["log"])
    row = dict(t, kl=float(ev["kl"]), final_loss=float(curve[-1]), seconds=time.perf_counter() - start)
    row.update(_summary(ev["rewards"]))
    return row, ev["rewards"].numpy().astype(np.float64)


# ---------------------------------------------------------------------------- 2-process global batch


def _global_worker(rank: int, world: int, cfg, n_eval: int, tasks: list[dict], port: int, out_file: str) -> None:
    import io

    import torch.distributed as dist

    import otloss

    from .model import completion_logps
    from .pipeline import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with contextlib.redirect_stdout(io.StringIO()):
        s = _load(cfg, n_eval)
    tr = s["data"]["train"]
    n = len(tr["prompts"])
    rows = []
    for t in tasks:
        start = time.perf_counter()
        run_cfg = replace(cfg, seed=cfg.seed + 1000 * t["seed"], beta=t["beta"], align_steps=t["steps"])
        torch.manual_seed(run_cfg.seed)
        policy = copy.deepcopy(s["ref"])
        policy.train()
        opt = torch.optim.AdamW(policy.parameters(), lr=run_cfg.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(run_cfg.seed + 2)  # the single-process align()'s batch order
        local = t["batch_size"] // world
        loss = torch.zeros(())
        for _ in range(run_cfg.align_steps):
            i = torch.randint(0, n, (t["batch_size"],), generator=gen)[rank * local : (rank + 1) * local]
            prompts = torch.cat([tr["prompts"][i], tr["prompts"][i]])
            comps = torch.cat([tr["chosen"][i], tr["rejected"][i]])
            lp = completion_logps(policy, prompts, comps)
            loss = otloss.aot_loss(
                lp[:local],
                lp[local:],
                tr["ref_chosen"][i],
                tr["ref_rejected"][i],
                paired=True,
                beta=run_cfg.beta,
                global_batch=t["design"] == "global_2proc",
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in policy.parameters():  # DDP's averaging of the gradients
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
        policy.eval()
        if rank == 0:
            ev = evaluate(
                run_cfg, "aot_paired", policy, s["ref"], s["tok"], s["scorer"], s["data"], s["device"], s["log"]
            )
            row = dict(t, kl=float(ev["kl"]), final_loss=float(loss.detach()), seconds=time.perf_counter() - start)
            row.update(_summary(ev["rewards"]))
            rows.append((row, ev["rewards"].numpy().astype(np.float64).tolist()))
        dist.barrier()
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _run_global(cfg, n_eval: int, tasks: list[dict], out: Path) -> list[tuple[dict, np.ndarray]]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_file = out / ".global_batch_rows.json"
    mp.start_processes(
        _global_worker, args=(2, cfg, n_eval, tasks, port, str(out_file)), nprocs=2, start_method="spawn"
    )
    rows = json.loads(out_file.read_text())
    out_file.unlink()
    return [(r, np.asarray(x)) for r, x in rows]


# ---------------------------------------------------------------------------- storage


def _done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {r["key"] for r in csv.DictReader(f)}


def _append(path: Path, columns: list[str], row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", *columns], extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in {**row, "key": task_key(row)}.items()})


def _save_rewards(path: Path, new: dict[str, np.ndarray]) -> None:
    old = dict(np.load(path)) if path.exists() else {}
    old.update(new)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **old)
    os.replace(tmp, path)


def _provenance(cfg, n_eval: int, workers: int) -> dict:
    import platform

    import otloss

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.provenance import commit, cpu_name, version

    return {
        "commit": commit(),
        "machine": f"{os.cpu_count()}-core CPU {cpu_name()} ({platform.machine()}), no GPU; "
        f"{workers} worker processes of 1 thread",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "otloss": otloss.__version__,
        "scikit-learn": version("sklearn", "scikit-learn"),
        "config": {**asdict(cfg), "n_eval_prompts_used": n_eval},
    }


def run(args: argparse.Namespace) -> int:
    cfg, n_eval = experiment_config(
        args.size, align_steps=args.steps, eval_prompts=args.eval_prompts, cache_dir=args.cache_dir
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # build the caches once, before the workers
        _load(replace(cfg, threads=2), n_eval)
    tasks = make_tasks(args.parts, args.methods, args.betas, args.seeds, args.batch_sizes, cfg.align_steps, args.beta)
    fr, bs_csv, rep_csv = out / "frontier.csv", out / "batch_size.csv", out / "frontier_repro.csv"
    rew = out / "frontier_rewards.npz"
    done = _done(fr) | _done(bs_csv) | _done(rep_csv)
    todo = [t for t in tasks if task_key(t) not in done]
    meta_path = out / "frontier_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("runs", []).append(
        {**_provenance(cfg, n_eval, args.workers), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    )
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"{len(todo)} of {len(tasks)} single-process cells to run on {args.workers} workers", flush=True)
    t0 = time.perf_counter()
    if todo:
        import multiprocessing as mp

        from tqdm.auto import tqdm

        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(cfg, n_eval)) as pool:
            bar = tqdm(pool.imap_unordered(_run_task, todo), total=len(todo), disable=args.no_progress, file=sys.stderr)
            for row, rewards in bar:
                # the rewards first: a row in a CSV (a cell that resuming skips) always has its samples saved
                _save_rewards(rew, {task_key(row): rewards})
                path = {"batch_size": bs_csv, "repro": rep_csv}.get(row["part"], fr)
                _append(path, BATCH_COLUMNS if path is bs_csv else FRONTIER_COLUMNS, row)
                bar.set_postfix_str(f"{row['method']} beta={row['beta']} seed={row['seed']} kl={row['kl']:.1f}")
    if "global_batch" in args.parts:
        gtasks = [
            dict(
                part="global_batch",
                design=d,
                method="aot_paired",
                beta=args.beta,
                seed=s,
                batch_size=BASE_BATCH,
                steps=cfg.align_steps,
            )
            for s in args.seeds
            for d in ("global_2proc", "local_2proc")
        ]
        gtasks = [t for t in gtasks if task_key(t) not in done]
        if gtasks:
            print(f"{len(gtasks)} two-process cells", flush=True)
            results = _run_global(cfg, n_eval, gtasks, out)
            _save_rewards(rew, {task_key(r): x for r, x in results})
            for row, _ in results:
                _append(bs_csv, BATCH_COLUMNS, row)
    wall = time.perf_counter() - t0
    meta["runs"][-1]["wall_seconds"] = round(wall, 1)
    meta["runs"][-1]["cells"] = len(todo)
    meta_path.write_text(json.dumps(meta, indent=2))
    print(f"done in {wall / 60:.1f} min; next: python -m examples.imdb.frontier report --out {out}")
    return 0


# ---------------------------------------------------------------------------- CLI


def _float_list(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or not all(v > 0 and math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {s!r}")
    return vals


def _int_list(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {s!r}")
    return vals


def _choices(allowed: tuple[str, ...], what: str):
    def parse(s: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in s.split(",") if x.strip())
        bad = [x for x in names if x not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or [s]}; choose from {list(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.imdb.frontier", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the sweep (resumes: cells already in the CSVs are skipped)")
    r.add_argument("--size", choices=("tiny", "small"), default="small", help="demo preset")
    r.add_argument("--parts", type=_choices(PARTS, "part"), default=PARTS, help=f"comma-separated subset of {PARTS}")
    r.add_argument("--methods", type=_choices(tuple(METHODS), "method"), default=tuple(METHODS))
    r.add_argument("--betas", type=_float_list, help="one beta grid for every method (default: BETA_GRIDS, per method)")
    r.add_argument("--beta", type=_positive_float, default=0.1, help="beta of the batch-size and global-batch parts")
    r.add_argument("--seeds", type=_int_list, default=DEFAULT_SEEDS)
    r.add_argument("--batch-sizes", type=_int_list, default=DEFAULT_BATCH_SIZES)
    r.add_argument("--steps", type=_positive_int, help="alignment steps (default: 60 for small, the preset's for tiny)")
    r.add_argument("--eval-prompts", type=_positive_int, help="held-out prompts (default: 512 for small)")
    r.add_argument("--workers", type=_positive_int, default=2, help="worker processes (1 torch thread each)")
    r.add_argument("--out", default=str(RESULTS))
    r.add_argument("--cache-dir", default="outputs/cache", help="the demo's cache of scorer, reference and data")
    r.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="plots, tables and dominance tests from the CSVs")
    rep.add_argument("--out", default=str(RESULTS))
    rep.add_argument(
        "--bootstrap", type=_positive_int, default=1000, help="bootstrap replicates of the dominance tests"
    )
    rep.add_argument("--figures", help="where the PNGs go (default: --out)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be at least 1")
    from . import require_extras

    require_extras()
    if args.command == "run":
        return run(args)
    from .frontier_report import report

    return report(Path(args.out), n_bootstrap=args.bootstrap, figures=Path(args.figures) if args.figures else None)


if __name__ == "__main__":
    raise SystemExit(main())
