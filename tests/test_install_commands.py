"""Every install command in the package, the docs and the examples installs this project or a named third party.

The registry's ``otloss`` is an unrelated project: ``pip install otloss`` or ``pip install 'otloss[trl]'`` would
install it. This project's distribution is ``torch-otloss`` (``pip install "torch-otloss[trl]"``), or a checkout
(``pip install -e ".[trl]"``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", ".in"}
SKIP_DIRS = {
    ".git",
    ".venv",
    ".venv-latest",
    ".venv-lock",
    "build",
    "dist",
    "site",
    "outputs",
    ".pytest_cache",
    ".hypothesis",
}
FORBIDDEN = {"otloss"}  # the unrelated project on the registry
COMMAND = re.compile(r"pip3?\s+install\s+([^\n`\"]*(?:\"[^\"\n]*\"[^\n`\"]*)*)")


def _files():
    for path in ROOT.rglob("*"):
        if path.is_file() and (path.suffix in SUFFIXES or path.name == "Makefile"):
            if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
                yield path


def _named_distributions(args: str) -> list[str]:
    """The distribution names a ``pip install`` argument string asks for (options and paths left out)."""
    args = re.split(r"\s#", args, maxsplit=1)[0]  # a shell comment after the command
    args = re.split(r"[);:,]", args, maxsplit=1)[0]  # prose after a command in a message
    try:
        tokens = shlex.split(args, posix=True)
    except ValueError:
        tokens = args.split()
    names = []
    for token in tokens:
        token = token.strip("'\"`),;")
        if not token or token.startswith(("-", ".", "/", "$", "<", "{")) or "/" in token:
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", token)
        if match:
            names.append(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def find_bad_commands() -> list[str]:
    bad = []
    for path in _files():
        if path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in COMMAND.finditer(text):
            if FORBIDDEN.intersection(_named_distributions(match.group(1))):
                line = text.count("\n", 0, match.start()) + 1
                bad.append(f"{path.relative_to(ROOT)}:{line}: {match.group(0).strip()}")
    return bad


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ("pip install 'otloss[trl]'", ["otloss"]),
        ('pip install "torch-otloss[trl]"', ["torch-otloss"]),
        ('pip install -e ".[trl]"', []),
        ("pip install --no-build-isolation torchsort", ["torchsort"]),
        ("pip install -U otloss", ["otloss"]),
        ("pip install -c $(LOCK) -e .", []),
        ("pip install torch  # any build; otloss needs torch", ["torch"]),
        ('pip install "torch-otloss[pot]"): timing otloss only', ["torch-otloss"]),
        ("pip install 'otloss[pot]'): timing", ["otloss"]),
    ],
)
def test_command_parser(command, names):
    assert _named_distributions(COMMAND.match(command).group(1)) == names


def test_no_install_command_names_another_project():
    bad = find_bad_commands()
    assert not bad, "install commands that fetch the unrelated registry project 'otloss':\n" + "\n".join(bad)


def test_distribution_name_is_ours():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "torch-otloss"
    for extra in meta["optional-dependencies"].get("dev", []):
        assert extra.startswith("torch-otloss[") or not extra.startswith("otloss")
