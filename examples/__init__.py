"""Examples that use otloss, run from the repository root of a checkout (not part of the wheel).

* :mod:`examples.imdb`: ``python -m examples.imdb``, AOT, PLOT, DPO, IPO and KTO on IMDB reviews, and
  ``python -m examples.imdb.frontier``, the multi-seed experiment: reward against KL over a beta grid,
  the sorted batch size, and global-batch sorting on 2 processes.
"""

__all__: list[str] = []
