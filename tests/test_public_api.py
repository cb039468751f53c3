"""The public API: ``__all__`` resolves, and ``import otloss`` needs only torch and numpy."""

from __future__ import annotations

import subprocess
import sys

import otloss


def test_star_import_resolves_every_name():
    ns: dict = {}
    exec("from otloss import *", ns)
    for name in otloss.__all__:
        assert name in ns, name
        assert ns[name] is getattr(otloss, name)
    assert len(set(otloss.__all__)) == len(otloss.__all__)


def test_submodule_all_lists_exist():
    import importlib

    for mod in [
        "costs",
        "coupling",
        "diagnostics",
        "dominance",
        "entropic",
        "functional",
        "modules",
        "sliced",
        "sorting",
        "tokens",
    ]:
        m = importlib.import_module(f"otloss.{mod}")
        for name in m.__all__:
            assert hasattr(m, name), f"otloss.{mod}.{name}"


def test_import_needs_only_torch_and_numpy():
    code = (
        "import sys, otloss\n"
        "bad = [m for m in ('scipy', 'ot', 'torchsort', 'triton', 'trl', 'transformers', 'lightning', 'hypothesis',"
        " 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import otloss pulled in optional packages: {out}"


def test_readme_example_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["loss"].ndim == 0 and ns["u"].grad is not None
    assert ns["w1"].shape == (8,)
    assert 0.0 <= float(ns["area"]) <= 1.0


def test_readme_beyond_one_dimension_example_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "sliced_ot" in b]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    assert ns["sw"].ndim == 0 and float(ns["sw"]) > 0
    ns["sw"].backward()
    assert ns["x"].grad is not None and ns["x"].grad.shape == (500, 3)
    assert ns["ent"].ndim == 0 and float(ns["ent"]) >= 0
    assert float(ns["r1"]) == 0.0  # chosen dominates rejected by construction: the exact 1-D ratio is 0
    assert float(ns["r"]) < 0.1  # the entropic ratio in 3 metrics is near 0
    ns["torch"].testing.assert_close(ns["otloss"].violation_ratio(ns["rejected"], ns["chosen"]), 1 - ns["r"])
