"""Batch-size ablation for AOT (the direction of the paper's Figure 2).

AOT sorts the policy and reference margins (paired) or the chosen and rejected
log-ratios (unpaired) within each mini-batch, so the batch size is the number of
samples from which the quantiles are estimated. This script aligns the demo's
reference policy (``python -m examples.imdb``) with AOT at several batch sizes and
reports, on held-out prompts, the FSD violation of the policy's reward
distribution over the reference's, the mean reward, the win rate and the KL.

The scorer, reference GPT and preference data come from the demo's cache (they
are built first if missing). ``--budget samples`` (default) gives every batch size
the same number of preference samples (fewer steps for larger batches, as with
a fixed number of epochs); ``--budget steps`` gives every batch size the same
number of steps.

    python -m examples.imdb.ablation_batch_size                 # CPU default, a few minutes
    python -m examples.imdb.ablation_batch_size --size medium --batch-sizes 4,16,64,256 --seeds 0,1,2   # a GPU

Run from the repository root, with the demo extras installed (``pip install -e ".[demo]"``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .losses import METHODS, label

__all__ = ["main", "parse_args"]

# the methods whose loss sorts over the batch: the ones whose batch size this ablation varies
SORTING_METHODS = tuple(name for name, m in METHODS.items() if m.sorts_batch)


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {s!r}")
    return vals


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.imdb.ablation_batch_size",
        description=__doc__.split("\n\n")[0],
        formatter_class=_Formatter,
    )
    p.add_argument("--size", choices=("auto", "tiny", "small", "medium", "large"), default="auto", help="demo preset")
    p.add_argument(
        "--batch-sizes", type=_int_list, help="sorted batch sizes (default: 4,16,64 on CPU, 4,16,64,256 on CUDA)"
    )
    p.add_argument(
        "--methods", default=SORTING_METHODS[0], help=f"comma-separated subset of {','.join(SORTING_METHODS)}"
    )
    p.add_argument(
        "--budget", choices=("samples", "steps"), default="samples", help="what is held fixed across batch sizes"
    )
    p.add_argument(
        "--samples",
        type=_positive_int,
        help="preference samples per run with --budget samples (default: the number of training pairs)",
    )
    p.add_argument(
        "--steps", type=_positive_int, help="steps per run with --budget steps (default: the preset's align steps)"
    )
    p.add_argument("--seeds", type=_int_list, default=[0], help="alignment seeds (batch order) averaged per batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--out", default="outputs/ablation_batch_size")
    p.add_argument("--cache-dir", default="outputs/cache")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in SORTING_METHODS]
    if not methods or bad:
        p.error(f"--methods takes a subset of {','.join(SORTING_METHODS)}, got {args.methods!r}")
    args.methods = methods
    if args.batch_sizes is not None and min(args.batch_sizes) < 1:
        p.error("batch sizes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import require_extras

    require_extras()
    from .data import load_reviews
    from .pipeline import (
        _Log,
        _metrics,
        align,
        evaluate,
        get_preferences,
        get_reference,
        get_scorer,
        machine_description,
        preset,
        resolve_device,
        validate_config,
    )

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = args.size if args.size != "auto" else ("medium" if device.type == "cuda" else "small")
    batch_sizes = args.batch_sizes or ([4, 16, 64, 256] if device.type == "cuda" else [4, 16, 64])
    cfg = preset(
        size,
        device=str(device),
        threads=args.threads,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    if max(batch_sizes) > cfg.n_train_prompts:
        print(f"error: batch sizes must not exceed the {cfg.n_train_prompts} training pairs", file=sys.stderr)
        return 2
    validate_config(cfg)
    torch.set_num_threads(cfg.threads)
    log = _Log(cfg.progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reviews = load_reviews(cfg.n_scorer_train, cfg.n_test_reviews, cfg.seed)
    scorer, _ = get_scorer(cfg, reviews, log)
    ref, tok, _, _ = get_reference(cfg, reviews, device, log)
    data, _ = get_preferences(cfg, reviews, ref, tok, scorer, device, log)
    ref_eval = evaluate(cfg, "reference", ref, ref, tok, scorer, data, device, log)
    samples = args.samples or cfg.n_train_prompts

    rows = []
    t0 = time.perf_counter()
    for method in args.methods:
        for bs in batch_sizes:
            steps = max(1, round(samples / bs)) if args.budget == "samples" else (args.steps or cfg.align_steps)
            per_seed = []
            for seed in args.seeds:
                run_cfg = replace(cfg, align_steps=steps, seed=cfg.seed + 1000 * seed)
                t = time.perf_counter()
                policy, curve = align(run_cfg, method, ref, data, device, log, batch_size=bs)
                ev = evaluate(cfg, method, policy, ref, tok, scorer, data, device, log)
                m = _metrics(method, ev, ref_eval)
                m.update(batch_size=bs, steps=steps, seed=seed, seconds=time.perf_counter() - t, final_loss=curve[-1])
                per_seed.append(m)
                rows.append(m)
            log(
                f"{label(method)} batch {bs:4d} ({steps} steps): FSD area "
                f"{statistics.mean(r['fsd_area'] for r in per_seed):.3f}, mean reward "
                f"{statistics.mean(r['mean_reward'] for r in per_seed):.3f}"
            )

    keys = [
        "method",
        "batch_size",
        "steps",
        "seed",
        "fsd_area",
        "fsd_w1",
        "mean_reward",
        "win_rate",
        "kl_to_ref",
        "margin_fsd_area",
        "dq10",
        "dq50",
        "dq90",
        "final_loss",
        "seconds",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ref_mean = float(ref_eval["rewards"].mean())
    summary = {
        "machine": machine_description(device),
        "size": size,
        "budget": args.budget,
        "samples": samples if args.budget == "samples" else None,
        "seeds": args.seeds,
        "reference_mean_reward": ref_mean,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))

    lines = [
        "| method | batch | steps | FSD area ↓ | FSD W1 ↓ | mean reward | win rate | KL(π‖ref) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agg = {}
    for method in args.methods:
        for bs in batch_sizes:
            rs = [r for r in rows if r["method"] == label(method) and r["batch_size"] == bs]
            mean = {
                k: statistics.mean(r[k] for r in rs)
                for k in ("fsd_area", "fsd_w1", "mean_reward", "win_rate", "kl_to_ref")
            }
            agg[(method, bs)] = mean
            lines.append(
                f"| {label(method)} | {bs} | {rs[0]['steps']} | {mean['fsd_area']:.3f} | {mean['fsd_w1']:.4f} | "
                f"{mean['mean_reward']:.3f} | {mean['win_rate']:.3f} | {mean['kl_to_ref']:.2f} |"
            )
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"Reference mean reward {ref_mean:.3f}; budget: {args.budget}; seeds {args.seeds}; {summary['machine']}.\n\n{table}\n"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in args.methods:
        xs = batch_sizes
        axes[0].plot(xs, [agg[(method, b)]["fsd_area"] for b in xs], marker="o", label=label(method))
        axes[1].plot(xs, [agg[(method, b)]["mean_reward"] for b in xs], marker="o", label=label(method))
    axes[1].axhline(ref_mean, color="black", ls="--", label="reference")
    for ax, ylabel in zip(axes, ("held-out FSD violation (area) vs reference", "held-out mean reward")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sorted batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"AOT batch-size ablation ({args.budget} held fixed)")
    fig.tight_layout()
    fig.savefig(out / "ablation_batch_size.png", dpi=110)
    plt.close(fig)

    print()
    print(table)
    print(f"\nPlot: {out / 'ablation_batch_size.png'}   tables: {out / 'results.md'}, {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
