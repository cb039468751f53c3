"""The examples are run from the repository root (``python -m examples.imdb``): put the root on ``sys.path``.

``python -m pytest`` from the root already does; a bare ``pytest`` or another working directory does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
