"""Command line of ``python -m examples.imdb`` (run from the repository root)."""

from __future__ import annotations

import argparse
import sys

from .losses import METHODS, PLOT_ALPHA

__all__ = ["build_parser", "config_from_args", "main"]

METHOD_NAMES = list(METHODS)
SIZES = ("auto", "tiny", "small", "medium", "large")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {s}")
    return v


def _methods(s: str) -> tuple[str, ...]:
    if s == "all":
        return tuple(METHOD_NAMES)
    names = tuple(m.strip() for m in s.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or [s]}; choose from {METHOD_NAMES} or 'all'")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"methods are repeated in {s!r}")
    return names


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.imdb",
        description=(
            "Pretrain a small character GPT on IMDB reviews (the reference policy), build paired and unpaired "
            "preference data from its completions scored by a sentiment classifier, align it with "
            f"{', '.join(m.label for m in METHODS.values())}, and compare the held-out reward distributions."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default="auto",
        help="preset: tiny (seconds, for tests), small (minutes on a CPU), medium/large (a GPU); "
        "auto = medium on CUDA, small otherwise",
    )
    p.add_argument("--methods", type=_methods, default="all", help=f"comma-separated subset of {METHOD_NAMES}, or all")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of data split, initialisation and sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (CUDA, then MPS, then CPU)")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads")
    p.add_argument("--pretrain-steps", type=_positive_int, help="reference pretraining steps (default: the preset's)")
    p.add_argument(
        "--align-steps", type=_positive_int, help="optimisation steps per alignment method (default: the preset's)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help="preference pairs (or desirable/undesirable samples) per step; "
        "AOT sorts over this batch (default: the preset's)",
    )
    p.add_argument("--lr", type=_positive_float, help="alignment learning rate (default: the preset's)")
    p.add_argument("--beta", type=_positive_float, help="beta of every loss (default: the preset's)")
    p.add_argument(
        "--plot-alpha",
        type=_nonneg_float,
        help=f"weight alpha of the token-level OT term of the PLOT methods, L = L_base + alpha * L_PLOT "
        f"(default: {PLOT_ALPHA})",
    )
    p.add_argument("--train-prompts", type=_positive_int, help="prompts with a preference pair (default: the preset's)")
    p.add_argument("--eval-prompts", type=_positive_int, help="held-out prompts for evaluation (default: the preset's)")
    p.add_argument("--out", default="outputs/demo", help="output directory for plots and tables")
    p.add_argument(
        "--cache-dir", default="outputs/cache", help="where the scorer, reference and preference data are cached"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def config_from_args(args: argparse.Namespace):
    from .pipeline import preset, resolve_device

    device = resolve_device(args.device)
    size = args.size
    if size == "auto":
        size = "medium" if device.type == "cuda" else "small"
    overrides = {
        "methods": args.methods if isinstance(args.methods, tuple) else _methods(args.methods),
        "seed": args.seed,
        "device": str(device),
        "threads": args.threads,
        "out_dir": args.out,
        "cache_dir": args.cache_dir,
        "use_cache": not args.no_cache,
        "progress": not args.no_progress,
    }
    for arg, name in (
        ("pretrain_steps", "pretrain_steps"),
        ("align_steps", "align_steps"),
        ("batch_size", "batch_size"),
        ("lr", "lr"),
        ("beta", "beta"),
        ("plot_alpha", "plot_alpha"),
        ("train_prompts", "n_train_prompts"),
        ("eval_prompts", "n_eval_prompts"),
    ):
        v = getattr(args, arg)
        if v is not None:
            overrides[name] = v
    return preset(size, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import require_extras

    try:
        require_extras()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .pipeline import run_demo, validate_config

    try:
        cfg = config_from_args(args)
        validate_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    run_demo(cfg)
    return 0
