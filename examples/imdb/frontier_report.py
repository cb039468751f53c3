"""Analysis of ``python -m examples.imdb.frontier run``: plots, matched-KL comparisons, dominance tests.

Statistics, all over seeds unless said otherwise (a seed is one independent alignment run);
SciPy, which the demo extra installs with scikit-learn, gives the t and Welch tests:

- Bands and intervals are Student-t 95% intervals of a mean over the seeds.
- A method's frontier on one seed: the betas that no other beta beats with less KL and more
  mean reward (:func:`efficient`), interpolated linearly in log KL.
- Rewards at a matched KL are read as a budget: the frontier at that KL, flat beyond its last
  point (:func:`matched_kl`). Two methods are compared with Welch's t-test over seeds, and
  the p-values of all pairs at one budget get Holm's correction.
- The distributional claim: for each method the frontier beta (seed means) with the most
  reward within 1.25 times the budget, the held-out rewards of its seeds pooled, then
  ``otloss.dominance.dominance_test`` (first-order violation ratio, squared-hinge cost,
  bootstrap interval) and bootstrap intervals of the quantile differences. The bootstrap
  resamples the pooled rewards, so it treats the seeds as one population.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

from .losses import METHODS, REFERENCE, colors, label

__all__ = ["kl_targets", "load_rows", "matched_kl", "report", "summary_table", "t_interval"]

QUANTILE_COLUMNS = (
    ("mean_reward", "mean reward"),
    ("reward_q10", "10th percentile"),
    ("reward_q50", "median"),
    ("reward_q90", "90th percentile"),
)
REWARD_COLUMNS = tuple(c for c, _ in QUANTILE_COLUMNS)
BATCH_METRICS = ("mean_reward", "kl", "violation")  # the batch-size and global-batch tables' columns
LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # quantile levels of the distributional comparison
KL_MATCH = 1.25  # a beta is within a KL budget when its mean KL is at most this factor times the budget


def load_rows(path: Path) -> list[dict]:
    """Rows of a results CSV with numbers parsed (``beta`` is ``None`` for the reference)."""
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r)
            for k, v in r.items():
                if k in ("key", "method", "design"):
                    continue
                row[k] = None if v == "" else (int(v) if k in ("seed", "batch_size", "steps") else float(v))
            out.append(row)
    return out


def t_interval(x) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval of the values ``x`` (the interval is the mean itself for one value)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


def efficient(points: list[tuple]) -> list[tuple]:
    """The frontier of ``(kl, reward, ...)`` points: in KL order, those with more reward than every point of less KL.

    A point with more KL and no more reward than another (a ``beta`` that moves further from the
    reference for nothing) is not on the trade-off curve.
    """
    out, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            out.append(p)
            best = p[1]
    return out


def _per_seed_curves(rows: list[dict], method: str, column: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per seed, the KLs and ``column`` of the betas on that seed's frontier (by mean reward)."""
    out = {}
    for seed in sorted({r["seed"] for r in rows if r["method"] == method}):
        pts = efficient(
            [
                (r["kl"], r["mean_reward"], r[column])
                for r in rows
                if r["method"] == method and r["seed"] == seed and r["kl"] > 0
            ]
        )
        out[seed] = (np.array([p[0] for p in pts]), np.array([p[2] for p in pts]))
    return out


def matched_kl(rows: list[dict], method: str, column: str, kl: float) -> list[float]:
    """Per seed, ``column`` at a KL budget ``kl``: the best the seed's frontier reaches within it.

    The frontier (:func:`efficient`) is interpolated linearly in log KL between its betas and is
    flat beyond its last one (a larger budget than the method uses buys nothing more). Seeds whose
    frontier starts above ``kl`` are left out.
    """
    vals = []
    for x, y in _per_seed_curves(rows, method, column).values():
        if not len(x) or x.min() > kl:
            continue
        vals.append(float(y[-1]) if kl >= x.max() else float(np.interp(math.log(kl), np.log(x), y)))
    return vals


