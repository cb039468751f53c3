"""Quantile plots in the style of the paper's Figure 1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import otloss

__all__ = ["plot_quantiles"]


def plot_quantiles(
    values: dict[str, torch.Tensor],
    path: Path,
    *,
    title: str,
    ylabel: str,
    paired: Sequence[str],
    unpaired: Sequence[str],
    levels: Sequence[float],
    colors: dict[str, str] | None = None,
) -> Path:
    """Quantile functions of each policy against ``values["reference"]``, paired and unpaired methods apart.

    The top row shows ``Q(t)``; the bottom row ``Q_policy(t) - Q_reference(t)``, which is
    non-negative at every ``t`` exactly when the policy dominates the reference (FSD).
    ``colors`` maps a label to a matplotlib colour; ``None`` (or a missing label) uses matplotlib's cycle.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f"paired data: {', '.join(paired)}", paired), (f"unpaired data: {', '.join(unpaired)}", unpaired)]
    groups = [g for g in groups if g[1]]
    t = torch.tensor(levels, dtype=torch.float64)
    q = {k: otloss.quantile_function(v.double(), t) for k, v in values.items()}
    fig, axes = plt.subplots(2, len(groups), figsize=(6.2 * len(groups), 7.2), squeeze=False, sharex=True)
    for col, (name, methods) in enumerate(groups):
        top, bottom = axes[0, col], axes[1, col]
        top.plot(t, q["reference"], color="black", lw=2, ls="--", label="reference")
        bottom.axhline(0.0, color="black", lw=1.5, ls="--")
        for m in methods:
            c = (colors or {}).get(m)
            top.plot(t, q[m], color=c, lw=1.8, label=m)
            diff = q[m] - q["reference"]
            bottom.plot(t, diff, color=c, lw=1.8, label=m)
            bottom.fill_between(t, diff, 0, where=diff < 0, color=c, alpha=0.15, lw=0)
        top.set_title(name, fontsize=10)
        top.set_ylabel(ylabel)
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=9)
        bottom.set_ylabel("Q_policy(t) - Q_reference(t)")
        bottom.set_xlabel("quantile level t")
        bottom.grid(alpha=0.3)
    fig.suptitle(title + "\nbottom row >= 0 everywhere: the policy dominates the reference (shaded: violations)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
