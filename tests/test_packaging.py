"""``otloss.integrations`` resolves from an editable install and from a built wheel, never as top-level ``integrations``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, json, otloss, otloss.integrations, otloss.ops;"
    "print(json.dumps({'otloss': otloss.__file__, 'integrations': otloss.integrations.__file__,"
    " 'trl': importlib.util.find_spec('otloss.integrations.trl').origin,"
    " 'top': importlib.util.find_spec('integrations') is not None}))"
)


def _probe(cwd, env=None):
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_editable_install_maps_integrations_folder(tmp_path):
    info = _probe(tmp_path)  # away from the repository root
    if not info["otloss"].startswith(str(ROOT)):
        pytest.skip("otloss is not installed editable from this checkout")
    assert pathlib.Path(info["integrations"]) == ROOT / "integrations" / "__init__.py"
    assert pathlib.Path(info["trl"]) == ROOT / "integrations" / "trl.py"
    assert info["top"] is False


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from this checkout (once per module)."""
    wheel_dir = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = wheel_dir.glob("*otloss-*.whl")  # otloss-... or torch_otloss-...
    return path


def test_wheel_does_not_ship_the_examples(wheel):
    # the IMDB demo and the other examples run from a checkout (python -m examples.imdb), outside the wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "otloss/__init__.py" in names
    shipped = [n for n in names if n.startswith(("otloss/demo/", "examples/", "otloss/examples/"))]
    assert not shipped, shipped


def test_wheel_contains_integrations_under_otloss(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "otloss/__init__.py",
        "otloss/py.typed",
        "otloss/ops/ot_sort.py",
        "otloss/integrations/__init__.py",
        "otloss/integrations/trl.py",
        "otloss/integrations/lightning.py",
        "otloss/integrations/_hf.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith("integrations/") for n in names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = dict(os.environ, PYTHONPATH=str(target))
    info = _probe(tmp_path, env)
    assert info["otloss"].startswith(str(target))
    assert pathlib.Path(info["trl"]) == target / "otloss" / "integrations" / "trl.py"
    assert info["top"] is False