def kl_targets(rows: list[dict], methods: list[str], k: int = 3) -> tuple[list[float], str]:
    """``k`` KL budgets to compare the methods at, log-spaced, and a sentence saying how they were chosen.

    From the largest of the methods' smallest frontier KLs (every method reaches it) to the largest
    frontier KL of any method.
    """
    ranges = {m: [kl for _, kl, _ in _frontier_betas(rows, m) if kl > 0] for m in methods}
    ranges = {m: (min(r), max(r)) for m, r in ranges.items() if r}
    if not ranges:
        return [], "No method has a positive KL."
    lo, hi = max(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
    targets = [float(t) for t in np.geomspace(lo, hi, k)] if lo < hi else [lo]
    return targets, (
        f"Each method's frontier (per seed, the betas not beaten by a beta of less KL and more mean reward) "
        f"is read at KL budgets from {lo:.1f} nats, the smallest every method reaches, to {hi:.1f}, the "
        f"largest any reaches: interpolated linearly in log KL between its betas and flat beyond its last one."
    )


def summary_table(rows: list[dict], methods: list[str], targets: list[float]) -> list[str]:
    """Mean held-out reward at each KL budget, one row per method: mean over seeds, 95% interval, seeds."""
    out = ["| method | " + " | ".join(f"KL {t:.1f}" for t in targets) + " |", "|---|" + "---:|" * len(targets)]
    for m in methods:
        cells = []
        for t in targets:
            vals = matched_kl(rows, m, "mean_reward", t)
            cells.append(f"{_fmt_ci(*t_interval(vals))} ({len(vals)})" if len(vals) >= 2 else "-")
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return out


def _holm(p: list[float]) -> list[float]:
    order = np.argsort(p)
    adj, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


def _beta_means(rows: list[dict], method: str) -> list[tuple[float, float, list[dict]]]:
    """(beta, mean KL over seeds, rows) per beta of ``method``, in KL order."""
    out = []
    for b in sorted({r["beta"] for r in rows if r["method"] == method}):
        rs = [r for r in rows if r["method"] == method and r["beta"] == b]
        out.append((b, float(np.mean([r["kl"] for r in rs])), rs))
    return sorted(out, key=lambda t: t[1])


def _frontier_betas(rows: list[dict], method: str) -> list[tuple[float, float, list[dict]]]:
    """:func:`_beta_means` restricted to the frontier of the seed means (KL, mean reward)."""
    means = [(kl, float(np.mean([r["mean_reward"] for r in rs])), b, rs) for b, kl, rs in _beta_means(rows, method)]
    return [(b, kl, rs) for kl, _, b, rs in efficient(means)]


def _plot_frontier(rows: list[dict], methods: list[str], ref_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = colors()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for ax, (column, title) in zip(axes.flat, QUANTILE_COLUMNS):
        for m in methods:
            c = col[label(m)]
            rs = [r for r in rows if r["method"] == m]
            ax.scatter([r["kl"] for r in rs], [r[column] for r in rs], s=9, alpha=0.35, color=c, linewidths=0)
            # every beta's seed mean (open markers); the line and band join the betas on the frontier
            means = [(kl, t_interval([r[column] for r in g])[0]) for _, kl, g in _beta_means(rows, m)]
            ax.scatter([p[0] for p in means], [p[1] for p in means], s=22, facecolors="none", edgecolors=c)
            pts = [(kl, *t_interval([r[column] for r in g])) for _, kl, g in _frontier_betas(rows, m)]
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", ms=4, color=c, label=label(m))
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=c, alpha=0.15, linewidth=0)
        if ref_rows:
            ax.axhline(float(np.mean([r[column] for r in ref_rows])), color="black", ls="--", lw=1, label=REFERENCE)
        ax.set_xscale("log")
        ax.set_title(f"held-out reward: {title}")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("KL(policy || reference), nats (Monte Carlo, held-out prompts)")
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.suptitle(
        "Reward against KL over each method's beta grid: seed means (circles), the frontier of the betas not "
        "beaten by one of less KL\n(lines, 95% t-bands over seeds) and single seeds (dots)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_batch(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for design, c in (("samples", "tab:green"), ("steps", "tab:blue")):
        rs = [r for r in rows if r["design"] == design]
        sizes = sorted({r["batch_size"] for r in rs})
        for ax, column in zip(axes, ("mean_reward", "kl", "violation")):
            stats = [t_interval([r[column] for r in rs if r["batch_size"] == b]) for b in sizes]
            ax.plot(sizes, [s[0] for s in stats], marker="o", color=c, label=f"fixed {design}")
            ax.fill_between(sizes, [s[1] for s in stats], [s[2] for s in stats], color=c, alpha=0.15, linewidth=0)
    for ax, ylabel in zip(
        axes, ("held-out mean reward", "KL(policy || reference)", "FSD violation ratio of policy over reference")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sorted batch size (AOT paired)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Batch size under a fixed number of samples and a fixed number of steps (95% t-bands over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_ci(m: float, lo: float, hi: float, spec: str = "{:.3f}") -> str:
    return f"{spec.format(m)} [{spec.format(lo)}, {spec.format(hi)}]"


def _cells(rows: list[dict], columns) -> str:
    """Table cells: each column's mean over ``rows`` with its t-interval (KL to 0.1 nat, the rest to 0.001)."""
    return " | ".join(
        _fmt_ci(*t_interval([r[c] for r in rows]), spec="{:.1f}" if c == "kl" else "{:.3f}") for c in columns
    )


def _quantile_diffs(x: np.ndarray, y: np.ndarray, n_boot: int, gen: np.random.Generator) -> list[tuple]:
    lv = np.asarray(LEVELS)
    d = np.quantile(x, lv) - np.quantile(y, lv)
    boots = np.stack(
        [
            np.quantile(x[gen.integers(0, len(x), len(x))], lv) - np.quantile(y[gen.integers(0, len(y), len(y))], lv)
            for _ in range(n_boot)
        ]
    )
    lo, hi = np.quantile(boots, 0.025, axis=0), np.quantile(boots, 0.975, axis=0)
    return list(zip(LEVELS, d, lo, hi))


def report(out: Path, n_bootstrap: int = 1000, figures: Path | None = None) -> int:
    """Write ``frontier.md`` into ``out`` and ``frontier.png``, ``frontier_batch_size.png`` into ``figures``.

    ``figures`` defaults to ``out``.
    """
    from scipy import stats

    import otloss

    fr = load_rows(out / "frontier.csv")
    if not fr:
        raise SystemExit(f"error: no rows in {out / 'frontier.csv'}; run python -m examples.imdb.frontier run first")
    meta = json.loads((out / "frontier_meta.json").read_text()) if (out / "frontier_meta.json").exists() else {}
    rewards = dict(np.load(out / "frontier_rewards.npz"))
    ref_rows = [r for r in fr if r["method"] == "reference"]
    rows = [r for r in fr if r["method"] != "reference"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Reward against KL: AOT, PLOT, DPO, IPO and KTO over beta and seeds", ""]
    grids = {m: sorted({r["beta"] for r in rows if r["method"] == m}) for m in methods}
    lines += _provenance_lines(meta, seeds, grids)

    # --- frontier table: per method and beta, mean KL and rewards with t-intervals
    figures = out if figures is None else figures
    figures.mkdir(parents=True, exist_ok=True)
    _plot_frontier(rows, methods, ref_rows, figures / "frontier.png")
    lines += [
        "## Every cell (mean over seeds, 95% t-interval)",
        "",
        "| method | beta | seeds | KL | mean reward | 10th pct | median | 90th pct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if ref_rows:
        lines.append(f"| reference | - | {len(ref_rows)} | 0 | {_cells(ref_rows, REWARD_COLUMNS)} |")
    for m in methods:
        for b, _, rs in sorted(_beta_means(rows, m), key=lambda t: t[0]):
            lines.append(f"| {label(m)} | {b:g} | {len(rs)} | {_cells(rs, ('kl', *REWARD_COLUMNS))} |")
    lines.append("")

    # --- matched KL
    targets, scope = kl_targets(rows, methods)
    lines += ["## Rewards at matched KL (within a KL budget)", "", scope, ""]
    lines += [*summary_table(rows, methods, targets), ""]
    verdicts = []
    for target in targets:
        lines += [
            f"### KL budget {target:.1f} nats",
            "",
            "| method | seeds | " + " | ".join(t for _, t in QUANTILE_COLUMNS) + " |",
            "|---|---:|" + "---:|" * len(QUANTILE_COLUMNS),
        ]
        per = {m: {c: matched_kl(rows, m, c, target) for c, _ in QUANTILE_COLUMNS} for m in methods}
        for m in methods:
            cells = [_fmt_ci(*t_interval(per[m][c])) if per[m][c] else "-" for c, _ in QUANTILE_COLUMNS]
            lines.append(f"| {label(m)} | {len(per[m]['mean_reward'])} | " + " | ".join(cells) + " |")
        pairs = [
            (a, b)
            for i, a in enumerate(methods)
            for b in methods[i + 1 :]
            if len(per[a]["mean_reward"]) >= 2 and len(per[b]["mean_reward"]) >= 2
        ]
        pv = [
            float(stats.ttest_ind(per[a]["mean_reward"], per[b]["mean_reward"], equal_var=False).pvalue)
            for a, b in pairs
        ]
        adj = _holm(pv) if pv else []
        reached = [m for m in methods if per[m]["mean_reward"]]
        if not reached:
            lines += ["", "No seed's curve reaches this KL.", ""]
            continue
        best = max(reached, key=lambda m: np.mean(per[m]["mean_reward"]))
        beats = [b if a == best else a for (a, b), p in zip(pairs, adj) if best in (a, b) and p < 0.05]
        others = [m for m in methods if m != best and per[m]["mean_reward"]]
        sig = [f"{label(a)} vs {label(b)} (Holm p = {p:.3g})" for (a, b), p in zip(pairs, adj) if p < 0.05]
        lines += [
            "",
            f"Highest mean reward: **{label(best)}**; significantly above "
            f"{len(beats)} of the {len(others)} others at Holm-corrected 5% "
            f"({', '.join(label(m) for m in beats) or 'none'}).",
            f"Significant pairwise differences in mean reward: {'; '.join(sig) or 'none'}.",
            "",
        ]
        verdicts.append((target, best, len(beats) == len(others) and bool(others)))
    lines += [
        "**Summary.** "
        + " ".join(
            f"At KL {t:.1f}: {label(b)} is highest"
            + (
                " and significantly above every other method."
                if d
                else ", but not significantly above every other method."
            )
            for t, b, d in verdicts
        )
        if verdicts
        else "",
        "",
    ]

    # --- distributional claim
    lines += _dominance_section(rows, methods, targets, rewards, n_bootstrap, otloss)
    # --- batch size and global batch
    lines += _batch_section(out, rewards, otloss, figures)
    # --- reproducibility
    lines += _repro_section(out, fr, rewards)
    lines += [
        f"Figures: `{figures / 'frontier.png'}` (reward against KL), `{figures / 'frontier_batch_size.png'}` "
        "(batch size).",
        "",
    ]
    (out / "frontier.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _provenance_lines(meta: dict, seeds: list[int], grids: dict[str, list[float]]) -> list[str]:
    runs = meta.get("runs", [])
    if not runs:
        return ["Provenance: unknown (no frontier_meta.json).", ""]
    first, last = runs[0], runs[-1]
    commits = sorted({r["commit"] for r in runs})
    wall = sum(r.get("wall_seconds", 0.0) for r in runs)
    cfg = last["config"]
    return [
        f"- Machine: {last['machine']}.",
        f"- Versions: Python {last['python']}, torch {last['torch']}, numpy {last['numpy']}, "
        f"scikit-learn {last['scikit-learn']}, otloss {last['otloss']}; commit(s) {', '.join(commits)}.",
        f"- Sweep wall time: {wall / 60:.0f} min over {len(runs)} invocation(s), started {first['started']}.",
        f"- Setting: the demo's `{cfg['size']}` preset ({cfg['d_model']}-wide, {cfg['n_layer']}-layer character GPT), "
        f"{cfg['align_steps']} alignment steps of batch 32 at learning rate {cfg['lr']:g}, "
        f"{cfg['n_eval_prompts_used']} held-out prompts; seeds {seeds}.",
        "- Beta grids: " + "; ".join(f"{label(m)} {', '.join(f'{b:g}' for b in g)}" for m, g in grids.items()) + ".",
        "- Command: `python -m examples.imdb.frontier run`, then `python -m examples.imdb.frontier report`.",
        *([f"- Note: {meta['note']}"] if meta.get("note") else []),
        "",
    ]


def _dominance_section(rows, methods, targets, rewards, n_bootstrap, otloss) -> list[str]:
    aots = [m for m in ("aot_paired", "aot_unpaired") if m in methods]
    if not aots or not targets:
        return []
    lines = [
        "## Does AOT's reward distribution dominate the others' within the same KL budget?",
        "",
        "For each method, the beta of its frontier (seed means) with the most reward among those whose mean "
        f"KL is at most {KL_MATCH:g} times the budget; the held-out rewards of its seeds pooled. "
        "`ratio` is the first-order violation ratio of AOT over the other method "
        "(`otloss.dominance.dominance_test`, squared-hinge cost: 0 = AOT dominates, 0.5 = neither, "
        f"1 = the other dominates) with its 95% bootstrap interval ({n_bootstrap} replicates). "
        "`quantiles` counts the levels 0.05, 0.10, ..., 0.95 where the 95% bootstrap interval of "
        "Q_AOT - Q_other is above 0 / contains 0 / is below 0.",
        "",
        "| KL budget | AOT | vs | KL (AOT / other) | ratio [95% CI] | relative dominance | quantiles + / 0 / - |",
        "|---:|---|---|---|---|---|---|",
    ]
    gen = torch.Generator().manual_seed(0)
    ngen = np.random.default_rng(0)
    for target in targets:
        pick = {}
        for m in methods:
            within = [t for t in _frontier_betas(rows, m) if t[1] <= KL_MATCH * target]
            if within:  # the frontier's last beta within the budget: its most rewarded one
                b, kl, rs = within[-1]
                pick[m] = (b, kl, np.concatenate([rewards[r["key"]] for r in rs]))
        missing = [label(m) for m in methods if m not in pick]
        if missing:
            lines.append(
                f"| {target:.1f} | no frontier beta within {KL_MATCH:g} x this budget: {', '.join(missing)} | | | | | |"
            )
        for a in aots:
            for o in methods:
                if o == a or a not in pick or o not in pick:
                    continue
                x, y = pick[a][2], pick[o][2]
                res = otloss.dominance.dominance_test(
                    torch.from_numpy(x), torch.from_numpy(y), n_bootstrap=n_bootstrap, generator=gen
                )
                q = _quantile_diffs(x, y, min(n_bootstrap, 500), ngen)
                up = sum(lo > 0 for _, _, lo, _ in q)
                down = sum(hi < 0 for _, _, _, hi in q)
                lines.append(
                    f"| {target:.1f} | {label(a)} (beta {pick[a][0]:g}) | {label(o)} (beta {pick[o][0]:g}) | "
                    f"{pick[a][1]:.1f} / {pick[o][1]:.1f} | {res.ratio:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] | "
                    f"{'yes' if res.relative else 'no'} | {up} / {len(q) - up - down} / {down} |"
                )
    lines.append("")
    return lines


def _batch_section(out: Path, rewards: dict, otloss, figures: Path) -> list[str]:
    from scipy import stats

    rows = load_rows(out / "batch_size.csv")
    if not rows:
        return []
    ref = {r["seed"]: rewards[r["key"]] for r in load_rows(out / "frontier.csv") if r["method"] == "reference"}
    for r in rows:
        base = ref.get(r["seed"])
        r["violation"] = (
            float(otloss.dominance.violation_ratio(torch.from_numpy(rewards[r["key"]]), torch.from_numpy(base)))
            if base is not None
            else float("nan")
        )
    lines = [
        "## Batch size (paired AOT, beta from the run; the paper's Figure 2 question)",
        "",
        "`samples`: every batch size sees the same number of training pairs (fewer steps for larger batches). "
        "`steps`: every batch size takes the same number of steps. `violation` is the first-order violation "
        "ratio of the policy's held-out rewards over the reference's (same seed); lower is better. Slopes are "
        "least-squares fits against log2(batch size) over every seed, with 95% intervals.",
        "",
        "| design | batch | steps | seeds | mean reward | KL | violation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    single = [r for r in rows if r["design"] in ("samples", "steps")]
    for design in ("samples", "steps"):
        for b in sorted({r["batch_size"] for r in single if r["design"] == design}):
            rs = [r for r in single if r["design"] == design and r["batch_size"] == b]
            lines.append(f"| {design} | {b} | {rs[0]['steps']} | {len(rs)} | {_cells(rs, BATCH_METRICS)} |")
    lines.append("")
    for design in ("samples", "steps"):
        rs = [r for r in single if r["design"] == design]
        if len({r["batch_size"] for r in rs}) < 3:
            continue
        x = np.log2([r["batch_size"] for r in rs])
        parts = []
        for c in ("mean_reward", "violation", "kl"):
            fit = stats.linregress(x, [r[c] for r in rs])
            h = stats.t.ppf(0.975, len(rs) - 2) * fit.stderr
            parts.append(f"{c} {fit.slope:+.4f} [{fit.slope - h:+.4f}, {fit.slope + h:+.4f}] (p = {fit.pvalue:.3g})")
        lines.append(f"- Slope per doubling, fixed {design}: " + "; ".join(parts) + ".")
    if single:
        _plot_batch(single, figures / "frontier_batch_size.png")
    g = {d: {r["seed"]: r for r in rows if r["design"] == d} for d in ("global_2proc", "local_2proc")}
    if g["global_2proc"] and g["local_2proc"]:
        common = sorted(set(g["global_2proc"]) & set(g["local_2proc"]))
        one = {r["seed"]: r for r in single if r["design"] == "steps" and r["batch_size"] == 32}
        lines += [
            "",
            "### Global-batch sorting across 2 CPU processes (gloo), global batch 32",
            "",
            "| sorting | seeds | mean reward | KL | violation |",
            "|---|---:|---:|---:|---:|",
        ]
        for d, name in (
            ("global_2proc", "global batch of 32 (`global_batch=True`)"),
            ("local_2proc", "each process its 16"),
        ):
            rs = [g[d][s] for s in common]
            lines.append(f"| {name} | {len(rs)} | {_cells(rs, BATCH_METRICS)} |")
        if len(common) >= 2:
            diff = [g["global_2proc"][s]["mean_reward"] - g["local_2proc"][s]["mean_reward"] for s in common]
            p = float(
                stats.ttest_rel(
                    [g["global_2proc"][s]["mean_reward"] for s in common],
                    [g["local_2proc"][s]["mean_reward"] for s in common],
                ).pvalue
            )
            lines.append("")
            lines.append(
                f"Global minus per-process mean reward, paired by seed (same samples): "
                f"{_fmt_ci(*t_interval(diff))}, paired t-test p = {p:.3g}."
            )
        both = [s for s in common if s in one]
        if both:
            dk = max(abs(g["global_2proc"][s]["kl"] - one[s]["kl"]) for s in both)
            dr = max(abs(g["global_2proc"][s]["mean_reward"] - one[s]["mean_reward"]) for s in both)
            lines.append(
                f"Same samples on one process at batch 32 (`design=steps`): largest difference over "
                f"{len(both)} seeds {dk:.2g} nats of KL and {dr:.2g} in mean reward (float roundoff in the "
                "batched forward and the gradient all-reduce, compounded over the steps)."
            )
    lines.append("")
    return lines


def _repro_section(out: Path, fr: list[dict], rewards: dict) -> list[str]:
    rep = load_rows(out / "frontier_repro.csv")
    if not rep:
        return []
    lines = ["## Reproducibility: the same cell run twice on this machine", ""]
    for r in rep:
        key = r["key"].replace("repro|", "frontier|", 1)
        twin = next((f for f in fr if f["key"] == key), None)
        if twin is None:
            lines.append(f"- {label(r['method'])} beta {r['beta']:g} seed {r['seed']}: no frontier twin.")
            continue
        same = np.array_equal(rewards[r["key"]], rewards[key]) and r["kl"] == twin["kl"]
        same = same and r["final_loss"] == twin["final_loss"]
        lines.append(
            f"- {label(r['method'])} beta {r['beta']:g} seed {r['seed']}: rewards of all "
            f"{len(rewards[key])} samples, KL and final loss "
            f"{'identical' if same else 'DIFFERENT'} (KL {twin['kl']:.6f} and {r['kl']:.6f})."
        )
    lines.append("")
    return lines
