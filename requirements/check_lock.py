"""Fail when the environment holds a distribution that the lock does not pin, or pins at another version.

Usage: ``python requirements/check_lock.py requirements/lock.txt`` (the Makefile runs it after each install).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# The project itself and the installer's own tools are not locked.
NOT_LOCKED = {"torch-otloss", "pip"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not an exact pin: {line!r}")
        pins[canonical(name)] = version.strip()
    return pins


def main(path: str) -> int:
    pins = read_lock(path)
    problems = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in NOT_LOCKED:
            continue
        if name not in pins:
            problems.append(f"{name}=={dist.version} is installed but not in {path}")
        elif dist.version != pins[name]:
            problems.append(f"{name}=={dist.version} is installed but {path} pins {pins[name]}")
    if problems:
        print("\n".join(["The environment does not match the lock:", *problems]), file=sys.stderr)
        return 1
    print(f"environment matches {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements/lock.txt"))
