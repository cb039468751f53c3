"""Provenance of a benchmark row (the commit, the device, the versions) and the CSV it is appended to.

Shared by every benchmark script.
"""

from __future__ import annotations

import csv
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["append_csv", "commit", "cpu_name", "device_name", "version"]

ROOT = Path(__file__).resolve().parents[1]


def version(module: str, dist: str | None = None) -> str:
    """``module.__version__``, else the installed distribution's version; ``""`` when ``module`` is missing."""
    try:
        mod = __import__(module)
    except ImportError:
        return ""
    found = getattr(mod, "__version__", None)
    if found is not None:
        return str(found)
    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def commit(*paths: str) -> str:
    """The short commit, with ``-dirty`` when tracked files differ from it (only ``paths`` when given)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=ROOT, capture_output=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu", *, threads: bool = True) -> str:
    """The GPU's name, or ``CPU <model> (<n> threads)``."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)" if threads else f"CPU {cpu_name()}"


def append_csv(
    rows: list[dict], path: Path, columns: list[str] | tuple[str, ...], *, short_floats: bool = True
) -> None:
    """Append ``rows`` to the CSV at ``path`` (header first when the file is new); floats as ``%.6g`` by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if short_floats and isinstance(v, float) else v) for k, v in row.items()})
