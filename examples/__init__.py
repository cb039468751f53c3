"""Examples that use otloss, run from the repository root of a checkout (not part of the wheel).

* :mod:`examples.imdb`: ``python -m examples.imdb``, AOT, DPO, IPO and KTO on IMDB reviews, and
  ``python -m examples.imdb.ablation_batch_size``, the sorted-batch-size ablation.
"""

__all__: list[str] = []
