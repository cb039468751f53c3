"""The reward: a sentiment scorer (TF-IDF + logistic regression) trained on the IMDB labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SentimentScorer", "train_scorer"]


@dataclass
class SentimentScorer:
    """``score(texts)`` is the logit of P(positive): higher means a more positive text."""

    pipeline: object
    test_accuracy: float
    n_train: int

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.pipeline.decision_function(texts), dtype=np.float64)


def train_scorer(
    train_text: list[str], train_label: list[int], test_text: list[str], test_label: list[int]
) -> SentimentScorer:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if len(set(train_label)) < 2:
        raise ValueError("the scorer needs both positive and negative training reviews")
    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=100_000, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=1000),
    )
    pipeline.fit(train_text, train_label)
    accuracy = float(pipeline.score(test_text, test_label))
    return SentimentScorer(pipeline=pipeline, test_accuracy=accuracy, n_train=len(train_text))
