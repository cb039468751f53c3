"""``helpers.run_process``: a hung run prints every process's Python stacks, then fails or tries again."""

from __future__ import annotations

import sys
import textwrap

import pytest
from helpers import run_process

# A parent that starts a child and waits for it; both block in ``time.sleep`` unless ``flag`` exists.
HANG = textwrap.dedent(
    """
    import contextlib, pathlib, subprocess, sys, time
    if len(sys.argv) > 2:  # the child
        time.sleep(float(sys.argv[2]))
        sys.exit(0)
    flag = pathlib.Path(sys.argv[1])
    again = flag.exists()
    with contextlib.suppress(OSError):
        flag.touch()  # a later run finishes
    subprocess.run([sys.executable, __file__, str(flag), "0" if again else "600"], check=True)
    print("finished", again)
    """
)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "hang.py"
    path.write_text(HANG)
    return path


def test_a_hung_run_fails_with_the_stacks_of_each_process(script, tmp_path):
    never = tmp_path / "missing" / "flag"  # cannot be created: every run hangs
    with pytest.raises(pytest.fail.Exception) as info:
        run_process([sys.executable, str(script), str(never)], cwd=tmp_path, timeout=3)
    text = str(info.value)
    assert "hung for 3 s (try 1 of 1)" in text
    assert text.count("in <module>") >= 2  # the parent's stack and the child's
    assert "subprocess.py" in text  # the parent waits in subprocess.run


def test_a_second_try_runs_after_a_warning_that_holds_the_stacks(script, tmp_path):
    flag = tmp_path / "flag"
    with pytest.warns(RuntimeWarning, match=r"hung for 3 s \(try 1 of 2\)(?s:.*)in <module>"):
        proc = run_process([sys.executable, str(script), str(flag)], cwd=tmp_path, timeout=3, attempts=2)
    assert proc.stdout.strip() == "finished True"


def test_a_failing_run_fails_at_once_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match=r"exit code 3(?s:.*)boom"):
        run_process([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], cwd=tmp_path, attempts=2)
